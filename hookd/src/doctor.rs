//! `qnetctl doctor`: from facts about the host (gathered by the
//! reconciler), the problems that would stop a guest's packets, each with
//! its fix. Pure, so every diagnosis is unit-tested; the facts are read
//! where the reconciler runs.

use std::collections::BTreeMap;

use crate::api::{Mac, Mode, Problem};
use crate::firewall::peers::firewalld_plan::zone_of;
use crate::firewall::peers::iptables_plan::{diff, wanted, FilterView, Op, Rule, DOCKER_USER};
use crate::firewall::peers::{libvirt_nft, Family, LibvirtForward, Opened, Openings};

/// The bridge as the kernel has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeState {
    Missing,
    Down,
    /// Up, without the router address.
    NoAddress,
    Ok,
}

/// One iptables filter table that exists.
#[derive(Debug, Clone)]
pub struct TableFacts {
    /// `iptables-nft`, `ip6tables-legacy`, ...
    pub program: &'static str,
    pub family: Family,
    pub view: FilterView,
    /// nf_tables backend: the handle of the last rule of each chain (what
    /// `nft -a list table ip filter` shows), to name the rule that drops.
    pub last_handles: BTreeMap<String, u64>,
}

/// The handle of the last rule of each chain in `nft -a list table …`.
pub fn last_rule_handles(listing: &str) -> BTreeMap<String, u64> {
    let mut handles = BTreeMap::new();
    let mut chain: Option<String> = None;
    for line in listing.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("chain ") {
            chain = name.split_whitespace().next().map(str::to_owned);
        } else if line == "}" {
            chain = None;
        } else if let (Some(c), Some((rule, handle))) = (&chain, line.rsplit_once("# handle ")) {
            if rule.starts_with("type ") {
                continue;
            }
            if let Ok(h) = handle.trim().parse() {
                handles.insert(c.clone(), h);
            }
        }
    }
    handles
}

/// What doctor knows of one network.
#[derive(Debug, Clone)]
pub struct NetworkFacts {
    pub net: Opened,
    pub up: bool,
    /// `firewall-integration` for this network.
    pub integrated: bool,
    pub bridge: BridgeState,
    /// The bridge's MAC now (`None`: no bridge), and the fixed one qnet
    /// gives it ([`crate::network::bridge_mac`]).
    pub bridge_mac: Option<Mac>,
    pub want_mac: Mac,
    pub dnsmasq_running: bool,
    pub ip_forward: bool,
    /// The bridge's effective `rp_filter` (the larger of `all` and the
    /// bridge's own) is 1, strict.
    pub rp_filter_strict: bool,
    /// The bridge's firewalld zone, if firewalld runs.
    pub firewalld_zone: Option<String>,
    /// Forwards into this network whose host port a host process holds:
    /// (the forward, the process).
    pub taken_ports: Vec<(String, String)>,
}

/// The problems of one network.
pub fn diagnose(f: &NetworkFacts, tables: &[TableFacts]) -> Vec<Problem> {
    let name = f.net.name.to_string();
    let mut problems = Vec::new();
    let mut add = |problem: String, fix: String| {
        problems.push(Problem {
            subject: name.clone(),
            problem,
            fix,
        })
    };
    if !f.up {
        add(
            "the network is down".into(),
            format!("`qnetctl network up {name}`"),
        );
        return problems;
    }
    plumbing(f, &mut add);
    host_settings(f, &mut add);
    firewalls(f, tables, &mut add);
    for (forward, owner) in &f.taken_ports {
        add(
            format!("forward {forward}: the host port is taken by {owner}, which gets connections from the host itself"),
            "stop that process, or forward another host port".into(),
        );
    }
    problems
}

/// Receives each problem found and its fix.
type Add<'a> = dyn FnMut(String, String) + 'a;

/// What qnet itself set up: the bridge and dnsmasq.
fn plumbing(f: &NetworkFacts, add: &mut Add<'_>) {
    let name = &f.net.name;
    for (problem, fix) in bridge_problems(f) {
        add(problem, fix);
    }
    if !f.dnsmasq_running {
        add(
            "dnsmasq is not running: no DHCP or DNS for the guests".into(),
            format!("read qnet-hookd's log for dnsmasq's error, then `qnetctl network down {name}` and `up {name}`"),
        );
    }
}

/// The host's sysctls the network's mode needs.
fn host_settings(f: &NetworkFacts, add: &mut Add<'_>) {
    let br = &f.net.bridge;
    if f.net.mode != Mode::Isolated && !f.ip_forward {
        add(
            "net.ipv4.ip_forward is 0: the host forwards nothing for the guests".into(),
            "`sysctl -w net.ipv4.ip_forward=1` (and set it in /etc/sysctl.d)".into(),
        );
    }
    if f.net.mode == Mode::Routed && f.rp_filter_strict {
        add(
            format!("rp_filter is 1 (strict) on {br}: packets of a routed network whose replies take another route are dropped"),
            format!("`sysctl -w net.ipv4.conf.{br}.rp_filter=2 net.ipv4.conf.all.rp_filter=2` (loose)"),
        );
    }
}

/// The other firewalls of the host: iptables tables and firewalld's zone.
fn firewalls(f: &NetworkFacts, tables: &[TableFacts], add: &mut Add<'_>) {
    let br = &f.net.bridge;
    let what = Openings {
        networks: vec![f.net.clone()],
        libvirt: Vec::new(),
    };
    for table in tables {
        for (chain, missing) in missing_by_chain(table, &wanted(&table.view, table.family, &what)) {
            let (problem, fix) = iptables_problem(table, &chain, &missing, f.integrated);
            add(problem, fix);
        }
    }
    if let Some(zone) = &f.firewalld_zone {
        if zone != zone_of(f.net.mode) {
            add(
                format!(
                    "firewalld puts bridge {br} in zone `{zone}`, which rejects the guests' DHCP and DNS and their forwarded packets{}",
                    not_integrated(f.integrated)
                ),
                fix_or(
                    f.integrated,
                    format!("`firewall-cmd --permanent --zone=trusted --change-interface={br} && firewall-cmd --reload`"),
                ),
            );
        }
    }
}

/// The bridge's problems: missing, down, without its router address, or
/// without qnet's fixed MAC.
fn bridge_problems(f: &NetworkFacts) -> Vec<(String, String)> {
    let name = &f.net.name;
    let br = &f.net.bridge;
    let mut problems = Vec::new();
    match f.bridge {
        BridgeState::Missing => problems.push((
            format!("bridge {br} does not exist"),
            format!("`qnetctl network down {name}` then `qnetctl network up {name}` (or restart qnet-hookd)"),
        )),
        BridgeState::Down => problems.push((
            format!("bridge {br} is down"),
            format!("`ip link set {br} up`"),
        )),
        BridgeState::NoAddress => problems.push((
            format!("bridge {br} lacks its router address"),
            format!("`qnetctl network down {name}` then `qnetctl network up {name}`"),
        )),
        BridgeState::Ok => {}
    }
    if let Some(mac) = f.bridge_mac.filter(|m| *m != f.want_mac) {
        problems.push((
            format!(
                "bridge {br} has MAC {mac}, not qnet's fixed {}: without it the router's MAC (and IPv6 link-local address) changes as guests come and go, and guests lose the router until their neighbour caches expire",
                f.want_mac
            ),
            format!("`ip link set {br} address {}` (or `qnetctl network down {name}` then `up {name}`)", f.want_mac),
        ));
    }
    problems
}

/// The problems of forwards into libvirt's own networks: its
/// `LIBVIRT_FWI` rejects them from outside unless accepted first.
pub fn diagnose_libvirt(
    forwards: &[LibvirtForward],
    tables: &[TableFacts],
    integrated: bool,
) -> Vec<Problem> {
    let what = Openings {
        networks: Vec::new(),
        libvirt: forwards.to_vec(),
    };
    let mut problems = Vec::new();
    for table in tables {
        for (_, missing) in missing_by_chain(table, &wanted(&table.view, table.family, &what)) {
            for rule in missing {
                problems.push(Problem {
                    subject: format!("libvirt network {}", rule_target(&rule)),
                    problem: format!(
                        "{}: libvirt's chain LIBVIRT_FWI rejects connections from outside to this forward's guest ({}){}",
                        table.program,
                        rule_target(&rule),
                        not_integrated(integrated)
                    ),
                    fix: fix_or(integrated, format!("`{} -I LIBVIRT_FWI 1 {}`", table.program, without_marker(&rule.spec))),
                });
            }
        }
    }
    problems
}

/// The same with libvirt's nftables backend: `listed` is its chain
/// `guest_input` (`None`: libvirt's table is not there).
pub fn diagnose_libvirt_nft(
    forwards: &[LibvirtForward],
    listed: Option<&[libvirt_nft::Listed]>,
    integrated: bool,
) -> Vec<Problem> {
    let Some(listed) = listed else {
        return Vec::new();
    };
    let missing: Vec<&LibvirtForward> = forwards
        .iter()
        .filter(|f| {
            let one = Openings {
                networks: Vec::new(),
                libvirt: vec![(*f).clone()],
            };
            libvirt_nft::commands(listed, &one)
                .iter()
                .any(|c| c.starts_with("insert "))
        })
        .collect();
    missing
        .into_iter()
        .map(|f| {
            let target = format!("{} port {} via {}", f.guest, f.port, f.bridge);
            let rule = libvirt_nft::rule(f);
            let rule = rule.split(" comment ").next().unwrap_or(&rule);
            Problem {
                subject: format!("libvirt network {target}"),
                problem: format!(
                    "libvirt's nftables chain ip {} {} rejects connections from outside to this forward's guest ({target}){}",
                    libvirt_nft::TABLE,
                    libvirt_nft::CHAIN,
                    not_integrated(integrated)
                ),
                fix: fix_or(
                    integrated,
                    format!("`nft insert rule ip {} {} {rule}`", libvirt_nft::TABLE, libvirt_nft::CHAIN),
                ),
            }
        })
        .collect()
}

fn rule_target(rule: &Rule) -> String {
    let words: Vec<&str> = rule.spec.split_whitespace().collect();
    let after = |flag: &str| {
        words
            .windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].trim_end_matches("/32"))
            .unwrap_or("?")
    };
    format!(
        "{} port {} via {}",
        after("-d"),
        after("--dport"),
        after("-o")
    )
}

/// The wanted rules `table` lacks (or holds behind a peer's), by chain.
fn missing_by_chain(table: &TableFacts, want: &[Rule]) -> BTreeMap<String, Vec<Rule>> {
    let mut by_chain: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
    for (op, rule) in diff(&table.view, want) {
        if op == Op::Insert {
            by_chain.entry(rule.chain.clone()).or_default().push(rule);
        }
    }
    for rules in by_chain.values_mut() {
        rules.reverse();
    }
    by_chain
}

fn iptables_problem(
    table: &TableFacts,
    chain: &str,
    missing: &[Rule],
    integrated: bool,
) -> (String, String) {
    let view = &table.view;
    let why = if chain == DOCKER_USER {
        view.drops("FORWARD")
            .map(|w| format!("Docker's {w}"))
            .unwrap_or_else(|| "Docker's chains".into())
    } else {
        view.drops(chain)
            .unwrap_or_else(|| format!("chain {chain}"))
    };
    let why = match table.last_handles.get(chain) {
        Some(h) if why.starts_with("last rule") => format!("{why} (nft handle {h})"),
        _ => why,
    };
    let packets = if chain == "INPUT" {
        "DHCP and DNS to the host"
    } else {
        "outbound and forwarded packets"
    };
    let problem = format!(
        "{}: {why} drops the guests' {packets}{}",
        table.program,
        not_integrated(integrated)
    );
    let commands: Vec<String> = missing
        .iter()
        .map(|r| {
            format!(
                "`{} -I {chain} 1 {}`",
                table.program,
                without_marker(&r.spec)
            )
        })
        .collect();
    (problem, fix_or(integrated, commands.join(" and ")))
}

fn not_integrated(integrated: bool) -> &'static str {
    if integrated {
        "; qnet's accepts there are missing"
    } else {
        "; firewall-integration is off"
    }
}

fn fix_or(integrated: bool, by_hand: String) -> String {
    if integrated {
        "read qnet-hookd's log for why its accepts failed; restarting qnet-hookd adds them again"
            .into()
    } else {
        format!("set `firewall-integration = true` in hookd.toml, or allow it yourself: {by_hand}")
    }
}

fn without_marker(spec: &str) -> String {
    let words: Vec<&str> = spec.split_whitespace().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] == "-m" && words.get(i + 1) == Some(&"comment") {
            i += 4;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IfName, NetName};
    use std::str::FromStr;

    fn facts(integrated: bool) -> NetworkFacts {
        NetworkFacts {
            net: Opened {
                name: NetName::from_str("lab").unwrap(),
                bridge: IfName::from_str("qnlab").unwrap(),
                mode: Mode::Nat,
                ipv6: false,
            },
            up: true,
            integrated,
            bridge: BridgeState::Ok,
            bridge_mac: Some(Mac::from_octets(crate::network::bridge_mac("lab"))),
            want_mac: Mac::from_octets(crate::network::bridge_mac("lab")),
            dnsmasq_running: true,
            ip_forward: true,
            rp_filter_strict: true,
            firewalld_zone: None,
            taken_ports: Vec::new(),
        }
    }

    /// The one problem of `problems`.
    #[track_caller]
    fn only(problems: Vec<Problem>) -> Problem {
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.into_iter().next().unwrap()
    }

    #[track_caller]
    fn assert_starts(text: &str, prefix: &str) {
        assert!(text.starts_with(prefix), "{text}");
    }

    #[track_caller]
    fn assert_ends(text: &str, suffix: &str) {
        assert!(text.ends_with(suffix), "{text}");
    }

    fn table(listing: &str) -> TableFacts {
        TableFacts {
            program: "iptables-nft",
            family: Family::V4,
            view: FilterView::parse(listing),
            last_handles: BTreeMap::new(),
        }
    }

    #[test]
    fn a_final_reject_is_named_with_its_nft_handle() {
        let nft = "table ip filter { # handle 3\n\tchain FORWARD { # handle 1\n\t\ttype filter hook forward priority filter; policy accept;\n\
            \t\tiifname \"eth0\" counter packets 0 bytes 0 accept # handle 4\n\
            \t\tcounter packets 0 bytes 0 reject # handle 7\n\t}\n}\n";
        let handles = last_rule_handles(nft);
        assert_eq!(handles.get("FORWARD"), Some(&7));
        let mut t = table("-P FORWARD ACCEPT\n-A FORWARD -i eth0 -j ACCEPT\n-A FORWARD -j REJECT --reject-with icmp-port-unreachable\n");
        t.last_handles = handles;
        let problems = diagnose(&facts(false), &[t]);
        assert_eq!(
            problems[0].problem,
            "iptables-nft: last rule of chain FORWARD: `-A FORWARD -j REJECT --reject-with icmp-port-unreachable` (nft handle 7) \
             drops the guests' outbound and forwarded packets; firewall-integration is off"
        );
    }

    #[test]
    fn a_healthy_network_has_no_problem() {
        assert_eq!(
            diagnose(
                &facts(true),
                &[table("-P INPUT ACCEPT\n-P FORWARD ACCEPT\n")]
            ),
            []
        );
    }

    #[test]
    fn a_drop_policy_without_integration_names_the_table_chain_and_the_commands() {
        let t = table("-P INPUT DROP\n-P FORWARD ACCEPT\n-A INPUT -i lo -j ACCEPT\n");
        let problem = only(diagnose(&facts(false), &[t]));
        assert_eq!(
            problem.problem,
            "iptables-nft: policy DROP of chain INPUT drops the guests' DHCP and DNS to the host; firewall-integration is off"
        );
        assert_starts(
            &problem.fix,
            "set `firewall-integration = true` in hookd.toml, or allow it yourself: `iptables-nft -I INPUT 1 -i qnlab -p udp -m udp --dport 67 -j ACCEPT` and ",
        );
    }

    #[test]
    fn docker_firewalld_and_the_basics_are_each_one_line() {
        let mut f = facts(false);
        f.firewalld_zone = Some("public".into());
        f.ip_forward = false;
        f.dnsmasq_running = false;
        f.bridge = BridgeState::NoAddress;
        f.taken_ports = vec![("tcp 8080 -> web:80".into(), "pid 7 (nginx)".into())];
        let docker = table("-P FORWARD DROP\n-N DOCKER-USER\n-A FORWARD -j DOCKER-USER\n-A DOCKER-USER -j RETURN\n");
        let problems = diagnose(&f, &[docker]);
        let lines: Vec<&str> = problems.iter().map(|p| p.problem.as_str()).collect();
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert!(lines[0].contains("lacks its router address"));
        assert!(lines[1].starts_with("dnsmasq is not running"));
        assert!(lines[2].starts_with("net.ipv4.ip_forward is 0"));
        assert_eq!(lines[3], "iptables-nft: Docker's policy DROP of chain FORWARD drops the guests' outbound and forwarded packets; firewall-integration is off");
        assert!(lines[4].starts_with("firewalld puts bridge qnlab in zone `public`"));
        assert!(lines[5].contains("taken by pid 7 (nginx)"));
        assert!(
            problems[3]
                .fix
                .contains("`iptables-nft -I DOCKER-USER 1 -i qnlab -j ACCEPT`"),
            "{}",
            problems[3].fix
        );
        // In qnet's zone: no firewalld problem.
        f.firewalld_zone = Some("qnet-nat".into());
        assert_eq!(diagnose(&f, &[]).len(), 4);
        // Strict rp_filter matters for routed networks only.
        f.net.mode = Mode::Routed;
        f.firewalld_zone = Some("qnet-routed".into());
        let routed = diagnose(&f, &[]);
        assert_eq!(routed.len(), 5);
        assert!(
            routed[3]
                .problem
                .starts_with("rp_filter is 1 (strict) on qnlab"),
            "{routed:?}"
        );
    }

    #[test]
    fn a_bridge_without_its_fixed_mac_is_named_with_the_command_that_sets_it() {
        let mut f = facts(true);
        f.bridge_mac = Some("52:54:00:12:34:56".parse().unwrap());
        let problem = only(diagnose(&f, &[]));
        let want = Mac::from_octets(crate::network::bridge_mac("lab"));
        assert_starts(
            &problem.problem,
            &format!("bridge qnlab has MAC 52:54:00:12:34:56, not qnet's fixed {want}:"),
        );
        assert_starts(&problem.fix, &format!("`ip link set qnlab address {want}`"));
        // No bridge: that is the problem, not its MAC.
        f.bridge = BridgeState::Missing;
        f.bridge_mac = None;
        assert_eq!(diagnose(&f, &[]).len(), 1);
    }

    /// A forward to port 80 of 192.168.122.5 on libvirt's `default`.
    fn virbr0_forward() -> LibvirtForward {
        LibvirtForward {
            network: "default".into(),
            bridge: IfName::from_str("virbr0").unwrap(),
            guest: "192.168.122.5".parse().unwrap(),
            proto: crate::api::Proto::Tcp,
            port: 80,
        }
    }

    #[test]
    fn libvirt_nft_rejects_are_named_per_forward_until_accepted() {
        let forward = virbr0_forward();
        let chain = libvirt_nft::parse_chain(
            "\t\toif \"virbr0\" counter packets 0 bytes 0 reject # handle 12\n",
        );
        let problem = only(diagnose_libvirt_nft(
            std::slice::from_ref(&forward),
            Some(chain.as_slice()),
            false,
        ));
        assert_eq!(
            problem.problem,
            "libvirt's nftables chain ip libvirt_network guest_input rejects connections from outside to this \
             forward's guest (192.168.122.5 port 80 via virbr0); firewall-integration is off"
        );
        assert_ends(
            &problem.fix,
            "`nft insert rule ip libvirt_network guest_input oifname \"virbr0\" ip daddr 192.168.122.5 tcp dport 80 ct status dnat accept`",
        );
        // Accepted first: nothing; no libvirt table: nothing.
        let ours = format!("\t\t{} # handle 20\n", libvirt_nft::rule(&forward));
        let accepted =
            libvirt_nft::parse_chain(&format!("{ours}\t\toif \"virbr0\" reject # handle 12\n"));
        assert_eq!(
            diagnose_libvirt_nft(
                std::slice::from_ref(&forward),
                Some(accepted.as_slice()),
                true
            ),
            []
        );
        assert_eq!(diagnose_libvirt_nft(&[forward], None, false), []);
    }

    #[test]
    fn libvirt_fwi_rejects_are_named_per_forward() {
        let t = table("-P FORWARD ACCEPT\n-N LIBVIRT_FWI\n-A LIBVIRT_FWI -o virbr0 -j REJECT\n");
        let forward = virbr0_forward();
        let problem = only(diagnose_libvirt(&[forward], &[t], false));
        assert_eq!(
            problem.subject,
            "libvirt network 192.168.122.5 port 80 via virbr0"
        );
        assert_ends(
            &problem.fix,
            "`iptables-nft -I LIBVIRT_FWI 1 -d 192.168.122.5/32 -o virbr0 -p tcp -m tcp --dport 80 -m conntrack --ctstate DNAT -j ACCEPT`",
        );
    }
}
