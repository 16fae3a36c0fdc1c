//! What the daemon persists: everything a user configured or the daemon
//! promised (reservations, networks taken down, attached QMP sockets, the
//! default network's subnet) and the guests it follows, so a restart, even
//! after kill -9, rebuilds exactly the same world.
//!
//! Written atomically (temp file in the same directory, fsync, rename,
//! fsync of the directory): a crash leaves either the old or the new file.
//!
//! Port forwards added at run time are not in `state.json` but one small
//! file each in `forwards/` (`tcp-8080-<hash>.json`): there can be
//! thousands, and a change to one of them writes (or unlinks) only its own
//! file, so adding forward #10,000 costs what adding #1 does. [`OnDisk`]
//! remembers what the files hold, so a save writes only what changed —
//! also `state.json`, which is left alone when its content is the same.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api;
use crate::config::NetworkConfig;
use crate::{fsutil, procfs};

pub const STATE_FILE: &str = "state.json";
/// One file per run-time port forward, under the state directory.
pub const FORWARDS_DIR: &str = "forwards";
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
    /// of hookd.toml come from the file at every start. Saved as files of
    /// their own in [`FORWARDS_DIR`], never in `state.json` (which older
    /// versions did: such a file is still read).
    #[serde(default, skip_serializing)]
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// What the state directory holds, as of the last load or save.
#[derive(Debug, Default)]
pub struct OnDisk {
    state_json: Option<Vec<u8>>,
    /// Each forward that has a file, with the file's name in
    /// [`FORWARDS_DIR`].
    forwards: HashMap<StoredForward, String>,
}

/// The file of one run-time forward: readable, and unique for each
/// distinct forward (the hash is of its whole content, FNV-1a, stable
/// across builds).
pub fn forward_file_name(forward: &StoredForward) -> String {
    let json = serde_json::to_vec(forward).expect("forwards always serialise");
    let hash = fsutil::fnv1a(&json);
    format!(
        "{}-{}-{hash:016x}.json",
        forward.spec.proto, forward.spec.host_ports.0
    )
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Loads the state and what is on disk; a missing file or directory
    /// is an empty state.
    pub fn load_with_files(state_dir: &Path) -> Result<(State, OnDisk), StateError> {
        let mut state = Self::load(state_dir)?;
        let mut on_disk = OnDisk::default();
        let dir = state_dir.join(FORWARDS_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((state, on_disk));
            }
            Err(source) => return Err(StateError::Io { path: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| StateError::Io {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Temp files of an interrupted write start with a dot.
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let path = entry.path();
            let text = fs::read(&path).map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
            let forward: StoredForward =
                serde_json::from_slice(&text).map_err(|e| StateError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            on_disk.forwards.insert(forward, name);
        }
        // Forwards of an older state.json that are also in files (a crash
        // between the two writes of the first save) count once. In the
        // order of their files: by protocol and first port.
        let mut by_name: Vec<(&String, &StoredForward)> =
            on_disk.forwards.iter().map(|(f, name)| (name, f)).collect();
        by_name.sort_by(|a, b| a.0.cmp(b.0));
        let mut forwards: Vec<StoredForward> =
            by_name.into_iter().map(|(_, f)| f.clone()).collect();
        for legacy in state.forwards.drain(..) {
            if !forwards.contains(&legacy) {
                forwards.push(legacy);
            }
        }
        state.forwards = forwards;
        Ok((state, on_disk))
    }

    /// Loads `state.json` alone; a missing file is an empty state.
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

    /// Writes what changed since `on_disk`, each file atomically: the
    /// forwards' files first (new ones written, gone ones unlinked), then
    /// `state.json` if its content changed. Finding the forwards that
    /// changed is a hash lookup each, no serialising; a caller that
    /// knows which forward it added or removed uses [`State::save_forward`]
    /// instead, whose cost does not depend on how many forwards exist.
    pub fn save(&self, state_dir: &Path, on_disk: &mut OnDisk) -> Result<(), StateError> {
        for forward in &self.forwards {
            if !on_disk.forwards.contains_key(forward) {
                write_forward(state_dir, on_disk, forward)?;
            }
        }
        // Every current forward has a file now; any other file is gone.
        let current: HashSet<&StoredForward> = self.forwards.iter().collect();
        if on_disk.forwards.len() > current.len() {
            let gone: Vec<StoredForward> = on_disk
                .forwards
                .keys()
                .filter(|f| !current.contains(f))
                .cloned()
                .collect();
            for forward in &gone {
                unlink_forward(state_dir, on_disk, forward)?;
            }
        }
        let text = serde_json::to_vec_pretty(self).expect("state always serialises");
        if on_disk.state_json.as_ref() != Some(&text) {
            write_atomically(&Self::path(state_dir), &text)?;
            on_disk.state_json = Some(text);
        }
        Ok(())
    }

    /// Persists one forward that was just added to (`present`) or removed
    /// from `self.forwards`: its file alone is written or unlinked.
    pub fn save_forward(
        &self,
        state_dir: &Path,
        on_disk: &mut OnDisk,
        forward: &StoredForward,
        present: bool,
    ) -> Result<(), StateError> {
        match (present, on_disk.forwards.contains_key(forward)) {
            (true, false) => write_forward(state_dir, on_disk, forward),
            (false, true) => unlink_forward(state_dir, on_disk, forward),
            _ => Ok(()),
        }
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

fn write_forward(
    state_dir: &Path,
    on_disk: &mut OnDisk,
    forward: &StoredForward,
) -> Result<(), StateError> {
    let name = forward_file_name(forward);
    let json = serde_json::to_vec_pretty(forward).expect("forwards always serialise");
    write_atomically(&state_dir.join(FORWARDS_DIR).join(&name), &json)?;
    on_disk.forwards.insert(forward.clone(), name);
    Ok(())
}

fn unlink_forward(
    state_dir: &Path,
    on_disk: &mut OnDisk,
    forward: &StoredForward,
) -> Result<(), StateError> {
    let Some(name) = on_disk.forwards.get(forward) else {
        return Ok(());
    };
    let dir = state_dir.join(FORWARDS_DIR);
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(StateError::Io { path, source }),
    }
    // The unlink is durable once the directory is.
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StateError::Io { path: dir, source })?;
    on_disk.forwards.remove(forward);
    Ok(())
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

/// Writes one file of the state directory atomically and durably
/// ([`fsutil::write_atomic`]).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    fsutil::write_atomic(path, bytes, 0o644).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether the guest recorded as `record` is still the running process.
pub fn still_running(record: &GuestRecord) -> bool {
    procfs::is_same_process(record.pid, record.start_time)
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
        state.save(dir.path(), &mut OnDisk::default()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), state);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file may remain");
    }

    fn forward(port: u16) -> StoredForward {
        StoredForward {
            spec: api::ForwardSpec {
                guest: "web".into(),
                proto: api::Proto::Tcp,
                host_ports: (port, port),
                guest_port: 80,
                host_addr: None,
                network: None,
            },
            owner_uid: 0,
            libvirt: None,
        }
    }

    fn forward_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join(FORWARDS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn forwards_are_files_of_their_own_written_and_removed_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut state, mut on_disk) = State::load_with_files(dir.path()).unwrap();
        state.forwards = vec![forward(8080), forward(8081)];
        state.save(dir.path(), &mut on_disk).unwrap();
        let files = forward_files(dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files[0].starts_with("tcp-8080-"), "{files:?}");
        let state_json = fs::read_to_string(State::path(dir.path())).unwrap();
        assert!(!state_json.contains("8080"), "{state_json}");
        let written = fs::metadata(dir.path().join(FORWARDS_DIR).join(&files[0]))
            .unwrap()
            .modified()
            .unwrap();

        // One more forward: one more file, the others untouched.
        std::thread::sleep(std::time::Duration::from_millis(20));
        state.forwards.push(forward(8082));
        state.save(dir.path(), &mut on_disk).unwrap();
        let files = forward_files(dir.path());
        assert_eq!(files.len(), 3);
        let again = fs::metadata(dir.path().join(FORWARDS_DIR).join(&files[0]))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(written, again, "an unchanged forward is not rewritten");

        state.forwards.retain(|f| f.spec.host_ports.0 != 8081);
        state.save(dir.path(), &mut on_disk).unwrap();
        assert_eq!(forward_files(dir.path()).len(), 2);
        let (loaded, _) = State::load_with_files(dir.path()).unwrap();
        let mut ports: Vec<u16> = loaded
            .forwards
            .iter()
            .map(|f| f.spec.host_ports.0)
            .collect();
        ports.sort();
        assert_eq!(ports, [8080, 8082]);
    }

    #[test]
    fn forwards_of_an_older_state_file_are_kept_once_and_moved_to_files() {
        let dir = tempfile::tempdir().unwrap();
        // As older versions wrote it: forwards inside state.json.
        let mut old = serde_json::to_value(State {
            version: VERSION,
            ..State::default()
        })
        .unwrap();
        old["forwards"] = serde_json::to_value(vec![forward(8080), forward(9090)]).unwrap();
        fs::write(State::path(dir.path()), old.to_string()).unwrap();
        // ... and a crash after the first new-style save wrote one file.
        let mut half = OnDisk::default();
        State {
            version: VERSION,
            forwards: vec![forward(8080)],
            ..State::default()
        }
        .save(&dir.path().join("elsewhere"), &mut half)
        .unwrap();
        fs::create_dir_all(dir.path().join(FORWARDS_DIR)).unwrap();
        let name = forward_file_name(&forward(8080));
        fs::copy(
            dir.path().join("elsewhere").join(FORWARDS_DIR).join(&name),
            dir.path().join(FORWARDS_DIR).join(&name),
        )
        .unwrap();

        let (state, mut on_disk) = State::load_with_files(dir.path()).unwrap();
        assert_eq!(state.forwards.len(), 2, "{:?}", state.forwards);
        state.save(dir.path(), &mut on_disk).unwrap();
        assert_eq!(forward_files(dir.path()).len(), 2);
        let (again, _) = State::load_with_files(dir.path()).unwrap();
        assert_eq!(again.forwards.len(), 2);
        assert!(!fs::read_to_string(State::path(dir.path()))
            .unwrap()
            .contains("9090"));
    }

    #[test]
    fn a_broken_forward_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(FORWARDS_DIR)).unwrap();
        fs::write(dir.path().join(FORWARDS_DIR).join("tcp-1-x.json"), "{").unwrap();
        let err = State::load_with_files(dir.path()).unwrap_err();
        assert!(err.to_string().contains("tcp-1-x.json"), "{err}");
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
        state.save(dir.path(), &mut OnDisk::default()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), state);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_silent_reset() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
        let err = State::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("move it away"), "{err}");
    }
}
