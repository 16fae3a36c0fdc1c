//! hookd's own test helpers, on top of the workspace's test kit
//! (`qnet_tests`): every namespace is a kit `NetNs`, which never touches the
//! host's namespace and is deleted on drop, also when a test panics.
#![allow(dead_code, unused_imports)]

pub use qnet_tests::netns::{accept_one, NetNs};
pub use qnet_tests::{require_programs as require, wait_until};

/// A veth pair: `a_if` in `a`, `b_if` in `b`, both up, no addresses.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    a.add_veth_to(a_if, None, b, b_if, None);
}

/// `ip -j` output of `args` in `ns`, parsed.
pub fn ip_json(ns: &NetNs, args: &[&str]) -> serde_json::Value {
    ns.ip_json(args)
}

/// A network config as the config file would give it: router `.1`, DHCP
/// `.100`-`.199`, domain `<name>.qnet`.
pub fn network(
    name: &str,
    bridge: &str,
    mode: qnet_hookd::api::Mode,
    subnet: &str,
) -> qnet_hookd::config::NetworkConfig {
    let subnet: ipnet::Ipv4Net = subnet.parse().expect("subnet");
    let base = u32::from(subnet.network());
    qnet_hookd::config::NetworkConfig {
        name: name.parse().unwrap(),
        bridge: bridge.parse().unwrap(),
        mode,
        subnet,
        router: (base + 1).into(),
        dhcp_range: ((base + 100).into(), (base + 199).into()),
        domain: format!("{name}.qnet").parse().unwrap(),
        uplink: None,
        blocked_ports: Vec::new(),
        ipv6: None,
        owner: None,
        connect_to: Vec::new(),
    }
}

/// Plugs `guest`'s `eth0` (with MAC `mac`) into bridge `bridge` of
/// `daemon` through the veth port `port`.
pub fn plug_guest(daemon: &NetNs, bridge: &str, port: &str, guest: &NetNs, mac: &str) {
    veth(daemon, port, guest, "eth0");
    guest.ip(&["link", "set", "eth0", "address", mac]);
    daemon.ip(&["link", "set", port, "master", bridge]);
}
