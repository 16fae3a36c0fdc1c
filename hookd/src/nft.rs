//! Our one nftables table, `table inet qnet`: masquerade, forwarding policy
//! for our bridges, blocked outgoing ports.
//!
//! We never list, flush or edit any other table: libvirt, Docker,
//! firewalld keep theirs. The table is replaced as a whole in one
//! transaction (`nft -f -`):
//!
//! ```text
//! add table inet qnet        # so that the delete cannot fail
//! delete table inet qnet     # drop the old contents...
//! table inet qnet { ... }    # ...and declare the new ones
//! ```
//!
//! nft commits the script atomically: packets see either the old table or
//! the new one, and a script with an error changes nothing.
//!
//! Our chains only ever *accept* or *drop/reject* traffic of our own
//! bridges, with policy accept: a verdict of accept in our table does not
//! override a drop in someone else's base chain on the same hook (nftables
//! evaluates every base chain), so everything else keeps working exactly as
//! it did — but note that a host firewall dropping forwarded traffic (e.g.
//! Docker's `FORWARD` policy drop) also drops our guests' traffic.
//!
//! # Port forwards
//!
//! Host ports are forwarded to guests by DNAT through four maps of the
//! table (see [`ForwardRule`] and [`render_with_forwards`]):
//!
//! | map | key | value |
//! |---|---|---|
//! | `fwd4` | `ipv4_addr . inet_proto . inet_service` (host address, proto, port) | `ipv4_addr . inet_service` |
//! | `fwd4_any` | `inet_proto . inet_service` (any local IPv4 address) | `ipv4_addr . inet_service` |
//! | `fwd6` | `ipv6_addr . inet_proto . inet_service` | `ipv6_addr . inet_service` |
//! | `fwd6_any` | `inet_proto . inet_service` (any local IPv6 address but `::1`) | `ipv6_addr . inet_service` |
//!
//! The maps are hash tables: a lookup costs the same with 1 or 10,000
//! forwards, and adding or removing a forward is one small transaction of
//! element additions / deletions ([`add_forwards`], [`remove_forwards`])
//! that touches nothing else — the table is only rebuilt by
//! [`apply_with_forwards`] (daemon start, network changes). Those element
//! transactions are sent by the daemon itself over nfnetlink
//! ([`crate::nft_elements`], ~0.15 ms), not by an `nft` process (~2 ms of
//! process start alone); everything else is `nft -f` text.
//! The maps' values are concatenations, which nft 1.0.6 only handles in
//! its text syntax: its JSON cannot create such maps, and its JSON listing
//! of our DNAT rules is lossy (it drops the port half of the value, so
//! feeding it back would install different rules). We only ever speak text
//! to nft and only ever list our own table.
//!
//! The same chain `port_forwards` is jumped to from `prerouting` (packets
//! from the outside and from guests) and from `output` (the host's own
//! connections), so a forward works from every direction:
//!
//! - from the outside, to the uplink address (or any local address);
//! - from the host itself to one of its addresses, and to `127.0.0.1`
//!   (a "localhost forward", like QEMU's `hostfwd`): the DNAT'ed packet
//!   leaves through a bridge with source 127.0.0.1, which the kernel only
//!   routes with `route_localnet` (see [`enable_localhost_forwards`]), and
//!   `postrouting` masquerades it to the bridge's (router) address;
//! - from a guest to the host's address, forwarded to a guest on the same
//!   bridge ("hairpin"): `postrouting` masquerades DNAT'ed connections from
//!   the network's subnet that leave through its own bridge, so that the
//!   target answers through the host instead of directly to the sender
//!   (which would drop the unexpected reply);
//! - IPv4 and IPv6 alike, except localhost: Linux cannot DNAT a connection
//!   to `::1` to another host (there is no IPv6 `route_localnet`), so
//!   `::1` is left alone (the host answers it itself) and localhost
//!   forwards are IPv4 only.
//!
//! A forward into a `nat` network passes `forward` through its
//! `ct status dnat accept`; into an `isolated` network it is dropped there
//! (except from the same bridge). Removing a forward stops *new*
//! connections; flows conntrack already knows (a TCP connection, a UDP
//! flow within its timeout) keep their translation until they end.
//!
//! With br_netfilter (Docker, Kubernetes; `bridge-nf-call-iptables=1`) the
//! IP hooks also run while a frame is bridged, so a forward from a guest
//! to a guest on the same bridge is applied by the bridge: that still
//! works (and is masqueraded), except for a guest reaching *its own*
//! forward, whose frame would have to leave by the port it came in by —
//! which the bridge only does for a port in hairpin mode.
//!
//! Besides the forwards themselves, the one rule that touches traffic not
//! of our bridges is in `loopback_guard` (prerouting, priority raw): a
//! packet arriving on any
//! interface but `lo` for 127.0.0.0/8 is dropped. Without `route_localnet`
//! the kernel drops those itself; with it (which localhost forwards need)
//! a neighbour could otherwise reach the host's loopback-only services
//! (CVE-2020-8558). It runs before conntrack, so the replies to localhost
//! forwards (addressed to the router address on the wire) pass.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use thiserror::Error;
use tokio::io::AsyncWriteExt;

use crate::api::{Mode, Proto};
use crate::config::NetworkConfig;
use crate::nft_elements::{self, Change};
use crate::programs::find_program;

pub const TABLE_FAMILY: &str = "inet";
pub const TABLE_NAME: &str = "qnet";

/// `net.ipv4.conf.all.route_localnet` of the current network namespace.
pub const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// One forwarded host port (a port range is expanded into one
/// `ForwardRule` per port by the caller: `HOSTPORT-HOSTPORT2:GUESTPORT`
/// means GUESTPORT is the guest port of HOSTPORT, and the offsets are
/// kept, e.g. `9000-9002:80` is 9000→80, 9001→81, 9002→82).
///
/// A rule is one element of one map: `host_addr` `Some(v4)` → `fwd4`,
/// `Some(v6)` → `fwd6`, `None` → `fwd4_any` or `fwd6_any` after the
/// family of `guest_addr`. The map key is (host address, proto, host
/// port): two rules with the same key and different guests conflict.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ForwardRule {
    /// Tcp | Udp.
    pub proto: Proto,
    /// `None`: every local address of the host (for IPv4 including
    /// 127.0.0.1; for IPv6 excluding `::1`, which cannot be forwarded).
    pub host_addr: Option<IpAddr>,
    pub host_port: u16,
    /// IPv4 or IPv6; must be of the family of `host_addr` when that is set.
    pub guest_addr: IpAddr,
    pub guest_port: u16,
}

impl ForwardRule {
    /// Why nft could not install this rule, if it could not.
    pub fn problem(&self) -> Option<&'static str> {
        if self.host_port == 0 || self.guest_port == 0 {
            return Some("port 0 cannot be forwarded");
        }
        match (self.host_addr, self.guest_addr) {
            (Some(IpAddr::V4(_)), IpAddr::V6(_)) => {
                Some("an IPv4 host address needs an IPv4 guest address")
            }
            (Some(IpAddr::V6(_)), IpAddr::V4(_)) => {
                Some("an IPv6 host address needs an IPv6 guest address")
            }
            _ => None,
        }
    }

    /// The map this rule is an element of.
    pub fn map(&self) -> &'static str {
        match (self.host_addr, self.guest_addr) {
            (Some(IpAddr::V4(_)), _) => "fwd4",
            (Some(IpAddr::V6(_)), _) => "fwd6",
            (None, IpAddr::V4(_)) => "fwd4_any",
            (None, IpAddr::V6(_)) => "fwd6_any",
        }
    }

    /// The element's key as nft writes it: `10.99.0.1 . tcp . 8080`, or
    /// `tcp . 8080` for any address.
    pub fn key(&self) -> String {
        match self.host_addr {
            Some(addr) => format!("{addr} . {} . {}", self.proto, self.host_port),
            None => format!("{} . {}", self.proto, self.host_port),
        }
    }

    /// The element's value: `10.42.0.10 . 80`.
    pub fn value(&self) -> String {
        format!("{} . {}", self.guest_addr, self.guest_port)
    }

    /// The order nft lists a map's elements in: by the key's bytes.
    fn listing_order(&self) -> ListingOrder {
        let addr = match self.host_addr {
            Some(IpAddr::V4(a)) => a.octets().to_vec(),
            Some(IpAddr::V6(a)) => a.octets().to_vec(),
            None => Vec::new(),
        };
        let proto = match self.proto {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        };
        (addr, proto, self.host_port)
    }
}

/// Sorts like nft's listing of a map: (address bytes, protocol number, port).
type ListingOrder = (Vec<u8>, u8, u16);

/// `tcp 10.99.0.1:8080 -> 10.42.0.10:80`, `udp *:53 -> [fd42::10]:53`.
impl fmt::Display for ForwardRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sock = |addr: IpAddr, port: u16| match addr {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        let host = match self.host_addr {
            Some(addr) => sock(addr, self.host_port),
            None => format!("*:{}", self.host_port),
        };
        write!(
            f,
            "{} {host} -> {}",
            self.proto,
            sock(self.guest_addr, self.guest_port)
        )
    }
}

/// The maps and their element lists, in nft's order, without duplicates.
const MAPS: [(&str, &str); 4] = [
    (
        "fwd4",
        "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service",
    ),
    (
        "fwd4_any",
        "inet_proto . inet_service : ipv4_addr . inet_service",
    ),
    (
        "fwd6",
        "ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service",
    ),
    (
        "fwd6_any",
        "inet_proto . inet_service : ipv6_addr . inet_service",
    ),
];

/// Checks every rule and that no two rules give one key different guests.
pub fn check_forwards(rules: &[ForwardRule]) -> Result<(), NftError> {
    let mut seen: BTreeMap<(&'static str, String), &ForwardRule> = BTreeMap::new();
    for rule in rules {
        if let Some(problem) = rule.problem() {
            return Err(NftError::InvalidForward {
                rule: *rule,
                problem: problem.into(),
            });
        }
        if let Some(other) = seen.insert((rule.map(), rule.key()), rule) {
            if other.value() != rule.value() {
                return Err(NftError::InvalidForward {
                    rule: *rule,
                    problem: format!("conflicts with `{other}`: one host port, two guests"),
                });
            }
        }
    }
    Ok(())
}

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot run {}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    /// nft ran and failed; `message` is the first relevant line of its
    /// stderr (with the offending script line), `stderr` all of it.
    #[error("{action}: nft failed ({status}): {message}")]
    Failed {
        action: &'static str,
        status: ExitStatus,
        message: String,
        stderr: String,
    },
    /// The kernel refused an element change sent over nfnetlink (or could
    /// not be asked); `EEXIST` means a key is taken by another guest.
    #[error("{action}: {source}")]
    Kernel {
        action: &'static str,
        #[source]
        source: nft_elements::KernelError,
    },
    /// A forward nft cannot install (checked before nft runs).
    #[error("port forward `{rule}`: {problem}")]
    InvalidForward { rule: ForwardRule, problem: String },
}

/// The name of network `name`'s chain for traffic forwarded into (`in`) or
/// out of (`out`) its bridge. Network names are `[A-Za-z0-9_-]{1,32}`, so
/// with the `net_` prefix this is always a valid nft identifier.
fn chain(name: &str, dir: &str) -> String {
    format!("net_{name}_{dir}")
}

/// `"a"`, or `{ "a", "b" }` for more than one element (nft's own spelling,
/// so that the listing looks like what we wrote).
fn set<T: AsRef<str>>(items: &[T]) -> String {
    match items {
        [one] => one.as_ref().to_owned(),
        many => format!(
            "{{ {} }}",
            many.iter()
                .map(AsRef::as_ref)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn quoted(s: &str) -> String {
    // Interface names are validated by the config (no quotes, no spaces);
    // this keeps a bad one from breaking out of the string regardless.
    format!("\"{}\"", s.replace(['"', '\\'], ""))
}

/// The complete `table inet qnet { ... }` for `networks`, with empty
/// port-forward maps: [`render_with_forwards`]`(networks, &[])`.
pub fn render(networks: &[NetworkConfig]) -> String {
    render_with_forwards(networks, &[])
}

/// The complete `table inet qnet { ... }` for `networks` and `forwards`,
/// without the add/delete preamble (see [`script_with_forwards`]). Pure and
/// deterministic: networks are emitted sorted by name, map elements in the
/// order nft lists them, each once. Rules with a [`ForwardRule::problem`]
/// are left out, and of two rules with one key only the first is kept
/// ([`apply_with_forwards`] refuses both cases, see [`check_forwards`]).
///
/// Layout:
/// - maps `fwd4`, `fwd4_any`, `fwd6`, `fwd6_any`: the port forwards (see
///   the module documentation);
/// - `loopback_guard` (filter, prerouting, raw): drops packets for
///   127.0.0.0/8 that did not come from `lo`;
/// - `prerouting` (nat, dstnat) and `output` (nat, -100, i.e. dstnat):
///   both jump to `port_forwards`, which DNATs through the maps — `fwd4` /
///   `fwd6` by destination address, `fwd4_any` / `fwd6_any` only for
///   destinations of type local (`fib daddr type local`), and never `::1`;
/// - `postrouting` (nat, srcnat): one masquerade rule per `nat` network
///   (IPv4, and IPv6 when configured): from its subnet, not to its subnet,
///   out of any interface but its bridge — or only out of `uplink`; then
///   masquerade for DNAT'ed connections from 127.0.0.0/8 leaving through
///   anything but `lo` (localhost forwards), and, per network, for
///   DNAT'ed connections from its subnet back out of its own bridge
///   (hairpin);
/// - `forward` (filter, policy accept), in order:
///   1. traffic that stays on one of our bridges (seen here only with
///      br_netfilter loaded, e.g. by Docker, and for hairpin forwards):
///      accept;
///   2. `isolated` bridges: drop whatever is forwarded into or out of them;
///   3. `ct state established,related accept`;
///   4. traffic into a bridge jumps to `net_<name>_in`: `nat` accepts only
///      DNAT'ed connections (port forwards) and drops the rest; `routed`
///      accepts (only from `uplink` when set);
///   5. traffic out of a bridge jumps to `net_<name>_out`: drop spoofed
///      sources, reject blocked ports (TCP with a reset, UDP with ICMP port
///      unreachable, so clients fail at once), drop anything not leaving
///      via `uplink` when set, accept.
///
/// "In" is checked before "out", so one `nat` network cannot open
/// connections into another.
pub fn render_with_forwards(networks: &[NetworkConfig], forwards: &[ForwardRule]) -> String {
    let mut nets: Vec<&NetworkConfig> = networks.iter().collect();
    nets.sort_by(|a, b| a.name.cmp(&b.name));

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "table {TABLE_FAMILY} {TABLE_NAME} {{");

    // --- the port-forward maps, as nft lists them ---
    let mut elements: BTreeMap<&str, BTreeMap<ListingOrder, &ForwardRule>> = BTreeMap::new();
    for rule in forwards.iter().filter(|r| r.problem().is_none()) {
        elements
            .entry(rule.map())
            .or_default()
            .entry(rule.listing_order())
            .or_insert(rule);
    }
    for (map, ty) in MAPS {
        let _ = writeln!(w, "\tmap {map} {{");
        let _ = writeln!(w, "\t\ttype {ty}");
        if let Some(rules) = elements.get(map) {
            let items: Vec<String> = rules
                .values()
                .map(|r| format!("{} : {}", r.key(), r.value()))
                .collect();
            // nft's layout: one element per line, aligned after the brace.
            let _ = writeln!(w, "\t\telements = {{ {} }}", items.join(",\n\t\t\t     "));
        }
        let _ = writeln!(w, "\t}}");
        let _ = writeln!(w);
    }

    // --- the loopback guard (see the module documentation) ---
    let _ = writeln!(w, "\tchain loopback_guard {{");
    let _ = writeln!(
        w,
        "\t\ttype filter hook prerouting priority raw; policy accept;"
    );
    let _ = writeln!(w, "\t\tiifname != \"lo\" ip daddr 127.0.0.0/8 drop");
    let _ = writeln!(w, "\t}}");

    // --- DNAT: from outside and guests (prerouting), from the host (output) ---
    let _ = writeln!(w);
    let _ = writeln!(w, "\tchain prerouting {{");
    let _ = writeln!(
        w,
        "\t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    let _ = writeln!(w, "\t\tjump port_forwards");
    let _ = writeln!(w, "\t}}");
    let _ = writeln!(w);
    let _ = writeln!(w, "\tchain output {{");
    // `dstnat` names -100 only for prerouting in nft 1.0.6.
    let _ = writeln!(w, "\t\ttype nat hook output priority -100; policy accept;");
    let _ = writeln!(w, "\t\tjump port_forwards");
    let _ = writeln!(w, "\t}}");
    let _ = writeln!(w);
    let _ = writeln!(w, "\tchain port_forwards {{");
    let _ = writeln!(
        w,
        "\t\tdnat ip to ip daddr . meta l4proto . th dport map @fwd4"
    );
    let _ = writeln!(
        w,
        "\t\tmeta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @fwd4_any"
    );
    let _ = writeln!(
        w,
        "\t\tdnat ip6 to ip6 daddr . meta l4proto . th dport map @fwd6"
    );
    let _ = writeln!(
        w,
        "\t\tip6 daddr != ::1 fib daddr type local dnat ip6 to meta l4proto . th dport map @fwd6_any"
    );
    let _ = writeln!(w, "\t}}");

    // --- postrouting: masquerade ---
    let _ = writeln!(w);
    let _ = writeln!(w, "\tchain postrouting {{");
    let _ = writeln!(
        w,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    for net in nets.iter().filter(|n| n.mode == Mode::Nat) {
        let via = match &net.uplink {
            Some(uplink) => format!("oifname {}", quoted(uplink)),
            None => format!("oifname != {}", quoted(&net.bridge)),
        };
        let _ = writeln!(
            w,
            "\t\tip saddr {s} ip daddr != {s} {via} masquerade comment {c}",
            s = net.subnet.trunc(),
            c = quoted(&net.name)
        );
        if let Some(v6) = &net.ipv6 {
            let _ = writeln!(
                w,
                "\t\tip6 saddr {s} ip6 daddr != {s} {via} masquerade comment {c}",
                s = v6.subnet.trunc(),
                c = quoted(&net.name)
            );
        }
    }
    let _ = writeln!(
        w,
        "\t\tct status dnat ip saddr 127.0.0.0/8 oifname != \"lo\" masquerade comment \"localhost forwards\""
    );
    for net in &nets {
        let _ = writeln!(
            w,
            "\t\tct status dnat ip saddr {s} oifname {b} masquerade comment {c}",
            s = net.subnet.trunc(),
            b = quoted(&net.bridge),
            c = quoted(&format!("{} hairpin", net.name))
        );
        if let Some(v6) = &net.ipv6 {
            let _ = writeln!(
                w,
                "\t\tct status dnat ip6 saddr {s} oifname {b} masquerade comment {c}",
                s = v6.subnet.trunc(),
                b = quoted(&net.bridge),
                c = quoted(&format!("{} hairpin", net.name))
            );
        }
    }
    let _ = writeln!(w, "\t}}");

    // --- forward: the policy for our bridges ---
    let _ = writeln!(w);
    let _ = writeln!(w, "\tchain forward {{");
    let _ = writeln!(
        w,
        "\t\ttype filter hook forward priority filter; policy accept;"
    );
    if !nets.is_empty() {
        let same: Vec<String> = nets
            .iter()
            .map(|n| format!("{b} . {b}", b = quoted(&n.bridge)))
            .collect();
        // nft lists a concatenated set in braces even with one element.
        let _ = writeln!(w, "\t\tiifname . oifname {{ {} }} accept", same.join(", "));
    }
    let isolated: Vec<String> = nets
        .iter()
        .filter(|n| n.mode == Mode::Isolated)
        .map(|n| quoted(&n.bridge))
        .collect();
    if !isolated.is_empty() {
        let _ = writeln!(w, "\t\tiifname {} drop", set(&isolated));
        let _ = writeln!(w, "\t\toifname {} drop", set(&isolated));
    }
    let _ = writeln!(w, "\t\tct state established,related accept");
    let connected: Vec<&&NetworkConfig> =
        nets.iter().filter(|n| n.mode != Mode::Isolated).collect();
    if !connected.is_empty() {
        let jumps = |dir: &str| {
            let items: Vec<String> = connected
                .iter()
                .map(|n| format!("{} : jump {}", quoted(&n.bridge), chain(&n.name, dir)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        };
        let _ = writeln!(w, "\t\toifname vmap {}", jumps("in"));
        let _ = writeln!(w, "\t\tiifname vmap {}", jumps("out"));
    }
    let _ = writeln!(w, "\t}}");

    // --- per network chains ---
    for net in connected {
        let _ = writeln!(w);
        let _ = writeln!(w, "\tchain {} {{", chain(&net.name, "in"));
        match net.mode {
            Mode::Nat => {
                let _ = writeln!(w, "\t\tct status dnat accept");
                let _ = writeln!(w, "\t\tdrop");
            }
            _ => {
                if let Some(uplink) = &net.uplink {
                    let _ = writeln!(w, "\t\tiifname != {} drop", quoted(uplink));
                }
                let _ = writeln!(w, "\t\taccept");
            }
        }
        let _ = writeln!(w, "\t}}");

        let _ = writeln!(w);
        let _ = writeln!(w, "\tchain {} {{", chain(&net.name, "out"));
        let _ = writeln!(w, "\t\tip saddr != {} drop", net.subnet.trunc());
        match &net.ipv6 {
            Some(v6) => {
                let _ = writeln!(w, "\t\tip6 saddr != {} drop", v6.subnet.trunc());
            }
            None => {
                let _ = writeln!(w, "\t\tmeta nfproto ipv6 drop");
            }
        }
        for (proto, verdict) in [
            (Proto::Tcp, "reject with tcp reset"),
            (Proto::Udp, "reject"),
        ] {
            let ports: Vec<String> = net
                .blocked_ports
                .iter()
                .filter(|p| p.proto == proto)
                .map(|p| p.port.to_string())
                .collect();
            if !ports.is_empty() {
                let _ = writeln!(w, "\t\t{proto} dport {} {verdict}", set(&ports));
            }
        }
        if let Some(uplink) = &net.uplink {
            let _ = writeln!(w, "\t\toifname != {} drop", quoted(uplink));
        }
        let _ = writeln!(w, "\t\taccept");
        let _ = writeln!(w, "\t}}");
    }
    let _ = writeln!(w, "}}");
    out
}

/// The transaction that replaces our table with the one for `networks`.
pub fn script(networks: &[NetworkConfig]) -> String {
    script_with_forwards(networks, &[])
}

/// The transaction that replaces our table with the one for `networks`
/// and `forwards`.
pub fn script_with_forwards(networks: &[NetworkConfig], forwards: &[ForwardRule]) -> String {
    format!(
        "add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n{}",
        render_with_forwards(networks, forwards)
    )
}

/// Installs our table for `networks` (with empty port-forward maps),
/// replacing the previous one atomically — and with it every forward: a
/// daemon with forwards calls [`apply_with_forwards`]. With no networks
/// our table is removed.
pub async fn apply(networks: &[NetworkConfig]) -> Result<(), NftError> {
    apply_with_forwards(networks, &[]).await
}

/// Installs our table for `networks` with exactly `forwards` in its maps,
/// replacing the previous table atomically (one transaction, also with
/// 10,000 forwards). With no networks and no forwards our table is
/// removed. Invalid or conflicting forwards ([`check_forwards`]) are an
/// error before nft runs; the previous table stays.
pub async fn apply_with_forwards(
    networks: &[NetworkConfig],
    forwards: &[ForwardRule],
) -> Result<(), NftError> {
    check_forwards(forwards)?;
    if networks.is_empty() && forwards.is_empty() {
        return remove().await;
    }
    run_nft(
        "applying table inet qnet",
        &["-f", "-"],
        Some(&script_with_forwards(networks, forwards)),
    )
    .await?;
    tracing::debug!(
        networks = networks.len(),
        forwards = forwards.len(),
        "applied table inet qnet"
    );
    Ok(())
}

/// The transaction [`add_forwards`] sends over nfnetlink, as nft text: one
/// `add element` line per rule (for `nft -f`, e.g. the benchmark's
/// reference, and as the readable statement of what the batch does).
pub fn add_forwards_script(rules: &[ForwardRule]) -> String {
    let mut script = String::new();
    for rule in rules {
        let _ = writeln!(
            script,
            "add element {TABLE_FAMILY} {TABLE_NAME} {} {{ {} : {} }}",
            rule.map(),
            rule.key(),
            rule.value()
        );
    }
    script
}

/// The transaction [`remove_forwards`] sends over nfnetlink, as nft text:
/// per rule, `add element` (a no-op if it is there, so that the delete
/// cannot fail because it is absent — nft 1.0.6 has no `destroy element`)
/// then `delete element`.
pub fn remove_forwards_script(rules: &[ForwardRule]) -> String {
    let mut script = add_forwards_script(rules);
    for rule in rules {
        let _ = writeln!(
            script,
            "delete element {TABLE_FAMILY} {TABLE_NAME} {} {{ {} }}",
            rule.map(),
            rule.key()
        );
    }
    script
}

/// Adds port forwards to the installed table: ONE transaction that adds
/// one element per rule and touches nothing else; its cost does not depend
/// on how many forwards exist. Sent by the daemon itself over nfnetlink
/// ([`crate::nft_elements`]), the same batch `nft -f` would send for
/// [`add_forwards_script`], without starting nft. All or nothing:
///
/// - a rule that is installed already (same key, same guest) is a no-op,
///   so adding twice is fine;
/// - a rule whose host address/proto/port is forwarded to another guest
///   fails the transaction (`EEXIST`) and nothing changes, as do invalid
///   or mutually conflicting rules ([`check_forwards`], before the kernel
///   sees them) and a missing table (`ENOENT`).
pub async fn add_forwards(rules: &[ForwardRule]) -> Result<(), NftError> {
    check_forwards(rules)?;
    if rules.is_empty() {
        return Ok(());
    }
    let owned = rules.to_vec();
    change_elements(move || nft_elements::run(&[(Change::Add, &owned)]))
        .await
        .map_err(|source| kernel_error(source, Change::Add))?;
    tracing::debug!(forwards = rules.len(), "added port forwards");
    Ok(())
}

/// Removes port forwards from the installed table: ONE transaction,
/// touching nothing else, independent of how many forwards exist. Per
/// rule it adds the element (a no-op if it is there) and then deletes it,
/// so a rule that is not installed is skipped without failing the others
/// and removing twice is fine (nft 1.0.6 has no `destroy element`; this is
/// [`remove_forwards_script`] as one nfnetlink batch). A rule whose key is
/// installed with *another* guest is not ours to remove: the transaction
/// fails (`EEXIST`) and nothing changes.
pub async fn remove_forwards(rules: &[ForwardRule]) -> Result<(), NftError> {
    check_forwards(rules)?;
    if rules.is_empty() {
        return Ok(());
    }
    let owned = rules.to_vec();
    change_elements(move || nft_elements::run(&[(Change::Add, &owned), (Change::Delete, &owned)]))
        .await
        .map_err(|source| kernel_error(source, Change::Delete))?;
    tracing::debug!(forwards = rules.len(), "removed port forwards");
    Ok(())
}

/// Runs a blocking nfnetlink transaction off the async threads: it takes
/// ~0.1 ms, but waits if another process holds the nftables commit lock.
async fn change_elements(
    transaction: impl FnOnce() -> Result<(), nft_elements::KernelError> + Send + 'static,
) -> Result<(), nft_elements::KernelError> {
    tokio::task::spawn_blocking(transaction)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("nfnetlink task: {e}")).into()))
}

/// The kernel's errno with what it means for a forward.
fn kernel_error(source: nft_elements::KernelError, change: Change) -> NftError {
    let action = match (change, source.errno()) {
        (Change::Add, Some(libc::EEXIST)) => {
            "adding port forwards (a host port is already forwarded to another guest)"
        }
        (Change::Delete, Some(libc::EEXIST)) => {
            "removing port forwards (a host port is forwarded to another guest than the one given)"
        }
        (Change::Add, Some(libc::ENOENT)) => {
            "adding port forwards (table inet qnet or its maps are missing)"
        }
        (Change::Delete, Some(libc::ENOENT)) => {
            "removing port forwards (table inet qnet or its maps are missing)"
        }
        (Change::Add, _) => "adding port forwards",
        (Change::Delete, _) => "removing port forwards",
    };
    NftError::Kernel { action, source }
}

/// Sets `net.ipv4.conf.all.route_localnet` to 1 in the current network
/// namespace (the sysctl is per namespace; `/proc/sys/net` is the calling
/// thread's). Needed for localhost forwards (`127.0.0.1:HOSTPORT` from the
/// host itself): after DNAT, the connection leaves through a bridge with
/// source 127.0.0.1, and the kernel refuses to route a loopback source (or
/// destination, for the replies after de-NAT) to or from a device without
/// `route_localnet` — the connection silently times out. `postrouting`
/// masquerades such packets to the bridge's address before they leave.
///
/// Turning it on also lets packets for 127.0.0.0/8 *arrive* from the
/// network on every interface; our table's `loopback_guard` drops those
/// while the table exists. The per-device sysctl
/// (`net.ipv4.conf.<bridge>.route_localnet`) is enough too (the kernel ORs
/// `all` and the device's), but does not survive the bridge being
/// re-created. IPv6 has no equivalent: localhost forwards are IPv4 only.
pub fn enable_localhost_forwards() -> std::io::Result<()> {
    if std::fs::read_to_string(ROUTE_LOCALNET)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(ROUTE_LOCALNET, "1\n")?;
    tracing::info!("set {ROUTE_LOCALNET} to 1 (localhost port forwards)");
    Ok(())
}

/// Removes our table, if it exists. Nothing else is touched.
pub async fn remove() -> Result<(), NftError> {
    let script = format!(
        "add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"
    );
    run_nft("removing table inet qnet", &["-f", "-"], Some(&script)).await?;
    Ok(())
}

/// Our table as nft lists it, normalised for comparison (trailing
/// whitespace and blank lines removed); empty if the table does not exist.
pub async fn list() -> Result<String, NftError> {
    match run_nft(
        "listing table inet qnet",
        &["list", "table", TABLE_FAMILY, TABLE_NAME],
        None,
    )
    .await
    {
        Ok(stdout) => Ok(normalize(&stdout)),
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(String::new())
        }
        Err(e) => Err(e),
    }
}

/// Trailing whitespace and blank lines removed, one `\n` after each line.
pub fn normalize(listing: &str) -> String {
    listing
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

async fn run_nft(
    action: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NftError> {
    let program = find_program("nft");
    let spawn_err = |source| NftError::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = tokio::process::Command::new(&program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes()).await.map_err(spawn_err)?;
        drop(pipe);
    }
    let output = child.wait_with_output().await.map_err(spawn_err)?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(NftError::Failed {
            action,
            status: output.status,
            message: relevant_error(&stderr),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// nft prints `FILE:LINE:COLS: Error: WHAT` followed by the offending line
/// and a line of carets; we keep the error and the offending line.
pub fn relevant_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    let Some(i) = lines.iter().position(|l| l.contains("Error")) else {
        return lines
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.is_empty())
            .unwrap_or("(no error message)")
            .to_owned();
    };
    let error = lines[i].trim();
    match lines.get(i + 1).map(|l| l.trim()) {
        Some(src) if !src.is_empty() && !src.chars().all(|c| c == '^' || c == '~') => {
            format!("{error}: `{src}`")
        }
        _ => error.to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{BlockedPort, Ipv6Config};

    fn net(name: &str, mode: Mode, subnet: &str) -> NetworkConfig {
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        let first = u32::from(subnet.network());
        NetworkConfig {
            name: name.parse().unwrap(),
            bridge: format!("br-{name}").parse().unwrap(),
            mode,
            subnet,
            router: (first + 1).into(),
            dhcp_range: ((first + 2).into(), (first + 200).into()),
            domain: format!("{name}.qnet").parse().unwrap(),
            uplink: None,
            blocked_ports: Vec::new(),
            ipv6: None,
        }
    }

    /// What every table starts with when there are no forwards: the empty
    /// maps, the loopback guard and the DNAT chains.
    const FORWARD_PARTS: &str = r#"	map fwd4 {
		type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
	}

	map fwd4_any {
		type inet_proto . inet_service : ipv4_addr . inet_service
	}

	map fwd6 {
		type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service
	}

	map fwd6_any {
		type inet_proto . inet_service : ipv6_addr . inet_service
	}

	chain loopback_guard {
		type filter hook prerouting priority raw; policy accept;
		iifname != "lo" ip daddr 127.0.0.0/8 drop
	}

	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump port_forwards
	}

	chain output {
		type nat hook output priority -100; policy accept;
		jump port_forwards
	}

	chain port_forwards {
		dnat ip to ip daddr . meta l4proto . th dport map @fwd4
		meta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @fwd4_any
		dnat ip6 to ip6 daddr . meta l4proto . th dport map @fwd6
		ip6 daddr != ::1 fib daddr type local dnat ip6 to meta l4proto . th dport map @fwd6_any
	}

"#;

    #[test]
    fn nat_network_with_blocked_ports() {
        let mut lab = net("lab", Mode::Nat, "10.42.0.0/24");
        lab.blocked_ports = vec![
            BlockedPort {
                proto: Proto::Tcp,
                port: 25,
            },
            BlockedPort {
                proto: Proto::Tcp,
                port: 465,
            },
            BlockedPort {
                proto: Proto::Udp,
                port: 1900,
            },
        ];
        let expected = String::from("table inet qnet {\n")
            + FORWARD_PARTS
            + r#"	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.42.0.0/24 ip daddr != 10.42.0.0/24 oifname != "br-lab" masquerade comment "lab"
		ct status dnat ip saddr 127.0.0.0/8 oifname != "lo" masquerade comment "localhost forwards"
		ct status dnat ip saddr 10.42.0.0/24 oifname "br-lab" masquerade comment "lab hairpin"
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname . oifname { "br-lab" . "br-lab" } accept
		ct state established,related accept
		oifname vmap { "br-lab" : jump net_lab_in }
		iifname vmap { "br-lab" : jump net_lab_out }
	}

	chain net_lab_in {
		ct status dnat accept
		drop
	}

	chain net_lab_out {
		ip saddr != 10.42.0.0/24 drop
		meta nfproto ipv6 drop
		tcp dport { 25, 465 } reject with tcp reset
		udp dport 1900 reject
		accept
	}
}
"#;
        assert_eq!(render(&[lab]), expected);
    }

    #[test]
    fn isolated_network_only_drops() {
        let iso = net("iso", Mode::Isolated, "10.43.0.0/24");
        let expected = String::from("table inet qnet {\n")
            + FORWARD_PARTS
            + r#"	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ct status dnat ip saddr 127.0.0.0/8 oifname != "lo" masquerade comment "localhost forwards"
		ct status dnat ip saddr 10.43.0.0/24 oifname "br-iso" masquerade comment "iso hairpin"
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname . oifname { "br-iso" . "br-iso" } accept
		iifname "br-iso" drop
		oifname "br-iso" drop
		ct state established,related accept
	}
}
"#;
        assert_eq!(render(&[iso]), expected);
    }

    #[test]
    fn routed_with_uplink_and_ipv6() {
        let mut r = net("r-1", Mode::Routed, "10.44.0.0/24");
        r.uplink = Some("eth0".parse().unwrap());
        r.ipv6 = Some(Ipv6Config {
            subnet: "fd44::/64".parse().unwrap(),
            router: "fd44::1".parse().unwrap(),
        });
        let text = render(&[r]);
        // No outgoing masquerade; only that of port forwards (hairpin,
        // localhost), which need it in every mode.
        assert!(
            text.lines()
                .filter(|l| l.contains("masquerade"))
                .all(|l| l.contains("ct status dnat")),
            "{text}"
        );
        assert!(
            text.contains("\tchain net_r-1_in {\n\t\tiifname != \"eth0\" drop\n\t\taccept\n\t}\n"),
            "{text}"
        );
        assert!(text.contains("\t\tip6 saddr != fd44::/64 drop\n"), "{text}");
        assert!(
            text.contains("\t\toifname != \"eth0\" drop\n\t\taccept\n"),
            "{text}"
        );
    }

    #[test]
    fn nat_with_uplink_and_ipv6_masquerades_both_families_via_uplink() {
        let mut n = net("six", Mode::Nat, "10.45.0.0/24");
        n.uplink = Some("up0".parse().unwrap());
        n.ipv6 = Some(Ipv6Config {
            subnet: "fd45::/64".parse().unwrap(),
            router: "fd45::1".parse().unwrap(),
        });
        let text = render(&[n]);
        assert!(text.contains(
            "\t\tip saddr 10.45.0.0/24 ip daddr != 10.45.0.0/24 oifname \"up0\" masquerade comment \"six\"\n"
        ), "{text}");
        assert!(text.contains(
            "\t\tip6 saddr fd45::/64 ip6 daddr != fd45::/64 oifname \"up0\" masquerade comment \"six\"\n"
        ), "{text}");
        assert!(!text.contains("nfproto ipv6 drop"), "{text}");
    }

    #[test]
    fn several_networks_are_sorted_and_use_sets() {
        let a = net("a", Mode::Nat, "10.1.0.0/24");
        let b = net("b", Mode::Isolated, "10.2.0.0/24");
        let c = net("c", Mode::Isolated, "10.3.0.0/24");
        let d = net("d", Mode::Routed, "10.4.0.0/24");
        let one = render(&[d.clone(), c.clone(), b.clone(), a.clone()]);
        assert_eq!(one, render(&[a, b, c, d]));
        assert!(
            one.contains("\t\tiifname { \"br-b\", \"br-c\" } drop\n"),
            "{one}"
        );
        assert!(
            one.contains(
                "\t\toifname vmap { \"br-a\" : jump net_a_in, \"br-d\" : jump net_d_in }\n"
            ),
            "{one}"
        );
        assert!(one.contains(
            "iifname . oifname { \"br-a\" . \"br-a\", \"br-b\" . \"br-b\", \"br-c\" . \"br-c\", \"br-d\" . \"br-d\" } accept"
        ), "{one}");
        assert!(script(&[])
            .starts_with("add table inet qnet\ndelete table inet qnet\ntable inet qnet {"));
    }

    pub(crate) fn rule(
        proto: Proto,
        host: Option<&str>,
        port: u16,
        guest: &str,
        gport: u16,
    ) -> ForwardRule {
        ForwardRule {
            proto,
            host_addr: host.map(|h| h.parse().unwrap()),
            host_port: port,
            guest_addr: guest.parse().unwrap(),
            guest_port: gport,
        }
    }

    #[test]
    fn forwards_are_map_elements_in_nfts_order_each_once() {
        let mut lab = net("lab", Mode::Nat, "10.42.0.0/24");
        lab.ipv6 = Some(Ipv6Config {
            subnet: "fd42::/64".parse().unwrap(),
            router: "fd42::1".parse().unwrap(),
        });
        let web = rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.10", 80);
        let dns = rule(Proto::Udp, None, 5353, "10.42.0.11", 53);
        let ssh = rule(Proto::Tcp, None, 22, "10.42.0.11", 22);
        let web6 = rule(Proto::Tcp, Some("fd99::1"), 8080, "fd42::10", 80);
        let text =
            render_with_forwards(std::slice::from_ref(&lab), &[dns, web6, web, ssh, dns, web]);
        let expected = r#"table inet qnet {
	map fwd4 {
		type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service
		elements = { 10.99.0.1 . tcp . 8080 : 10.42.0.10 . 80 }
	}

	map fwd4_any {
		type inet_proto . inet_service : ipv4_addr . inet_service
		elements = { tcp . 22 : 10.42.0.11 . 22,
			     udp . 5353 : 10.42.0.11 . 53 }
	}

	map fwd6 {
		type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service
		elements = { fd99::1 . tcp . 8080 : fd42::10 . 80 }
	}

	map fwd6_any {
		type inet_proto . inet_service : ipv6_addr . inet_service
	}
"#;
        assert!(text.starts_with(expected), "{text}");
        assert!(text.contains(
            "\t\tct status dnat ip6 saddr fd42::/64 oifname \"br-lab\" masquerade comment \"lab hairpin\"\n"
        ), "{text}");
        // Without forwards: the same layout, empty maps.
        assert_eq!(
            render(std::slice::from_ref(&lab)),
            render_with_forwards(&[lab], &[])
        );
    }

    #[test]
    fn adding_and_removing_touch_only_the_elements() {
        let web = rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.10", 80);
        let any6 = rule(Proto::Udp, None, 53, "fd42::10", 5353);
        assert_eq!(
            add_forwards_script(&[web, any6]),
            "add element inet qnet fwd4 { 10.99.0.1 . tcp . 8080 : 10.42.0.10 . 80 }\n\
             add element inet qnet fwd6_any { udp . 53 : fd42::10 . 5353 }\n"
        );
        assert_eq!(
            remove_forwards_script(&[web]),
            "add element inet qnet fwd4 { 10.99.0.1 . tcp . 8080 : 10.42.0.10 . 80 }\n\
             delete element inet qnet fwd4 { 10.99.0.1 . tcp . 8080 }\n"
        );
        assert_eq!(web.to_string(), "tcp 10.99.0.1:8080 -> 10.42.0.10:80");
        assert_eq!(any6.to_string(), "udp *:53 -> [fd42::10]:5353");
    }

    #[test]
    fn invalid_and_conflicting_forwards_are_refused_before_nft() {
        let ok = rule(Proto::Tcp, None, 8080, "10.42.0.10", 80);
        assert!(check_forwards(&[ok, ok]).is_ok(), "a duplicate is harmless");
        let cases = [
            (
                vec![rule(Proto::Tcp, Some("10.99.0.1"), 8080, "fd42::10", 80)],
                "IPv4 host address",
            ),
            (
                vec![rule(Proto::Tcp, Some("fd99::1"), 8080, "10.42.0.10", 80)],
                "IPv6 host address",
            ),
            (vec![rule(Proto::Udp, None, 0, "10.42.0.10", 80)], "port 0"),
            (
                vec![ok, rule(Proto::Tcp, None, 8080, "10.42.0.11", 80)],
                "conflicts with `tcp *:8080 -> 10.42.0.10:80`",
            ),
        ];
        for (rules, why) in cases {
            let err = check_forwards(&rules).expect_err(why);
            assert!(matches!(err, NftError::InvalidForward { .. }), "{err}");
            assert!(err.to_string().contains(why), "{err}");
        }
        // Not a conflict: another family, protocol or address.
        assert!(check_forwards(&[
            ok,
            rule(Proto::Tcp, None, 8080, "fd42::10", 80),
            rule(Proto::Udp, None, 8080, "10.42.0.11", 80),
            rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.11", 80),
        ])
        .is_ok());
    }

    #[test]
    fn relevant_error_keeps_the_error_and_the_offending_line() {
        let stderr = "/dev/stdin:6:20-25: Error: Could not process rule: No such file or directory\n  iifname \"x\" jump nosuch\n                   ^^^^^^\n";
        assert_eq!(
            relevant_error(stderr),
            "/dev/stdin:6:20-25: Error: Could not process rule: No such file or directory: `iifname \"x\" jump nosuch`"
        );
        assert_eq!(relevant_error("\nsomething odd\n"), "something odd");
        assert_eq!(relevant_error(""), "(no error message)");
    }

    #[test]
    fn normalize_drops_blank_lines_and_trailing_space() {
        assert_eq!(normalize("a  \n\n\tb\n"), "a\n\tb\n");
    }
}
