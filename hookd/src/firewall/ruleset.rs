//! The text of our table, `table inet qnet { ... }`, as small functions
//! over an [`Emitter`]: one function per concern (the forward maps, the
//! loopback guard, DNAT, masquerade, the forward policy, each network's
//! chains), each writing its own chain. Pure and deterministic: the same
//! networks and elements give the same bytes, in the layout `nft list`
//! prints, so a listing can be compared with what we rendered.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use super::element::{ForwardElement, ListingOrder, Map};
use crate::api::{Mode, Proto};
use crate::config::{links, Addressing, NetworkConfig};

pub const TABLE_FAMILY: &str = "inet";
pub const TABLE_NAME: &str = "qnet";

/// Writes a table in nft's layout: `{ ... }` blocks (maps and chains) one
/// tab deep and separated by a blank line, their lines two tabs deep.
struct Emitter {
    text: String,
    blocks: usize,
}

/// The body of one block: [`Block::line`] writes one line of it.
struct Block<'a>(&'a mut String);

impl Emitter {
    fn table() -> Emitter {
        Emitter {
            text: format!("table {TABLE_FAMILY} {TABLE_NAME} {{\n"),
            blocks: 0,
        }
    }

    /// `\t{head} {` + what `body` writes + `\t}`.
    fn block(&mut self, head: impl fmt::Display, body: impl FnOnce(&mut Block<'_>)) {
        if self.blocks > 0 {
            self.text.push('\n');
        }
        self.blocks += 1;
        let _ = writeln!(self.text, "\t{head} {{");
        body(&mut Block(&mut self.text));
        self.text.push_str("\t}\n");
    }

    fn finish(mut self) -> String {
        self.text.push_str("}\n");
        self.text
    }
}

impl Block<'_> {
    fn line(&mut self, text: impl fmt::Display) {
        let _ = writeln!(self.0, "\t\t{text}");
    }
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
        many => format!("{{ {} }}", join(many.iter().map(AsRef::as_ref), ", ")),
    }
}

fn join<'a>(items: impl Iterator<Item = &'a str>, sep: &str) -> String {
    items.collect::<Vec<_>>().join(sep)
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
/// order nft lists them, each once. Elements with a
/// [`ForwardElement::problem`] are left out, and of two elements with one
/// key only the first is kept (applying refuses both cases, see
/// [`super::check_elements`]).
///
/// Layout:
/// - maps `fwd4`, `fwd4_any`, `fwd6`, `fwd6_any`: the port forwards (see
///   the module documentation of [`super`]);
/// - `loopback_guard` (filter, prerouting, raw): drops packets for
///   127.0.0.0/8 that did not come from `lo`;
/// - `prerouting` (nat, dstnat) and `output` (nat, -100, i.e. dstnat):
///   both jump to `port_forwards`, which DNATs through the maps — `fwd4` /
///   `fwd6` by destination address, `fwd4_any` / `fwd6_any` only for
///   destinations of type local (`fib daddr type local`), and never `::1`;
/// - `postrouting` (nat, srcnat): first, per link from a `nat` network
///   (see [`crate::config::links`]), accept from its subnet to the linked
///   one: the linked guests see each other's own addresses; then one
///   masquerade rule per `nat` network
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
///   2. with links, jump to `links`: from a linked bridge and subnet to
///      the other, accept (new connections and the rest of theirs); the
///      other way, accept what conntrack knows (replies), so that this
///      works into isolated networks too, whose drops come next;
///   3. `isolated` bridges: drop whatever is forwarded into or out of them;
///   4. `ct state established,related accept`;
///   5. traffic into a bridge jumps to `net_<name>_in`: `nat` accepts only
///      DNAT'ed connections (port forwards) and drops the rest; `routed`
///      accepts (only from `uplink` when set);
///   6. traffic out of a bridge jumps to `net_<name>_out`: drop spoofed
///      sources, reject blocked ports (TCP with a reset, UDP with ICMP port
///      unreachable, so clients fail at once), drop anything not leaving
///      via `uplink` when set, accept.
///
/// "In" is checked before "out", so one `nat` network cannot open
/// connections into another unless they are linked. Links skip the `out`
/// chain: blocked ports and `uplink` are about the way out of the host.
pub fn render_with_forwards(networks: &[NetworkConfig], forwards: &[ForwardElement]) -> String {
    // Only networks with addresses of their own have rules: a LAN
    // network's guests are on the LAN, neither routed nor NATed by us.
    let mut nets: Vec<(&NetworkConfig, &Addressing)> = (networks.iter())
        .filter_map(|n| Some((n, n.addressing.as_ref()?)))
        .collect();
    nets.sort_by(|(a, _), (b, _)| a.name.cmp(&b.name));
    let links = links::allowed(networks);
    let mut table = Emitter::table();
    forward_maps(&mut table, forwards);
    loopback_guard(&mut table);
    dnat_chains(&mut table);
    let configs: Vec<&NetworkConfig> = nets.iter().map(|(net, _)| *net).collect();
    postrouting(&mut table, &configs, &links);
    forward(&mut table, &configs, !links.is_empty());
    links_chain(&mut table, &links);
    for (net, own) in nets.iter().filter(|(n, _)| n.mode != Mode::Isolated) {
        network_in(&mut table, net);
        network_out(&mut table, net, own);
    }
    table.finish()
}

/// The four maps, their elements as nft lists them: sorted by key bytes,
/// one per line aligned after the brace, each key once.
fn forward_maps(table: &mut Emitter, forwards: &[ForwardElement]) {
    let mut elements: BTreeMap<Map, BTreeMap<ListingOrder, &ForwardElement>> = BTreeMap::new();
    for element in forwards.iter().filter(|e| e.problem().is_none()) {
        elements
            .entry(element.map())
            .or_default()
            .entry(element.listing_order())
            .or_insert(element);
    }
    for map in Map::ALL {
        table.block(format_args!("map {map}"), |b| {
            b.line(format_args!("type {}", map.type_decl()));
            if let Some(in_map) = elements.get(&map) {
                let items: Vec<String> = in_map
                    .values()
                    .map(|e| format!("{} : {}", e.key(), e.value()))
                    .collect();
                b.line(format_args!(
                    "elements = {{ {} }}",
                    items.join(",\n\t\t\t     ")
                ));
            }
        });
    }
}

/// Drops packets for 127.0.0.0/8 from anywhere but `lo` (see the module
/// documentation of [`super`]: `route_localnet` would let them in).
fn loopback_guard(table: &mut Emitter) {
    table.block("chain loopback_guard", |b| {
        b.line("type filter hook prerouting priority raw; policy accept;");
        b.line("iifname != \"lo\" ip daddr 127.0.0.0/8 drop");
    });
}

/// DNAT through the maps, from outside and guests (prerouting) and from
/// the host itself (output).
fn dnat_chains(table: &mut Emitter) {
    table.block("chain prerouting", |b| {
        b.line("type nat hook prerouting priority dstnat; policy accept;");
        b.line("jump port_forwards");
    });
    table.block("chain output", |b| {
        // `dstnat` names -100 only for prerouting in nft 1.0.6.
        b.line("type nat hook output priority -100; policy accept;");
        b.line("jump port_forwards");
    });
    table.block("chain port_forwards", |b| {
        b.line("dnat ip to ip daddr . meta l4proto . th dport map @fwd4");
        b.line("meta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @fwd4_any");
        b.line("dnat ip6 to ip6 daddr . meta l4proto . th dport map @fwd6");
        b.line("ip6 daddr != ::1 fib daddr type local dnat ip6 to meta l4proto . th dport map @fwd6_any");
    });
}

/// A link as the firewall sees it: guests of the first network may open
/// connections to guests of the second.
type LinkPair<'a> = (&'a NetworkConfig, &'a NetworkConfig);

/// Masquerade: outgoing traffic of `nat` networks (but not to networks
/// they are linked to), localhost forwards, and every network's hairpin
/// forwards.
fn postrouting(table: &mut Emitter, nets: &[&NetworkConfig], links: &[LinkPair<'_>]) {
    table.block("chain postrouting", |b| {
        b.line("type nat hook postrouting priority srcnat; policy accept;");
        for (from, to) in links.iter().filter(|(from, _)| from.mode == Mode::Nat) {
            for (ip, s, d) in link_subnets(from, to) {
                b.line(format_args!("{ip} saddr {s} {ip} daddr {d} accept"));
            }
        }
        for net in nets.iter().filter(|n| n.mode == Mode::Nat) {
            let via = match &net.uplink {
                Some(uplink) => format!("oifname {}", quoted(uplink)),
                None => format!("oifname != {}", quoted(&net.bridge)),
            };
            let c = quoted(&net.name);
            for (ip, s) in subnets(net) {
                b.line(format_args!(
                    "{ip} saddr {s} {ip} daddr != {s} {via} masquerade comment {c}"
                ));
            }
        }
        b.line("ct status dnat ip saddr 127.0.0.0/8 oifname != \"lo\" masquerade comment \"localhost forwards\"");
        for net in nets {
            let (bridge, c) = (quoted(&net.bridge), quoted(&format!("{} hairpin", net.name)));
            for (ip, s) in subnets(net) {
                b.line(format_args!(
                    "ct status dnat {ip} saddr {s} oifname {bridge} masquerade comment {c}"
                ));
            }
        }
    });
}

/// The network's subnets with the keyword nft matches them by: `ip`, then
/// `ip6` when the network has IPv6 (a LAN network: none of its own).
fn subnets(net: &NetworkConfig) -> Vec<(&'static str, String)> {
    let Some(own) = &net.addressing else {
        return Vec::new();
    };
    let mut subnets = vec![("ip", own.subnet.trunc().to_string())];
    if let Some(v6) = &own.ipv6 {
        subnets.push(("ip6", v6.subnet.trunc().to_string()));
    }
    subnets
}

/// The subnets of a link, `from`'s and `to`'s, per address family both
/// have, with the keyword nft matches them by.
fn link_subnets(from: &NetworkConfig, to: &NetworkConfig) -> Vec<(&'static str, String, String)> {
    subnets(from)
        .into_iter()
        .zip(subnets(to))
        .map(|((ip, s), (_, d))| (ip, s, d))
        .collect()
}

/// `iifname . oifname { ... }`: a set of bridge pairs (nft lists a
/// concatenated set in braces even with one element).
fn bridge_pairs<'a>(pairs: impl Iterator<Item = (&'a NetworkConfig, &'a NetworkConfig)>) -> String {
    let items: Vec<String> = pairs
        .map(|(i, o)| format!("{} . {}", quoted(&i.bridge), quoted(&o.bridge)))
        .collect();
    format!("iifname . oifname {{ {} }}", items.join(", "))
}

/// The forward policy for our bridges (the order is explained at
/// [`render_with_forwards`]).
fn forward(table: &mut Emitter, nets: &[&NetworkConfig], links: bool) {
    table.block("chain forward", |b| {
        b.line("type filter hook forward priority filter; policy accept;");
        if !nets.is_empty() {
            let same = bridge_pairs(nets.iter().map(|n| (*n, *n)));
            b.line(format_args!("{same} accept"));
        }
        if links {
            b.line("jump links");
        }
        let isolated: Vec<String> = nets
            .iter()
            .filter(|n| n.mode == Mode::Isolated)
            .map(|n| quoted(&n.bridge))
            .collect();
        if !isolated.is_empty() {
            b.line(format_args!("iifname {} drop", set(&isolated)));
            b.line(format_args!("oifname {} drop", set(&isolated)));
        }
        b.line("ct state established,related accept");
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
            b.line(format_args!("oifname vmap {}", jumps("in")));
            b.line(format_args!("iifname vmap {}", jumps("out")));
        }
    });
}

/// `links`: connections between linked networks (see
/// [`render_with_forwards`]); nothing when there is no link.
fn links_chain(table: &mut Emitter, links: &[LinkPair<'_>]) {
    if links.is_empty() {
        return;
    }
    table.block("chain links", |b| {
        let replies = bridge_pairs(links.iter().map(|(from, to)| (*to, *from)));
        b.line(format_args!(
            "{replies} ct state established,related accept"
        ));
        for (from, to) in links {
            let (i, o) = (quoted(&from.bridge), quoted(&to.bridge));
            for (ip, s, d) in link_subnets(from, to) {
                b.line(format_args!(
                    "iifname {i} oifname {o} {ip} saddr {s} {ip} daddr {d} accept"
                ));
            }
        }
    });
}

/// `net_<name>_in`: what may be forwarded into a `nat` or `routed` bridge.
fn network_in(table: &mut Emitter, net: &NetworkConfig) {
    table.block(
        format_args!("chain {}", chain(&net.name, "in")),
        |b| match net.mode {
            Mode::Nat => {
                b.line("ct status dnat accept");
                b.line("drop");
            }
            _ => {
                if let Some(uplink) = &net.uplink {
                    b.line(format_args!("iifname != {} drop", quoted(uplink)));
                }
                b.line("accept");
            }
        },
    );
}

/// `net_<name>_out`: what a bridge's guests (addressed by `own`) may send
/// to be forwarded.
fn network_out(table: &mut Emitter, net: &NetworkConfig, own: &Addressing) {
    table.block(format_args!("chain {}", chain(&net.name, "out")), |b| {
        b.line(format_args!("ip saddr != {} drop", own.subnet.trunc()));
        match &own.ipv6 {
            Some(v6) => b.line(format_args!("ip6 saddr != {} drop", v6.subnet.trunc())),
            None => b.line("meta nfproto ipv6 drop"),
        }
        for (proto, verdict) in [
            (Proto::Tcp, "reject with tcp reset"),
            (Proto::Udp, "reject"),
        ] {
            let ports: Vec<String> = own
                .blocked_ports
                .iter()
                .filter(|p| p.proto == proto)
                .map(|p| p.port.to_string())
                .collect();
            if !ports.is_empty() {
                b.line(format_args!("{proto} dport {} {verdict}", set(&ports)));
            }
        }
        if let Some(uplink) = &net.uplink {
            b.line(format_args!("oifname != {} drop", quoted(uplink)));
        }
        b.line("accept");
    });
}

/// The transaction that replaces our table with the one for `networks`.
#[cfg(test)]
fn script(networks: &[NetworkConfig]) -> String {
    script_with_forwards(networks, &[])
}

/// The transaction that replaces our table with the one for `networks`
/// and `forwards`: `add table` (so that the delete cannot fail), `delete
/// table`, then the new table. nft commits it atomically.
pub fn script_with_forwards(networks: &[NetworkConfig], forwards: &[ForwardElement]) -> String {
    format!(
        "{}{}",
        remove_script(),
        render_with_forwards(networks, forwards)
    )
}

/// The transaction that removes our table, whether it exists or not.
pub fn remove_script() -> String {
    format!("add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n")
}

/// Adding `elements`, as nft text: one `add element` line per element
/// (what the nfnetlink batch of [`super::Firewall::add_elements`] does, for
/// `nft -f`, e.g. the benchmark's reference, and as its readable statement).
pub fn add_forwards_script(elements: &[ForwardElement]) -> String {
    let mut script = String::new();
    for e in elements {
        let _ = writeln!(
            script,
            "add element {TABLE_FAMILY} {TABLE_NAME} {} {{ {} : {} }}",
            e.map(),
            e.key(),
            e.value()
        );
    }
    script
}

/// Removing `elements`, as nft text: per element, `add element` (a no-op
/// if it is there, so that the delete cannot fail because it is absent —
/// nft 1.0.6 has no `destroy element`) then `delete element`.
pub fn remove_forwards_script(elements: &[ForwardElement]) -> String {
    let mut script = add_forwards_script(elements);
    for e in elements {
        let _ = writeln!(
            script,
            "delete element {TABLE_FAMILY} {TABLE_NAME} {} {{ {} }}",
            e.map(),
            e.key()
        );
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BlockedPort, Ipv6Config};
    use crate::firewall::element::tests::rule;

    fn net(name: &str, mode: Mode, subnet: &str) -> NetworkConfig {
        let mut net = NetworkConfig::with_defaults(name, mode, subnet.parse().unwrap());
        net.bridge = format!("br-{name}").parse().unwrap();
        let first = u32::from(net.own().subnet.network());
        net.own_mut().dhcp_range = ((first + 2).into(), (first + 200).into());
        net
    }

    /// `net` alone with uplink `uplink` and IPv6 subnet `v6`, rendered.
    fn render_dual_stack(mut net: NetworkConfig, uplink: &str, v6: &str) -> String {
        net.uplink = Some(uplink.parse().unwrap());
        net.own_mut().ipv6 = Ipv6Config::first_router(v6.parse().unwrap());
        render(&[net])
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
        lab.own_mut().blocked_ports = vec![
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
    fn a_lan_network_has_nothing_in_the_table() {
        let lan = NetworkConfig {
            name: "lan".parse().unwrap(),
            bridge: "br-lan".parse().unwrap(),
            mode: Mode::Bridged,
            uplink: Some("eth0".parse().unwrap()),
            owner: None,
            addressing: None,
        };
        let iso = net("iso", Mode::Isolated, "10.43.0.0/24");
        assert_eq!(render(&[iso.clone(), lan]), render(&[iso]));
    }

    #[test]
    fn routed_with_uplink_and_ipv6() {
        let text = render_dual_stack(
            net("r-1", Mode::Routed, "10.44.0.0/24"),
            "eth0",
            "fd44::/64",
        );
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
        let text = render_dual_stack(net("six", Mode::Nat, "10.45.0.0/24"), "up0", "fd45::/64");
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

    #[test]
    fn links_accept_their_direction_and_replies_and_skip_masquerade() {
        let v6 = |n: u8| Ipv6Config::first_router(format!("fd0{n}::/64").parse().unwrap());
        let link = |to: &str, one_way| crate::config::Link {
            to: to.parse().unwrap(),
            one_way,
        };
        let mut a = net("a", Mode::Nat, "10.1.0.0/24");
        a.own_mut().ipv6 = v6(1);
        a.own_mut().connect_to = vec![link("b", false), link("c", true), link("gone", false)];
        let mut b = net("b", Mode::Nat, "10.2.0.0/24");
        b.own_mut().ipv6 = v6(2);
        let c = net("c", Mode::Isolated, "10.3.0.0/24");
        let text = render(&[c.clone(), b.clone(), a.clone()]);
        assert!(
            text.contains(
                "\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr 10.1.0.0/24 ip daddr 10.2.0.0/24 accept\n\
             \t\tip6 saddr fd01::/64 ip6 daddr fd02::/64 accept\n\
             \t\tip saddr 10.1.0.0/24 ip daddr 10.3.0.0/24 accept\n\
             \t\tip saddr 10.2.0.0/24 ip daddr 10.1.0.0/24 accept\n\
             \t\tip6 saddr fd02::/64 ip6 daddr fd01::/64 accept\n\
             \t\tip saddr 10.1.0.0/24 ip daddr != 10.1.0.0/24"
            ),
            "{text}"
        );
        assert!(
            text.contains(" accept\n\t\tjump links\n\t\tiifname \"br-c\" drop\n"),
            "{text}"
        );
        let expected = r#"	chain links {
		iifname . oifname { "br-b" . "br-a", "br-c" . "br-a", "br-a" . "br-b" } ct state established,related accept
		iifname "br-a" oifname "br-b" ip saddr 10.1.0.0/24 ip daddr 10.2.0.0/24 accept
		iifname "br-a" oifname "br-b" ip6 saddr fd01::/64 ip6 daddr fd02::/64 accept
		iifname "br-a" oifname "br-c" ip saddr 10.1.0.0/24 ip daddr 10.3.0.0/24 accept
		iifname "br-b" oifname "br-a" ip saddr 10.2.0.0/24 ip daddr 10.1.0.0/24 accept
		iifname "br-b" oifname "br-a" ip6 saddr fd02::/64 ip6 daddr fd01::/64 accept
	}
"#;
        assert!(text.contains(expected), "{text}");
        // A link to a network that is not up is no rule; nor is a table
        // without links any different.
        let alone = render(&[a.clone(), c]);
        assert!(
            alone.contains("\t\tiifname . oifname { \"br-c\" . \"br-a\" } ct state"),
            "{alone}"
        );
        a.own_mut().connect_to.clear();
        assert!(!render(&[a, b]).contains("links"));
    }

    #[test]
    fn forwards_are_map_elements_in_nfts_order_each_once() {
        let mut lab = net("lab", Mode::Nat, "10.42.0.0/24");
        lab.own_mut().ipv6 = Ipv6Config::first_router("fd42::/64".parse().unwrap());
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
}
