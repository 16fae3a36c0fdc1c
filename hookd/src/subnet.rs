//! Picking the default network's /24: the first candidate that overlaps no
//! IPv4 route (of any routing table) and no IPv4 address in the current
//! network namespace.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::AddressFamily;
use thiserror::Error;

use crate::netlink::{dump, Netlink, NetlinkError};

#[derive(Debug, Error)]
pub enum SubnetError {
    #[error("{0}")]
    Netlink(#[from] NetlinkError),
    #[error(
        "every candidate subnet (10.213.0.0/16, 172.31.0.0/16, 192.168.200.0-254.0 in /24s) \
         overlaps a route or address of this host: configure the network's subnet explicitly"
    )]
    NoneFree,
}

/// Something in the namespace that occupies a range of IPv4 addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occupied {
    pub net: Ipv4Net,
    /// The interface the address is on, or the route goes out of.
    pub ifindex: Option<u32>,
    /// For the log: "address 10.0.0.5/24 on eth0", "route 10.1.0.0/16
    /// table 254 dev wg0".
    pub what: String,
}

impl Occupied {
    /// The subnet of a configured network (up or not: a network that is
    /// down still owns its subnet).
    pub fn configured(network: &str, net: Ipv4Net) -> Occupied {
        Occupied {
            net: net.trunc(),
            ifindex: None,
            what: format!("network `{network}` ({net})"),
        }
    }
}

impl fmt::Display for Occupied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

/// Whether two IPv4 networks share at least one address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    let (a, b) = (a.trunc(), b.trunc());
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The /24s tried, in order: 10.213.0-255.0, 172.31.0-255.0,
/// 192.168.200-254.0.
pub fn candidates() -> impl Iterator<Item = Ipv4Net> {
    let v24 = |a, b, c| Ipv4Net::new(Ipv4Addr::new(a, b, c, 0), 24).expect("/24 is valid");
    (0..=255u8)
        .map(move |c| v24(10, 213, c))
        .chain((0..=255u8).map(move |c| v24(172, 31, c)))
        .chain((200..=254u8).map(move |c| v24(192, 168, c)))
}

/// The first candidate overlapping nothing in `used`, logging why earlier
/// ones were skipped. `prefer` is tried first (the subnet our own bridge
/// already carries, when adopting it). Default routes never collide.
pub fn pick_from(used: &[Occupied], prefer: &[Ipv4Net]) -> Option<Ipv4Net> {
    let collision = |net: Ipv4Net| {
        used.iter()
            .find(|u| u.net.prefix_len() > 0 && overlaps(u.net, net))
    };
    for &net in prefer {
        if candidates().any(|c| c == net) && collision(net).is_none() {
            tracing::info!(subnet = %net, "keeping the subnet already on our bridge");
            return Some(net);
        }
    }
    // Runs of consecutive candidates skipped for the same reason are logged
    // as one line: a 10.0.0.0/8 route would otherwise log 256 of them.
    let mut run: Option<(Ipv4Net, Ipv4Net, &Occupied)> = None;
    let flush = |run: &mut Option<(Ipv4Net, Ipv4Net, &Occupied)>| {
        if let Some((first, last, why)) = run.take() {
            if first == last {
                tracing::info!("default network: skipping {first}: overlaps {why}");
            } else {
                tracing::info!("default network: skipping {first} to {last}: overlap {why}");
            }
        }
    };
    for net in candidates() {
        match collision(net) {
            Some(why) => match &mut run {
                Some((_, last, prev)) if *prev == why => *last = net,
                _ => {
                    flush(&mut run);
                    run = Some((net, net, why));
                }
            },
            None => {
                flush(&mut run);
                tracing::info!(subnet = %net, "default network: picked {net}, it overlaps no route or address");
                return Some(net);
            }
        }
    }
    flush(&mut run);
    None
}

/// The first of `candidates` overlapping nothing in `used` (default
/// routes never collide).
pub fn pick_among(
    mut candidates: impl Iterator<Item = Ipv4Net>,
    used: &[Occupied],
) -> Option<Ipv4Net> {
    candidates.find(|net| {
        !used
            .iter()
            .any(|u| u.net.prefix_len() > 0 && overlaps(u.net, *net))
    })
}

/// Every IPv4 address and every IPv4 route of every routing table in the
/// current network namespace.
pub async fn occupied() -> Result<Vec<Occupied>, SubnetError> {
    let netlink = Netlink::open()?;
    let names: HashMap<u32, String> = netlink
        .links()
        .await?
        .into_iter()
        .map(|link| (link.index, link.name))
        .collect();
    let ifname = |index: u32| {
        names
            .get(&index)
            .cloned()
            .unwrap_or_else(|| format!("ifindex {index}"))
    };
    let request = netlink.handle().address().get().execute();
    let addresses = dump(request, "listing addresses").await?;
    // Table 0 (RT_TABLE_UNSPEC) with no filter: the kernel dumps the
    // routes of every table.
    let mut query = RouteMessage::default();
    query.header.address_family = AddressFamily::Inet;
    let request = netlink.handle().route().get(query).execute();
    let routes = dump(request, "listing routes").await?;
    let mut used: Vec<Occupied> = addresses
        .iter()
        .flat_map(|msg| address_ranges(msg, &ifname))
        .collect();
    used.extend(routes.iter().filter_map(|msg| route_range(msg, &ifname)));
    Ok(used)
}

/// What an IPv4 address occupies: its prefix, and for a point-to-point
/// address its peer's (IFA_ADDRESS) as well; nothing for another family.
fn address_ranges(msg: &AddressMessage, ifname: &impl Fn(u32) -> String) -> Vec<Occupied> {
    if msg.header.family != AddressFamily::Inet {
        return Vec::new();
    }
    let v4 = |attr: &AddressAttribute| match attr {
        AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
            Some(*ip)
        }
        _ => None,
    };
    msg.attributes
        .iter()
        .filter_map(v4)
        .filter_map(|ip| Ipv4Net::new(ip, msg.header.prefix_len).ok())
        .map(|net| Occupied {
            net: net.trunc(),
            ifindex: Some(msg.header.index),
            what: format!("address {net} on {}", ifname(msg.header.index)),
        })
        .collect()
}

/// What an IPv4 route occupies; `None` for a default route (not a
/// collision) and for another family.
fn route_range(msg: &RouteMessage, ifname: &impl Fn(u32) -> String) -> Option<Occupied> {
    let len = msg.header.destination_prefix_length;
    if msg.header.address_family != AddressFamily::Inet || len == 0 {
        return None;
    }
    let mut dest = Ipv4Addr::UNSPECIFIED;
    let mut table = u32::from(msg.header.table);
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dest = *ip,
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let net = Ipv4Net::new(dest, len).ok()?;
    let dev = oif
        .map(|i| format!(" dev {}", ifname(i)))
        .unwrap_or_default();
    Some(Occupied {
        net: net.trunc(),
        ifindex: oif,
        what: format!("route {net} table {table}{dev}"),
    })
}

/// Picks the first candidate /24 that overlaps no IPv4 route or address in
/// the current network namespace (see [`candidates`]).
pub async fn pick_free_subnet() -> Result<Ipv4Net, SubnetError> {
    let used = occupied().await?;
    pick_from(&used, &[]).ok_or(SubnetError::NoneFree)
}

/// Like [`pick_free_subnet`], for a daemon restart: addresses and routes on
/// our own bridge `bridge` do not count as collisions, and if the bridge
/// already carries a candidate /24 that is still free, that one is kept —
/// otherwise a restart would see its own router address and move the
/// network to the next subnet.
pub async fn pick_free_subnet_for(bridge: &str) -> Result<Ipv4Net, SubnetError> {
    let own = Netlink::open()?
        .link_by_name(bridge)
        .await
        .ok()
        .flatten()
        .map(|link| link.index);
    let used = occupied().await?;
    let (ours, others): (Vec<Occupied>, Vec<Occupied>) = used
        .into_iter()
        .partition(|u| own.is_some() && u.ifindex == own);
    let prefer: Vec<Ipv4Net> = ours
        .iter()
        .filter(|u| u.what.starts_with("address ") && u.net.prefix_len() == 24)
        .map(|u| u.net)
        .collect();
    pick_from(&others, &prefer).ok_or(SubnetError::NoneFree)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn used(s: &str) -> Occupied {
        Occupied {
            net: net(s),
            ifindex: Some(2),
            what: format!("route {s}"),
        }
    }

    #[test]
    fn overlap_is_containment_either_way() {
        assert!(overlaps(net("10.0.0.0/8"), net("10.213.0.0/24")));
        assert!(overlaps(net("10.213.0.0/24"), net("10.0.0.0/8")));
        assert!(overlaps(net("10.213.0.0/24"), net("10.213.0.0/24")));
        assert!(overlaps(net("10.213.0.7/32"), net("10.213.0.0/24")));
        assert!(
            overlaps(net("10.213.0.1/24"), net("10.213.0.0/24")),
            "host bits ignored"
        );
        assert!(!overlaps(net("10.213.1.0/24"), net("10.213.0.0/24")));
        assert!(!overlaps(net("10.213.0.0/25"), net("10.213.0.128/25")));
        assert!(overlaps(net("0.0.0.0/0"), net("192.168.1.0/24")));
    }

    #[test]
    fn pick_among_skips_what_is_used_but_not_default_routes() {
        let pool = || net("10.214.0.0/22").subnets(24).unwrap();
        let taken = [
            used("0.0.0.0/0"),
            used("10.214.0.0/24"),
            used("10.214.1.128/25"),
        ];
        assert_eq!(pick_among(pool(), &taken), Some(net("10.214.2.0/24")));
        assert_eq!(pick_among(pool(), &[used("10.214.0.0/22")]), None);
    }

    #[test]
    fn candidates_are_ordered_24s() {
        let all: Vec<Ipv4Net> = candidates().collect();
        assert_eq!(all[0], net("10.213.0.0/24"));
        assert_eq!(all[1], net("10.213.1.0/24"));
        assert_eq!(all[256], net("172.31.0.0/24"));
        assert_eq!(all[512], net("192.168.200.0/24"));
        assert_eq!(*all.last().unwrap(), net("192.168.254.0/24"));
        assert!(all.iter().all(|n| n.prefix_len() == 24));
    }

    #[test]
    fn picks_first_free_and_ignores_default_routes() {
        assert_eq!(pick_from(&[], &[]), Some(net("10.213.0.0/24")));
        assert_eq!(
            pick_from(&[used("0.0.0.0/0")], &[]),
            Some(net("10.213.0.0/24"))
        );
        let busy = [used("10.213.0.0/24"), used("10.213.1.5/32")];
        assert_eq!(pick_from(&busy, &[]), Some(net("10.213.2.0/24")));
        assert_eq!(
            pick_from(&[used("10.0.0.0/8")], &[]),
            Some(net("172.31.0.0/24"))
        );
        let most = [
            used("10.0.0.0/8"),
            used("172.16.0.0/12"),
            used("192.168.0.0/17"),
        ];
        assert_eq!(pick_from(&most, &[]), Some(net("192.168.200.0/24")));
        let all = [
            used("10.0.0.0/8"),
            used("172.16.0.0/12"),
            used("192.168.0.0/16"),
        ];
        assert_eq!(pick_from(&all, &[]), None);
    }

    fn name(index: u32) -> String {
        format!("eth{index}")
    }

    #[test]
    fn an_address_occupies_its_prefix_and_a_peer_prefix_too() {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = 24;
        msg.header.index = 3;
        msg.attributes = vec![
            AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5))),
            AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(10, 2, 0, 1))),
        ];
        let ranges = address_ranges(&msg, &name);
        let nets: Vec<Ipv4Net> = ranges.iter().map(|u| u.net).collect();
        assert_eq!(nets, [net("10.1.0.0/24"), net("10.2.0.0/24")]);
        assert_eq!(ranges[0].ifindex, Some(3));
        assert_eq!(ranges[0].what, "address 10.1.0.5/24 on eth3");
        msg.header.family = AddressFamily::Inet6;
        assert!(address_ranges(&msg, &name).is_empty());
    }

    #[test]
    fn a_route_occupies_its_destination_but_a_default_route_nothing() {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 16;
        msg.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 9, 0, 0))),
            RouteAttribute::Table(100),
            RouteAttribute::Oif(4),
        ];
        let range = route_range(&msg, &name).expect("a /16 route");
        assert_eq!(range.net, net("10.9.0.0/16"));
        assert_eq!(range.ifindex, Some(4));
        assert_eq!(range.what, "route 10.9.0.0/16 table 100 dev eth4");
        msg.header.destination_prefix_length = 0;
        assert_eq!(route_range(&msg, &name), None);
    }

    #[test]
    fn preferred_subnet_is_kept_only_if_free_and_a_candidate() {
        let busy = [used("10.213.0.0/24")];
        assert_eq!(
            pick_from(&busy, &[net("10.213.5.0/24")]),
            Some(net("10.213.5.0/24"))
        );
        assert_eq!(
            pick_from(&[used("10.213.5.0/24")], &[net("10.213.5.0/24")]),
            Some(net("10.213.0.0/24"))
        );
        assert_eq!(
            pick_from(&[], &[net("10.9.9.0/24")]),
            Some(net("10.213.0.0/24"))
        );
    }
}
