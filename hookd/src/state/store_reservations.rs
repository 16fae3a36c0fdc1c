//! Reservations in the state directory: one journal per network
//! (`reservations/NET.jsonl`, see [`crate::state::journal`]), and the
//! upgrade from version 2's file per reservation
//! (`reservations/NET/MAC.json`), which still loads: its reservations are
//! written into the network's journal, and only then are its files
//! removed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use qnet_api::{Mac, NetName};

use super::read::{files_ending, json_files, read_if_exists, read_record, set_aside, subdirs};
use super::{StateError, Store, RESERVATIONS_DIR};
use crate::fsutil::{self, Durability};
use crate::state::alloc::ReservationTable as _;
use crate::state::journal::{self, Replay};
use crate::state::saved::{JournalEntry, SavedReservation};
use crate::state::{Reservation, State};

/// What the daemon wrote to a network's journal: an append is only made
/// to a file that is still exactly this.
#[derive(Debug, Clone, Copy)]
pub(super) struct JournalFile {
    len: u64,
    lines: usize,
}

/// Version 2's reservations of one network: what they hold, and their
/// files, removed once the journal holds them.
#[derive(Default)]
struct Older {
    table: BTreeMap<Mac, SavedReservation>,
    files: Vec<PathBuf>,
}

impl Store {
    pub(super) fn load_reservations(&mut self, state: &mut State) -> Result<(), StateError> {
        let root = self.files.dir.join(RESERVATIONS_DIR);
        let mut older = read_older(&root)?;
        let suffix = format!(".{}", journal::EXTENSION);
        for (path, name) in files_ending(&root, &suffix)? {
            let Some(network) = network_of(&path, &name, &suffix) else {
                continue;
            };
            let bytes = read_if_exists(&path)?.unwrap_or_default();
            let before = older.remove(&network).unwrap_or_default();
            let replay = journal::replay(&bytes, before.table);
            // With older files to fold in, the journal is rewritten.
            let file = before.files.is_empty().then_some(JournalFile {
                len: bytes.len() as u64,
                lines: replay.lines,
            });
            self.adopt(state, &network, replay, file, &path)?;
            self.finish_upgrade(&network, &before.files)?;
        }
        for (network, before) in older {
            let replay = Replay {
                table: before.table,
                ..Replay::default()
            };
            let path = journal_path(&self.files.dir, &network);
            self.adopt(state, &network, replay, None, &path)?;
            self.finish_upgrade(&network, &before.files)?;
        }
        Ok(())
    }

    /// Takes a network's reservations as `replay` says into the state and
    /// the store, and rewrites its journal unless `file` is one this
    /// daemon would have written and need not compact yet.
    fn adopt(
        &mut self,
        state: &mut State,
        network: &NetName,
        replay: Replay,
        file: Option<JournalFile>,
        path: &Path,
    ) -> Result<(), StateError> {
        if !replay.bad.is_empty() {
            let lines: Vec<String> = replay.bad.iter().map(usize::to_string).collect();
            let why = format!("line(s) {} are not reservations", lines.join(", "));
            set_aside(path, &why)?;
        }
        if replay.torn > 0 {
            tracing::info!(
                "{}: dropped the last {} byte(s), a line a crash cut short before it was acknowledged",
                path.display(),
                replay.torn
            );
        }
        let clean = replay.is_clean();
        let table: BTreeMap<Mac, Reservation> = replay
            .table
            .into_iter()
            .map(|(mac, saved)| (mac, Reservation::from(saved)))
            .collect();
        for (mac, reservation) in &table {
            let mut entry = state.reservations.table_mut(network);
            entry.insert(*mac, reservation.clone());
        }
        let due = |f: &JournalFile| journal::needs_compaction(f.lines, table.len());
        match file {
            Some(file) if clean && !due(&file) => {
                self.journals.insert(network.clone(), file);
            }
            _ => self.rewrite_journal(network, &table)?,
        }
        if !table.is_empty() {
            self.reservations.insert(network.clone(), table);
        }
        Ok(())
    }

    /// Removes version 2's files of a network whose journal now holds
    /// them, and their directory if nothing else is left in it (a file set
    /// aside as `.bad` stays for the admin).
    fn finish_upgrade(&mut self, network: &NetName, files: &[PathBuf]) -> Result<(), StateError> {
        if files.is_empty() {
            return Ok(());
        }
        fsutil::remove_all(files, Durability::PowerCut).map_err(StateError::at)?;
        let dir = self.files.dir.join(RESERVATIONS_DIR).join(network.as_str());
        if fs::remove_dir(&dir).is_ok() {
            let _ = fsutil::sync_dir(&self.files.dir.join(RESERVATIONS_DIR));
        }
        tracing::info!(
            "{network}: {} reservation file(s) of an older version moved into {}",
            files.len(),
            journal_path(&self.files.dir, network).display()
        );
        Ok(())
    }

    /// Only the reservations noted as changed since the last save are
    /// compared and written ([`crate::state::tracked`]): a connect among a
    /// thousand guests appends one line to one journal.
    pub(super) fn save_reservations(&mut self, state: &mut State) -> Result<(), StateError> {
        let mut changes: BTreeMap<NetName, Vec<JournalEntry>> = BTreeMap::new();
        for (network, mac) in state.reservations.store_changes() {
            let now = state.reservations.get(network).and_then(|t| t.get(mac));
            let before = self.reservations.get(network).and_then(|t| t.get(mac));
            let entry = match now {
                _ if now == before => continue,
                Some(reservation) => JournalEntry::Set {
                    mac: *mac,
                    reservation: reservation.into(),
                },
                None => JournalEntry::Remove { mac: *mac },
            };
            changes.entry(network.clone()).or_default().push(entry);
        }
        let empty = BTreeMap::new();
        for (network, entries) in changes {
            let live = state.reservations.get(&network).unwrap_or(&empty);
            self.write_journal(&network, &entries, live)?;
            // What the journal now holds: the changed records only, not a
            // copy of the network's whole table for each connect.
            let saved = self.reservations.entry(network.clone()).or_default();
            for entry in &entries {
                match entry {
                    JournalEntry::Set { mac, .. } => saved.insert(*mac, live[mac].clone()),
                    JournalEntry::Remove { mac } => saved.remove(mac),
                };
            }
            if saved.is_empty() {
                self.reservations.remove(&network);
            }
        }
        state.reservations.clear_store_changes();
        debug_assert!(
            self.reservations
                .iter()
                .all(|(net, t)| state.reservations.get(net) == Some(t))
                && state
                    .reservations
                    .iter()
                    .all(|(net, t)| t.is_empty() || self.reservations.get(net) == Some(t)),
            "a reservation changed without being noted"
        );
        Ok(())
    }

    /// Makes `entries` durable in `network`'s journal, whose reservations
    /// are then `live`: an append, or a rewrite when the journal is due
    /// for one or is not as the daemon left it. A network without
    /// reservations has no journal ([`Self::rewrite_journal`] removes it).
    fn write_journal(
        &mut self,
        network: &NetName,
        entries: &[JournalEntry],
        live: &BTreeMap<Mac, Reservation>,
    ) -> Result<(), StateError> {
        let lines = |file: &JournalFile| file.lines + entries.len();
        let appendable =
            self.journals.get(network).copied().filter(|file| {
                !live.is_empty() && !journal::needs_compaction(lines(file), live.len())
            });
        if let Some(file) = appendable {
            let path = journal_path(&self.files.dir, network);
            match journal::append(&path, file.len, &journal::encode(entries)) {
                Ok(Some(len)) => {
                    let file = JournalFile {
                        len,
                        lines: lines(&file),
                    };
                    self.journals.insert(network.clone(), file);
                    return Ok(());
                }
                Ok(None) => tracing::warn!(
                    "{}: removed or changed by something else than this daemon; written again from its state",
                    path.display()
                ),
                Err(e) => return Err(StateError::io(&path)(e)),
            }
        }
        self.rewrite_journal(network, live)
    }

    /// Writes `network`'s journal whole, atomically and durably: a line per
    /// reservation of `table` (none: no journal).
    fn rewrite_journal(
        &mut self,
        network: &NetName,
        table: &BTreeMap<Mac, Reservation>,
    ) -> Result<(), StateError> {
        let path = journal_path(&self.files.dir, network);
        self.journals.remove(network);
        if table.is_empty() {
            return fsutil::remove_durably(&path).map_err(StateError::io(&path));
        }
        let bytes = journal::compacted(table.iter().map(|(mac, r)| (*mac, r.into())));
        let file = JournalFile {
            len: bytes.len() as u64,
            lines: table.len(),
        };
        self.files
            .write_all(vec![(path, bytes)], Durability::PowerCut)?;
        self.journals.insert(network.clone(), file);
        Ok(())
    }
}

/// `reservations/NET.jsonl`.
fn journal_path(dir: &Path, network: &NetName) -> PathBuf {
    dir.join(RESERVATIONS_DIR)
        .join(format!("{network}.{}", journal::EXTENSION))
}

/// The network a journal's file name names, or `None` (and a warning) for
/// a file that is not a network's journal.
fn network_of(path: &Path, name: &str, suffix: &str) -> Option<NetName> {
    let network = name.strip_suffix(suffix)?.parse::<NetName>().ok();
    if network.is_none() {
        tracing::warn!("{}: not a network's journal; ignored", path.display());
    }
    network
}

/// Version 2's `reservations/NET/MAC.json` files, by network. A file that
/// does not parse is set aside, as before.
fn read_older(root: &Path) -> Result<BTreeMap<NetName, Older>, StateError> {
    let mut older: BTreeMap<NetName, Older> = BTreeMap::new();
    for (net_dir, net_name) in subdirs(root)? {
        let Ok(network) = net_name.parse::<NetName>() else {
            tracing::warn!("{}: not a network's directory; ignored", net_dir.display());
            continue;
        };
        for (path, name) in json_files(&net_dir)? {
            let Some(mac) = mac_of_file(&name) else {
                set_aside(&path, "the file name is not MAC.json")?;
                continue;
            };
            let Some(saved) = read_record::<SavedReservation>(&path)? else {
                continue;
            };
            let entry = older.entry(network.clone()).or_default();
            entry.table.insert(mac, saved);
            entry.files.push(path);
        }
    }
    Ok(older)
}

fn mac_of_file(name: &str) -> Option<Mac> {
    name.strip_suffix(".json")?.parse().ok()
}
