//! Pure planning for firewalld: qnet's zones and policies, which bridge
//! belongs in which zone, and the interface changes that get there.
//!
//! One zone per mode, so that a policy can be as wide as its mode needs
//! and no wider: `qnet-nat`, `qnet-routed`, `qnet-isolated` each let the
//! guests reach the host's DHCP, DHCPv6 and DNS (ICMP, router
//! solicitations included, are allowed by every firewalld zone unless
//! blocked); policies `qnet-nat-out` and `qnet-routed-out` let guests
//! forward anywhere, `qnet-routed-in` lets anything forward to a routed
//! network. Port forwards into a nat network need no policy: firewalld
//! accepts DNAT'ed connections in its forward chain. `table inet qnet`
//! still enforces each mode (its drops are final too).

use std::collections::{BTreeMap, BTreeSet};

use crate::api::Mode;

use super::Opened;

/// A zone of qnet's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneDef {
    pub name: &'static str,
    pub short: &'static str,
    pub mode: Mode,
}

/// A policy of qnet's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyDef {
    pub name: &'static str,
    pub ingress: &'static str,
    pub egress: &'static str,
}

pub const ZONES: [ZoneDef; 3] = [
    ZoneDef {
        name: "qnet-nat",
        short: "qnet NAT networks",
        mode: Mode::Nat,
    },
    ZoneDef {
        name: "qnet-routed",
        short: "qnet routed networks",
        mode: Mode::Routed,
    },
    ZoneDef {
        name: "qnet-isolated",
        short: "qnet isolated networks",
        mode: Mode::Isolated,
    },
];

pub const POLICIES: [PolicyDef; 3] = [
    PolicyDef {
        name: "qnet-nat-out",
        ingress: "qnet-nat",
        egress: "ANY",
    },
    PolicyDef {
        name: "qnet-routed-out",
        ingress: "qnet-routed",
        egress: "ANY",
    },
    PolicyDef {
        name: "qnet-routed-in",
        ingress: "ANY",
        egress: "qnet-routed",
    },
];

/// Services every qnet zone allows to the host.
pub const SERVICES: [&str; 3] = ["dhcp", "dhcpv6", "dns"];

/// What the description of each zone and policy says: the mark that they
/// are qnet's (their names start with `qnet-` too).
pub const DESCRIPTION: &str = "qnet:managed by qnet-hookd; removed by `qnet-hookd --cleanup`";

/// The zone of a network's mode (never asked of `bridged`, which has
/// none: see [`wanted_interfaces`]).
pub fn zone_of(mode: Mode) -> &'static str {
    ZONES
        .iter()
        .find(|z| z.mode == mode)
        .map(|z| z.name)
        .expect("every mode has a zone")
}

/// Every qnet zone with the bridges it should hold (possibly none). A
/// LAN (`bridged`) network's bridge is in none: it carries the host's own
/// addresses, so it stays in the zone the host's LAN traffic was in (a
/// qnet zone would open DHCP and DNS to the LAN), and firewalld forwards
/// within a zone by default.
pub fn wanted_interfaces(networks: &[Opened]) -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut zones: BTreeMap<_, BTreeSet<String>> =
        ZONES.iter().map(|z| (z.name, BTreeSet::new())).collect();
    for net in networks.iter().filter(|n| n.mode != Mode::Bridged) {
        zones
            .entry(zone_of(net.mode))
            .or_default()
            .insert(net.bridge.to_string());
    }
    zones
}

/// One interface change in one zone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum IfChange {
    Add { zone: &'static str, bridge: String },
    Remove { zone: &'static str, bridge: String },
}

/// The changes taking `have` (a zone's interfaces, permanent or runtime)
/// to `want`.
pub fn interface_changes(
    zone: &'static str,
    want: &BTreeSet<String>,
    have: &BTreeSet<String>,
) -> Vec<IfChange> {
    let removes = have.difference(want).map(|b| IfChange::Remove {
        zone,
        bridge: b.clone(),
    });
    let adds = want.difference(have).map(|b| IfChange::Add {
        zone,
        bridge: b.clone(),
    });
    removes.chain(adds).collect()
}

/// Whether a firewalld error only says the change was there already.
pub fn is_no_op(error: &str) -> bool {
    [
        "ALREADY_ENABLED",
        "NOT_ENABLED",
        "ZONE_ALREADY_SET",
        "UNKNOWN_INTERFACE",
    ]
    .iter()
    .any(|code| error.contains(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IfName, NetName};
    use std::str::FromStr;

    fn opened(name: &str, mode: Mode) -> Opened {
        Opened {
            name: NetName::from_str(name).unwrap(),
            bridge: IfName::from_str(name).unwrap(),
            mode,
            ipv6: false,
        }
    }

    #[test]
    fn each_bridge_goes_to_the_zone_of_its_mode_and_every_zone_is_planned() {
        let zones = wanted_interfaces(&[
            opened("a", Mode::Nat),
            opened("b", Mode::Routed),
            opened("c", Mode::Nat),
            opened("lan", Mode::Bridged),
        ]);
        let shown: Vec<(&str, Vec<&str>)> = zones
            .iter()
            .map(|(z, b)| (*z, b.iter().map(String::as_str).collect()))
            .collect();
        assert_eq!(
            shown,
            [
                ("qnet-isolated", vec![]),
                ("qnet-nat", vec!["a", "c"]),
                ("qnet-routed", vec!["b"])
            ]
        );
        assert!(wanted_interfaces(&[]).values().all(BTreeSet::is_empty));
        for policy in POLICIES {
            assert!(ZONES
                .iter()
                .any(|z| z.name == policy.ingress || z.name == policy.egress));
        }
    }

    #[test]
    fn interface_changes_remove_extras_and_add_the_missing() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            interface_changes("qnet-nat", &set(&["a", "b"]), &set(&["b", "old"])),
            [
                IfChange::Remove {
                    zone: "qnet-nat",
                    bridge: "old".into()
                },
                IfChange::Add {
                    zone: "qnet-nat",
                    bridge: "a".into()
                },
            ]
        );
        assert_eq!(
            interface_changes("qnet-nat", &set(&["a"]), &set(&["a"])),
            []
        );
        assert!(is_no_op(
            "org.fedoraproject.FirewallD1.Exception: ZONE_ALREADY_SET: 'x' already bound"
        ));
        assert!(!is_no_op("INVALID_ZONE: qnet-nat"));
    }
}
