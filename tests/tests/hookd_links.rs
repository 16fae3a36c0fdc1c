//! Links between networks with real guests: three NAT networks, `a` linked
//! two-way to `b` (`connect-to`) and one way to `c` (`connect-to-one-way`),
//! `b` and `c` not linked. A connection a→b, b→a and a→c works; c→a, b→c
//! and c→b are blocked.
//!
//! One real guest per network (qemu -accel tcg, through
//! qnet-bridge-helper, followed by the daemon over QMP), at addresses
//! reserved beforehand. The guests open their connections with
//! `qnet.probe` at boot: `ga` and `gb` reach each other; `gc` boots once
//! they serve and fails to reach either. Connections the guests cannot
//! open on demand (to `gc`, once it is up) come from veth "guests":
//! namespaces plugged into bridge a and b, each also reaching a guest it
//! may reach, so that a blocked connection is the firewall's doing.
//! Last, `qnetctl status` shows each network's traffic.

use std::net::SocketAddr;
use std::time::Duration;

use qnet_tests::guest::{guest_image, random_token, GuestSpec, ProbeOutcome, RunningGuest, LONG};
use qnet_tests::hookd::{network, Hookd};
use qnet_tests::http::{http_get_in_netns, http_get_once};
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::ConfigDir;

/// One try of a connection that must be dropped.
const DROPPED_AFTER: Duration = Duration::from_secs(3);

/// `a` linked two-way to `b` and one way to `c`.
fn hookd_toml() -> String {
    let a = network(
        "a",
        "qnla",
        &[
            r#"subnet = "10.81.0.0/24""#,
            r#"connect-to = ["b"]"#,
            r#"connect-to-one-way = ["c"]"#,
        ],
    );
    let b = network("b", "qnlb", &[r#"subnet = "10.82.0.0/24""#]);
    let c = network("c", "qnlc", &[r#"subnet = "10.83.0.0/24""#]);
    a + &b + &c
}

/// Guest `g<net>`'s address and MAC on network `net`.
fn guest_addr(net: char) -> String {
    format!("10.8{}.0.10", net as u8 - b'a' + 1)
}

fn guest_mac(net: char) -> String {
    format!("52:54:00:8a:00:0{}", net as u8 - b'a' + 1)
}

fn http(net: char) -> SocketAddr {
    format!("{}:80", guest_addr(net)).parse().unwrap()
}

struct World {
    hookd: Hookd,
    config: ConfigDir,
    hk: NetNs,
}

impl World {
    /// The daemon with the three networks, and each guest's address
    /// reserved.
    fn new() -> World {
        let hk = NetNs::new("links-hk");
        let (hookd, config) =
            Hookd::start_for_guests(&hk, &hookd_toml(), &["qnla", "qnlb", "qnlc"]);
        for net in ['a', 'b', 'c'] {
            let (name, mac, ip) = (net.to_string(), guest_mac(net), guest_addr(net));
            hookd
                .qnetctl(&["reserve", "add", &name, &mac, "--ip", &ip])
                .unwrap_or_else(|e| panic!("reserve {ip}: {e}"));
        }
        World { hookd, config, hk }
    }

    /// Boots guest `g<net>` on network `net`, probing `probes` (`tries`
    /// times each) once it serves; does not wait.
    fn boot(&self, net: char, token: &str, probes: &[char], tries: u32) -> RunningGuest {
        let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
        let mut spec = GuestSpec::new(&image, guest_mac(net), token);
        let targets: Vec<String> = probes.iter().map(|p| http(*p).to_string()).collect();
        spec.extra_append = vec![
            format!("qnet.probe={}", targets.join(",")),
            format!("qnet.probe_tries={tries}"),
        ];
        let bridge = format!("qnl{net}");
        let name = format!("g{net}");
        (self.hookd).spawn_guest(&self.hk, &self.config, &name, &spec, &bridge, &[])
    }

    /// A veth "guest" on network `net`'s bridge at `.20`.
    fn veth_guest(&self, net: char) -> NetNs {
        let ns = NetNs::new(&format!("links-v{net}"));
        let addr = guest_addr(net).replace(".10", ".20");
        self.hk.add_veth_to(
            &format!("v{net}0"),
            None,
            &ns,
            "eth0",
            Some(&format!("{addr}/24")),
        );
        self.hk.ip(&[
            "link",
            "set",
            &format!("v{net}0"),
            "master",
            &format!("qnl{net}"),
        ]);
        let router = guest_addr(net).replace(".10", ".1");
        ns.ip(&["route", "add", "default", "via", &router]);
        ns
    }
}

/// What `guest` found at `net`'s guest.
fn probe(guest: &RunningGuest, net: char) -> ProbeOutcome {
    guest
        .wait_for_probe_to(&http(net).to_string(), LONG)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn linked_networks_connect_where_linked_only() {
    let world = World::new();
    let tokens: Vec<String> = (0..3).map(|_| random_token()).collect();
    let reached = |net: char| ProbeOutcome::Reached {
        body: tokens[(net as u8 - b'a') as usize].clone(),
    };

    // a ↔ b, opened by the real guests of both (each tries while the
    // other boots).
    let ga = world.boot('a', &tokens[0], &['b'], 10);
    let gb = world.boot('b', &tokens[1], &['a'], 10);
    assert_eq!(
        probe(&ga, 'b'),
        reached('b'),
        "a -> b\n{}",
        world.hookd.log()
    );
    assert_eq!(probe(&gb, 'a'), reached('a'), "b -> a");

    // c's guest, once a and b serve: it reaches neither.
    let gc = world.boot('c', &tokens[2], &['a', 'b'], 1);
    gc.wait_for_ready(LONG).unwrap_or_else(|e| panic!("{e}"));
    // a → c (one-way link) from a's veth guest, to c's real guest.
    let va = world.veth_guest('a');
    let body = http_get_in_netns(va.name(), http('c'), "/", LONG)
        .unwrap_or_else(|e| panic!("a -> c: {e}"));
    assert_eq!(body.trim(), tokens[2], "a -> c");
    // b → c: not linked, although b's veth guest reaches a's guest.
    let vb = world.veth_guest('b');
    let body = http_get_in_netns(vb.name(), http('a'), "/", LONG)
        .unwrap_or_else(|e| panic!("b -> a: {e}"));
    assert_eq!(body.trim(), tokens[0], "b -> a");
    let blocked = vb.run_in(|| http_get_once(http('c'), "/", DROPPED_AFTER));
    assert!(blocked.is_err(), "b -> c is not linked: {blocked:?}");
    // Meanwhile c's guest tried a's and b's.
    assert_eq!(probe(&gc, 'a'), ProbeOutcome::Failed, "c -> a is one-way");
    assert_eq!(probe(&gc, 'b'), ProbeOutcome::Failed, "c -> b: not linked");

    // `qnetctl status` counts each network's traffic (its bridge's).
    let status = world.hookd.qnetctl(&["status"]).unwrap();
    let networks = status["networks"].as_array().unwrap();
    assert_eq!(networks.len(), 3, "{status}");
    for net in networks {
        for counter in ["rx_bytes", "tx_bytes"] {
            assert!(net[counter].as_u64().unwrap() > 0, "{counter}: {net}");
        }
    }
}
