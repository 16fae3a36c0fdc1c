//! What the daemon persists: everything a user configured or the daemon
//! promised (reservations, networks taken down, attached QMP sockets, the
//! default network's subnet) and the guests it follows, so a restart, even
//! after kill -9, rebuilds exactly the same world.
//!
//! Written atomically (temp file in the same directory, fsync, rename,
//! fsync of the directory): a crash leaves either the old or the new file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api;
use crate::config::NetworkConfig;

pub const STATE_FILE: &str = "state.json";
const VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{}: not a qnet state file ({message}); move it away to start from scratch (reservations in it would be lost)",
        path.display()
    )]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The subnet picked for the default network, kept so it never moves.
    #[serde(default)]
    pub default_subnet: Option<Ipv4Net>,
    /// Networks the daemon brought up, as they were configured then, so one
    /// that disappears from the config is still removed after a restart.
    #[serde(default)]
    pub known_networks: BTreeMap<String, NetworkConfig>,
    /// Networks `qnetctl network down` took down; they stay down across
    /// restarts until `network up`.
    #[serde(default)]
    pub networks_down: BTreeSet<String>,
    /// network → MAC → reservation.
    #[serde(default)]
    pub reservations: BTreeMap<String, BTreeMap<String, StoredReservation>>,
    /// Guests being followed, by QEMU pid.
    #[serde(default)]
    pub guests: BTreeMap<u32, GuestRecord>,
    /// QMP server sockets to re-dial after a restart (`qnetctl attach`).
    #[serde(default)]
    pub attached: BTreeSet<PathBuf>,
    /// Port forwards added at run time (qnetctl, the libvirt hook); those
    /// of hookd.toml come from the file at every start.
    #[serde(default)]
    pub forwards: Vec<StoredForward>,
    /// Addresses of guest NICs on libvirt's own networks, by MAC: the last
    /// lease libvirt's dnsmasq gave (or the fixed address of the qnet
    /// metadata), so a restart of the guest or of the daemon installs its
    /// forwards at once instead of after the next lease.
    #[serde(default)]
    pub libvirt_addresses: BTreeMap<String, LibvirtAddress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtAddress {
    /// The libvirt network's name and bridge when the address was seen.
    pub network: String,
    pub bridge: String,
    pub ip: Ipv4Addr,
    /// From `<qnet:address>`: leases do not change it.
    pub fixed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredForward {
    #[serde(flatten)]
    pub spec: api::ForwardSpec,
    /// Who added it.
    pub owner_uid: u32,
    /// The UUID of the libvirt domain whose XML declares it (the libvirt
    /// hook): removed when that guest unregisters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReservation {
    pub ip: Ipv4Addr,
    pub name: Option<String>,
    pub explicit: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    pub pid: u32,
    /// Start time of the process (clock ticks since boot, /proc/PID/stat
    /// field 22), so a recycled pid is not mistaken for the guest.
    pub start_time: u64,
    pub uid: u32,
    pub name: Option<String>,
    pub uuid: Option<String>,
    /// The QMP server socket, when the daemon dialed it.
    pub qmp_server: Option<PathBuf>,
    pub nics: Vec<api::GuestNic>,
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Loads the state; a missing file is an empty state.
    pub fn load(state_dir: &Path) -> Result<State, StateError> {
        let path = Self::path(state_dir);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: VERSION,
                    ..State::default()
                })
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if state.version != VERSION {
            return Err(StateError::Corrupt {
                path,
                message: format!("version {} (this daemon knows {VERSION})", state.version),
            });
        }
        Ok(state)
    }

    /// Writes the state atomically.
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(self).expect("state always serialises");
        write_atomically(&Self::path(state_dir), &text)
    }

    /// The reservation of `mac` on `network`, making a sticky one from the
    /// network's pool if there is none. `None` if the pool is exhausted.
    pub fn reserve(
        &mut self,
        net: &NetworkConfig,
        mac: &str,
        name: Option<&str>,
    ) -> Option<Ipv4Addr> {
        let table = self.reservations.entry(net.name.clone()).or_default();
        if let Some(existing) = table.get_mut(mac) {
            if existing.name.is_none() {
                existing.name = name.map(str::to_string);
            }
            return Some(existing.ip);
        }
        let ip = free_address(net, table)?;
        table.insert(
            mac.to_string(),
            StoredReservation {
                ip,
                name: name.map(str::to_string),
                explicit: false,
            },
        );
        Some(ip)
    }

    /// Reservations of one network, as the API shows them.
    pub fn reservations_of(&self, network: &str) -> Vec<api::Reservation> {
        self.reservations
            .get(network)
            .into_iter()
            .flatten()
            .map(|(mac, r)| api::Reservation {
                network: network.to_string(),
                mac: mac.clone(),
                ip: r.ip,
                name: r.name.clone(),
                explicit: r.explicit,
            })
            .collect()
    }
}

/// The first address of the DHCP range that no reservation holds.
pub fn free_address(
    net: &NetworkConfig,
    taken: &BTreeMap<String, StoredReservation>,
) -> Option<Ipv4Addr> {
    let used: BTreeSet<Ipv4Addr> = taken.values().map(|r| r.ip).collect();
    let (start, end) = net.dhcp_range;
    (u32::from(start)..=u32::from(end))
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip) && *ip != net.router)
}

/// Writes `bytes` to `path` so that readers see the old or the new content,
/// never a mix: temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut file = File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Start time of a process (/proc/PID/stat field 22), `None` if it is gone.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields we want follow the last ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the guest recorded as `record` is still the running process.
pub fn still_running(record: &GuestRecord) -> bool {
    process_start_time(record.pid) == Some(record.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn net() -> NetworkConfig {
        let mut net = Config::default_network("10.9.0.0/24".parse().unwrap());
        net.dhcp_range = (Ipv4Addr::new(10, 9, 0, 10), Ipv4Addr::new(10, 9, 0, 12));
        net
    }

    #[test]
    fn reservations_are_sticky_and_unique() {
        let mut state = State::default();
        let net = net();
        let a = state.reserve(&net, "52:54:00:00:00:0a", Some("a")).unwrap();
        let b = state.reserve(&net, "52:54:00:00:00:0b", None).unwrap();
        assert_ne!(a, b);
        assert_eq!(state.reserve(&net, "52:54:00:00:00:0a", None), Some(a));
        state.reserve(&net, "52:54:00:00:00:0c", None).unwrap();
        assert_eq!(
            state.reserve(&net, "52:54:00:00:00:0d", None),
            None,
            "pool of 3 is full"
        );
        let listed = state.reservations_of("qnet0");
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[0].name.as_deref(), Some("a"));
    }

    #[test]
    fn save_and_load_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::load(dir.path()).unwrap();
        assert_eq!(state.version, VERSION);
        state.reserve(&net(), "52:54:00:00:00:0a", Some("a"));
        state.networks_down.insert("lab".into());
        state.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), state);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file may remain");
    }

    #[test]
    fn libvirt_addresses_persist_and_older_files_load() {
        let dir = tempfile::tempdir().unwrap();
        // A state file of a daemon before libvirt networks: no such key.
        fs::write(
            dir.path().join(STATE_FILE),
            r#"{"version": 1, "reservations": {}}"#,
        )
        .unwrap();
        let mut state = State::load(dir.path()).unwrap();
        assert!(state.libvirt_addresses.is_empty());
        state.libvirt_addresses.insert(
            "52:54:00:00:00:0a".into(),
            LibvirtAddress {
                network: "default".into(),
                bridge: "virbr0".into(),
                ip: Ipv4Addr::new(192, 168, 122, 7),
                fixed: false,
            },
        );
        state.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), state);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_silent_reset() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        let err = State::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("move it away"), "{err}");
    }

    #[test]
    fn own_process_start_time_is_known() {
        let me = std::process::id();
        assert!(process_start_time(me).is_some());
        assert!(process_start_time(u32::MAX).is_none());
    }
}
