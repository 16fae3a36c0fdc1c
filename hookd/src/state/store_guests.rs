//! The guests' records, `RUN/guests/PID.json`, and the move of those an
//! older daemon kept in `STATE/guests/`.
//!
//! A record names a running QEMU process: it means nothing after a
//! reboot, so it lives in the run directory (tmpfs) and is not fsynced.
//! Daemons before this one kept them in the state directory; a restart
//! into this one (the guests still running) must find them, so each valid
//! one is written into the run directory first and removed from the state
//! directory only then: a crash in between leaves two copies, and the run
//! directory's wins at the next open, as it does whenever both exist.

use std::fs;
use std::path::Path;

use super::read::{json_files, read_record, set_aside};
use super::saved::SavedGuest;
use super::{record_bytes, StateError, Store, GUESTS_DIR};
use crate::fsutil::Durability;
use crate::state::{Guest, State};

impl Store {
    /// Moves the records of `STATE/guests/` into `RUN/guests/` (one of the
    /// same PID already there wins) and removes the emptied directory.
    /// Bad records are set aside where they are.
    pub(super) fn move_old_guests(&mut self) -> Result<(), StateError> {
        let old_dir = self.files.dir.join(GUESTS_DIR);
        if same_dir(&old_dir, &self.guests_dir) {
            // `--run-dir` and `--state-dir` are one directory: nothing to move.
            return Ok(());
        }
        let (mut writes, mut moved) = (Vec::new(), Vec::new());
        for (path, name) in json_files(&old_dir)? {
            let Some(saved) = read_guest(&path, &name)? else {
                continue;
            };
            let new = self.guests_dir.join(&name);
            if !new.exists() {
                writes.push((new, record_bytes(&saved)));
            }
            moved.push(path);
        }
        self.files.write_all(writes, Durability::ProcessCrash)?;
        self.files
            .remove_all(moved.clone(), Durability::ProcessCrash)?;
        if !moved.is_empty() {
            tracing::info!(
                "moved {} guest record(s) of an older daemon from {} to {}",
                moved.len(),
                old_dir.display(),
                self.guests_dir.display()
            );
        }
        // Only if empty: records set aside as `.bad` stay to be inspected.
        if fs::remove_dir(&old_dir).is_ok() {
            self.files.dirs.remove(&old_dir);
        }
        Ok(())
    }

    /// Loads `RUN/guests/`.
    pub(super) fn load_guests(&mut self, state: &mut State) -> Result<(), StateError> {
        for (path, name) in json_files(&self.guests_dir)? {
            let Some(saved) = read_guest(&path, &name)? else {
                continue;
            };
            let guest = Guest::from(saved);
            self.guests.insert(guest.process.pid, guest.clone());
            state.guests.insert(guest.process.pid, guest);
        }
        Ok(())
    }
}

/// Reads the guest's record `path` (named `name`); `None` if it is gone
/// or set aside. Guests' records are not fsynced (see
/// [`Store::save_guests`]): a power cut can leave one empty, and its QEMU
/// went with the machine, so an empty one is removed, not set aside.
fn read_guest(path: &Path, name: &str) -> Result<Option<SavedGuest>, StateError> {
    if fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        fs::remove_file(path).map_err(StateError::io(path))?;
        tracing::info!("{}: empty after a power cut: removed", path.display());
        return Ok(None);
    }
    let Some(saved) = read_record::<SavedGuest>(path)? else {
        return Ok(None);
    };
    if name != format!("{}.json", saved.pid) {
        set_aside(path, "the file name is not the guest's PID.json")?;
        return Ok(None);
    }
    Ok(Some(saved))
}

/// `a` and `b` are one directory (as paths, or once links are resolved).
fn same_dir(a: &Path, b: &Path) -> bool {
    let canonical = |p: &Path| fs::canonicalize(p).ok();
    a == b || canonical(a).is_some_and(|a| Some(a) == canonical(b))
}
