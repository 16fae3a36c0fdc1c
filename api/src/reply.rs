//! The daemon's side of the control protocol: what it answers
//! ([`Response`], [`Reply`] and the records in it) and how it refuses
//! ([`ApiError`] with an [`ErrorKind`] a client can act on).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::types::{DnsLabel, Mac};
use crate::wire::{BadRequest, ForwardSpec, Mode};

/// A forward and whether it is in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardInfo {
    #[serde(flatten)]
    pub forward: ForwardSpec,
    /// `config` (hookd.toml), `runtime` (qnetctl) or `libvirt` (the hook).
    pub origin: String,
    /// The guest's address while the guest runs and the forward is
    /// installed.
    pub guest_addr: Option<IpAddr>,
    /// Why the forward is not in force, when it is not (the guest is not
    /// running, another forward holds the port, the kernel refused it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Ok(Reply),
    Error(ApiError),
}

/// What went wrong with a request, by kind, so a client can act on it
/// (retry, tell the user to fix the request, ask root) without parsing the
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request is malformed or names a bad value: fix it.
    Invalid,
    /// What it names does not exist (network, guest, forward, reservation).
    NotFound,
    /// Allowed for root (or another user) only.
    Denied,
    /// Something else holds it (a port, an address, a name).
    Conflict,
    /// A pool or a limit is used up (addresses, sessions).
    Exhausted,
    /// The change could not be made durable (state directory full or
    /// read-only): nothing changed; retry once that is fixed.
    Storage,
    /// Applying it to the system failed (netlink, nftables, dnsmasq, QMP).
    Failed,
    /// The daemon is busy or stopping, or did not answer in time.
    Unavailable,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

/// A refused or failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    /// One line saying what is wrong and what to do.
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// A refused request line reaches the client as an
/// [`ErrorKind::Invalid`] error.
impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> ApiError {
        ApiError::new(ErrorKind::Invalid, e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    Done { message: String },
    Status { networks: Vec<NetworkStatus> },
    Guests { guests: Vec<GuestStatus> },
    Reservations { reservations: Vec<Reservation> },
    Forwards { forwards: Vec<ForwardInfo> },
    Doctor { problems: Vec<Problem> },
    Network { network: NetworkInfo },
}

/// A network's configuration, key by key (`network show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub up: bool,
    /// Where it is configured: `FILE:LINE` of hookd.toml or the run-time
    /// network's file; absent for the default network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub settings: Vec<Setting>,
}

/// One key of a network, its value as TOML writes it, and its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    pub key: String,
    pub value: String,
    pub source: SettingSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SettingSource {
    /// Written in hookd.toml.
    Toml,
    /// Set at run time (`network create`/`edit`).
    RunTime,
    /// Not written anywhere: the default.
    Default,
}

impl fmt::Display for SettingSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SettingSource::Toml => "hookd.toml",
            SettingSource::RunTime => "run-time",
            SettingSource::Default => "default",
        })
    }
}

/// One thing `doctor` found that would stop a guest's packets, and what
/// to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The network (or guest) concerned.
    pub subject: String,
    pub problem: String,
    pub fix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub name: String,
    pub mode: Mode,
    pub bridge: String,
    /// The IPv4 subnet; `LAN of UPLINK` for a `bridged` network, whose
    /// addresses are the LAN's (its `router` is then 0.0.0.0).
    pub subnet: String,
    pub router: Ipv4Addr,
    pub ipv6: Option<String>,
    pub up: bool,
    /// Why the network does not fully work although it is up (dnsmasq
    /// failing, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    pub guests: usize,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The uid of the user the network belongs to; absent for the
    /// admin's networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub pid: u32,
    pub uid: u32,
    pub user: Option<String>,
    pub status: String,
    pub nics: Vec<GuestNic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNic {
    pub mac: Mac,
    /// The host device (TAP or macvtap) backing the NIC, when known.
    pub device: Option<String>,
    pub network: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// The bridge of the libvirt network the NIC is on, when `network` is
    /// one of libvirt's own networks rather than a qnet network: `ip` is
    /// then the address libvirt's dnsmasq leased (or the metadata's fixed
    /// address), and no qnet reservation exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_bridge: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub network: String,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// DNS name (without domain).
    pub name: Option<DnsLabel>,
    /// Made by `reserve add` (kept until `reserve rm`), rather than
    /// assigned automatically when the guest first appeared.
    pub explicit: bool,
    /// The user whose guest or request made it, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
}
