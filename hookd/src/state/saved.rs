//! The state directory's file formats, apart from the domain types they
//! hold (firecracker's `persist.rs` keeps saved state as its own types in
//! the same way): renaming a field of [`super::State`] must never change
//! what is on disk, and old files must keep loading.
//!
//! Version 3 (this one): `state.json` holds the few network-wide facts
//! ([`Header`]); each network's reservations are a journal of
//! [`JournalEntry`] lines; each guest and run-time forward is a file of
//! its own ([`SavedGuest`], [`SavedForward`]):
//!
//! ```text
//! STATE/state.json                     Header
//! STATE/reservations/NET.jsonl         JournalEntry, a line each
//! STATE/forwards/PROTO-PORT-HASH.json  SavedForward
//! RUN/guests/PID.json                  SavedGuest (a reboot ends them)
//! ```
//!
//! Older layouts still load, and the daemon moves what they hold to where
//! this version keeps it: version 2 kept each reservation in a file of its
//! own (`STATE/reservations/NET/MAC.json`, a [`SavedReservation`]);
//! daemons before the run directory kept the guests' files in
//! `STATE/guests/`, of the same format; version 1 kept reservations and
//! guests inside `state.json` ([`LegacyV1`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use qnet_api::{
    DnsLabel, DomainName, ForwardSpec, GuestName, GuestUuid, IfName, Mac, Mode, NetName,
};
use serde::{Deserialize, Serialize};

use super::{Forward, Guest, LibvirtAddress, Nic, NicNetwork, NicOwner, Reservation};
use crate::config::{Addressing, BlockedPort, Ipv6Config, Link, NetworkConfig};
use crate::procfs::Process;

pub const VERSION: u32 = 3;

/// `state.json` of versions 2 and 3.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub version: u32,
    #[serde(default)]
    pub default_subnet: Option<Ipv4Net>,
    #[serde(default)]
    pub known_networks: BTreeMap<NetName, SavedNetwork>,
    #[serde(default)]
    pub networks_down: BTreeSet<NetName>,
    #[serde(default)]
    pub attached: BTreeSet<PathBuf>,
    #[serde(default)]
    pub libvirt_addresses: BTreeMap<Mac, SavedLibvirtAddress>,
}

/// A network the daemon brought up, as it was configured then (the
/// header's `known_networks`), so that one gone from the config is still
/// taken down after a restart.
///
/// The fields are those every earlier daemon wrote, flat. A LAN network has
/// no addressing, but its record still carries what earlier daemons put
/// there for it (subnet 0.0.0.0/32, router 0.0.0.0) so that a daemon
/// downgraded to an earlier release still reads the file; they are ignored
/// when it loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNetwork {
    pub name: NetName,
    pub bridge: IfName,
    pub mode: Mode,
    pub subnet: Ipv4Net,
    pub router: Ipv4Addr,
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<DomainName>,
    pub uplink: Option<IfName>,
    #[serde(default)]
    pub blocked_ports: Vec<BlockedPort>,
    pub ipv6: Option<Ipv6Config>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_to: Vec<Link>,
}

impl From<&NetworkConfig> for SavedNetwork {
    fn from(net: &NetworkConfig) -> Self {
        let lan_domain = || format!("{}.qnet", net.name).parse().ok();
        let nowhere = Ipv4Addr::UNSPECIFIED;
        let own = net.addressing.as_ref();
        SavedNetwork {
            name: net.name.clone(),
            bridge: net.bridge.clone(),
            mode: net.mode,
            subnet: own.map_or(Ipv4Net::from(nowhere), |a| a.subnet),
            router: own.map_or(nowhere, |a| a.router),
            dhcp_range: own.map_or((nowhere, nowhere), |a| a.dhcp_range),
            domain: own.map_or_else(lan_domain, |a| Some(a.domain.clone())),
            uplink: net.uplink.clone(),
            blocked_ports: own.map_or_else(Vec::new, |a| a.blocked_ports.clone()),
            ipv6: net.ipv6(),
            owner: net.owner,
            connect_to: net.connect_to().to_vec(),
        }
    }
}

impl SavedNetwork {
    /// The network as the daemon uses it: `None` for a record of a nat,
    /// routed or isolated network without its domain, which no daemon
    /// writes.
    pub fn into_config(self) -> Option<NetworkConfig> {
        let addressing = match self.mode {
            Mode::Bridged => None,
            _ => Some(Addressing {
                subnet: self.subnet,
                router: self.router,
                dhcp_range: self.dhcp_range,
                domain: self.domain?,
                blocked_ports: self.blocked_ports,
                ipv6: self.ipv6,
                connect_to: self.connect_to,
            }),
        };
        Some(NetworkConfig {
            name: self.name,
            bridge: self.bridge,
            mode: self.mode,
            uplink: self.uplink,
            owner: self.owner,
            addressing,
        })
    }
}

/// `state.json` of version 1: everything in one file. Read only.
#[derive(Debug, Deserialize)]
pub struct LegacyV1 {
    #[serde(flatten)]
    pub header: Header,
    #[serde(default)]
    pub reservations: BTreeMap<NetName, BTreeMap<Mac, LegacyReservation>>,
    #[serde(default)]
    pub guests: BTreeMap<u32, SavedGuest>,
    #[serde(default)]
    pub forwards: Vec<SavedForward>,
}

#[derive(Debug, Deserialize)]
pub struct LegacyReservation {
    pub ip: Ipv4Addr,
    pub name: Option<DnsLabel>,
    pub explicit: bool,
}

impl From<LegacyReservation> for Reservation {
    fn from(r: LegacyReservation) -> Reservation {
        Reservation {
            ip: r.ip,
            name: r.name,
            explicit: r.explicit,
            owner_uid: None,
            nic: None,
            // Unknown: counts as seen now, so nothing old is reclaimed
            // right after an upgrade.
            last_seen: super::now(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLibvirtAddress {
    pub network: String,
    pub bridge: IfName,
    pub ip: Ipv4Addr,
    pub fixed: bool,
}

impl From<&LibvirtAddress> for SavedLibvirtAddress {
    fn from(a: &LibvirtAddress) -> Self {
        SavedLibvirtAddress {
            network: a.network.clone(),
            bridge: a.bridge.clone(),
            ip: a.ip,
            fixed: a.fixed,
        }
    }
}

impl From<SavedLibvirtAddress> for LibvirtAddress {
    fn from(a: SavedLibvirtAddress) -> Self {
        LibvirtAddress {
            network: a.network,
            bridge: a.bridge,
            ip: a.ip,
            fixed: a.fixed,
        }
    }
}

/// One line of `reservations/NET.jsonl`: a reservation made or changed
/// (`{"op":"set","mac":...,"reservation":{...}}`), or removed
/// (`{"op":"remove","mac":...}`). The journal holds a network's
/// reservations as the last line of each MAC says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum JournalEntry {
    Set {
        mac: Mac,
        reservation: SavedReservation,
    },
    Remove {
        mac: Mac,
    },
}

/// A reservation: a line of `reservations/NET.jsonl` holds one, and so
/// did version 2's `reservations/NET/MAC.json` files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedReservation {
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub name: Option<DnsLabel>,
    pub explicit: bool,
    #[serde(default)]
    pub owner_uid: Option<u32>,
    #[serde(default)]
    pub nic: Option<SavedNicOwner>,
    #[serde(default)]
    pub last_seen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedNicOwner {
    pub guest: String,
    pub nic: String,
}

impl From<&Reservation> for SavedReservation {
    fn from(r: &Reservation) -> Self {
        SavedReservation {
            ip: r.ip,
            name: r.name.clone(),
            explicit: r.explicit,
            owner_uid: r.owner_uid,
            nic: r.nic.as_ref().map(|o| SavedNicOwner {
                guest: o.guest.to_string(),
                nic: o.nic.clone(),
            }),
            last_seen: r.last_seen,
        }
    }
}

impl From<SavedReservation> for Reservation {
    /// An owner whose guest key does not read (a record edited by hand)
    /// is dropped: the reservation stays, owned by no NIC, as an older
    /// daemon's automatic ones are.
    fn from(r: SavedReservation) -> Self {
        Reservation {
            ip: r.ip,
            name: r.name,
            explicit: r.explicit,
            owner_uid: r.owner_uid,
            nic: r.nic.and_then(|o| {
                Some(NicOwner {
                    guest: o.guest.parse().ok()?,
                    nic: o.nic,
                })
            }),
            last_seen: r.last_seen,
        }
    }
}

/// `RUN/guests/PID.json` (and an older daemon's `STATE/guests/PID.json`,
/// and version 1's `guests` map).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGuest {
    pub pid: u32,
    pub start_time: u64,
    pub uid: u32,
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub qmp_server: Option<PathBuf>,
    pub nics: Vec<SavedNic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNic {
    pub mac: Mac,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_name: Option<String>,
    pub device: Option<IfName>,
    pub network: Option<String>,
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_bridge: Option<IfName>,
}

impl From<&Guest> for SavedGuest {
    fn from(g: &Guest) -> Self {
        SavedGuest {
            pid: g.process.pid,
            start_time: g.process.start_time,
            uid: g.uid,
            name: g.name.as_ref().map(ToString::to_string),
            uuid: g.uuid.as_ref().map(ToString::to_string),
            qmp_server: g.qmp_server.clone(),
            nics: g.nics.iter().map(SavedNic::from).collect(),
        }
    }
}

impl From<SavedGuest> for Guest {
    /// Name and UUID are made safe as they are where QMP gives them (a
    /// record of an older daemon may hold what it did not check).
    fn from(g: SavedGuest) -> Self {
        Guest {
            process: Process {
                pid: g.pid,
                start_time: g.start_time,
            },
            uid: g.uid,
            name: g.name.as_deref().map(GuestName::kept),
            uuid: g.uuid.and_then(|u| u.parse().ok()),
            qmp_server: g.qmp_server,
            nics: g.nics.into_iter().map(Nic::from).collect(),
        }
    }
}

impl From<&Nic> for SavedNic {
    fn from(n: &Nic) -> Self {
        SavedNic {
            mac: n.mac,
            qemu_name: n.qemu_name.clone(),
            device: n.device.clone(),
            network: n.network.as_ref().map(|on| on.name().to_owned()),
            ip: n.ip,
            libvirt_bridge: n.libvirt_bridge().cloned(),
        }
    }
}

impl From<SavedNic> for Nic {
    /// A qnet network that is no network name (a record edited by hand)
    /// leaves the NIC on no network.
    fn from(n: SavedNic) -> Self {
        let network = match (n.network, n.libvirt_bridge) {
            (Some(name), Some(bridge)) => Some(NicNetwork::Libvirt { name, bridge }),
            (Some(name), None) => name.parse().ok().map(NicNetwork::Qnet),
            (None, _) => None,
        };
        Nic {
            mac: n.mac,
            qemu_name: n.qemu_name,
            device: n.device,
            network,
            ip: n.ip,
        }
    }
}

/// `forwards/PROTO-PORT-HASH.json`: the spec, flat, plus who declared it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SavedForward {
    #[serde(flatten)]
    pub spec: ForwardSpec,
    pub owner_uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<GuestUuid>,
}

impl From<&Forward> for SavedForward {
    fn from(f: &Forward) -> Self {
        SavedForward {
            spec: f.spec.clone(),
            owner_uid: f.owner_uid,
            libvirt: f.libvirt.clone(),
        }
    }
}

impl From<SavedForward> for Forward {
    fn from(f: SavedForward) -> Self {
        Forward {
            spec: f.spec,
            owner_uid: f.owner_uid,
            libvirt: f.libvirt,
        }
    }
}
