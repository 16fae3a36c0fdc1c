//! The state's two large collections, which remember what changed in
//! them: the reservations and the guests. A guest connecting changes one
//! or two records among thousands; the state directory and dnsmasq's hosts
//! directories then follow by looking at those records alone, so a flush
//! costs the same with 1,000 guests as with 10.
//!
//! Each collection reads like a map (`Deref` to its `BTreeMap`) but changes
//! only through methods that note the key, so a change cannot go unnoticed:
//! there is no `&mut` to the map itself. Each reader of the changes (the
//! store, dnsmasq's hosts) takes them on its own schedule, and only once
//! it has made them follow (a failed save keeps them for the retry). A
//! change noted that changed nothing costs one comparison.
//!
//! The guests also keep an index of their NICs on qnet networks, so
//! "does a running guest have this MAC on this network" is a lookup
//! rather than a walk over every guest.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};

use qnet_api::{Mac, NetName};

use super::alloc::{InUse, ReservationTable};
use super::{Guest, Reservation};

/// network → MAC → reservation, with the keys changed since the store and
/// the hosts last took them.
#[derive(Debug, Clone, Default)]
pub struct Reservations {
    tables: BTreeMap<NetName, BTreeMap<Mac, Reservation>>,
    changed: Changed<(NetName, Mac)>,
}

/// Keys changed since each reader took them.
#[derive(Debug, Clone)]
struct Changed<K> {
    store: BTreeSet<K>,
    hosts: BTreeSet<K>,
}

impl<K> Default for Changed<K> {
    fn default() -> Self {
        Changed {
            store: BTreeSet::new(),
            hosts: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone> Changed<K> {
    fn note(&mut self, key: &K) {
        self.store.insert(key.clone());
        self.hosts.insert(key.clone());
    }
}

impl PartialEq for Reservations {
    fn eq(&self, other: &Self) -> bool {
        self.tables == other.tables
    }
}
impl Eq for Reservations {}

impl Deref for Reservations {
    type Target = BTreeMap<NetName, BTreeMap<Mac, Reservation>>;
    fn deref(&self) -> &Self::Target {
        &self.tables
    }
}

impl Reservations {
    /// Network `net`'s table, to change (made empty if it has none).
    pub fn table_mut(&mut self, net: &NetName) -> Table<'_> {
        Table {
            net: net.clone(),
            table: self.tables.entry(net.clone()).or_default(),
            changed: &mut self.changed,
        }
    }

    /// The reservation of `mac` on `net`, to change.
    pub fn get_mut(&mut self, net: &str, mac: &Mac) -> Option<&mut Reservation> {
        let (name, table) = self
            .tables
            .iter_mut()
            .find(|(name, _)| name.as_str() == net)?;
        let reservation = table.get_mut(mac)?;
        self.changed.note(&(name.clone(), *mac));
        Some(reservation)
    }

    /// Removes network `net`'s whole table.
    pub fn remove_network(&mut self, net: &NetName) -> Option<BTreeMap<Mac, Reservation>> {
        let table = self.tables.remove(net)?;
        for mac in table.keys() {
            self.changed.note(&(net.clone(), *mac));
        }
        Some(table)
    }

    /// The keys changed since the store last took them.
    pub fn store_changes(&self) -> &BTreeSet<(NetName, Mac)> {
        &self.changed.store
    }

    pub fn clear_store_changes(&mut self) {
        self.changed.store.clear();
    }

    /// Takes the keys changed since the hosts last took them.
    pub fn take_hosts_changes(&mut self) -> BTreeSet<(NetName, Mac)> {
        std::mem::take(&mut self.changed.hosts)
    }
}

/// One network's reservations, borrowed to change.
pub struct Table<'a> {
    net: NetName,
    table: &'a mut BTreeMap<Mac, Reservation>,
    changed: &'a mut Changed<(NetName, Mac)>,
}

impl Deref for Table<'_> {
    type Target = BTreeMap<Mac, Reservation>;
    fn deref(&self) -> &Self::Target {
        self.table
    }
}

impl Table<'_> {
    /// Keeps the reservations `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Mac, &Reservation) -> bool) {
        let Table {
            net,
            table,
            changed,
        } = self;
        table.retain(|mac, r| {
            let kept = keep(mac, r);
            if !kept {
                changed.note(&(net.clone(), *mac));
            }
            kept
        });
    }
}

/// Each change notes the key (a removal or a lookup that finds nothing
/// changes nothing, and notes nothing).
impl ReservationTable for Table<'_> {
    fn view(&self) -> &BTreeMap<Mac, Reservation> {
        self.table
    }

    fn get_mut(&mut self, mac: &Mac) -> Option<&mut Reservation> {
        let reservation = self.table.get_mut(mac)?;
        self.changed.note(&(self.net.clone(), *mac));
        Some(reservation)
    }

    fn remove(&mut self, mac: &Mac) -> Option<Reservation> {
        let removed = self.table.remove(mac)?;
        self.changed.note(&(self.net.clone(), *mac));
        Some(removed)
    }

    fn insert(&mut self, mac: Mac, reservation: Reservation) -> Option<Reservation> {
        self.changed.note(&(self.net.clone(), mac));
        self.table.insert(mac, reservation)
    }
}

/// The guests being followed, by QEMU pid, with the pids changed since
/// the store took them, the (network, MAC) pairs of NICs that came or went
/// since the hosts took them, and the index of NICs on qnet networks.
#[derive(Debug, Clone, Default)]
pub struct Guests {
    map: BTreeMap<u32, Guest>,
    /// qnet network → MAC → how many running NICs have it there.
    on_networks: BTreeMap<String, BTreeMap<Mac, u32>>,
    changed: BTreeSet<u32>,
    nics_changed: BTreeSet<(String, Mac)>,
}

impl PartialEq for Guests {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}
impl Eq for Guests {}

impl Deref for Guests {
    type Target = BTreeMap<u32, Guest>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl Guests {
    pub fn insert(&mut self, pid: u32, guest: Guest) -> Option<Guest> {
        self.index(&guest, true);
        let old = self.map.insert(pid, guest);
        if let Some(old) = &old {
            self.index(old, false);
        }
        self.changed.insert(pid);
        old
    }

    pub fn remove(&mut self, pid: &u32) -> Option<Guest> {
        let old = self.map.remove(pid)?;
        self.index(&old, false);
        self.changed.insert(*pid);
        Some(old)
    }

    /// Guest `pid`, to change: the index follows when the guard is dropped.
    pub fn get_mut(&mut self, pid: &u32) -> Option<GuestMut<'_>> {
        let guest = self.map.remove(pid)?;
        self.index(&guest, false);
        Some(GuestMut {
            guests: self,
            guest: Some(guest),
        })
    }

    /// Keeps the guests `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&u32, &Guest) -> bool) {
        let gone: Vec<u32> = self
            .map
            .iter()
            .filter(|(pid, g)| !keep(pid, g))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            self.remove(&pid);
        }
    }

    /// Whether a guest has a NIC with `mac` on the qnet network `net`.
    pub fn is_running_on(&self, net: &str, mac: &Mac) -> bool {
        self.on_networks
            .get(net)
            .is_some_and(|macs| macs.contains_key(mac))
    }

    /// The MACs running on the qnet network `net`, looked up one at a time
    /// (see [`InUse`]).
    pub fn running_on<'a>(&'a self, net: &'a str) -> RunningOn<'a> {
        RunningOn { guests: self, net }
    }

    /// The pids changed since the store last took them.
    pub fn store_changes(&self) -> &BTreeSet<u32> {
        &self.changed
    }

    pub fn clear_store_changes(&mut self) {
        self.changed.clear();
    }

    /// Takes the (qnet network, MAC) pairs of NICs that came or went since
    /// the hosts last took them.
    pub fn take_hosts_changes(&mut self) -> BTreeSet<(String, Mac)> {
        std::mem::take(&mut self.nics_changed)
    }

    /// Adds (`add`) or removes `guest`'s NICs on qnet networks in the index.
    fn index(&mut self, guest: &Guest, add: bool) {
        for nic in &guest.nics {
            let Some(net) = nic.qnet_network() else {
                continue;
            };
            self.nics_changed.insert((net.to_string(), nic.mac));
            let macs = self.on_networks.entry(net.to_string()).or_default();
            let count = macs.entry(nic.mac).or_default();
            if add {
                *count += 1;
            } else {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    macs.remove(&nic.mac);
                    if macs.is_empty() {
                        self.on_networks.remove(net.as_str());
                    }
                }
            }
        }
    }
}

/// A guest borrowed to change (see [`Guests::get_mut`]): it is out of the
/// map and the index while borrowed, and put back, noted, when dropped.
pub struct GuestMut<'a> {
    guests: &'a mut Guests,
    guest: Option<Guest>,
}

impl Deref for GuestMut<'_> {
    type Target = Guest;
    fn deref(&self) -> &Guest {
        self.guest.as_ref().expect("present until dropped")
    }
}

impl DerefMut for GuestMut<'_> {
    fn deref_mut(&mut self) -> &mut Guest {
        self.guest.as_mut().expect("present until dropped")
    }
}

impl Drop for GuestMut<'_> {
    fn drop(&mut self) {
        if let Some(guest) = self.guest.take() {
            self.guests.insert(guest.process.pid, guest);
        }
    }
}

/// The MACs running on one qnet network, as [`super::alloc`] asks.
pub struct RunningOn<'a> {
    guests: &'a Guests,
    net: &'a str,
}

impl InUse for RunningOn<'_> {
    fn contains(&self, mac: &Mac) -> bool {
        self.guests.is_running_on(self.net, mac)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Nic;
    use super::*;
    use crate::procfs::Process;
    use crate::state::NicNetwork;

    fn mac(n: u8) -> Mac {
        Mac::from_octets([0x52, 0x54, 0, 0, 0, n])
    }

    fn guest(pid: u32, nics: &[(&str, u8)]) -> Guest {
        Guest {
            process: Process { pid, start_time: 1 },
            uid: 0,
            name: None,
            uuid: None,
            qmp_server: None,
            nics: nics
                .iter()
                .map(|(net, n)| Nic {
                    mac: mac(*n),
                    qemu_name: None,
                    device: None,
                    network: Some(NicNetwork::Qnet(net.parse().unwrap())),
                    ip: None,
                })
                .collect(),
        }
    }

    fn reservation(last_seen: u64) -> Reservation {
        Reservation {
            ip: [10, 0, 0, 2].into(),
            name: None,
            explicit: false,
            owner_uid: None,
            nic: None,
            last_seen,
        }
    }

    #[test]
    fn every_way_of_changing_a_reservation_is_noted() {
        let lab: NetName = "lab".parse().unwrap();
        let mut r = Reservations::default();
        r.table_mut(&lab).insert(mac(1), reservation(0));
        r.table_mut(&lab).insert(mac(2), reservation(0));
        r.table_mut(&lab).insert(mac(3), reservation(0));
        assert_eq!(r.store_changes().len(), 3);
        assert_eq!(r.take_hosts_changes().len(), 3);
        r.clear_store_changes();

        r.get_mut("lab", &mac(1)).unwrap().last_seen = 5;
        r.table_mut(&lab).remove(&mac(2));
        // Nothing to remove, nothing noted.
        assert!(r.table_mut(&lab).remove(&mac(9)).is_none());
        assert!(r.get_mut("other", &mac(1)).is_none());
        let noted: Vec<Mac> = r.store_changes().iter().map(|(_, m)| *m).collect();
        assert_eq!(noted, [mac(1), mac(2)]);
        r.clear_store_changes();

        r.table_mut(&lab).retain(|m, _| *m != mac(3));
        let noted: Vec<Mac> = r.store_changes().iter().map(|(_, m)| *m).collect();
        assert_eq!(noted, [mac(3)]);
        r.clear_store_changes();
        r.remove_network(&lab);
        let noted: Vec<Mac> = r.store_changes().iter().map(|(_, m)| *m).collect();
        assert_eq!(noted, [mac(1)]);
        assert!(r.is_empty());
        // The hosts' changes were kept for them all along.
        assert_eq!(r.take_hosts_changes().len(), 3);
    }

    /// The MACs the index has running on `net`.
    fn running_macs_on(g: &Guests, net: &str) -> BTreeSet<Mac> {
        g.on_networks
            .get(net)
            .map(|macs| macs.keys().copied().collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_nic_index_follows_every_change_of_the_guests() {
        let mut g = Guests::default();
        g.insert(1, guest(1, &[("lab", 1), ("dev", 2)]));
        g.insert(2, guest(2, &[("lab", 1)]));
        assert!(g.is_running_on("lab", &mac(1)) && g.is_running_on("dev", &mac(2)));
        assert!(!g.is_running_on("lab", &mac(2)));
        // Two guests with one MAC: it runs until both are gone.
        g.remove(&1);
        assert!(g.is_running_on("lab", &mac(1)) && !g.is_running_on("dev", &mac(2)));
        g.get_mut(&2).unwrap().nics = guest(2, &[("lab", 3)]).nics;
        assert_eq!(running_macs_on(&g, "lab"), [mac(3)].into());
        g.insert(2, guest(2, &[]));
        assert!(running_macs_on(&g, "lab").is_empty());
        g.insert(3, guest(3, &[("lab", 4)]));
        g.retain(|pid, _| *pid != 3);
        assert!(running_macs_on(&g, "lab").is_empty());
        assert_eq!(g.store_changes(), &[1, 2, 3].into());
        let nics: Vec<(String, Mac)> = g.take_hosts_changes().into_iter().collect();
        assert_eq!(
            nics,
            [
                ("dev".into(), mac(2)),
                ("lab".into(), mac(1)),
                ("lab".into(), mac(3)),
                ("lab".into(), mac(4)),
            ]
        );
    }
}
