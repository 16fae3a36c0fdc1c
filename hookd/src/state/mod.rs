//! The daemon's model of the world it keeps: everything a user configured
//! or the daemon promised (reservations, forwards, networks taken down,
//! attached QMP sockets, the default network's subnet) and the guests it
//! follows.
//!
//! These are domain types: typed, always valid, free of any file format.
//! [`store`] saves and loads them (its own serde types, in `saved`), and
//! the control protocol has its own wire types (`qnet_api`): a change of
//! one never changes the others by accident. [`alloc`] hands out sticky
//! addresses.

pub mod alloc;
mod journal;
mod saved;
pub mod store;
mod tracked;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::Ipv4Net;
use qnet_api::types::preview;
use qnet_api::{DnsLabel, ForwardSpec, GuestName, GuestUuid, IfName, Invalid, Mac, NetName};

use crate::config::NetworkConfig;
use crate::procfs::Process;

pub use store::{StateError, Store};
pub use tracked::{Guests, Reservations};

/// Everything the daemon persists, as it uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// The subnet picked for the default network, kept so it never moves.
    pub default_subnet: Option<Ipv4Net>,
    /// Networks the daemon brought up, as they were configured then, so one
    /// that disappears from the config is still removed after a restart.
    pub known_networks: BTreeMap<NetName, NetworkConfig>,
    /// Networks `qnetctl network down` took down; they stay down across
    /// restarts until `network up`.
    pub networks_down: BTreeSet<NetName>,
    /// network → MAC → reservation.
    pub reservations: Reservations,
    /// Guests being followed, by QEMU pid.
    pub guests: Guests,
    /// QMP server sockets to re-dial after a restart (`qnetctl attach`).
    pub attached: BTreeSet<PathBuf>,
    /// Port forwards added at run time (qnetctl, the libvirt hook); those
    /// of hookd.toml come from the file at every start.
    pub forwards: Vec<Forward>,
    /// Addresses of guest NICs on libvirt's own networks: the last lease
    /// libvirt's dnsmasq gave (or the fixed address of the qnet metadata),
    /// so a restart installs their forwards at once instead of after the
    /// next lease.
    pub libvirt_addresses: BTreeMap<Mac, LibvirtAddress>,
}

/// A sticky address: `mac` always gets `ip` on its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: Ipv4Addr,
    /// DNS name (without the domain).
    pub name: Option<DnsLabel>,
    /// Made by `reserve add` (kept until `reserve rm`, never reclaimed),
    /// rather than assigned when a guest NIC first appeared.
    pub explicit: bool,
    /// The user whose guest or request made it.
    pub owner_uid: Option<u32>,
    /// The guest NIC an automatic reservation was made for: a NIC may
    /// hold only a few (see [`alloc`]).
    pub nic: Option<NicOwner>,
    /// When a running guest last had this MAC (seconds since the epoch):
    /// automatic reservations unseen for long may be reclaimed when the
    /// pool runs out.
    pub last_seen: u64,
}

/// Which guest NIC an automatic reservation belongs to: the guest and
/// QEMU's name for the NIC (a libvirt NIC's MAC). A guest that changes its
/// NIC's MAC keeps the same owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NicOwner {
    pub guest: GuestKey,
    pub nic: String,
}

/// A guest as its automatic reservations name it: by its UUID, else its
/// name, else its process. The first two outlive the process, so a guest
/// started again finds its NICs' reservations; saved as `uuid:U`,
/// `name:N` or `pid:P:T` (the start time).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GuestKey {
    Uuid(GuestUuid),
    Name(GuestName),
    Process(Process),
}

impl fmt::Display for GuestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestKey::Uuid(uuid) => write!(f, "uuid:{uuid}"),
            GuestKey::Name(name) => write!(f, "name:{name}"),
            GuestKey::Process(p) => write!(f, "pid:{}:{}", p.pid, p.start_time),
        }
    }
}

impl FromStr for GuestKey {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<GuestKey, Invalid> {
        let process = |rest: &str| {
            let (pid, start_time) = rest.split_once(':')?;
            Some(Process {
                pid: pid.parse().ok()?,
                start_time: start_time.parse().ok()?,
            })
        };
        match text.split_once(':') {
            Some(("uuid", uuid)) => Ok(GuestKey::Uuid(uuid.parse()?)),
            Some(("name", name)) => Ok(GuestKey::Name(GuestName::kept(name))),
            Some(("pid", rest)) => process(rest)
                .map(GuestKey::Process)
                .ok_or_else(|| Invalid(format!("`{}` is not PID:START-TIME", preview(rest)))),
            _ => Err(Invalid(format!(
                "`{}` is not a guest key (uuid:U, name:N or pid:P:T)",
                preview(text)
            ))),
        }
    }
}

/// A QEMU process the daemon follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    /// The QEMU, with its start time, so that a recycled pid is not
    /// mistaken for the guest.
    pub process: Process,
    pub uid: u32,
    /// `-name` (or the libvirt domain's name).
    pub name: Option<GuestName>,
    pub uuid: Option<GuestUuid>,
    /// The QMP server socket, when the daemon dialed it.
    pub qmp_server: Option<PathBuf>,
    pub nics: Vec<Nic>,
}

impl Guest {
    /// Whether this is still the running process.
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// The key of this guest's automatic reservations.
    pub fn owner_key(&self) -> GuestKey {
        match (&self.uuid, &self.name) {
            (Some(uuid), _) => GuestKey::Uuid(uuid.clone()),
            (None, Some(name)) => GuestKey::Name(name.clone()),
            (None, None) => GuestKey::Process(self.process),
        }
    }
}

/// One NIC of a guest and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub mac: Mac,
    /// QEMU's name for the NIC (`net0`, `virtio-net-pci.0`), when known.
    pub qemu_name: Option<String>,
    /// The host device (TAP or macvtap) backing the NIC, when known.
    pub device: Option<IfName>,
    /// The network it is on, when it is on one qnet knows.
    pub network: Option<NicNetwork>,
    pub ip: Option<Ipv4Addr>,
}

/// The network a guest NIC is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicNetwork {
    /// A network of qnet's: `ip` is the NIC's reservation.
    Qnet(NetName),
    /// One of libvirt's own networks (a libvirt guest's): `ip` is the last
    /// lease libvirt's dnsmasq gave (or the metadata's fixed address), and
    /// no qnet reservation exists.
    Libvirt { name: String, bridge: IfName },
}

impl NicNetwork {
    /// The network's name, whoever's it is.
    pub fn name(&self) -> &str {
        match self {
            NicNetwork::Qnet(name) => name.as_str(),
            NicNetwork::Libvirt { name, .. } => name,
        }
    }
}

impl Nic {
    /// Whether the NIC is on the qnet network `name` (a NIC on a libvirt
    /// network of the same name is not).
    pub fn is_on_qnet_network(&self, name: &str) -> bool {
        self.qnet_network().is_some_and(|n| n.as_str() == name)
    }

    /// The qnet network the NIC is on, if it is on one (not on a libvirt
    /// network).
    pub fn qnet_network(&self) -> Option<&NetName> {
        match &self.network {
            Some(NicNetwork::Qnet(name)) => Some(name),
            _ => None,
        }
    }

    /// The bridge of the libvirt network the NIC is on, if it is on one.
    pub fn libvirt_bridge(&self) -> Option<&IfName> {
        match &self.network {
            Some(NicNetwork::Libvirt { bridge, .. }) => Some(bridge),
            _ => None,
        }
    }
}

/// A forward declared at run time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Forward {
    pub spec: ForwardSpec,
    /// Who added it.
    pub owner_uid: u32,
    /// The UUID of the libvirt domain whose XML declares it (the libvirt
    /// hook): removed when that guest unregisters.
    pub libvirt: Option<GuestUuid>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtAddress {
    /// The libvirt network's name and bridge when the address was seen.
    pub network: String,
    pub bridge: IfName,
    pub ip: Ipv4Addr,
    /// From `<qnet:address>`: leases do not change it.
    pub fixed: bool,
}

impl State {
    /// Every NIC of every followed guest.
    pub fn nics(&self) -> impl Iterator<Item = &Nic> {
        self.guests.values().flat_map(|g| g.nics.iter())
    }

    /// MACs of the running guests of `uid`.
    pub fn macs_of(&self, uid: u32) -> BTreeSet<Mac> {
        self.guests
            .values()
            .filter(|g| g.uid == uid)
            .flat_map(|g| g.nics.iter().map(|n| n.mac))
            .collect()
    }

    /// Guests on the qnet network `name`.
    pub fn guests_on(&self, name: &str) -> usize {
        self.guests
            .values()
            .filter(|g| g.nics.iter().any(|nic| nic.is_on_qnet_network(name)))
            .count()
    }
}

/// Now, in seconds since the epoch (0 if the clock is before 1970).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
