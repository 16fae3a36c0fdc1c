//! Sticky addresses: which address a MAC gets on a network, made once and
//! kept. Pure: a network's reservation table in, a decision out.
//!
//! A guest decides its own MACs, so it could make a new automatic
//! reservation at every MAC change and empty the pool for everybody else.
//! Two rules bound that:
//!
//! - a guest NIC ([`NicOwner`]) holds at most [`Limits::per_nic`]
//!   automatic reservations: a new MAC beyond that takes the place of the
//!   NIC's least recently seen one;
//! - when the pool is empty, an automatic reservation whose MAC no guest
//!   has had for [`Limits::reclaim_after`] seconds is reused, the oldest
//!   first.
//!
//! Explicit reservations (`qnetctl reserve add`) count against neither and
//! are never reclaimed. A MAC in use by a running guest is never taken
//! away.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use qnet_api::{DnsLabel, Mac};
use thiserror::Error;

use super::{NicOwner, Reservation};
use crate::config::{Addressing, NetworkConfig, ReservationLimits as Limits};

/// Which MACs running guests have on the network: those are never
/// evicted. A set, or the state's index of running NICs.
pub trait InUse {
    fn contains(&self, mac: &Mac) -> bool;
}

impl InUse for BTreeSet<Mac> {
    fn contains(&self, mac: &Mac) -> bool {
        BTreeSet::contains(self, mac)
    }
}

/// A network's reservation table as [`reserve_auto`] changes it: a plain
/// map, or the state's table, which notes each change
/// (`tracked::Table`).
pub trait ReservationTable {
    fn view(&self) -> &BTreeMap<Mac, Reservation>;
    fn get_mut(&mut self, mac: &Mac) -> Option<&mut Reservation>;
    fn remove(&mut self, mac: &Mac) -> Option<Reservation>;
    fn insert(&mut self, mac: Mac, reservation: Reservation) -> Option<Reservation>;
}

impl ReservationTable for BTreeMap<Mac, Reservation> {
    fn view(&self) -> &BTreeMap<Mac, Reservation> {
        self
    }
    fn get_mut(&mut self, mac: &Mac) -> Option<&mut Reservation> {
        BTreeMap::get_mut(self, mac)
    }
    fn remove(&mut self, mac: &Mac) -> Option<Reservation> {
        BTreeMap::remove(self, mac)
    }
    fn insert(&mut self, mac: Mac, reservation: Reservation) -> Option<Reservation> {
        BTreeMap::insert(self, mac, reservation)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllocError {
    #[error(
        "network `{network}` has no free address left ({size} addresses in its DHCP range, none unused for long enough to reclaim): \
         remove reservations with `qnetctl reserve rm`, or widen dhcp-range"
    )]
    Exhausted { network: String, size: u32 },
    #[error("{ip} is not a guest address of {network} ({subnet}): pick one inside the subnet, other than the router")]
    NotAGuestAddress {
        ip: Ipv4Addr,
        network: String,
        subnet: ipnet::Ipv4Net,
    },
    #[error("{ip} is already reserved for {other} on {network}")]
    Taken {
        ip: Ipv4Addr,
        other: Mac,
        network: String,
    },
    #[error(
        "`{network}` is a bridged network: its guests get their addresses from the LAN's own \
         DHCP server, so reserve the address there"
    )]
    Lan { network: String },
}

/// `net`'s addressing: a LAN network has none to reserve from.
pub fn addressing(net: &NetworkConfig) -> Result<&Addressing, AllocError> {
    (net.addressing.as_ref()).ok_or_else(|| AllocError::Lan {
        network: net.name.to_string(),
    })
}

/// Who asks for an automatic reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoRequest {
    pub mac: Mac,
    pub name: Option<DnsLabel>,
    pub owner: NicOwner,
    pub uid: u32,
}

/// What [`reserve_auto`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub ip: Ipv4Addr,
    /// The reservation is new (and must be saved before it is published).
    pub created: bool,
    /// Automatic reservations removed to make room, and why.
    pub evicted: Vec<(Mac, Ipv4Addr, &'static str)>,
}

/// The reservation of `request.mac` in `table` (network `net`), made if
/// there is none. `in_use`: MACs of NICs that run now, never evicted.
pub fn reserve_auto(
    table: &mut impl ReservationTable,
    net: &NetworkConfig,
    request: AutoRequest,
    in_use: &impl InUse,
    limits: Limits,
    now: u64,
) -> Result<Granted, AllocError> {
    let own = addressing(net)?;
    if let Some(existing) = table.get_mut(&request.mac) {
        existing.last_seen = now;
        if existing.name.is_none() {
            existing.name = request.name;
        }
        return Ok(Granted {
            ip: existing.ip,
            created: false,
            evicted: Vec::new(),
        });
    }
    let mut evicted = Vec::new();
    let owned: Vec<Mac> = table
        .view()
        .iter()
        .filter(|(_, r)| !r.explicit && r.nic.as_ref() == Some(&request.owner))
        .map(|(mac, _)| *mac)
        .collect();
    if owned.len() >= limits.per_nic.max(1) {
        // The NIC's least recently seen MAC that no guest uses now.
        let oldest = owned
            .iter()
            .filter(|mac| !in_use.contains(mac))
            .min_by_key(|mac| table.view()[*mac].last_seen)
            .copied();
        if let Some(mac) = oldest {
            let gone = table.remove(&mac).map(|r| r.ip);
            evicted
                .extend(gone.map(|ip| (mac, ip, "the NIC holds too many automatic reservations")));
        }
    }
    let ip = match free_address(own, table.view()) {
        Some(ip) => ip,
        None => {
            let (mac, ip) = reclaimable(table.view(), in_use, limits, now).ok_or_else(|| {
                AllocError::Exhausted {
                    network: net.name.to_string(),
                    size: range_size(own),
                }
            })?;
            table.remove(&mac);
            evicted.push((mac, ip, "unseen for long and the pool is empty"));
            ip
        }
    };
    table.insert(
        request.mac,
        Reservation {
            ip,
            name: request.name,
            explicit: false,
            owner_uid: Some(request.uid),
            nic: Some(request.owner),
            last_seen: now,
        },
    );
    Ok(Granted {
        ip,
        created: true,
        evicted,
    })
}

/// The address an explicit reservation of `mac` gets: `wanted` if it is
/// a free guest address, else the one `mac` has, else a free one (or a
/// reclaimed one). Changes nothing; the caller inserts.
pub fn explicit_address(
    table: &BTreeMap<Mac, Reservation>,
    net: &NetworkConfig,
    mac: Mac,
    wanted: Option<Ipv4Addr>,
    in_use: &impl InUse,
    limits: Limits,
    now: u64,
) -> Result<(Ipv4Addr, Option<Mac>), AllocError> {
    let own = addressing(net)?;
    if let Some(ip) = wanted {
        check_guest_address(net, ip)?;
        if let Some((other, _)) = table.iter().find(|(m, r)| r.ip == ip && **m != mac) {
            return Err(AllocError::Taken {
                ip,
                other: *other,
                network: net.name.to_string(),
            });
        }
        return Ok((ip, None));
    }
    if let Some(existing) = table.get(&mac) {
        return Ok((existing.ip, None));
    }
    if let Some(ip) = free_address(own, table) {
        return Ok((ip, None));
    }
    reclaimable(table, in_use, limits, now)
        .map(|(mac, ip)| (ip, Some(mac)))
        .ok_or_else(|| AllocError::Exhausted {
            network: net.name.to_string(),
            size: range_size(own),
        })
}

/// Whether `ip` may be given to a guest of `net`: inside its subnet, not
/// the network, broadcast or router address (and never on a LAN network).
pub fn check_guest_address(net: &NetworkConfig, ip: Ipv4Addr) -> Result<(), AllocError> {
    let own = addressing(net)?;
    if !own.subnet.contains(&ip)
        || ip == own.router
        || ip == own.subnet.network()
        || ip == own.subnet.broadcast()
    {
        return Err(AllocError::NotAGuestAddress {
            ip,
            network: net.name.to_string(),
            subnet: own.subnet,
        });
    }
    Ok(())
}

/// The first address of the DHCP range that no reservation holds.
///
/// Every new MAC asks, so this is the allocator's one walk over the whole
/// table: the taken addresses of the range go into one vector, sorted,
/// and the first gap is the answer (a set built per call cost an
/// allocation per thousand-odd reservations).
pub fn free_address(own: &Addressing, table: &BTreeMap<Mac, Reservation>) -> Option<Ipv4Addr> {
    let (start, end) = (u32::from(own.dhcp_range.0), u32::from(own.dhcp_range.1));
    let mut taken: Vec<u32> = table
        .values()
        .map(|r| u32::from(r.ip))
        .chain([u32::from(own.router)])
        .filter(|ip| (start..=end).contains(ip))
        .collect();
    taken.sort_unstable();
    taken.dedup();
    let mut candidate = start;
    for ip in taken {
        // Sorted and at least `start`: the first one that is not the
        // candidate leaves the candidate free.
        if ip != candidate {
            break;
        }
        candidate = candidate.checked_add(1)?;
    }
    (candidate <= end).then(|| Ipv4Addr::from(candidate))
}

/// The oldest automatic reservation unseen for `limits.reclaim_after`
/// whose MAC no running guest has.
fn reclaimable(
    table: &BTreeMap<Mac, Reservation>,
    in_use: &impl InUse,
    limits: Limits,
    now: u64,
) -> Option<(Mac, Ipv4Addr)> {
    table
        .iter()
        .filter(|(mac, r)| {
            !r.explicit
                && !in_use.contains(mac)
                && now.saturating_sub(r.last_seen) >= limits.reclaim_after
        })
        .min_by_key(|(_, r)| r.last_seen)
        .map(|(mac, r)| (*mac, r.ip))
}

fn range_size(own: &Addressing) -> u32 {
    let (start, end) = own.dhcp_range;
    u32::from(end).saturating_sub(u32::from(start)) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::state::GuestKey;
    use qnet_api::GuestName;

    /// A network whose DHCP range holds `size` addresses, and its empty
    /// reservation table.
    fn pool(size: u8) -> (NetworkConfig, BTreeMap<Mac, Reservation>) {
        (net(size), BTreeMap::new())
    }

    fn net(pool: u8) -> NetworkConfig {
        let mut net = Config::default_network("10.9.0.0/24".parse().unwrap());
        net.own_mut().dhcp_range = (
            Ipv4Addr::new(10, 9, 0, 10),
            Ipv4Addr::new(10, 9, 0, 9 + pool),
        );
        net
    }

    fn mac(n: u8) -> Mac {
        Mac::from_octets([0x52, 0x54, 0, 0, 0, n])
    }

    #[test]
    fn a_lan_network_has_no_address_to_give() {
        let mut lan = net(4);
        lan.mode = crate::api::Mode::Bridged;
        lan.addressing = None;
        let ip = Ipv4Addr::new(10, 9, 0, 10);
        fn refused<T>(result: Result<T, AllocError>) -> bool {
            matches!(result, Err(AllocError::Lan { network }) if network == "qnet0")
        }
        assert!(refused(check_guest_address(&lan, ip)));
        let table = BTreeMap::new();
        let explicit = explicit_address(&table, &lan, mac(1), None, &BTreeSet::new(), LIMITS, 0);
        assert!(refused(explicit));
        let mut table = BTreeMap::new();
        let auto = reserve_auto(
            &mut table,
            &lan,
            request(1, "g"),
            &BTreeSet::new(),
            LIMITS,
            0,
        );
        assert!(refused(auto.map(|g| g.ip)));
        assert!(table.is_empty());
    }

    fn request(n: u8, guest: &str) -> AutoRequest {
        AutoRequest {
            mac: mac(n),
            name: None,
            owner: NicOwner {
                guest: GuestKey::Name(GuestName::kept(guest)),
                nic: "net0".into(),
            },
            uid: 1000,
        }
    }

    const LIMITS: Limits = Limits {
        per_nic: 2,
        reclaim_after: 100,
    };

    fn auto(
        table: &mut BTreeMap<Mac, Reservation>,
        net: &NetworkConfig,
        n: u8,
        guest: &str,
        now: u64,
    ) -> Result<Granted, AllocError> {
        reserve_auto(table, net, request(n, guest), &BTreeSet::new(), LIMITS, now)
    }

    /// Each case: the last octets reserved (10.9.0.X) and where the router
    /// is, in a range of .10–.14; the address `free_address` gives.
    #[test]
    fn the_first_gap_of_the_range_is_free() {
        let cases: [(&[u8], u8, Option<u8>); 7] = [
            (&[], 1, Some(10)),
            (&[10, 11], 1, Some(12)),
            (&[11, 10, 13], 1, Some(12)),
            (&[12], 10, Some(11)),
            // Reservations outside the range (an explicit one, or an
            // old range) take nothing from it.
            (&[3, 200, 10], 1, Some(11)),
            (&[10, 11, 12, 13, 14], 1, None),
            (&[10, 11, 13, 14], 12, None),
        ];
        for (held, router, want) in cases {
            let mut net = net(5);
            net.own_mut().router = Ipv4Addr::new(10, 9, 0, router);
            let table: BTreeMap<Mac, Reservation> = held
                .iter()
                .map(|&last| {
                    let reservation = Reservation {
                        ip: Ipv4Addr::new(10, 9, 0, last),
                        name: None,
                        explicit: true,
                        owner_uid: None,
                        nic: None,
                        last_seen: 0,
                    };
                    (mac(last), reservation)
                })
                .collect();
            let want = want.map(|last| Ipv4Addr::new(10, 9, 0, last));
            assert_eq!(
                free_address(net.own(), &table),
                want,
                "{held:?}, router .{router}"
            );
        }
    }

    #[test]
    fn reservations_are_sticky_and_unique() {
        let (net, mut table) = pool(3);
        let a = auto(&mut table, &net, 1, "a", 0).unwrap();
        let b = auto(&mut table, &net, 2, "b", 0).unwrap();
        assert!(a.created && b.created);
        assert_ne!(a.ip, b.ip);
        let again = auto(&mut table, &net, 1, "a", 5).unwrap();
        assert_eq!((again.ip, again.created), (a.ip, false));
        assert_eq!(table[&mac(1)].last_seen, 5, "seen again");
    }

    #[test]
    fn a_nic_changing_its_mac_keeps_at_most_its_limit() {
        let (net, mut table) = pool(50);
        for (n, now) in [(1, 1), (2, 2)] {
            auto(&mut table, &net, n, "g", now).unwrap();
        }
        let third = auto(&mut table, &net, 3, "g", 3).unwrap();
        assert_eq!(third.evicted.len(), 1);
        assert_eq!(third.evicted[0].0, mac(1), "the least recently seen goes");
        // A thousand MAC changes still hold two addresses.
        for n in 4..=200 {
            auto(&mut table, &net, n, "g", u64::from(n)).unwrap();
        }
        assert_eq!(table.len(), 2);
        // Another guest's NIC is unaffected.
        auto(&mut table, &net, 201, "other", 300).unwrap();
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn a_mac_in_use_is_never_evicted() {
        let (net, mut table) = pool(50);
        auto(&mut table, &net, 1, "g", 1).unwrap();
        auto(&mut table, &net, 2, "g", 2).unwrap();
        let in_use: BTreeSet<Mac> = [mac(1), mac(2)].into();
        let third = reserve_auto(&mut table, &net, request(3, "g"), &in_use, LIMITS, 3).unwrap();
        assert!(third.evicted.is_empty());
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn an_empty_pool_reclaims_only_long_unseen_automatic_reservations() {
        let (net, mut table) = pool(2);
        auto(&mut table, &net, 1, "a", 10).unwrap();
        let (ip, _) =
            explicit_address(&table, &net, mac(2), None, &BTreeSet::new(), LIMITS, 10).unwrap();
        table.insert(
            mac(2),
            Reservation {
                ip,
                name: None,
                explicit: true,
                owner_uid: Some(0),
                nic: None,
                last_seen: 0,
            },
        );
        // Full; the automatic one was seen 50 s ago: refused, clearly.
        let err = auto(&mut table, &net, 3, "c", 60).unwrap_err();
        assert!(err.to_string().contains("no free address left"), "{err}");
        // Seen 100 s ago or more: reclaimed; the explicit one never is.
        let granted = auto(&mut table, &net, 3, "c", 110).unwrap();
        assert_eq!(granted.evicted.len(), 1);
        assert_eq!(granted.evicted[0].0, mac(1));
        assert!(table.contains_key(&mac(2)));
        let err = auto(&mut table, &net, 4, "d", 150).unwrap_err();
        assert!(matches!(err, AllocError::Exhausted { .. }), "{err}");
    }

    #[test]
    fn explicit_addresses_are_checked() {
        let (net, mut table) = pool(5);
        let granted = auto(&mut table, &net, 1, "a", 0).unwrap();
        let none = BTreeSet::new();
        for bad in [
            net.own().router,
            net.own().subnet.network(),
            net.own().subnet.broadcast(),
            Ipv4Addr::new(10, 8, 0, 1),
        ] {
            assert!(matches!(
                explicit_address(&table, &net, mac(2), Some(bad), &none, LIMITS, 0),
                Err(AllocError::NotAGuestAddress { .. })
            ));
        }
        let err =
            explicit_address(&table, &net, mac(2), Some(granted.ip), &none, LIMITS, 0).unwrap_err();
        assert!(err.to_string().contains("already reserved"), "{err}");
        let (same, _) = explicit_address(&table, &net, mac(1), None, &none, LIMITS, 0).unwrap();
        assert_eq!(same, granted.ip);
    }
}
