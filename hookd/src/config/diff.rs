//! What a new configuration changes, network by network: the plan a
//! reload or a run-time edit applies. Pure, so every case is unit-tested;
//! the reconciler acts on it.
//!
//! A network that did not change is not touched at all (its bridge,
//! dnsmasq and guests go on as they were); one that changed is touched as
//! little as its change needs.

use super::NetworkConfig;

/// How much of a changed network must be redone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Only its rules (blocked ports, uplink, firewall integration, mode
    /// between nat and routed...): the next ruleset transaction carries
    /// them; bridge and dnsmasq stay.
    Rules,
    /// Its dnsmasq configuration too (DHCP range, domain, isolation):
    /// dnsmasq restarts; the bridge and the guests on it stay.
    Dnsmasq,
    /// Its bridge's name or addresses: the bridge is made again, which
    /// the guests on it see as a link flap.
    Recreate,
}

/// The plan: which networks come, go and change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetworkDiff {
    pub added: Vec<NetworkConfig>,
    pub removed: Vec<NetworkConfig>,
    /// (old, new, what to redo).
    pub changed: Vec<(NetworkConfig, NetworkConfig, Change)>,
}

impl NetworkDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The diff from the networks `old` to `new` (matched by name).
/// `dnsmasq_differs` tells whether two configs of one network give
/// dnsmasq different configuration files (the dnsmasq module knows).
pub fn diff(
    old: &[NetworkConfig],
    new: &[NetworkConfig],
    dnsmasq_differs: impl Fn(&NetworkConfig, &NetworkConfig) -> bool,
) -> NetworkDiff {
    let mut plan = NetworkDiff::default();
    for net in old {
        if !new.iter().any(|n| n.name == net.name) {
            plan.removed.push(net.clone());
        }
    }
    for net in new {
        match old.iter().find(|o| o.name == net.name) {
            None => plan.added.push(net.clone()),
            Some(before) if before == net => {}
            Some(before) => {
                let change = change(before, net, &dnsmasq_differs);
                plan.changed.push((before.clone(), net.clone(), change));
            }
        }
    }
    plan
}

/// What redoing `old` as `new` takes (they differ).
fn change(
    old: &NetworkConfig,
    new: &NetworkConfig,
    dnsmasq_differs: impl Fn(&NetworkConfig, &NetworkConfig) -> bool,
) -> Change {
    let link = |n: &NetworkConfig| {
        let addresses = n.addressing.as_ref().map(|a| (a.subnet, a.router, a.ipv6));
        (n.bridge.clone(), addresses)
    };
    // A LAN network's bridge is its uplink's: another uplink, or a mode
    // to or from bridged, gives the uplink back and takes over anew.
    let lan = |n: &NetworkConfig| n.is_lan().then(|| n.uplink.clone());
    if link(old) != link(new) || lan(old) != lan(new) {
        Change::Recreate
    } else if dnsmasq_differs(old, new) {
        Change::Dnsmasq
    } else {
        Change::Rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn net(name: &str, third: u8) -> NetworkConfig {
        let mut net = Config::default_network(format!("10.77.{third}.0/24").parse().unwrap());
        net.name = name.parse().unwrap();
        net.bridge = name.parse().unwrap();
        net
    }

    fn never(_: &NetworkConfig, _: &NetworkConfig) -> bool {
        false
    }

    #[test]
    fn unchanged_networks_are_not_in_the_plan() {
        let nets = [net("a", 1), net("b", 2)];
        assert!(diff(&nets, &nets, |_, _| true).is_empty());
    }

    #[test]
    fn networks_come_and_go_by_name() {
        let plan = diff(
            &[net("a", 1), net("b", 2)],
            &[net("b", 2), net("c", 3)],
            never,
        );
        assert_eq!(plan.added, [net("c", 3)]);
        assert_eq!(plan.removed, [net("a", 1)]);
        assert!(plan.changed.is_empty());
    }

    #[test]
    fn each_change_redoes_as_little_as_it_needs() {
        let old = net("a", 1);
        use Change::{Dnsmasq, Recreate, Rules};
        fn p<T: std::str::FromStr<Err: std::fmt::Debug>>(text: &str) -> T {
            text.parse().unwrap()
        }
        // What is edited, whether dnsmasq's config text changes, and the
        // change that follows.
        type Edit = fn(&mut NetworkConfig);
        let cases: [(Edit, bool, Change); 6] = [
            (
                |n| n.own_mut().blocked_ports.push(p("tcp/25")),
                false,
                Rules,
            ),
            (|n| n.uplink = Some(p("eth0")), false, Rules),
            (|n| n.own_mut().domain = p("x.example"), true, Dnsmasq),
            (|n| n.own_mut().subnet = p("10.77.1.0/25"), true, Recreate),
            (|n| n.own_mut().router = p("10.77.1.254"), false, Recreate),
            (|n| n.bridge = p("other"), true, Recreate),
        ];
        for (edit, dnsmasq, expected) in cases {
            let mut new = old.clone();
            edit(&mut new);
            let plan = diff(
                std::slice::from_ref(&old),
                std::slice::from_ref(&new),
                |_, _| dnsmasq,
            );
            assert_eq!(plan.changed, [(old.clone(), new, expected)]);
        }
    }
}
