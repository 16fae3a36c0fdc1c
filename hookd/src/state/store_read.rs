//! Reading the state directory: a missing file or directory is empty,
//! and a record that does not parse is set aside as `NAME.bad` with one
//! line saying so, so that the daemon starts without it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::StateError;

pub(super) fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::io(path)(e)),
    }
}

/// Reads one record file; one that does not parse is set aside (`None`).
pub(super) fn read_record<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let Some(bytes) = read_if_exists(path)? else {
        return Ok(None);
    };
    match serde_json::from_slice(&bytes) {
        Ok(record) => Ok(Some(record)),
        Err(e) => set_aside(path, &e.to_string()).map(|()| None),
    }
}

/// Renames a file that does not parse to `NAME.bad`, so that the daemon
/// starts without it and nobody loses it, and says so.
pub(super) fn set_aside(path: &Path, why: &str) -> Result<(), StateError> {
    let mut bad = path.as_os_str().to_owned();
    bad.push(".bad");
    let bad = PathBuf::from(bad);
    fs::rename(path, &bad).map_err(StateError::io(path))?;
    tracing::error!(
        "{}: {why}: set aside as {}; the daemon runs without it (inspect it, then delete it)",
        path.display(),
        bad.display()
    );
    Ok(())
}

/// `(path, name)` of each `*.json` file in `dir` (none if it is missing).
pub(super) fn json_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, StateError> {
    files_ending(dir, ".json")
}

/// `(path, name)` of each regular file in `dir` whose name ends in
/// `suffix`, hidden ones (temp files) apart (none if `dir` is missing).
pub(super) fn files_ending(dir: &Path, suffix: &str) -> Result<Vec<(PathBuf, String)>, StateError> {
    Ok(entries(dir)?
        .into_iter()
        .filter(|(path, name)| name.ends_with(suffix) && !name.starts_with('.') && path.is_file())
        .collect())
}

pub(super) fn subdirs(dir: &Path) -> Result<Vec<(PathBuf, String)>, StateError> {
    Ok(entries(dir)?
        .into_iter()
        .filter(|(path, _)| path.is_dir())
        .collect())
}

fn entries(dir: &Path) -> Result<Vec<(PathBuf, String)>, StateError> {
    let read = match fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StateError::io(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(StateError::io(dir))?;
        if let Some(name) = entry.file_name().to_str() {
            out.push((entry.path(), name.to_owned()));
        }
    }
    Ok(out)
}
