//! `qnetctl doctor --trace`: where a static reading of the rules cannot
//! tell (a table of nft's own with a drop policy, a rule matching ports
//! or addresses), synthetic guest packets go through the real ruleset with
//! nftrace on, and the trace names the table, chain and rule that dropped
//! them.
//!
//! How ([`probe::run`] does it; everything here is pure):
//! - a veth pair [`VETH`], one end a port of the network's bridge: a frame
//!   written to the other end (AF_PACKET) enters the bridge as a guest's
//!   does, from a spare address of the network ([`spare_address`]);
//! - our own table `inet qnet_probe` ([`probe_table`]): at prerouting,
//!   priority -500 (before anyone), it turns nftrace on for frames from
//!   that address on the bridge; at the end of the input and forward
//!   hooks (priority 2147483647, after every other chain) it drops them:
//!   a probe never reaches dnsmasq nor leaves the host;
//! - `nft -a monitor trace` prints each chain and rule a probe passes; the
//!   first drop (or reject) outside our table is the answer
//!   ([`outcome`]).
//!
//! The veth pair and the table exist only while the probe runs (a
//! leftover of an interrupted probe is removed before the next).
//! iptables-legacy's rules are not nf_tables and do not show in a trace:
//! the static checks cover them.

pub mod probe;

use std::fmt;
use std::net::Ipv4Addr;

use crate::api::{Mode, Problem};
use crate::config::{Addressing, NetworkConfig};

/// Our table while a probe runs (family `inet`).
pub const TABLE: &str = "qnet_probe";
/// The veth pair: frames are written to the first, the second is the
/// bridge port.
pub const VETH: (&str, &str) = ("qnprobe0", "qnprobe1");
/// The probes' source MAC: locally administered, "qnetp".
pub const PROBE_MAC: [u8; 6] = [0x02, 0x71, 0x6e, 0x65, 0x74, 0x70];
/// Where the outbound probe goes: TEST-NET-3 (RFC 5737), an address no
/// one uses, routed as any address on the internet. It never leaves.
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The outbound probe's source port (the DHCP probe's is 68).
const PROBE_PORT: u16 = 40_404;

/// The path a probe takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A guest's DHCP request to the host (input).
    Dhcp,
    /// A guest's new connection to the internet (forward).
    Outbound,
}

/// One synthetic packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub path: Path,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path {
            Path::Dhcp => write!(
                f,
                "a guest's DHCP request to the host (UDP {}:68 -> {}:67)",
                self.src, self.dst
            ),
            Path::Outbound => write!(
                f,
                "a guest's new connection out (TCP {}:{} -> {}:{})",
                self.src, self.sport, self.dst, self.dport
            ),
        }
    }
}

/// The probes for `net` (`own`: its addressing) from address `src`: DHCP
/// always; outbound unless the network is isolated (nothing leaves it, by
/// design).
pub fn probes(net: &NetworkConfig, own: &Addressing, src: Ipv4Addr) -> Vec<Probe> {
    let mut probes = vec![Probe {
        path: Path::Dhcp,
        src,
        dst: own.router,
        sport: 68,
        dport: 67,
    }];
    if net.mode != Mode::Isolated {
        probes.push(Probe {
            path: Path::Outbound,
            src,
            dst: OUTSIDE,
            sport: PROBE_PORT,
            dport: 80,
        });
    }
    probes
}

/// The highest host address of the network's subnet that is neither the
/// router nor in `taken` (guests' addresses), if any.
pub fn spare_address(own: &Addressing, taken: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let first = u32::from(own.subnet.network());
    let last = u32::from(own.subnet.broadcast());
    (first.saturating_add(1)..last)
        .rev()
        .map(Ipv4Addr::from)
        .find(|ip| *ip != own.router && !taken.contains(ip))
}

/// The nft script that (re)creates our table for probes from `src` on
/// `bridge` (see the module documentation).
pub fn probe_table(bridge: &str, src: Ipv4Addr) -> String {
    let from = format!("iifname \"{bridge}\" ip saddr {src}");
    format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tchain trace_on {{\n\t\ttype filter hook prerouting priority -500; policy accept;\n\t\t{from} meta nftrace set 1\n\t}}\n\
         \tchain input_last {{\n\t\ttype filter hook input priority 2147483647; policy accept;\n\t\t{from} drop\n\t}}\n\
         \tchain forward_last {{\n\t\ttype filter hook forward priority 2147483647; policy accept;\n\t\t{from} drop\n\t}}\n\
         }}\n"
    )
}

/// The Ethernet frame of `probe`, to `dst_mac` (the bridge's): IPv4, then
/// UDP (DHCP) or a TCP SYN (outbound), checksums filled in.
pub fn frame(probe: &Probe, dst_mac: [u8; 6]) -> Vec<u8> {
    let (proto, l4) = match probe.path {
        Path::Dhcp => (17u8, udp(probe)),
        Path::Outbound => (6u8, tcp_syn(probe)),
    };
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&probe.src.octets());
    ip.extend_from_slice(&probe.dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut l4 = l4;
    let at = if proto == 6 { 16 } else { 6 };
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend_from_slice(&probe.src.octets());
    pseudo.extend_from_slice(&probe.dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&l4);
    l4[at..at + 2].copy_from_slice(&checksum(&pseudo).to_be_bytes());
    let mut frame = dst_mac.to_vec();
    frame.extend_from_slice(&PROBE_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// A UDP header and a minimal payload (a DHCP server would not parse it:
/// it is dropped before any socket sees it anyway).
fn udp(probe: &Probe) -> Vec<u8> {
    let payload = b"qnet doctor probe";
    let mut h = Vec::new();
    h.extend_from_slice(&probe.sport.to_be_bytes());
    h.extend_from_slice(&probe.dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

fn tcp_syn(probe: &Probe) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&probe.sport.to_be_bytes());
    h.extend_from_slice(&probe.dport.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    // Data offset 5 words, SYN, window 64240, checksum, urgent pointer.
    h.extend_from_slice(&[0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
    h
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What became of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Dropped (or rejected) by someone's chain: `what` is the rule (as
    /// nft lists it, without counters) or `policy drop`.
    Dropped {
        family: String,
        table: String,
        chain: String,
        what: String,
        handle: Option<u64>,
    },
    /// It reached the end of its hook: nothing drops it.
    Passed,
    /// Seen at prerouting only: the host has no route for it.
    NotRouted,
    /// Not in the trace, or not to its end.
    Unseen,
}

/// One trace line: `trace id ID FAMILY TABLE CHAIN REST`.
struct Line<'a> {
    id: &'a str,
    family: &'a str,
    table: &'a str,
    chain: &'a str,
    rest: &'a str,
}

fn line(text: &str) -> Option<Line<'_>> {
    let text = text.trim().strip_prefix("trace id ")?;
    let mut words = text.splitn(5, ' ');
    Some(Line {
        id: words.next()?,
        family: words.next()?,
        table: words.next()?,
        chain: words.next()?,
        rest: words.next()?.trim(),
    })
}

/// What `nft -a monitor trace` output `trace` says of `probe`. A packet
/// gets a new trace id at each hook, so the ids of `probe` are those whose
/// `packet:` line shows its source address and port.
pub fn outcome(trace: &str, probe: &Probe) -> Outcome {
    let proto = if probe.path == Path::Dhcp {
        "udp"
    } else {
        "tcp"
    };
    let saddr = format!(" ip saddr {} ", probe.src);
    let sport = format!(" {proto} sport {} ", probe.sport);
    let mut ids: Vec<&str> = Vec::new();
    // A packet line with an output interface: past routing, forwarded.
    let mut routed = false;
    for l in trace.lines().filter_map(line) {
        if let Some(packet) = l.rest.strip_prefix("packet:") {
            let packet = format!("{packet} ");
            if packet.contains(&saddr) && packet.contains(&sport) {
                if !ids.contains(&l.id) {
                    ids.push(l.id);
                }
                routed |= packet.contains(" oif ");
            }
        }
        if !ids.contains(&l.id) {
            continue;
        }
        if l.table == TABLE {
            if l.chain != "trace_on" && l.rest.ends_with("(verdict drop)") {
                return Outcome::Passed;
            }
        } else if let Some(dropped) = dropped(&l) {
            return dropped;
        }
    }
    if !ids.is_empty() && probe.path == Path::Outbound && !routed {
        Outcome::NotRouted
    } else {
        Outcome::Unseen
    }
}

/// The drop a line reports, if it does.
fn dropped(l: &Line<'_>) -> Option<Outcome> {
    let what = if let Some(rule) = l.rest.strip_prefix("rule ") {
        rule.strip_suffix("(verdict drop)")?.trim()
    } else if l.rest.starts_with("policy drop") || l.rest.starts_with("verdict drop") {
        "policy drop"
    } else {
        return None;
    };
    let (what, handle) = match what.rsplit_once(" # handle ") {
        Some((rule, h)) => (rule, h.trim().parse().ok()),
        None => (what, None),
    };
    Some(Outcome::Dropped {
        family: l.family.to_owned(),
        table: l.table.to_owned(),
        chain: l.chain.to_owned(),
        what: without_counters(what),
        handle,
    })
}

/// A rule without its `counter packets N bytes M` (they change).
fn without_counters(rule: &str) -> String {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        if words[i] == "packets" || words[i] == "bytes" {
            i += 2;
            continue;
        }
        out.push(words[i]);
        i += 1;
    }
    out.join(" ")
}

/// The problem `outcome` of `probe` on network `name`'s `bridge` is, if
/// any, with its fix.
pub fn problem(name: &str, bridge: &str, probe: &Probe, outcome: &Outcome) -> Option<Problem> {
    let (problem, fix) = match outcome {
        Outcome::Passed => return None,
        Outcome::Dropped {
            family,
            table,
            chain,
            what,
            handle,
        } => {
            let at = format!("{family} {table} {chain}");
            let accept = match probe.path {
                Path::Dhcp => format!("iifname \"{bridge}\" udp dport {{ 53, 67 }} accept"),
                Path::Outbound => format!("iifname \"{bridge}\" accept"),
            };
            let fix = match handle {
                Some(h) => format!(
                    "accept it ahead of that rule: `nft insert rule {at} position {h} {accept}` (or delete it: `nft delete rule {at} handle {h}`)"
                ),
                None => format!("accept it in that chain: `nft insert rule {at} {accept}`"),
            };
            let by = match handle {
                Some(h) => format!("rule `{what}` (handle {h})"),
                None => what.clone(),
            };
            (
                format!("nftrace: {probe} is dropped in table {family} {table}, chain {chain}, by {by}"),
                fix,
            )
        }
        Outcome::NotRouted => (
            format!("nftrace: {probe} is not routed: the host has no route to {}", probe.dst),
            "give the host a default route (`ip route add default via GATEWAY`)".to_owned(),
        ),
        Outcome::Unseen => (
            format!("nftrace: {probe} did not show in the trace to its end"),
            "run `qnetctl doctor --trace` again; if it persists, the kernel lacks nf_tables tracing".to_owned(),
        ),
    };
    Some(Problem {
        subject: name.to_owned(),
        problem,
        fix,
    })
}

#[cfg(test)]
mod tests;
