//! Port forwards: from what users declared (hookd.toml, qnetctl, the
//! libvirt hook) and which guests run where, to the exact set of nftables
//! map elements that must exist. The reconciler diffs that set against what
//! is installed and changes only the difference, element by element.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsRawFd;

use crate::api::{normalize_mac, ForwardSpec, GuestNic, Proto};
use crate::config::NetworkConfig;
use crate::firewall::ForwardElement;
use crate::state::GuestRecord;

/// The guest NIC a forward goes to, if that guest runs now.
pub fn target_nic<'a>(
    spec: &ForwardSpec,
    guests: impl IntoIterator<Item = &'a GuestRecord>,
) -> Option<&'a GuestNic> {
    let mac = normalize_mac(&spec.guest).ok();
    guests.into_iter().find_map(|guest| {
        let by_name = guest.name.as_deref() == Some(spec.guest.as_str());
        guest.nics.iter().find(|nic| {
            let wanted_guest = by_name || mac.as_deref() == Some(nic.mac.as_str());
            let wanted_network = match &spec.network {
                Some(net) => nic.network.as_deref() == Some(net.as_str()),
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
    nic: &GuestNic,
    net: Option<&NetworkConfig>,
) -> Vec<ForwardElement> {
    let mut rules = Vec::new();
    let Some(v4) = nic.ip else {
        return rules;
    };
    let v6 = net
        .and_then(|n| n.ipv6)
        .and_then(|ipv6| slaac_address(ipv6.subnet.network(), &nic.mac));
    let (start, end) = spec.host_ports;
    for (offset, host_port) in (start..=end).enumerate() {
        let guest_port = spec.guest_port + offset as u16;
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
pub fn slaac_address(prefix: Ipv6Addr, mac: &str) -> Option<Ipv6Addr> {
    let mac = normalize_mac(mac).ok()?;
    let b: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap_or(0))
        .collect();
    let eui = [b[0] ^ 0x02, b[1], b[2], 0xff, 0xfe, b[3], b[4], b[5]];
    let mut octets = prefix.octets();
    octets[8..].copy_from_slice(&eui);
    Some(Ipv6Addr::from(octets))
}

/// Everything that must be installed now.
pub fn desired<'a>(
    specs: impl IntoIterator<Item = &'a ForwardSpec>,
    guests: &[&GuestRecord],
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

/// A host process listening on `proto` `port` (any address), named as
/// "pid PID (COMMAND)" when it can be found: a forward would steal its
/// traffic.
///
/// First the cheap question ([`port_may_be_held`], two `bind` calls);
/// only when that says yes are `/proc/net/{tcp,udp}[6]` read, which walks
/// every socket of the host (~5 ms here, per port).
pub fn host_listener(proto: Proto, port: u16) -> Option<String> {
    if !port_may_be_held(proto, port) {
        return None;
    }
    listener_in_proc(proto, port)
}

/// Whether some socket may hold `port`: binding a fresh socket to the
/// wildcard address (IPv4, then IPv6-only) fails with `EADDRINUSE`. For
/// TCP with `SO_REUSEADDR`, which only a listener (or a bound socket
/// without `SO_REUSEADDR`) makes fail: connections and TIME_WAIT do not.
/// For UDP any bound socket. The socket is closed at once, never used.
fn port_may_be_held(proto: Proto, port: u16) -> bool {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
        SockaddrIn6,
    };
    let kind = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let Ok(fd) = socket(family, kind, SockFlag::SOCK_CLOEXEC, None) else {
            // No IPv6 in this kernel, say: nothing can listen there.
            continue;
        };
        if proto == Proto::Tcp && setsockopt(&fd, sockopt::ReuseAddr, &true).is_err() {
            return true;
        }
        let bound = match family {
            AddressFamily::Inet => bind(
                fd.as_raw_fd(),
                &SockaddrIn::from(std::net::SocketAddrV4::new(
                    std::net::Ipv4Addr::UNSPECIFIED,
                    port,
                )),
            ),
            _ => {
                if setsockopt(&fd, sockopt::Ipv6V6Only, &true).is_err() {
                    return true;
                }
                bind(
                    fd.as_raw_fd(),
                    &SockaddrIn6::from(std::net::SocketAddrV6::new(
                        Ipv6Addr::UNSPECIFIED,
                        port,
                        0,
                        0,
                    )),
                )
            }
        };
        // Any failure but "free" sends us to /proc for the answer.
        if bound.is_err() {
            return true;
        }
    }
    false
}

/// The listener on `proto` `port` from `/proc/net`, with its owner.
fn listener_in_proc(proto: Proto, port: u16) -> Option<String> {
    let tables: &[&str] = match proto {
        Proto::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Proto::Udp => &["/proc/net/udp", "/proc/net/udp6"],
    };
    for table in tables {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // TCP state 0A = LISTEN; for UDP any bound socket counts (07).
            let listening = match proto {
                Proto::Tcp => fields[3] == "0A",
                Proto::Udp => fields[3] == "07",
            };
            if local_port == Some(port) && listening {
                let owner = socket_owner(fields[9]).unwrap_or_else(|| "a host process".into());
                return Some(owner);
            }
        }
    }
    None
}

/// "pid PID (COMMAND)" of the process holding socket inode `inode`.
fn socket_owner(inode: &str) -> Option<String> {
    let wanted = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == wanted) {
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn spec(guest: &str, ports: (u16, u16), guest_port: u16) -> ForwardSpec {
        ForwardSpec {
            guest: guest.into(),
            proto: Proto::Tcp,
            host_ports: ports,
            guest_port,
            host_addr: None,
            network: None,
        }
    }

    fn guest(name: &str, mac: &str, ip: [u8; 4]) -> GuestRecord {
        GuestRecord {
            pid: 1,
            start_time: 1,
            uid: 0,
            name: Some(name.into()),
            uuid: None,
            qmp_server: None,
            nics: vec![GuestNic {
                mac: mac.into(),
                device: None,
                network: Some("lab".into()),
                ip: Some(Ipv4Addr::from(ip)),
                libvirt_bridge: None,
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
        web.nics[0].libvirt_bridge = Some("virbr0".into());
        // A qnet network called like the libvirt one, with IPv6.
        let mut lab = crate::config::Config::default_network("10.9.0.0/24".parse().unwrap());
        lab.name = "lab".into();
        lab.ipv6 = Some(crate::config::Ipv6Config {
            subnet: "fd42::/64".parse().unwrap(),
            router: "fd42::1".parse().unwrap(),
        });
        let rules = desired([&spec("web", (8080, 8080), 80)], &[&web], &[&lab]);
        let targets: Vec<IpAddr> = rules.iter().map(|r| r.guest_addr).collect();
        assert_eq!(targets, [IpAddr::V4(Ipv4Addr::new(192, 168, 122, 9))]);
        // Without an address yet (no lease), no forward.
        web.nics[0].ip = None;
        assert!(desired([&spec("web", (8080, 8080), 80)], &[&web], &[&lab]).is_empty());
    }

    #[test]
    fn slaac_addresses_are_eui64() {
        let addr = slaac_address("fd42::".parse().unwrap(), "52:54:00:12:34:56").unwrap();
        assert_eq!(addr, "fd42::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn a_listening_socket_is_found_with_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let owner = host_listener(Proto::Tcp, port).expect("our listener");
        assert!(owner.contains(&std::process::id().to_string()), "{owner}");
        drop(listener);
        assert_eq!(host_listener(Proto::Tcp, port), None, "closed");
    }

    #[test]
    fn ipv6_and_udp_holders_are_found_and_connections_do_not_count() {
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let port = v6.local_addr().unwrap().port();
        assert!(host_listener(Proto::Tcp, port).is_some(), "IPv6 listener");
        assert_eq!(host_listener(Proto::Udp, port), None, "TCP only");
        // A connection to the listener: its client port is not held.
        let client = std::net::TcpStream::connect(v6.local_addr().unwrap()).unwrap();
        let client_port = client.local_addr().unwrap().port();
        assert_eq!(host_listener(Proto::Tcp, client_port), None);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        assert!(host_listener(Proto::Udp, udp_port).is_some(), "bound UDP");
    }
}
