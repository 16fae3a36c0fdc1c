//! Pure planning: from the desired state and an event to what should be.
//! Nothing here touches the system, so all of it is unit-tested without
//! root; the reconciler's appliers make the world match the plans.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use qnet_api::{ForwardSpec, IfName, Mac, NetName};

use crate::config::NetworkConfig;
use crate::discover::{GuestPort, PortKind};
use crate::dnsmasq::{DhcpHost, DnsHost, HostUpdate};
use crate::firewall::ForwardElement;
use crate::forwards;
use crate::qmp::NicInfo;
use crate::state::{Guest, Reservation, State};

/// Where one guest NIC is, as far as QMP and `/proc` tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub mac: Mac,
    pub qemu_name: String,
    pub device: Option<IfName>,
    /// The qnet network, when the NIC is on one.
    pub network: Option<NetName>,
}

/// Works out which network each NIC is on.
///
/// QMP names NICs and MACs; `/proc` names the host devices. A macvtap
/// carries the guest's MAC, so it matches exactly. TAPs carry their own
/// MACs: they are paired with the NICs in order (QEMU opens the netdevs
/// and creates the NICs in command-line order), or, when the counts
/// differ, every NIC is put on the one qnet network the guest's TAPs are
/// on, if there is exactly one.
pub fn place_nics(
    nics: &[NicInfo],
    ports: &[GuestPort],
    network_of_bridge: impl Fn(&str) -> Option<NetName>,
) -> Vec<Placement> {
    let taps: Vec<&GuestPort> = ports.iter().filter(|p| p.kind == PortKind::Tap).collect();
    let tap_networks: Vec<Option<NetName>> = taps
        .iter()
        .map(|p| p.master.as_deref().and_then(&network_of_bridge))
        .collect();
    let distinct: BTreeSet<&NetName> = tap_networks.iter().flatten().collect();
    let only_network = match distinct.len() {
        1 => distinct.into_iter().next().cloned(),
        _ => None,
    };
    nics.iter()
        .enumerate()
        .map(|(i, nic)| {
            let macvtap = ports
                .iter()
                .find(|p| p.kind == PortKind::Macvtap && p.mac == Some(nic.mac));
            let (device, network) = if let Some(port) = macvtap {
                (Some(port.ifname.clone()), None)
            } else if taps.len() == nics.len() {
                (Some(taps[i].ifname.clone()), tap_networks[i].clone())
            } else {
                (None, only_network.clone())
            };
            Placement {
                mac: nic.mac,
                qemu_name: nic.name.clone(),
                device,
                network,
            }
        })
        .collect()
}

/// Takes the MACs whose hosts may have changed since the last call, by
/// network: those whose reservation changed, and those of NICs that came
/// or went on a network.
pub fn hosts_changed(state: &mut State) -> BTreeMap<String, BTreeSet<Mac>> {
    let mut changed: BTreeMap<String, BTreeSet<Mac>> = BTreeMap::new();
    for (net, mac) in state.reservations.take_hosts_changes() {
        changed.entry(net.to_string()).or_default().insert(mac);
    }
    for (net, mac) in state.guests.take_hosts_changes() {
        changed.entry(net).or_default().insert(mac);
    }
    changed
}

/// What network `network`'s hosts are now for each MAC of `macs` (see
/// [`dnsmasq_hosts`] for all of them).
pub fn host_updates<'a>(
    state: &State,
    network: &NetName,
    macs: impl IntoIterator<Item = &'a Mac>,
) -> Vec<HostUpdate> {
    let table = state.reservations.get(network);
    macs.into_iter()
        .map(|mac| {
            let r = table.and_then(|t| t.get(mac));
            HostUpdate {
                mac: *mac,
                reservation: r.map(|r| (r.ip, r.name.clone())),
                in_dns: r.is_some_and(|r| in_dns(state, network, mac, r)),
            }
        })
        .collect()
}

/// The hosts one network's dnsmasq serves: DHCP for every reservation,
/// DNS names for running guests and for explicit reservations with a name.
pub fn dnsmasq_hosts(state: &State, network: &NetName) -> (Vec<DhcpHost>, Vec<DnsHost>) {
    let mut dhcp = Vec::new();
    let mut dns = Vec::new();
    for (mac, r) in state.reservations.get(network).into_iter().flatten() {
        dhcp.push(DhcpHost {
            mac: *mac,
            ip: r.ip,
            name: r.name.clone(),
        });
        if let Some(name) = &r.name {
            if in_dns(state, network, mac, r) {
                dns.push(DnsHost {
                    ip: r.ip,
                    name: name.clone(),
                });
            }
        }
    }
    (dhcp, dns)
}

/// Whether reservation `r` of `mac` puts its name in DNS: it is explicit,
/// or a guest with the MAC runs on the network.
fn in_dns(state: &State, network: &NetName, mac: &Mac, r: &Reservation) -> bool {
    r.explicit || state.guests.is_running_on(network, mac)
}

/// The forward map elements `specs` need now: those of running guests
/// whose NIC is on a qnet network that is up, or on one of libvirt's own
/// networks (libvirt keeps those up, not us).
pub fn desired_elements<'a>(
    specs: impl IntoIterator<Item = &'a ForwardSpec>,
    guests: &[&Guest],
    networks_up: &[&NetworkConfig],
) -> BTreeSet<ForwardElement> {
    let mut elements = forwards::desired(specs, guests, networks_up);
    if elements.is_empty() {
        // No forward at all (the common case): no walk over every NIC.
        return elements;
    }
    let on_libvirt: BTreeSet<IpAddr> = guests
        .iter()
        .flat_map(|g| g.nics.iter())
        .filter(|nic| nic.libvirt_bridge().is_some())
        .filter_map(|nic| nic.ip.map(IpAddr::V4))
        .collect();
    elements.retain(|e| {
        let guest_net_up = (networks_up.iter()).any(|n| {
            n.addressing
                .as_ref()
                .is_some_and(|a| a.contains(e.guest_addr))
        });
        guest_net_up || on_libvirt.contains(&e.guest_addr)
    });
    elements
}

/// Which of two declared forwards on the same host port is in force: the
/// admin's file wins over run-time forwards, and among run-time forwards
/// the earlier one (by position) wins. Returns the indexes of `runtime`
/// forwards that clash with a forward that wins, with the one they lose
/// to.
pub fn clashes<'a>(
    config: &'a [ForwardSpec],
    runtime: &'a [ForwardSpec],
) -> BTreeMap<usize, &'a ForwardSpec> {
    let mut lost = BTreeMap::new();
    for (i, spec) in runtime.iter().enumerate() {
        let winner = config
            .iter()
            .chain(
                runtime[..i]
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| !lost.contains_key(j))
                    .map(|(_, s)| s),
            )
            .find(|other| other.overlaps(spec));
        if let Some(winner) = winner {
            lost.insert(i, winner);
        }
    }
    lost
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
