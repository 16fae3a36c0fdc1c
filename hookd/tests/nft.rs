//! The firewall (our nftables table) against the real kernel: our table beside a foreign one, and real
//! TCP connections through it. Topology of the packet tests:
//!
//! ```text
//!  guest ns                daemon ns                      outside ns
//!  eth0 10.42.0.10 ── gport ─[bridge qnlab 10.42.0.1]
//!  fd42::10                          up0 10.99.0.1 ─────── eth0 10.99.0.2
//!                                    fd99::1                   fd99::2
//! ```
//!
//! The outside has no route back to the guests' subnet (unless a test adds
//! one), so a connection from a guest only works if it is masqueraded.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, UdpSocket};
use std::time::Duration;

use common::{accept_one, network, own, own_mut, plug_guest, require, veth, NetNs};
use qnet_hookd::api::{Mode, Proto};
use qnet_hookd::config::{BlockedPort, Ipv6Config, NetworkConfig};
use qnet_hookd::firewall::{self, Firewall, FirewallError};
use qnet_hookd::network::bring_up;

static FW: Firewall = Firewall::new();

/// Generous failure bound for connections that must succeed.
const OK_WITHIN: Duration = Duration::from_secs(10);
/// How long a connection that must fail (dropped packets) is given.
const DROPPED_AFTER: Duration = Duration::from_secs(3);

fn lab(mode: Mode) -> NetworkConfig {
    let mut net = network("lab", "qnlab", mode, "10.42.0.0/24");
    own_mut(&mut net).ipv6 = Ipv6Config::first_router("fd42::/64".parse().unwrap());
    net
}

struct Topology {
    daemon: NetNs,
    outside: NetNs,
    guest: NetNs,
}

fn topology(what: &str, net: &NetworkConfig) -> Topology {
    require(&["ip", "nft"]);
    let daemon = NetNs::new(&format!("{what}-d"));
    let outside = NetNs::new(&format!("{what}-o"));
    let guest = NetNs::new(&format!("{what}-g"));
    common::uplink(&daemon, &outside);
    daemon.block_on(|| bring_up(net)).expect("bring_up");
    plug_guest(&daemon, &net.bridge, "gport", &guest, "52:54:00:00:00:10");
    guest.ip(&["addr", "add", "10.42.0.10/24", "dev", "eth0"]);
    guest.ip(&["route", "add", "default", "via", "10.42.0.1"]);
    guest.ip(&["addr", "add", "fd42::10/64", "dev", "eth0", "nodad"]);
    guest.ip(&["-6", "route", "add", "default", "via", "fd42::1"]);
    Topology {
        daemon,
        outside,
        guest,
    }
}

impl Topology {
    /// Our table for `net` alone, in the daemon's namespace.
    fn apply(&self, net: &NetworkConfig) {
        self.daemon
            .block_on(|| FW.apply_ruleset(std::slice::from_ref(net), &[]))
            .expect("apply");
    }
}

/// A connection from `from` to `to` (listening in `listen_ns`) gets
/// through, and the listener sees it come from `source`.
#[track_caller]
fn assert_source(from: &NetNs, listen_ns: &NetNs, to: &str, source: &str) {
    let seen = connect_and_see_source(from, listen_ns, to);
    assert_eq!(seen, source.parse::<IpAddr>().unwrap(), "to {to}");
}

/// Connects from `from` to `to` (listening in `listen_ns`) and returns the
/// source address the listener saw.
fn connect_and_see_source(from: &NetNs, listen_ns: &NetNs, to: &str) -> IpAddr {
    let listener = listen_ns.listen(to);
    let seen = accept_one(listener, OK_WITHIN);
    from.connect(to, OK_WITHIN)
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
    seen.recv_timeout(OK_WITHIN)
        .unwrap_or_else(|_| panic!("{to} saw no connection"))
        .ip()
}

/// What nft lists is what we rendered, rule for rule (nft may list the
/// elements of an anonymous set in another order, so compare the shape).
fn assert_listed_as_rendered(listing: &str, nets: &[NetworkConfig]) {
    assert_eq!(
        listing.lines().count(),
        firewall::normalize(&firewall::render(nets)).lines().count(),
        "{listing}"
    );
}

#[test]
fn apply_replaces_only_our_table_and_is_repeatable() {
    require(&["ip", "nft"]);
    let ns = NetNs::new("nft-table");
    ns.exec_ok(&["nft", "add", "table", "ip", "foreign"]);
    ns.exec_ok(&["nft", "add", "chain", "ip", "foreign", "c"]);
    let foreign = || ns.exec_ok(&["nft", "list", "table", "ip", "foreign"]);
    let foreign_before = foreign();

    let mut nat = lab(Mode::Nat);
    own_mut(&mut nat).blocked_ports = vec![BlockedPort {
        proto: Proto::Tcp,
        port: 25,
    }];
    let iso = network("iso", "qniso", Mode::Isolated, "10.43.0.0/24");
    let nets = vec![nat.clone(), iso];

    let (absent, first, second) = ns.block_on(|| async {
        let absent = FW.listing().await.expect("list without our table");
        FW.apply_ruleset(&nets, &[]).await.expect("first apply");
        let first = FW.listing().await.expect("list");
        FW.apply_ruleset(&nets, &[]).await.expect("second apply");
        let second = FW.listing().await.expect("list");
        (absent, first, second)
    });
    assert_eq!(absent, "");
    assert_eq!(first, second, "re-applying changes nothing");
    assert!(first.starts_with("table inet qnet {\n"), "{first}");
    assert_eq!(
        first.matches("masquerade comment \"lab\"").count(),
        2,
        "outgoing masquerade, IPv4 and IPv6, once each:\n{first}"
    );
    assert_eq!(first.matches("chain net_lab_out {").count(), 1, "{first}");
    assert!(
        first.contains("tcp dport 25 reject with tcp reset"),
        "{first}"
    );
    assert_listed_as_rendered(&first, &nets);

    let tables = ns.exec_ok(&["nft", "list", "tables"]);
    let mut tables: Vec<&str> = tables.lines().collect();
    tables.sort();
    assert_eq!(tables, ["table inet qnet", "table ip foreign"]);
    assert_eq!(
        foreign(),
        foreign_before,
        "apply left the foreign table alone"
    );

    // A different configuration replaces the table as a whole.
    let only_nat = vec![nat];
    let changed = ns.block_on(|| async {
        FW.apply_ruleset(&only_nat, &[]).await.expect("apply");
        FW.listing().await.expect("list")
    });
    assert!(!changed.contains("qniso"), "{changed}");

    ns.block_on(|| async {
        FW.teardown().await.expect("remove");
        assert_eq!(FW.listing().await.expect("list"), "");
        FW.teardown().await.expect("removing an absent table");
        FW.apply_ruleset(&[], &[]).await.expect("applying nothing");
    });
    assert_eq!(
        foreign(),
        foreign_before,
        "remove left the foreign table alone"
    );
    assert_eq!(
        ns.exec_ok(&["nft", "list", "tables"]).trim(),
        "table ip foreign"
    );
}

#[test]
fn a_failed_apply_reports_nft_and_keeps_the_previous_table() {
    require(&["ip", "nft"]);
    let ns = NetNs::new("nft-fail");
    let good = vec![lab(Mode::Nat)];
    // Names are typed now and cannot break nft's syntax; two networks on
    // one bridge (the config refuses that, the structs do not) still make
    // nft fail.
    let mut twin = lab(Mode::Routed);
    twin.name = "twin".parse().unwrap();
    let bad = [lab(Mode::Routed), twin];
    let (before, err, after) = ns.block_on(|| async {
        FW.apply_ruleset(&good, &[]).await.expect("apply");
        let before = FW.listing().await.unwrap();
        let err = FW
            .apply_ruleset(&bad, &[])
            .await
            .expect_err("nft must refuse this");
        let after = FW.listing().await.unwrap();
        (before, err, after)
    });
    let FirewallError::Failed { message, .. } = &err else {
        panic!("expected nft's error, got {err}");
    };
    assert!(message.contains("Error"), "{message}");
    assert!(err.to_string().contains(message.as_str()), "{err}");
    assert_eq!(before, after, "the transaction changed nothing");
}

#[test]
fn nat_masquerades_rejects_blocked_ports_and_keeps_the_outside_out() {
    let mut net = lab(Mode::Nat);
    own_mut(&mut net).blocked_ports = vec![
        BlockedPort {
            proto: Proto::Tcp,
            port: 2525,
        },
        BlockedPort {
            proto: Proto::Udp,
            port: 5353,
        },
    ];
    let t = topology("nat", &net);
    t.apply(&net);

    // Out through the uplink, masqueraded: the outside sees the daemon's
    // uplink address, for IPv4 and IPv6.
    assert_source(&t.guest, &t.outside, "10.99.0.2:8080", "10.99.0.1");
    assert_source(&t.guest, &t.outside, "[fd99::2]:8080", "fd99::1");

    // A blocked TCP port fails at once with a reset, although the outside
    // listens on it.
    let _listener = t.outside.listen("10.99.0.2:2525");
    let err = t
        .guest
        .connect("10.99.0.2:2525", OK_WITHIN)
        .expect_err("tcp/2525 is blocked");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // A blocked UDP port gets an ICMP port unreachable, although a socket
    // is bound to it outside.
    let _bound = t
        .outside
        .run_in(|| UdpSocket::bind("10.99.0.2:5353").unwrap());
    let err = t.guest.run_in(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect("10.99.0.2:5353").unwrap();
        socket.set_read_timeout(Some(OK_WITHIN)).unwrap();
        socket.send(b"ping").unwrap();
        socket.recv(&mut [0; 16]).expect_err("udp/5353 is blocked")
    });
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // Nothing gets in from outside, even with a route to the guests.
    t.outside
        .ip(&["route", "add", "10.42.0.0/24", "via", "10.99.0.1"]);
    let _guest_listener = t.guest.listen("10.42.0.10:2222");
    let result = t.outside.connect("10.42.0.10:2222", DROPPED_AFTER);
    assert!(result.is_err(), "the outside reached a NAT guest");
}

#[test]
fn nat_with_uplink_masquerades_only_via_the_uplink() {
    let mut net = lab(Mode::Nat);
    net.uplink = Some("up0".parse().unwrap());
    let t = topology("natup", &net);
    // A second way out, not the uplink: forwarding there is refused.
    let other = NetNs::new("natup-x");
    veth(&t.daemon, "side0", &other, "eth0");
    t.daemon
        .ip(&["addr", "add", "10.98.0.1/24", "dev", "side0"]);
    other.ip(&["addr", "add", "10.98.0.2/24", "dev", "eth0"]);
    t.apply(&net);

    assert_source(&t.guest, &t.outside, "10.99.0.2:8080", "10.99.0.1");
    let _listener = other.listen("10.98.0.2:8080");
    let result = t.guest.connect("10.98.0.2:8080", DROPPED_AFTER);
    assert!(
        result.is_err(),
        "forwarded via a device that is not the uplink"
    );
}

#[test]
fn routed_forwards_both_ways_without_masquerade() {
    let net = lab(Mode::Routed);
    let t = topology("routed", &net);
    t.outside
        .ip(&["route", "add", "10.42.0.0/24", "via", "10.99.0.1"]);
    t.apply(&net);

    assert_source(&t.guest, &t.outside, "10.99.0.2:8080", "10.42.0.10");
    assert_source(&t.outside, &t.guest, "10.42.0.10:2222", "10.99.0.2");
}

#[test]
fn isolated_forwards_nothing_but_guests_reach_each_other_and_the_host() {
    let net = lab(Mode::Isolated);
    let t = topology("iso", &net);
    // Forwarding on, as if another network needed it: only our rules
    // keep this one isolated.
    t.daemon
        .exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    t.outside
        .ip(&["route", "add", "10.42.0.0/24", "via", "10.99.0.1"]);
    let second = NetNs::new("iso-g2");
    plug_guest(&t.daemon, "qnlab", "gport2", &second, "52:54:00:00:00:11");
    second.ip(&["addr", "add", "10.42.0.11/24", "dev", "eth0"]);

    // Without our table the guest does get out (the topology works).
    assert_source(&t.guest, &t.outside, "10.99.0.2:8080", "10.42.0.10");

    t.apply(&net);

    let _outside_listener = t.outside.listen("10.99.0.2:8081");
    let out = t.guest.connect("10.99.0.2:8081", DROPPED_AFTER);
    assert!(out.is_err(), "an isolated guest reached the outside");
    let _guest_listener = t.guest.listen("10.42.0.10:2222");
    let inbound = t.outside.connect("10.42.0.10:2222", DROPPED_AFTER);
    assert!(inbound.is_err(), "the outside reached an isolated guest");

    // Bridged guest to guest, and guest to host, still work.
    assert_source(&second, &t.guest, "10.42.0.10:2223", "10.42.0.11");
    assert_source(&t.guest, &t.daemon, "10.42.0.1:7000", "10.42.0.10");
}

/// Links between networks against the real kernel, with a veth "guest" on
/// each of four networks: `lab` (nat, IPv6 too) linked two-way to `b` (nat,
/// IPv6 too) and one way to `c` (nat) and to `i` (isolated); `b` and `c`
/// not linked.
#[test]
fn links_open_their_directions_only_without_masquerade() {
    require(&["ip", "nft"]);
    let daemon = NetNs::new("links-d");
    let link = |to: &str, one_way| qnet_hookd::config::Link {
        to: to.parse().unwrap(),
        one_way,
    };
    let mut a = lab(Mode::Nat);
    // Declared by lab alone: b's guests may connect back all the same.
    own_mut(&mut a).connect_to = vec![link("b", false), link("c", true), link("i", true)];
    let mut b = network("b", "qnb", Mode::Nat, "10.43.0.0/24");
    own_mut(&mut b).ipv6 = Ipv6Config::first_router("fd43::/64".parse().unwrap());
    let c = network("c", "qnc", Mode::Nat, "10.44.0.0/24");
    let i = network("i", "qni", Mode::Isolated, "10.45.0.0/24");
    let nets = vec![a, b, c, i];
    let guests: Vec<NetNs> = nets
        .iter()
        .enumerate()
        .map(|(n, net)| {
            let guest = NetNs::new(&format!("links-{}", net.name));
            daemon.block_on(|| bring_up(net)).expect("bring_up");
            let mac = format!("52:54:00:00:01:{n:02x}");
            plug_guest(&daemon, &net.bridge, &format!("p{n}"), &guest, &mac);
            let base = own(net).subnet.network().octets();
            let addr = format!("{}.{}.{}.10/24", base[0], base[1], base[2]);
            guest.ip(&["addr", "add", &addr, "dev", "eth0"]);
            guest.ip(&[
                "route",
                "add",
                "default",
                "via",
                &own(net).router.to_string(),
            ]);
            if let Some(v6) = &own(net).ipv6 {
                let addr = format!("{}10/64", v6.subnet.network());
                guest.ip(&["addr", "add", &addr, "dev", "eth0", "nodad"]);
                guest.ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &v6.router.to_string(),
                ]);
            }
            guest
        })
        .collect();
    let [ga, gb, gc, gi] = &guests[..] else {
        unreachable!()
    };
    daemon
        .block_on(|| FW.apply_ruleset(&nets, &[]))
        .expect("apply");
    let listing = daemon.block_on(|| FW.listing()).expect("list");
    assert!(listing.contains("\tchain links {\n"), "{listing}");
    assert_listed_as_rendered(&listing, &nets);

    // Linked: each side sees the other's own address (no masquerade).
    for (from, to, port, source) in [
        (ga, gb, "10.43.0.10:80", "10.42.0.10"),
        (ga, gb, "[fd43::10]:80", "fd42::10"),
        (gb, ga, "10.42.0.10:81", "10.43.0.10"),
        (gb, ga, "[fd42::10]:81", "fd43::10"),
        (ga, gc, "10.44.0.10:82", "10.42.0.10"),
        (ga, gi, "10.45.0.10:83", "10.42.0.10"),
    ] {
        assert_source(from, to, port, source);
    }
    // The other way of a one-way link, and networks not linked: dropped.
    for (from, to, port) in [
        (gc, ga, "10.42.0.10:84"),
        (gi, ga, "10.42.0.10:85"),
        (gb, gc, "10.44.0.10:86"),
        (gc, gb, "10.43.0.10:87"),
    ] {
        let _listener = to.listen(port);
        let result = from.connect(port, DROPPED_AFTER);
        assert!(result.is_err(), "{} reached {port}", from.name());
    }
}
