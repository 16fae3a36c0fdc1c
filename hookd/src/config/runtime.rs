//! Networks created at run time (`qnetctl network create`): one file per
//! network, `networks.d/NAME.toml` next to hookd.toml, holding the keys of
//! one `[[network]]` table at its top level. hookd.toml stays the admin's
//! file, never rewritten; these files are the daemon's, written
//! atomically and durably before a change is acknowledged. They are read
//! and validated together with hookd.toml, with the same keys and
//! messages, so a network means the same wherever it was written.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::ConfigError;
use crate::fsutil;

/// The directory of run-time networks, next to the config file.
pub const DIR_NAME: &str = "networks.d";
/// Most run-time network files read: each becomes a bridge, a dnsmasq and
/// rules, so a directory filled by mistake must not take the host down.
pub const MAX_FILES: usize = 1024;
/// Largest run-time network file read (one network is a few hundred bytes).
pub const MAX_FILE_BYTES: u64 = 64 * 1024;

const HEADER: &str =
    "# A qnet network created at run time: change it with `qnetctl network edit`\n\
# (or edit it here and run `qnetctl reload`). Keys as in hookd.toml's [[network]].\n";

/// One run-time network file as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeFile {
    pub path: PathBuf,
    pub text: String,
}

/// The run-time networks' directory for the config file `config`.
pub fn dir_for(config: &Path) -> PathBuf {
    config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(DIR_NAME)
}

/// The file of run-time network `name` in `dir`.
pub fn file_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.toml"))
}

/// The `*.toml` files of `dir`, by name; a missing directory holds none.
/// Hidden files (the atomic writer's temp files, editors' backups) are
/// not networks.
pub fn read_dir(dir: &Path) -> Result<Vec<RuntimeFile>, ConfigError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfigError::Read { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_error(dir)(e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(read_error(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        if paths.len() == MAX_FILES {
            return Err(ConfigError::Parse {
                path: dir.to_path_buf(),
                message: format!(
                    "more than {MAX_FILES} network files: remove the networks you no longer use"
                ),
            });
        }
        paths.push(path);
    }
    paths.sort();
    paths.into_iter().map(|path| read_file(&path)).collect()
}

fn read_file(path: &Path) -> Result<RuntimeFile, ConfigError> {
    let too_big = |size: u64| ConfigError::Parse {
        path: path.to_path_buf(),
        message: format!("{size} bytes is too large for one network (at most {MAX_FILE_BYTES})"),
    };
    let size = std::fs::metadata(path)
        .map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(too_big(size));
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(RuntimeFile {
        path: path.to_path_buf(),
        text,
    })
}

/// The text of a run-time network file holding `table`.
pub fn render(table: &toml::Table) -> String {
    format!("{HEADER}{table}")
}

/// Writes `file` durably (see [`fsutil::write_atomic`]), making the
/// directory if needed. World-readable like hookd.toml: it holds no secret.
pub fn write(file: &RuntimeFile) -> io::Result<()> {
    if let Some(dir) = file.path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            if let Some(parent) = dir.parent() {
                fsutil::sync_dir(parent)?;
            }
        }
    }
    fsutil::write_atomic(&file.path, file.text.as_bytes(), 0o644)
}

/// Removes the file at `path` durably.
pub fn remove(path: &Path) -> io::Result<()> {
    fsutil::remove_durably(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_next_to_the_config_file() {
        assert_eq!(
            dir_for(Path::new("/etc/qnet/hookd.toml")),
            Path::new("/etc/qnet/networks.d")
        );
        assert_eq!(dir_for(Path::new("hookd.toml")), Path::new("./networks.d"));
    }

    #[test]
    fn only_visible_toml_files_are_read_in_order_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.toml", "a.toml", ".a.toml.tmp.12", "notes.txt", "c.toml~"] {
            std::fs::write(dir.path().join(name), name).unwrap();
        }
        let files = read_dir(dir.path()).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.text.as_str()).collect();
        assert_eq!(names, ["a.toml", "b.toml"]);
        assert!(read_dir(&dir.path().join("missing")).unwrap().is_empty());
        std::fs::write(
            dir.path().join("big.toml"),
            vec![b'#'; MAX_FILE_BYTES as usize + 1],
        )
        .unwrap();
        let err = read_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn written_files_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = toml::Table::new();
        table.insert("name".into(), "lab".into());
        table.insert("subnet".into(), "10.9.0.0/24".into());
        let file = RuntimeFile {
            path: file_in(&dir.path().join(DIR_NAME), "lab"),
            text: render(&table),
        };
        write(&file).unwrap();
        assert_eq!(
            read_dir(&dir.path().join(DIR_NAME)).unwrap(),
            std::slice::from_ref(&file)
        );
        remove(&file.path).unwrap();
        assert!(read_dir(&dir.path().join(DIR_NAME)).unwrap().is_empty());
    }
}
