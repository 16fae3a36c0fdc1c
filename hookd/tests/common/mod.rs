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

/// The uplink the network tests share: veth `up0` in `host` (10.99.0.1/24,
/// fd99::1/64) to `eth0` in `outside` (10.99.0.2/24, fd99::2/64).
pub fn uplink(host: &NetNs, outside: &NetNs) {
    veth(host, "up0", outside, "eth0");
    host.ip(&["addr", "add", "10.99.0.1/24", "dev", "up0"]);
    host.ip(&["addr", "add", "fd99::1/64", "dev", "up0", "nodad"]);
    outside.ip(&["addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    outside.ip(&["addr", "add", "fd99::2/64", "dev", "eth0", "nodad"]);
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
    let mut net = qnet_hookd::config::NetworkConfig::with_defaults(name, mode, subnet);
    net.bridge = bridge.parse().unwrap();
    let base = u32::from(subnet.network());
    own_mut(&mut net).dhcp_range = ((base + 100).into(), (base + 199).into());
    net
}

/// The addressing of a network the tests made with one (not a LAN one).
pub fn own(net: &qnet_hookd::config::NetworkConfig) -> &qnet_hookd::config::Addressing {
    net.addressing.as_ref().expect("a network with addressing")
}

/// The same, to change it.
pub fn own_mut(net: &mut qnet_hookd::config::NetworkConfig) -> &mut qnet_hookd::config::Addressing {
    net.addressing.as_mut().expect("a network with addressing")
}

/// Runs `future` on a runtime of the calling thread (and so in its
/// network namespace).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Plugs `guest`'s `eth0` (with MAC `mac`) into bridge `bridge` of
/// `daemon` through the veth port `port`.
pub fn plug_guest(daemon: &NetNs, bridge: &str, port: &str, guest: &NetNs, mac: &str) {
    veth(daemon, port, guest, "eth0");
    guest.ip(&["link", "set", "eth0", "address", mac]);
    daemon.ip(&["link", "set", port, "master", bridge]);
}
