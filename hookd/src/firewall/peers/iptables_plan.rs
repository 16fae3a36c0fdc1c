//! Pure planning for the iptables peers (no process is run here): what
//! `iptables -S` shows, which of its chains would drop a qnet network's
//! traffic, the accepts qnet wants there, and the inserts and deletes
//! that take the table from one to the other.
//!
//! Where the accepts go, by what the filter table holds:
//!
//! - Docker's `DOCKER-USER` exists: forwarding accepts go there (Docker
//!   documents it as the place for other software's rules; `FORWARD`
//!   jumps to it first, and dockerd keeps it across restarts);
//! - else `FORWARD` drops (policy `DROP`, or a last rule that drops or
//!   rejects everything — ufw, hand-written rules): the accepts go first
//!   in `FORWARD`;
//! - `INPUT` drops: DHCP, DNS and ICMP from the bridge go first in
//!   `INPUT` (DHCPv6 and ICMPv6 in `ip6 filter`).
//!
//! Nothing is added where nothing drops. Every rule carries the comment
//! [`super::marker`] of its network, which is how a later run (also after
//! kill -9) finds, keeps, moves or deletes it: no duplicates.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::Mode;

use super::head::{head_diff, Change};
use super::{libvirt_marker, marker, Family, LibvirtForward, Openings, MARKER_PREFIX};

/// The chain Docker makes for other software's forwarding rules.
pub const DOCKER_USER: &str = "DOCKER-USER";

/// A filter table as `iptables -S` prints it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FilterView {
    /// Built-in chains and their policy (`-P FORWARD DROP`).
    pub policies: BTreeMap<String, String>,
    /// Every chain, built-in or not.
    pub chains: BTreeSet<String>,
    /// Rules in order: chain, and the rest of the `-A CHAIN` line.
    pub rules: Vec<Rule>,
}

/// One rule: `-A CHAIN SPEC`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub chain: String,
    pub spec: String,
}

impl Rule {
    fn new(chain: &str, spec: String) -> Rule {
        Rule {
            chain: chain.to_owned(),
            spec,
        }
    }

    /// Whether this rule carries a qnet marker.
    pub fn is_ours(&self) -> bool {
        self.spec
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] == "--comment" && w[1].starts_with(MARKER_PREFIX))
    }

    /// The argv of `iptables -I CHAIN 1 …` / `-D CHAIN …` for it.
    pub fn args(&self, op: Op) -> Vec<String> {
        let mut args = vec!["-w".to_owned(), op.flag().to_owned(), self.chain.clone()];
        if op == Op::Insert {
            args.push("1".to_owned());
        }
        args.extend(self.spec.split_whitespace().map(str::to_owned));
        args
    }
}

/// One change to a filter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Delete,
}

impl Op {
    fn flag(self) -> &'static str {
        match self {
            Op::Insert => "-I",
            Op::Delete => "-D",
        }
    }
}

impl FilterView {
    /// Reads `iptables -S` output; lines it does not know are skipped.
    pub fn parse(listing: &str) -> FilterView {
        let mut view = FilterView::default();
        for line in listing.lines() {
            let mut words = line.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("-P"), Some(chain), Some(policy)) => {
                    view.chains.insert(chain.to_owned());
                    view.policies
                        .insert(chain.to_owned(), policy.trim().to_owned());
                }
                (Some("-N"), Some(chain), None) => {
                    view.chains.insert(chain.trim().to_owned());
                }
                (Some("-A"), Some(chain), Some(spec)) => {
                    view.rules.push(Rule::new(chain, unquote(spec)));
                }
                _ => {}
            }
        }
        view
    }

    /// Why `chain` drops what no earlier rule accepts: its policy, or a
    /// last rule that drops or rejects everything; `None` if it does not.
    pub fn drops(&self, chain: &str) -> Option<String> {
        if self.policies.get(chain).map(String::as_str) == Some("DROP") {
            return Some(format!("policy DROP of chain {chain}"));
        }
        let last = self.rules.iter().rev().find(|r| r.chain == chain)?;
        let unconditional = last.spec.starts_with("-j DROP") || last.spec.starts_with("-j REJECT");
        unconditional.then(|| format!("last rule of chain {chain}: `-A {chain} {}`", last.spec))
    }

    /// The rules carrying a qnet marker.
    pub fn ours(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.is_ours())
    }

    /// The chain our forwarding accepts belong in, if any.
    pub fn forward_chain(&self) -> Option<&'static str> {
        if self.chains.contains(DOCKER_USER) {
            Some(DOCKER_USER)
        } else if self.drops("FORWARD").is_some() {
            Some("FORWARD")
        } else {
            None
        }
    }
}

/// A rule's words with the quotes iptables-nft puts around every
/// comment (`--comment "qnet:lab"`; legacy prints none) taken off words
/// that need none, so both backends' listings compare equal to what we
/// insert, and the words can be passed back as arguments.
fn unquote(spec: &str) -> String {
    spec.split_whitespace()
        .map(
            |w| match w.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
                Some(inner) if !inner.is_empty() && !inner.contains(['"', '\\']) => inner,
                _ => w,
            },
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// libvirt's chain rejecting connections into its NAT and isolated
/// networks (its iptables backend; `FORWARD` jumps to it).
pub const LIBVIRT_FWI: &str = "LIBVIRT_FWI";

/// The accepts `what` needs in a filter table like `view`.
pub fn wanted(view: &FilterView, family: Family, what: &Openings) -> Vec<Rule> {
    let forward = view.forward_chain();
    let input = view.drops("INPUT").is_some();
    let mut rules = Vec::new();
    if family == Family::V4 && view.chains.contains(LIBVIRT_FWI) {
        rules.extend(what.libvirt.iter().map(libvirt_rule));
    }
    for net in what
        .networks
        .iter()
        .filter(|n| family == Family::V4 || n.ipv6)
    {
        let tag = format!("-m comment --comment {}", marker(&net.name));
        let br = &net.bridge;
        if let Some(chain) = forward {
            for spec in forward_specs(net.mode, br, &tag) {
                rules.push(Rule::new(chain, spec));
            }
        }
        // A LAN bridge carries the host's own addresses: opening DHCP and
        // DNS to the host there would open them to the whole LAN.
        if input && net.mode != Mode::Bridged {
            for spec in input_specs(family, br, &tag) {
                rules.push(Rule::new("INPUT", spec));
            }
        }
    }
    rules
}

/// The narrowest accept for one forward into a libvirt network: only
/// connections our table DNAT'ed, to that guest and port.
fn libvirt_rule(f: &LibvirtForward) -> Rule {
    let proto = f.proto.to_string();
    Rule::new(
        LIBVIRT_FWI,
        format!(
            "-d {}/32 -o {} -p {proto} -m {proto} --dport {} -m conntrack --ctstate DNAT -m comment --comment {} -j ACCEPT",
            f.guest,
            f.bridge,
            f.port,
            libvirt_marker(&f.network)
        ),
    )
}

fn forward_specs(mode: Mode, br: &str, tag: &str) -> Vec<String> {
    let out = format!("-i {br} {tag} -j ACCEPT");
    match mode {
        // Into the network: replies, and connections our table DNATs to a
        // guest (a port forward).
        Mode::Nat => vec![
            out,
            format!("-o {br} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT {tag} -j ACCEPT"),
        ],
        Mode::Routed => vec![out, format!("-o {br} {tag} -j ACCEPT")],
        // Nothing leaves or enters an isolated network through the host.
        Mode::Isolated => Vec::new(),
        // Only frames the bridge passes between its own ports (guests and
        // the uplink), which reach this chain when br_netfilter is loaded
        // (Docker loads it, and drops in FORWARD): never the host's own
        // traffic, nor anything routed from another interface.
        Mode::Bridged => vec![format!("-i {br} -o {br} {tag} -j ACCEPT")],
    }
}

fn input_specs(family: Family, br: &str, tag: &str) -> Vec<String> {
    let (dhcp, icmp) = match family {
        Family::V4 => (67, "icmp"),
        Family::V6 => (547, "ipv6-icmp"),
    };
    vec![
        format!("-i {br} -p udp -m udp --dport {dhcp} {tag} -j ACCEPT"),
        format!("-i {br} -p udp -m udp --dport 53 {tag} -j ACCEPT"),
        format!("-i {br} -p tcp -m tcp --dport 53 {tag} -j ACCEPT"),
        format!("-i {br} -p {icmp} {tag} -j ACCEPT"),
    ]
}

/// The changes that leave exactly `wanted` of our rules in `view`, each
/// ahead of every rule of others in its chain (see [`head_diff`]).
pub fn diff(view: &FilterView, wanted: &[Rule]) -> Vec<(Op, Rule)> {
    let listed: Vec<(Rule, bool)> = view
        .rules
        .iter()
        .map(|r| (r.clone(), r.is_ours()))
        .collect();
    head_diff(&listed, |r| r.chain.as_str(), wanted)
        .into_iter()
        .map(|change| match change {
            Change::Delete(i) => (Op::Delete, listed[i].0.clone()),
            Change::Insert(rule) => (Op::Insert, rule),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IfName, NetName};
    use std::str::FromStr;

    fn opened(name: &str, mode: Mode, ipv6: bool) -> Openings {
        Openings {
            networks: vec![super::super::Opened {
                name: NetName::from_str(name).unwrap(),
                bridge: IfName::from_str(&format!("br-{name}")).unwrap(),
                mode,
                ipv6,
            }],
            libvirt: Vec::new(),
        }
    }

    const DOCKER: &str =
        "-P INPUT ACCEPT\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n-N DOCKER\n-N DOCKER-USER\n\
        -A FORWARD -j DOCKER-USER\n-A FORWARD -o docker0 -j DOCKER\n-A DOCKER-USER -j RETURN\n";

    #[test]
    fn docker_gets_its_accepts_in_docker_user() {
        let view = FilterView::parse(DOCKER);
        assert_eq!(
            view.drops("FORWARD").as_deref(),
            Some("policy DROP of chain FORWARD")
        );
        let rules = wanted(&view, Family::V4, &opened("lab", Mode::Nat, false));
        let specs: Vec<String> = rules
            .iter()
            .map(|r| format!("-A {} {}", r.chain, r.spec))
            .collect();
        assert_eq!(
            specs,
            [
                "-A DOCKER-USER -i br-lab -m comment --comment qnet:lab -j ACCEPT",
                "-A DOCKER-USER -o br-lab -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -m comment --comment qnet:lab -j ACCEPT",
            ]
        );
        assert_eq!(
            rules[0].args(Op::Insert),
            [
                "-w",
                "-I",
                "DOCKER-USER",
                "1",
                "-i",
                "br-lab",
                "-m",
                "comment",
                "--comment",
                "qnet:lab",
                "-j",
                "ACCEPT"
            ]
        );
        // IPv4-only networks get nothing in ip6 filter.
        assert!(wanted(&view, Family::V6, &opened("lab", Mode::Nat, false)).is_empty());
    }

    #[test]
    fn a_final_reject_or_drop_policy_gets_accepts_first_in_that_chain() {
        let ufw = "-P INPUT DROP\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n-N ufw-before-forward\n-A FORWARD -j ufw-before-forward\n";
        let rules = wanted(
            &FilterView::parse(ufw),
            Family::V6,
            &opened("lab", Mode::Routed, true),
        );
        let chains: Vec<&str> = rules.iter().map(|r| r.chain.as_str()).collect();
        assert_eq!(
            chains,
            ["FORWARD", "FORWARD", "INPUT", "INPUT", "INPUT", "INPUT"]
        );
        assert!(rules[2].spec.contains("--dport 547"), "{rules:?}");
        assert!(rules[5].spec.contains("-p ipv6-icmp"), "{rules:?}");

        let reject = "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-A FORWARD -i eth0 -j ACCEPT\n-A FORWARD -j REJECT --reject-with icmp-host-prohibited\n";
        let view = FilterView::parse(reject);
        assert!(view.drops("FORWARD").unwrap().contains("-j REJECT"));
        assert_eq!(view.drops("INPUT"), None);
        assert_eq!(
            wanted(&view, Family::V4, &opened("iso", Mode::Isolated, false)),
            []
        );
        assert_eq!(
            wanted(&view, Family::V4, &opened("lab", Mode::Nat, false)).len(),
            2
        );
    }

    #[test]
    fn forwards_into_libvirt_networks_get_the_narrowest_accept_in_libvirt_fwi() {
        let libvirt = "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-N LIBVIRT_FWI\n-A FORWARD -j LIBVIRT_FWI\n\
            -A LIBVIRT_FWI -d 192.168.122.0/24 -o virbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
            -A LIBVIRT_FWI -o virbr0 -j REJECT --reject-with icmp-port-unreachable\n";
        let what = Openings {
            networks: Vec::new(),
            libvirt: vec![LibvirtForward {
                network: "default net".into(),
                bridge: IfName::from_str("virbr0").unwrap(),
                guest: "192.168.122.50".parse().unwrap(),
                proto: crate::api::Proto::Tcp,
                port: 80,
            }],
        };
        let view = FilterView::parse(libvirt);
        let rules = wanted(&view, Family::V4, &what);
        assert_eq!(
            rules,
            [Rule::new(
                "LIBVIRT_FWI",
                "-d 192.168.122.50/32 -o virbr0 -p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT \
                 -m comment --comment qnet:libvirt-default_net -j ACCEPT"
                    .into()
            )]
        );
        assert_eq!(wanted(&view, Family::V6, &what), []);
        // Without libvirt's chain (libvirtd not running): nothing.
        assert_eq!(wanted(&FilterView::default(), Family::V4, &what), []);
    }

    #[test]
    fn nothing_is_added_where_nothing_drops() {
        let open =
            "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n-A FORWARD -o eth9 -j DROP\n";
        assert_eq!(
            wanted(
                &FilterView::parse(open),
                Family::V4,
                &opened("lab", Mode::Nat, true)
            ),
            []
        );
    }

    #[test]
    fn diff_adopts_ours_deletes_stale_and_duplicates_and_inserts_the_rest() {
        // iptables-nft quotes comments, legacy does not.
        let head = DOCKER.strip_suffix("-A DOCKER-USER -j RETURN\n").unwrap();
        let listing = format!(
            "{head}-A DOCKER-USER -i br-lab -m comment --comment \"qnet:lab\" -j ACCEPT\n\
             -A DOCKER-USER -i br-lab -m comment --comment qnet:lab -j ACCEPT\n\
             -A DOCKER-USER -i br-old -m comment --comment qnet:old -j ACCEPT\n\
             -A DOCKER-USER -i br-x -m comment --comment \"someone else\" -j ACCEPT\n\
             -A DOCKER-USER -j RETURN\n"
        );
        let view = FilterView::parse(&listing);
        assert_eq!(view.ours().count(), 3);
        let want = wanted(&view, Family::V4, &opened("lab", Mode::Nat, false));
        let changes = diff(&view, &want);
        let shown: Vec<String> = changes
            .iter()
            .map(|(op, r)| format!("{op:?} {} {}", r.chain, r.spec))
            .collect();
        assert_eq!(
            shown,
            [
                "Delete DOCKER-USER -i br-lab -m comment --comment qnet:lab -j ACCEPT",
                "Delete DOCKER-USER -i br-old -m comment --comment qnet:old -j ACCEPT",
                "Insert DOCKER-USER -o br-lab -m conntrack --ctstate RELATED,ESTABLISHED,DNAT -m comment --comment qnet:lab -j ACCEPT",
            ]
        );
        // Applied, the same plan is a no-op.
        let mut done = view.clone();
        done.rules.retain(|r| !r.is_ours());
        done.rules.splice(0..0, want.iter().cloned());
        assert_eq!(diff(&done, &want), []);
        // Nothing wanted: every rule of ours goes.
        assert_eq!(diff(&view, &[]).len(), 3);
    }

    #[test]
    fn ours_behind_a_peers_rule_are_put_first_again() {
        // libvirt rebuilt its chain: its rules went in ahead of ours.
        let listing = "-N LIBVIRT_FWI\n-A LIBVIRT_FWI -o virbr0 -j REJECT\n\
            -A LIBVIRT_FWI -d 10.0.0.5/32 -m comment --comment qnet:libvirt-x -j ACCEPT\n";
        let view = FilterView::parse(listing);
        let ours = view.ours().cloned().collect::<Vec<_>>();
        assert_eq!(
            diff(&view, &ours),
            [(Op::Delete, ours[0].clone()), (Op::Insert, ours[0].clone())]
        );
        // First already: nothing to do.
        let first = FilterView::parse(
            "-N LIBVIRT_FWI\n-A LIBVIRT_FWI -d 10.0.0.5/32 -m comment --comment qnet:libvirt-x -j ACCEPT\n\
             -A LIBVIRT_FWI -o virbr0 -j REJECT\n",
        );
        assert_eq!(diff(&first, &ours), []);
    }

    /// A LAN bridge carries the host's addresses: only frames it passes
    /// between its own ports are accepted, in both families, and nothing
    /// in INPUT.
    #[test]
    fn a_lan_bridge_gets_only_its_own_forwarding() {
        let view = FilterView::parse("-P INPUT DROP\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n");
        let lan = opened("lan", Mode::Bridged, true);
        for family in [Family::V4, Family::V6] {
            let rules: Vec<(String, String)> = wanted(&view, family, &lan)
                .into_iter()
                .map(|r| (r.chain, r.spec))
                .collect();
            let want = "-i br-lan -o br-lan -m comment --comment qnet:lan -j ACCEPT";
            assert_eq!(rules, [("FORWARD".to_string(), want.to_string())]);
        }
    }
}
