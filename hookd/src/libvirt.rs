//! libvirt's own networks, as far as hookd needs them: the addresses
//! libvirt's dnsmasq leased to guests, read from the lease status file
//! libvirt keeps per bridge (`/var/lib/libvirt/dnsmasq/BRIDGE.status`,
//! written by `libvirt_leaseshelper` from dnsmasq's `--dhcp-script`).
//!
//! hookd never calls libvirt (libvirtd waits for its hooks, and a hook
//! waiting for hookd waiting for libvirtd would deadlock); reading
//! libvirt's files is all it does. The file is treated as hostile input:
//! bounded in size, and an entry that does not parse is skipped rather than
//! trusted.
//!
//! [`watch_leases`] follows the files of the bridges hookd cares about by
//! polling their metadata (a `stat` per bridge every [`POLL_INTERVAL`]) and
//! reading a file only when it changed. A poll rather than inotify: the
//! directory may not exist yet when hookd starts (libvirt creates it with
//! its first network), the helper replaces the file by rename, and a
//! `stat` of a few files twice a second costs nothing; it only runs while
//! some libvirt guest is registered.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;
use tokio::sync::watch;

use qnet_api::Mac;

/// Where libvirt keeps its networks' lease status files.
pub const LEASE_DIR: &str = "/var/lib/libvirt/dnsmasq";
/// Largest status file read (a lease is ~150 bytes: this is ~25,000 leases).
pub const MAX_STATUS_BYTES: u64 = 4 * 1024 * 1024;
/// How often the watched status files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseFileError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: larger than {max} bytes: not a libvirt lease status file", max = MAX_STATUS_BYTES)]
    TooLarge { path: String },
    #[error("{path}: not a libvirt lease status file ({message})")]
    Malformed { path: String, message: String },
    #[error("`{0}` is not a bridge name libvirt would use")]
    BadBridge(String),
}

/// One IPv4 lease of libvirt's dnsmasq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
    /// Seconds since the epoch; `None` for an infinite lease.
    pub expiry: Option<u64>,
}

/// The status file of `bridge` in `dir`. The bridge name comes from a
/// request (the libvirt hook, root only) but still goes into a path, so
/// it must be an interface name: no `/`, not `.` or `..`, 1–15 bytes.
pub fn status_path(dir: &Path, bridge: &str) -> Result<PathBuf, LeaseFileError> {
    let valid = !bridge.is_empty()
        && bridge.len() < 16
        && bridge != "."
        && bridge != ".."
        && bridge
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !valid {
        return Err(LeaseFileError::BadBridge(bridge.to_string()));
    }
    Ok(dir.join(format!("{bridge}.status")))
}

/// Parses a status file: a JSON array of objects with `ip-address`,
/// `mac-address`, `hostname`, `expiry-time` (and `client-id`, `iaid` for
/// IPv6, which we do not need). The document must be a JSON array; an
/// element that is not an IPv4 lease with a valid unicast MAC is skipped.
/// An empty file is no leases (libvirt writes one before the first lease).
pub fn parse_status(path: &str, bytes: &[u8]) -> Result<Vec<Lease>, LeaseFileError> {
    if bytes.len() as u64 > MAX_STATUS_BYTES {
        return Err(LeaseFileError::TooLarge { path: path.into() });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| LeaseFileError::Malformed {
        path: path.into(),
        message: format!("not UTF-8: {e}"),
    })?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    // serde_json limits nesting to 128 levels, so a deeply nested document
    // is an error, not a stack overflow.
    let value: Value = serde_json::from_str(text).map_err(|e| LeaseFileError::Malformed {
        path: path.into(),
        message: e.to_string(),
    })?;
    let Value::Array(entries) = value else {
        return Err(LeaseFileError::Malformed {
            path: path.into(),
            message: "the document is not a JSON array".into(),
        });
    };
    let leases = entries
        .iter()
        .filter_map(|entry| {
            let object = entry.as_object()?;
            let ip: Ipv4Addr = object.get("ip-address")?.as_str()?.trim().parse().ok()?;
            if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
                return None;
            }
            let mac: Mac = object.get("mac-address")?.as_str()?.parse().ok()?;
            let hostname = object
                .get("hostname")
                .and_then(Value::as_str)
                .filter(|h| !h.is_empty() && h.len() <= 255)
                .map(str::to_string);
            // dnsmasq writes 0 for an infinite lease; anything that is not a
            // non-negative integer is treated the same (it still names the
            // guest's address, which is all we use it for).
            let expiry = object
                .get("expiry-time")
                .and_then(Value::as_u64)
                .filter(|t| *t != 0);
            Some(Lease {
                mac,
                ip,
                hostname,
                expiry,
            })
        })
        .collect();
    Ok(leases)
}

/// The address leased to `mac`: of several leases (a client that changed
/// its client id), the one that runs longest.
pub fn address_of(leases: &[Lease], mac: Mac) -> Option<Ipv4Addr> {
    leases
        .iter()
        .filter(|l| l.mac == mac)
        .max_by_key(|l| l.expiry.unwrap_or(u64::MAX))
        .map(|l| l.ip)
}

/// Reads and parses a status file; a missing file is no leases (the
/// network has not leased anything yet, or is not running).
pub fn read_status(path: &Path) -> Result<Vec<Lease>, LeaseFileError> {
    let shown = path.display().to_string();
    let io = |e: std::io::Error| LeaseFileError::Io {
        path: shown.clone(),
        message: e.to_string(),
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    if !file.metadata().map_err(io)?.is_file() {
        return Err(LeaseFileError::Malformed {
            path: shown,
            message: "not a regular file".into(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_STATUS_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    parse_status(&shown, &bytes)
}

/// The leases of one bridge's status file, after it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseUpdate {
    pub bridge: String,
    pub leases: Vec<Lease>,
}

/// What identifies one version of a file without reading it (`None`:
/// no file).
type Stamp = Option<(u64, u64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// Follows the status files of the bridges in `bridges` (under `dir`)
/// and calls `send` with the leases of each file when it first is watched
/// and whenever it changes. Returns when `send` returns false (the daemon
/// is gone) or `bridges` is closed. Reads run on the blocking pool, so a
/// slow file system never stalls the caller's runtime threads.
pub async fn watch_leases(
    dir: PathBuf,
    mut bridges: watch::Receiver<BTreeSet<String>>,
    send: impl Fn(LeaseUpdate) -> bool + Send + 'static,
) {
    let mut seen: BTreeMap<String, Stamp> = BTreeMap::new();
    // The last error per bridge, so a broken file is logged once, not
    // twice a second.
    let mut failing: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let wanted = bridges.borrow_and_update().clone();
        if wanted.is_empty() {
            seen.clear();
            failing.clear();
            if bridges.changed().await.is_err() {
                return;
            }
            continue;
        }
        seen.retain(|b, _| wanted.contains(b));
        failing.retain(|b, _| wanted.contains(b));
        for bridge in &wanted {
            let path = match status_path(&dir, bridge) {
                Ok(path) => path,
                Err(e) => {
                    if failing.insert(bridge.clone(), e.to_string()).is_none() {
                        tracing::warn!("libvirt leases: {e}");
                    }
                    continue;
                }
            };
            let before = seen.get(bridge).copied();
            let checked = tokio::task::spawn_blocking(move || {
                let now = stamp(&path);
                // Read only a file that changed (or was never read).
                let result = (before != Some(now)).then(|| read_status_if(&path, now));
                (now, result)
            })
            .await;
            let Ok((now, Some(result))) = checked else {
                continue;
            };
            match result {
                Ok(leases) => {
                    failing.remove(bridge);
                    seen.insert(bridge.clone(), now);
                    if !send(LeaseUpdate {
                        bridge: bridge.clone(),
                        leases,
                    }) {
                        return;
                    }
                }
                Err(e) => {
                    // Not marked as seen: a file caught half-written is read
                    // again at the next poll.
                    let text = e.to_string();
                    if failing.get(bridge) != Some(&text) {
                        tracing::warn!("libvirt leases: {text}");
                        failing.insert(bridge.clone(), text);
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            changed = bridges.changed() => if changed.is_err() { return },
        }
    }
}

/// Reads the file only if it exists at all (a missing file is `Ok(empty)`
/// without touching the disk again).
fn read_status_if(path: &Path, stamp: Stamp) -> Result<Vec<Lease>, LeaseFileError> {
    if stamp.is_none() {
        return Ok(Vec::new());
    }
    read_status(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What libvirt 9.0's leases helper wrote on Debian 12 (one IPv4
    /// lease; the test suite's guest).
    const LIBVIRT_9: &str = r#"[
  {
    "ip-address": "10.79.0.57",
    "mac-address": "52:54:00:3b:aa:01",
    "hostname": "qnetguest",
    "client-id": "01:52:54:00:3b:aa:01",
    "expiry-time": 1767225600
  }
]
"#;

    fn parse(text: &str) -> Result<Vec<Lease>, LeaseFileError> {
        parse_status("t.status", text.as_bytes())
    }

    #[test]
    fn libvirt_status_files_parse() {
        let leases = parse(LIBVIRT_9).unwrap();
        assert_eq!(
            leases,
            [Lease {
                mac: "52:54:00:3b:aa:01".parse().unwrap(),
                ip: Ipv4Addr::new(10, 79, 0, 57),
                hostname: Some("qnetguest".into()),
                expiry: Some(1767225600),
            }]
        );
        assert_eq!(
            address_of(&leases, "52:54:00:3b:aa:01".parse().unwrap()),
            Some(Ipv4Addr::new(10, 79, 0, 57))
        );
        assert_eq!(
            address_of(&leases, "52:54:00:3b:aa:02".parse().unwrap()),
            None
        );
        // libvirt writes an empty array (or, before the first lease, an
        // empty file).
        assert_eq!(parse("[]").unwrap(), []);
        assert_eq!(parse("").unwrap(), []);
        assert_eq!(parse(" \n").unwrap(), []);
    }

    #[test]
    fn macs_are_normalised_and_the_longest_lease_wins() {
        let text = r#"[
          {"ip-address": "10.0.0.5", "mac-address": "52:54:00:AA:BB:CC", "expiry-time": 100},
          {"ip-address": "10.0.0.6", "mac-address": "52:54:00:aa:bb:cc", "expiry-time": 200},
          {"ip-address": "10.0.0.7", "mac-address": "52:54:00:aa:bb:dd", "expiry-time": 0},
          {"ip-address": "10.0.0.8", "mac-address": "52:54:00:aa:bb:dd", "expiry-time": 900}
        ]"#;
        let leases = parse(text).unwrap();
        assert_eq!(
            address_of(&leases, "52:54:00:aa:bb:cc".parse().unwrap()),
            Some(Ipv4Addr::new(10, 0, 0, 6))
        );
        // 0 is dnsmasq's infinite lease.
        assert_eq!(
            address_of(&leases, "52:54:00:aa:bb:dd".parse().unwrap()),
            Some(Ipv4Addr::new(10, 0, 0, 7))
        );
    }

    #[test]
    fn entries_that_are_not_ipv4_leases_are_skipped() {
        let text = r#"[
          {"ip-address": "fd00::5", "mac-address": "52:54:00:00:00:01", "iaid": "1", "expiry-time": 1},
          {"ip-address": "10.0.0.1"},
          {"mac-address": "52:54:00:00:00:02"},
          {"ip-address": "10.0.0.3", "mac-address": "01:00:5e:00:00:01"},
          {"ip-address": "10.0.0.4", "mac-address": "not a mac"},
          {"ip-address": "10.0.0.300", "mac-address": "52:54:00:00:00:04"},
          {"ip-address": "0.0.0.0", "mac-address": "52:54:00:00:00:05"},
          {"ip-address": "127.0.0.1", "mac-address": "52:54:00:00:00:06"},
          {"ip-address": "224.0.0.1", "mac-address": "52:54:00:00:00:07"},
          {"ip-address": 167772165, "mac-address": "52:54:00:00:00:08"},
          {"ip-address": ["10.0.0.9"], "mac-address": "52:54:00:00:00:09"},
          "10.0.0.10 52:54:00:00:00:0a",
          null, 7, [], {},
          {"ip-address": "10.0.0.11", "mac-address": "52:54:00:00:00:0b",
           "hostname": {"$": "x"}, "expiry-time": "soon", "extra": [1, 2, 3]}
        ]"#;
        let leases = parse(text).unwrap();
        assert_eq!(leases.len(), 1, "{leases:?}");
        assert_eq!(leases[0].ip, Ipv4Addr::new(10, 0, 0, 11));
        assert_eq!(leases[0].hostname, None);
        assert_eq!(leases[0].expiry, None);
    }

    #[test]
    fn hostile_documents_are_errors_not_panics() {
        for bad in [
            "{not json",
            "[",
            r#"{"ip-address": "10.0.0.1", "mac-address": "52:54:00:00:00:01"}"#,
            "\"a string\"",
            "42",
            "null",
            "[] []",
            "[1,]",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(
                matches!(err, LeaseFileError::Malformed { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("t.status"), "{err}");
        }
        // Nesting beyond serde_json's recursion limit.
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(matches!(
            parse(&deep),
            Err(LeaseFileError::Malformed { .. })
        ));
        // Not UTF-8.
        assert!(matches!(
            parse_status("t.status", b"[\xff\xfe]"),
            Err(LeaseFileError::Malformed { .. })
        ));
        // Too large.
        let huge = vec![b' '; MAX_STATUS_BYTES as usize + 1];
        assert!(matches!(
            parse_status("t.status", &huge),
            Err(LeaseFileError::TooLarge { .. })
        ));
        // A very long hostname is dropped, the lease kept.
        let long = format!(
            r#"[{{"ip-address": "10.0.0.1", "mac-address": "52:54:00:00:00:01", "hostname": "{}"}}]"#,
            "h".repeat(10_000)
        );
        let leases = parse(&long).unwrap();
        assert_eq!(leases[0].hostname, None);
    }

    #[test]
    fn bridge_names_cannot_leave_the_directory() {
        let dir = Path::new("/var/lib/libvirt/dnsmasq");
        assert_eq!(
            status_path(dir, "virbr0").unwrap(),
            Path::new("/var/lib/libvirt/dnsmasq/virbr0.status")
        );
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "virbr0 x",
            "0123456789abcdef",
            "br:1",
            "b\0r",
        ] {
            assert!(status_path(dir, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn files_are_read_bounded_and_a_missing_file_is_no_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("virbr9.status");
        assert_eq!(read_status(&path).unwrap(), []);
        std::fs::write(&path, LIBVIRT_9).unwrap();
        assert_eq!(read_status(&path).unwrap().len(), 1);
        std::fs::write(&path, vec![b' '; MAX_STATUS_BYTES as usize + 10]).unwrap();
        assert!(matches!(
            read_status(&path),
            Err(LeaseFileError::TooLarge { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(read_status(&path).is_err());
    }

    async fn next(updates: &mut tokio::sync::mpsc::UnboundedReceiver<LeaseUpdate>) -> LeaseUpdate {
        tokio::time::timeout(Duration::from_secs(5), updates.recv())
            .await
            .expect("an update")
            .expect("the watcher runs")
    }

    #[tokio::test]
    async fn the_watcher_reports_a_file_when_it_appears_and_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = watch::channel(BTreeSet::from(["virbr9".to_string()]));
        let (updates_tx, mut updates) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(watch_leases(dir.path().to_path_buf(), rx, move |u| {
            updates_tx.send(u).is_ok()
        }));
        // Not there yet: no leases.
        let first = next(&mut updates).await;
        assert_eq!(first.bridge, "virbr9");
        assert!(first.leases.is_empty());
        // The lease appears (libvirt's helper renames a new file in).
        let tmp = dir.path().join("virbr9.status.new");
        std::fs::write(&tmp, LIBVIRT_9).unwrap();
        std::fs::rename(&tmp, dir.path().join("virbr9.status")).unwrap();
        let second = next(&mut updates).await;
        assert_eq!(second.leases.len(), 1);
        // A malformed version is skipped (logged), the next good one seen.
        std::fs::write(dir.path().join("virbr9.status"), "[{").unwrap();
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert!(updates.try_recv().is_err(), "a broken file is no update");
        std::fs::write(dir.path().join("virbr9.status"), "[]").unwrap();
        assert!(next(&mut updates).await.leases.is_empty());
        // No bridges: the watcher idles; closing the channel ends it.
        tx.send(BTreeSet::new()).unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watcher ends with its channel")
            .unwrap();
    }
}
