//! network.rs and subnet.rs against the real kernel, each test in network
//! namespaces of its own.

mod common;

use std::net::Ipv4Addr;

use common::{ip_json, network, own_mut, NetNs};
use ipnet::Ipv4Net;
use qnet_hookd::api::Mode;
use qnet_hookd::config::Ipv6Config;
use qnet_hookd::network::{bridge_counters, bridge_mac, bring_down, bring_up, NetworkError};
use qnet_hookd::subnet::{pick_free_subnet, pick_free_subnet_for};

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `(family, address, prefix, flags)` of every address on `dev`, except
/// IPv6 link-local ones.
fn addresses(ns: &NetNs, dev: &str) -> Vec<(String, String, u64, serde_json::Value)> {
    let json = ip_json(ns, &["addr", "show", "dev", dev]);
    json[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["scope"] != "link")
        .map(|a| {
            (
                a["family"].as_str().unwrap().to_owned(),
                a["local"].as_str().unwrap().to_owned(),
                a["prefixlen"].as_u64().unwrap(),
                a.clone(),
            )
        })
        .collect()
}

fn link(ns: &NetNs, dev: &str) -> Option<serde_json::Value> {
    let out = ns.exec_output(&["ip", "-d", "-j", "link", "show", "dev", dev]);
    if !out.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    Some(json[0].clone())
}

fn sysctl(ns: &NetNs, path: &str) -> String {
    ns.exec_ok(&["cat", path]).trim().to_owned()
}

#[test]
fn bring_up_creates_the_bridge_with_its_mac_and_addresses_idempotently() {
    let ns = NetNs::new("up");
    let mut net = network("lab", "qnlab", Mode::Nat, "10.42.0.0/24");
    own_mut(&mut net).ipv6 = Ipv6Config::first_router("fd42::/64".parse().unwrap());
    let host_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(sysctl(&ns, "/proc/sys/net/ipv4/ip_forward"), "0");

    ns.block_on(|| bring_up(&net)).expect("bring_up");

    let dev = link(&ns, "qnlab").expect("the bridge exists");
    assert_eq!(dev["linkinfo"]["info_kind"], "bridge");
    assert_eq!(dev["address"], mac_string(bridge_mac("lab")));
    assert!(
        dev["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{dev}"
    );
    let addrs = addresses(&ns, "qnlab");
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(addrs
        .iter()
        .any(|(f, a, p, _)| f == "inet" && a == "10.42.0.1" && *p == 24));
    let v6 = addrs
        .iter()
        .find(|(f, ..)| f == "inet6")
        .expect("IPv6 router address");
    assert_eq!((v6.1.as_str(), v6.2), ("fd42::1", 64));
    assert_eq!(v6.3["nodad"], true, "{}", v6.3);
    assert!(v6.3.get("tentative").is_none(), "{}", v6.3);
    assert_eq!(sysctl(&ns, "/proc/sys/net/ipv4/ip_forward"), "1");
    assert_eq!(sysctl(&ns, "/proc/sys/net/ipv6/conf/all/forwarding"), "1");
    // The host's own namespace was not touched.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forwarding
    );

    // Someone else's address on the bridge is left alone, ours is not
    // duplicated.
    ns.ip(&["addr", "add", "10.42.0.77/24", "dev", "qnlab"]);
    ns.block_on(|| bring_up(&net)).expect("second bring_up");
    let addrs = addresses(&ns, "qnlab");
    assert_eq!(
        addrs.iter().filter(|(_, a, ..)| a == "10.42.0.1").count(),
        1,
        "{addrs:?}"
    );
    assert_eq!(
        addrs.iter().filter(|(_, a, ..)| a == "fd42::1").count(),
        1,
        "{addrs:?}"
    );
    assert!(
        addrs.iter().any(|(_, a, ..)| a == "10.42.0.77"),
        "{addrs:?}"
    );

    // Counters come from this namespace's bridge.
    let (rx, tx) = ns
        .block_on(|| bridge_counters("qnlab"))
        .expect("counters of an existing bridge");
    assert!(rx < u64::MAX && tx < u64::MAX);
    assert_eq!(ns.block_on(|| bridge_counters("qnnothere")), None);
}

#[test]
fn bring_up_adopts_an_existing_bridge_and_fixes_its_mac_and_prefix() {
    let ns = NetNs::new("adopt");
    ns.ip(&[
        "link",
        "add",
        "qnold",
        "address",
        "02:00:00:00:00:01",
        "type",
        "bridge",
    ]);
    ns.ip(&["addr", "add", "10.43.0.1/16", "dev", "qnold"]);
    let index_before = link(&ns, "qnold").unwrap()["ifindex"].clone();
    let net = network("old", "qnold", Mode::Isolated, "10.43.0.0/24");

    ns.block_on(|| bring_up(&net)).expect("bring_up");

    let dev = link(&ns, "qnold").unwrap();
    assert_eq!(
        dev["ifindex"], index_before,
        "the bridge was adopted, not recreated"
    );
    assert_eq!(dev["address"], mac_string(bridge_mac("old")));
    assert!(
        dev["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{dev}"
    );
    let addrs = addresses(&ns, "qnold");
    let routers: Vec<_> = addrs.iter().filter(|(_, a, ..)| a == "10.43.0.1").collect();
    assert_eq!(routers.len(), 1, "{addrs:?}");
    assert_eq!(routers[0].2, 24, "the stale /16 was replaced: {addrs:?}");
    // Isolated networks need no forwarding.
    assert_eq!(sysctl(&ns, "/proc/sys/net/ipv4/ip_forward"), "0");
}

#[test]
fn bring_up_and_down_refuse_a_device_that_is_not_a_bridge() {
    let ns = NetNs::new("notbr");
    ns.ip(&[
        "link", "add", "qnlab", "type", "veth", "peer", "name", "qnpeer",
    ]);
    let net = network("lab", "qnlab", Mode::Nat, "10.42.0.0/24");

    let err = ns
        .block_on(|| bring_up(&net))
        .expect_err("a veth is not our bridge");
    assert!(matches!(err, NetworkError::NotABridge { .. }), "{err}");
    assert!(err.to_string().contains("veth"), "{err}");
    let err = ns
        .block_on(|| bring_down(&net))
        .expect_err("nor may we delete it");
    assert!(matches!(err, NetworkError::NotABridge { .. }), "{err}");
    assert!(link(&ns, "qnlab").is_some(), "the veth is still there");
    assert!(addresses(&ns, "qnlab").is_empty(), "and got no address");
}

#[test]
fn bring_down_deletes_the_bridge_and_tolerates_its_absence() {
    let ns = NetNs::new("down");
    let net = network("lab", "qnlab", Mode::Routed, "10.42.0.0/24");
    ns.block_on(|| async {
        bring_up(&net).await.expect("bring_up");
    });
    assert!(link(&ns, "qnlab").is_some());
    ns.block_on(|| async {
        bring_down(&net).await.expect("bring_down");
        bring_down(&net)
            .await
            .expect("bring_down of a missing bridge");
    });
    assert!(link(&ns, "qnlab").is_none());
    // Sysctls are left as they were set.
    assert_eq!(sysctl(&ns, "/proc/sys/net/ipv4/ip_forward"), "1");
}

#[test]
fn pick_free_subnet_skips_addresses_and_routes_of_every_table() {
    let ns = NetNs::new("subnet");
    let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
    assert_eq!(ns.block_on(pick_free_subnet).unwrap(), net("10.213.0.0/24"));

    ns.ip(&["addr", "add", "10.213.0.1/24", "dev", "lo"]);
    ns.ip(&["route", "add", "10.213.1.0/24", "dev", "lo"]);
    ns.ip(&["route", "add", "10.213.2.0/23", "dev", "lo", "table", "100"]);
    ns.ip(&["route", "add", "default", "dev", "lo"]);
    ns.ip(&["route", "add", "unreachable", "10.213.4.128/25"]);
    assert_eq!(ns.block_on(pick_free_subnet).unwrap(), net("10.213.5.0/24"));

    // A restart must keep the subnet on its own bridge rather than move on.
    let mut cfg = network("qnet0", "qnet0", Mode::Nat, "10.213.5.0/24");
    own_mut(&mut cfg).router = Ipv4Addr::new(10, 213, 5, 1);
    ns.block_on(|| bring_up(&cfg)).expect("bring_up");
    assert_eq!(ns.block_on(pick_free_subnet).unwrap(), net("10.213.6.0/24"));
    assert_eq!(
        ns.block_on(|| pick_free_subnet_for("qnet0")).unwrap(),
        net("10.213.5.0/24")
    );
    // Without an address of its own, the bridge gets the first free one.
    assert_eq!(
        ns.block_on(|| pick_free_subnet_for("nosuchbr")).unwrap(),
        net("10.213.6.0/24")
    );
    // Everything in 10.0.0.0/8 taken: on to 172.31.
    ns.ip(&["route", "add", "10.0.0.0/8", "dev", "lo"]);
    assert_eq!(ns.block_on(pick_free_subnet).unwrap(), net("172.31.0.0/24"));
}
