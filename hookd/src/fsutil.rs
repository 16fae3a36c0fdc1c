//! Files the daemon writes: one atomic writer for every file a reader
//! must see whole (state, forwards, dnsmasq's config and hosts files), in
//! three forms (durable, many files at once as durable as asked, and
//! atomic only for files rebuilt at every start), removals, the sweep of
//! temp files a crash left behind, and one stable hash for names derived
//! from content.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Temp files are `.NAME.tmp.PID` next to their target: hidden, and
/// recognisable by [`remove_temp_files`] after a crash.
const TEMP_MARK: &str = ".tmp.";

/// What a write or a removal must outlast once it returns. Either way,
/// readers see a file's old or new content, never a mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A power cut: fsync of each file, then of each directory. For what
    /// the daemon promises (reservations, forwards, its networks).
    PowerCut,
    /// The daemon's crash, not the machine's: no fsync (the page cache
    /// outlives the process). For records of what a power cut ends anyway:
    /// the guests the daemon follows are QEMU processes. A power cut may
    /// lose such a change or leave such a file empty.
    ProcessCrash,
}

/// Writes `contents` to `path` so that readers see the old or the new
/// content, never a mix, and the new content survives a power cut once
/// this returns: a temp file in the same directory (so the rename cannot
/// cross file systems), fsync, rename over `path`, fsync of the directory.
/// The temp file is removed on every error (a full disk must not fill up
/// further with our leftovers). `mode` is applied exactly, whatever the
/// umask.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_all_atomic(&[(path, contents)], mode, Durability::PowerCut).map_err(|(_, e)| e)
}

/// [`write_atomic`] without its two fsyncs: readers still see the old or
/// the new content, never a mix, but a power cut may lose the new content
/// or leave the file empty. Only for files rebuilt from the state at every
/// start (dnsmasq's config and hosts files): each fsync costs about a
/// millisecond of waiting for the disk, on the path of every connect.
pub fn write_atomic_unsynced(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    write_all_atomic(&[(path, contents)], mode, Durability::ProcessCrash).map_err(|(_, e)| e)
}

/// `.NAME.tmp.PID` next to `path` (see [`TEMP_MARK`]).
fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    dir.join(format!(".{file_name}{TEMP_MARK}{}", std::process::id()))
}

/// Writes `contents` to the new file `tmp` with exactly `mode`, fsynced
/// if `sync`.
fn write_temp(tmp: &Path, contents: &[u8], mode: u32, sync: bool) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)?;
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    if sync {
        file.sync_all()?;
    }
    Ok(())
}

/// Atomic writes of many files at once, as durable as `durability` asks,
/// in fewer waits for the disk: every file is written (and fsynced) under
/// its temp name first, then all are renamed, then each directory is
/// fsynced once (a thousand guests exiting at once rewrite a thousand
/// reservations under one directory fsync, not a thousand). On an error,
/// says which path failed and removes the temp files not yet renamed;
/// files renamed before it stay renamed (each whole, maybe not durable).
/// [`write_atomic`] and [`write_atomic_unsynced`] are this for one file.
pub fn write_all_atomic(
    files: &[(impl AsRef<Path>, impl AsRef<[u8]>)],
    mode: u32,
    durability: Durability,
) -> Result<(), (PathBuf, io::Error)> {
    let sync = durability == Durability::PowerCut;
    let mut temps: Vec<PathBuf> = Vec::with_capacity(files.len());
    let result = (|| {
        for (path, contents) in files {
            let path = path.as_ref();
            let tmp = temp_path(path);
            temps.push(tmp.clone());
            write_temp(&tmp, contents.as_ref(), mode, sync).map_err(|e| (path.to_path_buf(), e))?;
        }
        for (done, (path, _)) in files.iter().enumerate() {
            let path = path.as_ref();
            fs::rename(&temps[done], path).map_err(|e| (path.to_path_buf(), e))?;
            temps[done] = PathBuf::new();
        }
        match durability {
            Durability::PowerCut => sync_parents(files.iter().map(|(path, _)| path.as_ref())),
            Durability::ProcessCrash => Ok(()),
        }
    })();
    if result.is_err() {
        for tmp in temps.iter().filter(|t| !t.as_os_str().is_empty()) {
            let _ = fs::remove_file(tmp);
        }
    }
    result
}

/// Removes `path` and makes the removal durable (fsync of its directory).
/// A missing file is fine: the result is the same.
pub fn remove_durably(path: &Path) -> io::Result<()> {
    remove_all(&[path.to_path_buf()], Durability::PowerCut).map_err(|(_, e)| e)
}

/// Removes every file of `paths`, as durably as `durability` asks, with
/// one fsync per directory however many files went from it. Missing
/// files are fine. On an error, says which path failed; the files removed
/// before it stay removed (and may not be durable yet).
pub fn remove_all(paths: &[PathBuf], durability: Durability) -> Result<(), (PathBuf, io::Error)> {
    let mut removed = Vec::with_capacity(paths.len());
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => removed.push(path.as_path()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err((path.clone(), e)),
        }
    }
    match durability {
        Durability::PowerCut => sync_parents(removed),
        Durability::ProcessCrash => Ok(()),
    }
}

/// fsync of the directory of each of `paths`, once per directory.
fn sync_parents<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<(), (PathBuf, io::Error)> {
    let mut dirs: Vec<&Path> = Vec::new();
    for path in paths {
        let dir = path.parent().unwrap_or(Path::new("."));
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    for dir in dirs {
        sync_dir(dir).map_err(|e| (dir.to_path_buf(), e))?;
    }
    Ok(())
}

/// fsync of a directory: makes renames and unlinks in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes the temp files [`write_atomic`] leaves when the process is
/// killed between creating and renaming one (any pid: a daemon killed
/// with -9 never cleans up after itself). Returns how many went.
pub fn remove_temp_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_temp_name(&name) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether `name` is one of [`write_atomic`]'s temp files.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(TEMP_MARK)
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// 64-bit FNV-1a of `bytes`: tiny, and stable across builds and versions
/// (std's hashers are neither), for names derived from content.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `dir`, sorted.
    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn atomic_writes_leave_only_the_target_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomic(&path, b"one", 0o640).unwrap();
        write_atomic(&path, b"two", 0o640).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails after the temp
        // file was written.
        let target = dir.path().join("d");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"").unwrap();
        assert!(write_atomic(&target, b"data", 0o600).is_err());
        let names = names_in(dir.path());
        assert_eq!(names, ["d"]);
    }

    #[test]
    fn writing_many_leaves_each_whole_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let files = vec![
            (dir.path().join("a"), b"one".to_vec()),
            (sub.join("b"), b"two".to_vec()),
        ];
        write_all_atomic(&files, 0o600, Durability::PowerCut).unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"one");
        assert_eq!(fs::read(sub.join("b")).unwrap(), b"two");
        // The second target is a non-empty directory: the first file is
        // written, the error names the second, and no temp file is left.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        let files = vec![
            (dir.path().join("a"), b"three".to_vec()),
            (blocked.clone(), b"four".to_vec()),
        ];
        let (path, _) = write_all_atomic(&files, 0o600, Durability::ProcessCrash).unwrap_err();
        assert_eq!(path, blocked);
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"three");
        let names = names_in(dir.path());
        assert_eq!(names, ["a", "blocked", "sub"]);
    }

    #[test]
    fn removing_many_leaves_the_rest_and_takes_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c"] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        let gone = ["a", "c", "never"].map(|n| dir.path().join(n));
        remove_all(&gone, Durability::PowerCut).unwrap();
        let left = names_in(dir.path());
        assert_eq!(left, ["b"]);
        // A directory is not a file: the error names it.
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let (path, _) =
            remove_all(std::slice::from_ref(&sub), Durability::ProcessCrash).unwrap_err();
        assert_eq!(path, sub);
    }

    #[test]
    fn temp_files_of_any_pid_are_swept_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            ".state.json.tmp.123",
            ".a.tmp.9",
            "state.json",
            ".hidden",
            "x.tmp.1",
        ] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(remove_temp_files(dir.path()), 2);
        let left = names_in(dir.path());
        assert_eq!(left, [".hidden", "state.json", "x.tmp.1"]);
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        // Test vectors of the FNV specification.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
