//! Where [`State`] survives restarts, kill -9 and power cuts: the state
//! directory, and the run directory for what a reboot ends anyway.
//!
//! ```text
//! STATE/state.json                     network-wide facts (saved::Header)
//! STATE/reservations/NET.jsonl         one network's reservations (a journal)
//! STATE/forwards/PROTO-PORT-HASH.json  one run-time forward
//! RUN/guests/PID.json                  one followed guest
//! ```
//!
//! Each change writes only its own record, so its cost does not grow with
//! how many there are: a guest, a forward or `state.json` is a small file
//! written atomically (`fsutil::write_all_atomic`), and a reservation is a
//! line appended to its network's journal (`super::journal`; see
//! `reservations` for why). Each is durable before a save returns, bar
//! the guests' records (see [`Store::save_guests`]). [`Store`] remembers
//! what the files hold (as domain values, compared without serialising)
//! and a save writes only what differs, looking only at the records the
//! state noted as changed (`super::tracked`).
//!
//! What the daemon promised (reservations, forwards, its networks) is
//! made durable into the state directory (`/var/lib/qnet`, on disk). A guest's
//! record names a QEMU process, which means nothing once the machine
//! reboots (its PID is somebody else's then): it lives in the run
//! directory (`/run/qnet`, tmpfs), as libvirt keeps a running domain's
//! status in `/run/libvirt/qemu/`, and is not fsynced. Records an older
//! daemon left in `STATE/guests/` are moved there at open
//! (`store_guests.rs`).
//!
//! Loading never refuses to start over one bad file: a file that does not
//! parse is renamed to `*.bad` and reported, and the daemon runs without
//! it (a journal's good lines are kept). Temp files of writes a crash
//! interrupted are removed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use qnet_api::{Mac, NetName};
use serde::Serialize;
use thiserror::Error;

use super::alloc::ReservationTable as _;
use super::saved::{self, Header, LegacyV1, SavedForward, SavedGuest, SavedNetwork};
use super::{Forward, Guest, Reservation, State};
use crate::config::NetworkConfig;
use crate::fsutil::{self, Durability};
use read::{json_files, read_if_exists, read_record, set_aside, subdirs};

#[path = "store_guests.rs"]
mod guests;
#[path = "store_read.rs"]
mod read;
#[path = "store_reservations.rs"]
mod reservations;

pub const STATE_FILE: &str = "state.json";
pub const RESERVATIONS_DIR: &str = "reservations";
pub const GUESTS_DIR: &str = crate::config::RUN_GUESTS_DIR;
pub const FORWARDS_DIR: &str = "forwards";
/// The store's files are readable by root only: they name users' guests
/// and addresses.
const FILE_MODE: u32 = 0o600;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StateError {
    /// The error of a path, as `fsutil`'s batch functions give it.
    fn at((path, source): (PathBuf, io::Error)) -> StateError {
        StateError::Io { path, source }
    }

    fn io(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The state and run directories and what their files hold.
#[derive(Debug)]
pub struct Store {
    files: Files,
    /// `RUN/guests`: the guests' records.
    guests_dir: PathBuf,
    header: Option<Vec<u8>>,
    /// `state.json` is of version 1 and still holds records: it is
    /// rewritten once every record has a file of its own.
    legacy: bool,
    reservations: BTreeMap<NetName, BTreeMap<Mac, Reservation>>,
    /// Each network's journal as this daemon last wrote it.
    journals: BTreeMap<NetName, reservations::JournalFile>,
    guests: BTreeMap<u32, Guest>,
    /// Each forward with a file, and the file's name.
    forwards: HashMap<Forward, String>,
}

/// Writes and removes the store's files, as durably as each asks.
#[derive(Debug)]
struct Files {
    dir: PathBuf,
    /// Directories known to exist (created durably by us or found).
    dirs: HashSet<PathBuf>,
}

impl Store {
    /// Loads the state directory `dir` and the guests' records of the run
    /// directory `run_dir` (missing ones are an empty state). Files that
    /// do not parse are set aside, not fatal; only I/O errors on the
    /// directories themselves are.
    pub fn open(dir: &Path, run_dir: &Path) -> Result<(Store, State), StateError> {
        let mut store = Store {
            files: Files {
                dir: dir.to_path_buf(),
                dirs: HashSet::new(),
            },
            guests_dir: run_dir.join(GUESTS_DIR),
            header: None,
            legacy: false,
            reservations: BTreeMap::new(),
            journals: BTreeMap::new(),
            guests: BTreeMap::new(),
            forwards: HashMap::new(),
        };
        let mut state = State::default();
        sweep_temp_files(dir, run_dir)?;
        store.load_header(&mut state)?;
        store.load_reservations(&mut state)?;
        store.move_old_guests()?;
        store.load_guests(&mut state)?;
        store.load_forwards(&mut state)?;
        Ok((store, state))
    }

    /// Brings the files to `state`, writing only what changed: new and
    /// changed records first, then removals, then `state.json`. Each file
    /// is durable when this returns `Ok`; on an error the files written so
    /// far stay, and the caller decides (see the reconciler's rollback).
    pub fn save(&mut self, state: &mut State) -> Result<(), StateError> {
        self.save_promises(state)?;
        self.save_guests(state)
    }

    /// [`Self::save`] of everything but the guests' records: what the
    /// daemon promised (reservations, run-time forwards, networks taken
    /// down, attached sockets), which must be durable before dnsmasq or
    /// the firewall publish it. The guests' records only say whom the
    /// daemon follows; see [`Self::save_guests`].
    pub fn save_promises(&mut self, state: &mut State) -> Result<(), StateError> {
        self.save_reservations(state)?;
        self.save_forwards(state)?;
        let header = serde_json::to_vec_pretty(&header_of(state)).expect("headers serialise");
        if self.legacy || self.header.as_ref() != Some(&header) {
            let path = self.files.dir.join(STATE_FILE);
            self.files
                .write_all(vec![(path, header.clone())], Durability::PowerCut)?;
            self.header = Some(header);
            self.legacy = false;
        }
        Ok(())
    }

    fn load_header(&mut self, state: &mut State) -> Result<(), StateError> {
        let path = self.files.dir.join(STATE_FILE);
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(());
        };
        let version = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
        let header = match version {
            Some(1) => match serde_json::from_slice::<LegacyV1>(&bytes) {
                Ok(v1) => {
                    self.legacy = true;
                    absorb_legacy(state, v1.reservations, v1.guests, v1.forwards);
                    v1.header
                }
                Err(e) => return set_aside(&path, &e.to_string()),
            },
            // Version 2 differs only in where reservations are (files
            // of their own, see `reservations`), not in this file.
            Some(2) | Some(3) => match serde_json::from_slice::<Header>(&bytes) {
                Ok(header) => header,
                Err(e) => return set_aside(&path, &e.to_string()),
            },
            Some(v) => return set_aside(&path, &format!("version {v}, this daemon knows 1 to 3")),
            None => return set_aside(&path, "not a qnet state file"),
        };
        state.default_subnet = header.default_subnet;
        state.known_networks = known_networks(header.known_networks);
        state.networks_down = header.networks_down;
        state.attached = header.attached;
        state.libvirt_addresses = header
            .libvirt_addresses
            .into_iter()
            .map(|(mac, a)| (mac, a.into()))
            .collect();
        if !self.legacy {
            self.header = Some(bytes);
        }
        Ok(())
    }

    fn load_forwards(&mut self, state: &mut State) -> Result<(), StateError> {
        let mut files = json_files(&self.files.dir.join(FORWARDS_DIR))?;
        // In the order of their names: by protocol and first port.
        files.sort();
        for (path, name) in files {
            let Some(saved) = read_record::<SavedForward>(&path)? else {
                continue;
            };
            let forward = Forward::from(saved);
            if self.forwards.contains_key(&forward) {
                // The same forward twice (an older daemon's crash): keep one.
                fsutil::remove_durably(&path).map_err(StateError::io(&path))?;
                continue;
            }
            self.forwards.insert(forward.clone(), name);
            // A forward of a version-1 state.json that also has a file.
            if !state.forwards.contains(&forward) {
                state.forwards.push(forward);
            }
        }
        Ok(())
    }

    /// Brings the guests' records to `state` (see [`Self::save`]), those
    /// noted as changed only. They are saved after dnsmasq has its hosts:
    /// a crash in between forgets at most that a guest connected (and it
    /// is found again when it reconnects), never a promised address. They
    /// outlast the daemon's crash but not the machine's, as their QEMUs
    /// do ([`Durability::ProcessCrash`]).
    pub fn save_guests(&mut self, state: &mut State) -> Result<(), StateError> {
        let Store {
            files,
            guests: saved,
            guests_dir: dir,
            ..
        } = self;
        let (mut writes, mut written, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for pid in state.guests.store_changes() {
            let now = state.guests.get(pid);
            match now {
                _ if now == saved.get(pid) => {}
                Some(guest) => {
                    let path = dir.join(format!("{pid}.json"));
                    writes.push((path, record_bytes(&SavedGuest::from(guest))));
                    written.push(guest);
                }
                None => gone.push(*pid),
            }
        }
        // Records of QEMU processes, which a power cut ends too: no fsync
        // (see `Durability::ProcessCrash`), so the connect that follows
        // does not wait behind the disk.
        files.write_all(writes, Durability::ProcessCrash)?;
        for guest in written {
            saved.insert(guest.process.pid, guest.clone());
        }
        let paths = gone.iter().map(|pid| dir.join(format!("{pid}.json")));
        files.remove_all(paths.collect(), Durability::ProcessCrash)?;
        for pid in gone {
            saved.remove(&pid);
        }
        state.guests.clear_store_changes();
        debug_assert!(
            *saved == *state.guests,
            "a guest changed without being noted"
        );
        Ok(())
    }

    fn save_forwards(&mut self, state: &State) -> Result<(), StateError> {
        let Store {
            files,
            forwards: saved,
            ..
        } = self;
        for forward in &state.forwards {
            if !saved.contains_key(forward) {
                let record = SavedForward::from(forward);
                let name = forward_file_name(&record);
                let path = files.dir.join(FORWARDS_DIR).join(&name);
                files.write_all(vec![(path, record_bytes(&record))], Durability::PowerCut)?;
                saved.insert(forward.clone(), name);
            }
        }
        // Every current forward has a file now: any other file is gone
        // (forwards are never duplicated, so the counts tell).
        if saved.len() > state.forwards.len() {
            let current: HashSet<&Forward> = state.forwards.iter().collect();
            let dir = files.dir.join(FORWARDS_DIR);
            let gone = saved.iter().filter(|(f, _)| !current.contains(f));
            let gone = gone.map(|(_, name)| dir.join(name)).collect();
            files.remove_all(gone, Durability::PowerCut)?;
            saved.retain(|f, _| current.contains(f));
        }
        Ok(())
    }
}

impl Files {
    /// Writes `files` atomically, as durably as `durability` asks
    /// (`fsutil::write_all_atomic`), making their directories first.
    fn write_all(
        &mut self,
        files: Vec<(PathBuf, Vec<u8>)>,
        durability: Durability,
    ) -> Result<(), StateError> {
        if files.is_empty() {
            return Ok(());
        }
        let parents: BTreeSet<PathBuf> = files
            .iter()
            .map(|(path, _)| path.parent().unwrap_or(Path::new(".")).to_path_buf())
            .collect();
        for parent in &parents {
            self.ensure_dir(parent)?;
        }
        match fsutil::write_all_atomic(&files, FILE_MODE, durability) {
            // Somebody removed a directory since we made it.
            Err((_, e)) if e.kind() == io::ErrorKind::NotFound => {
                for parent in &parents {
                    self.dirs.remove(parent);
                    self.ensure_dir(parent)?;
                }
                fsutil::write_all_atomic(&files, FILE_MODE, durability).map_err(StateError::at)
            }
            result => result.map_err(StateError::at),
        }
    }

    /// Removes `paths`, as durably as `durability` asks, with at most one
    /// fsync per directory: a thousand guests exiting at once cost one,
    /// not a thousand.
    fn remove_all(
        &mut self,
        paths: Vec<PathBuf>,
        durability: Durability,
    ) -> Result<(), StateError> {
        fsutil::remove_all(&paths, durability).map_err(StateError::at)
    }
    /// Creates `dir` (and its parents) durably: a new directory entry is
    /// only durable once its parent is synced.
    fn ensure_dir(&mut self, dir: &Path) -> Result<(), StateError> {
        if self.dirs.contains(dir) {
            return Ok(());
        }
        if !dir.is_dir() {
            if let Some(parent) = dir.parent() {
                self.ensure_dir(parent)?;
            }
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(StateError::io(dir)(io::Error::from_raw_os_error(
                        libc::ENOTDIR,
                    )));
                }
                Err(e) => return Err(StateError::io(dir)(e)),
            }
            if let Some(parent) = dir.parent() {
                fsutil::sync_dir(parent).map_err(StateError::io(parent))?;
            }
        }
        self.dirs.insert(dir.to_path_buf());
        Ok(())
    }
}

fn record_bytes<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(record).expect("records serialise")
}

/// The known networks of a header; a record that is not one (see
/// [`SavedNetwork::into_config`]) is left out with a warning: at worst its
/// bridge stays after the network left the config.
fn known_networks(saved: BTreeMap<NetName, SavedNetwork>) -> BTreeMap<NetName, NetworkConfig> {
    let mut known = BTreeMap::new();
    for (name, record) in saved {
        match record.into_config() {
            Some(net) => {
                known.insert(name, net);
            }
            None => {
                tracing::warn!(network = %name, "state.json: its record has no `domain`: left out")
            }
        }
    }
    known
}

fn header_of(state: &State) -> Header {
    Header {
        version: saved::VERSION,
        default_subnet: state.default_subnet,
        known_networks: (state.known_networks.iter())
            .map(|(name, net)| (name.clone(), net.into()))
            .collect(),
        networks_down: state.networks_down.clone(),
        attached: state.attached.clone(),
        libvirt_addresses: state
            .libvirt_addresses
            .iter()
            .map(|(mac, a)| (*mac, a.into()))
            .collect(),
    }
}

fn absorb_legacy(
    state: &mut State,
    reservations: BTreeMap<NetName, BTreeMap<Mac, saved::LegacyReservation>>,
    guests: BTreeMap<u32, SavedGuest>,
    forwards: Vec<SavedForward>,
) {
    for (network, table) in reservations {
        let mut entry = state.reservations.table_mut(&network);
        for (mac, r) in table {
            entry.insert(mac, r.into());
        }
    }
    for (pid, guest) in guests {
        state.guests.insert(pid, guest.into());
    }
    state
        .forwards
        .extend(forwards.into_iter().map(Forward::from));
}

/// Removes the temp files of writes a crash interrupted from every
/// directory the store writes to (`reservations/NET/` included, and the
/// `STATE/guests/` of an older daemon).
fn sweep_temp_files(dir: &Path, run_dir: &Path) -> Result<(), StateError> {
    let mut dirs: Vec<PathBuf> = ["", RESERVATIONS_DIR, GUESTS_DIR, FORWARDS_DIR]
        .iter()
        .map(|sub| dir.join(sub))
        .collect();
    dirs.push(run_dir.join(GUESTS_DIR));
    dirs.extend(
        subdirs(&dir.join(RESERVATIONS_DIR))?
            .into_iter()
            .map(|(path, _)| path),
    );
    for dir in dirs {
        let removed = fsutil::remove_temp_files(&dir);
        if removed > 0 {
            tracing::info!(
                "{}: removed {removed} temp file(s) of interrupted writes",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The file of one run-time forward: readable, and unique for each
/// distinct forward (the hash is of its whole content, stable across
/// builds), as version 1 named them too.
pub(super) fn forward_file_name(forward: &SavedForward) -> String {
    let json = serde_json::to_vec(forward).expect("forwards always serialise");
    format!(
        "{}-{}-{:016x}.json",
        forward.spec.proto,
        forward.spec.ports.first(),
        fsutil::fnv1a(&json)
    )
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
