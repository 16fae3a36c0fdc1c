//! Port forwards: from what users declared (hookd.toml, qnetctl, the
//! libvirt hook) and which guests run where, to the exact set of nftables
//! map elements that must exist. The reconciler diffs that set against what
//! is installed and changes only the difference, element by element.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};

use qnet_api::{ForwardSpec, Mac};

use crate::config::NetworkConfig;
use crate::firewall::ForwardElement;
use crate::state::{Guest, Nic};

/// The guest NIC a forward goes to, if that guest runs now.
pub fn target_nic<'a>(
    spec: &ForwardSpec,
    guests: impl IntoIterator<Item = &'a Guest>,
) -> Option<&'a Nic> {
    let mac = spec.guest.mac();
    guests.into_iter().find_map(|guest| {
        let by_name = guest.name.as_deref() == Some(spec.guest.as_str());
        guest.nics.iter().find(|nic| {
            let wanted_guest = by_name || mac == Some(nic.mac);
            let wanted_network = match &spec.network {
                Some(net) => nic
                    .network
                    .as_ref()
                    .is_some_and(|on| on.name() == net.as_str()),
                None => nic.network.is_some(),
            };
            wanted_guest && wanted_network && nic.ip.is_some()
        })
    })
}

/// The map elements of one forward to `nic` on `net`: one per port, IPv4,
/// plus IPv6 when the network has it (to the guest's SLAAC address, see
/// [`slaac_address`]) unless the forward is bound to an IPv4 host address.
pub fn rules_for(
    spec: &ForwardSpec,
    nic: &Nic,
    net: Option<&NetworkConfig>,
) -> Vec<ForwardElement> {
    let mut rules = Vec::new();
    let Some(v4) = nic.ip else {
        return rules;
    };
    let v6 = net
        .and_then(NetworkConfig::ipv6)
        .map(|ipv6| slaac_address(ipv6.subnet.network(), nic.mac));
    for (host_port, guest_port) in spec.ports.pairs() {
        let mut push = |host_addr: Option<IpAddr>, guest_addr: IpAddr| {
            rules.push(ForwardElement {
                proto: spec.proto,
                host_addr,
                host_port,
                guest_addr,
                guest_port,
            })
        };
        match spec.host_addr {
            Some(IpAddr::V4(addr)) => push(Some(IpAddr::V4(addr)), IpAddr::V4(v4)),
            Some(IpAddr::V6(addr)) => {
                if let Some(v6) = v6 {
                    push(Some(IpAddr::V6(addr)), IpAddr::V6(v6));
                }
            }
            None => {
                push(None, IpAddr::V4(v4));
                if let Some(v6) = v6 {
                    push(None, IpAddr::V6(v6));
                }
            }
        }
    }
    rules
}

/// The address a guest gives itself by SLAAC (EUI-64, as Linux does by
/// default) in a /64: dnsmasq announces the prefix stateless, so this is
/// the address to forward IPv6 to.
pub fn slaac_address(prefix: Ipv6Addr, mac: Mac) -> Ipv6Addr {
    let mut octets = prefix.octets();
    octets[8..].copy_from_slice(&mac.eui64());
    Ipv6Addr::from(octets)
}

/// Everything that must be installed now.
pub fn desired<'a>(
    specs: impl IntoIterator<Item = &'a ForwardSpec>,
    guests: &[&Guest],
    networks: &[&NetworkConfig],
) -> BTreeSet<ForwardElement> {
    let mut rules = BTreeSet::new();
    for spec in specs {
        if let Some(nic) = target_nic(spec, guests.iter().copied()) {
            // A NIC on a libvirt network is never on a qnet network, even
            // one of the same name (and has no IPv6 forward: libvirt's
            // dnsmasq may hand out DHCPv6 addresses we cannot predict).
            let net = networks
                .iter()
                .find(|n| nic.is_on_qnet_network(&n.name))
                .copied();
            rules.extend(rules_for(spec, nic, net));
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NicNetwork;
    use qnet_api::GuestName;
    use std::net::Ipv4Addr;

    use crate::procfs::Process;

    fn spec(guest: &str, ports: (u16, u16), guest_port: u16) -> ForwardSpec {
        ForwardSpec {
            guest: guest.parse().unwrap(),
            proto: qnet_api::Proto::Tcp,
            ports: qnet_api::PortMap::new(ports.0, ports.1, guest_port).unwrap(),
            host_addr: None,
            network: None,
        }
    }

    fn guest(name: &str, mac: &str, ip: [u8; 4]) -> Guest {
        Guest {
            process: Process {
                pid: 1,
                start_time: 1,
            },
            uid: 0,
            name: Some(GuestName::kept(name)),
            uuid: None,
            qmp_server: None,
            nics: vec![Nic {
                mac: mac.parse().unwrap(),
                qemu_name: None,
                device: None,
                network: Some(NicNetwork::Qnet("lab".parse().unwrap())),
                ip: Some(Ipv4Addr::from(ip)),
            }],
        }
    }

    #[test]
    fn forwards_find_their_guest_by_name_or_mac() {
        let web = guest("web", "52:54:00:00:00:01", [10, 0, 0, 5]);
        let guests = [&web];
        let by_name = desired([&spec("web", (8080, 8080), 80)], &guests, &[]);
        assert_eq!(by_name.len(), 1);
        let rule = by_name.iter().next().unwrap();
        assert_eq!(rule.guest_addr, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!((rule.host_port, rule.guest_port), (8080, 80));
        let by_mac = desired([&spec("52:54:00:00:00:01", (8080, 8080), 80)], &guests, &[]);
        assert_eq!(by_mac, by_name);
        assert!(desired([&spec("db", (5432, 5432), 5432)], &guests, &[]).is_empty());
    }

    #[test]
    fn ranges_expand_with_their_offsets() {
        let web = guest("web", "52:54:00:00:00:01", [10, 0, 0, 5]);
        let rules = desired([&spec("web", (9000, 9002), 100)], &[&web], &[]);
        let pairs: Vec<(u16, u16)> = rules.iter().map(|r| (r.host_port, r.guest_port)).collect();
        assert_eq!(pairs, [(9000, 100), (9001, 101), (9002, 102)]);
    }

    #[test]
    fn a_nic_on_a_libvirt_network_gets_ipv4_only_even_if_a_qnet_network_has_its_name() {
        let mut web = guest("web", "52:54:00:00:00:01", [192, 168, 122, 9]);
        web.nics[0].network = Some(NicNetwork::Libvirt {
            name: "lab".into(),
            bridge: "virbr0".parse().unwrap(),
        });
        // A qnet network called like the libvirt one, with IPv6.
        let mut lab = crate::config::Config::default_network("10.9.0.0/24".parse().unwrap());
        lab.name = "lab".parse().unwrap();
        lab.own_mut().ipv6 = crate::config::Ipv6Config::first_router("fd42::/64".parse().unwrap());
        let rules = desired([&spec("web", (8080, 8080), 80)], &[&web], &[&lab]);
        let targets: Vec<IpAddr> = rules.iter().map(|r| r.guest_addr).collect();
        assert_eq!(targets, [IpAddr::V4(Ipv4Addr::new(192, 168, 122, 9))]);
        // Without an address yet (no lease), no forward.
        web.nics[0].ip = None;
        assert!(desired([&spec("web", (8080, 8080), 80)], &[&web], &[&lab]).is_empty());
    }

    #[test]
    fn slaac_addresses_are_eui64() {
        let addr = slaac_address(
            "fd42::".parse().unwrap(),
            "52:54:00:12:34:56".parse().unwrap(),
        );
        assert_eq!(addr, "fd42::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap());
    }
}
