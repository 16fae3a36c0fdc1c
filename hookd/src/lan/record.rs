//! `STATE/lan/NETWORK.json`: what a LAN network's uplink had before the
//! switch-over, written durably before anything is touched and removed
//! only once the uplink has it back. It is what makes a kill -9 in the
//! middle of the switch-over harmless: the next start (or `network down`,
//! or the network's removal from the config) restores from it.
//!
//! The file may have been tampered with, like any file of the state
//! directory: it is read bounded, and every value is checked before it is
//! used (names are typed, lists are bounded).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use qnet_api::NetName;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::plan::Snapshot;
use crate::fsutil;

/// The directory of the records, in the state directory.
pub const LAN_DIR: &str = "lan";
const VERSION: u32 = 1;
/// Largest record read: far more than the lists below can fill.
const MAX_BYTES: u64 = 1 << 20;
/// Most addresses and routes one uplink may have for us to take it over.
pub const MAX_ADDRESSES: usize = 256;
pub const MAX_ROUTES: usize = 1024;

/// How far the switch-over got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Started and not finished: whatever the system shows is half-done.
    Switching,
    /// Done: the bridge holds what the uplink had.
    Complete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub network: NetName,
    pub phase: Phase,
    /// `/proc/sys/kernel/random/boot_id` when it was written: after a
    /// reboot the kernel holds none of it, and the record means nothing.
    pub boot_id: String,
    pub snapshot: Snapshot,
}

impl Record {
    pub fn new(network: NetName, boot_id: String, snapshot: Snapshot) -> Record {
        Record {
            version: VERSION,
            network,
            phase: Phase::Switching,
            boot_id,
            snapshot,
        }
    }
}

/// Where the record of `network` lives.
pub fn path(state_dir: &Path, network: &str) -> PathBuf {
    state_dir.join(LAN_DIR).join(format!("{network}.json"))
}

/// Writes `record` durably (the directory too, created root-only).
pub fn save(state_dir: &Path, record: &Record) -> io::Result<()> {
    let dir = state_dir.join(LAN_DIR);
    if !dir.is_dir() {
        fs::create_dir_all(&dir)?;
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        fsutil::sync_dir(state_dir)?;
    }
    let text = serde_json::to_vec_pretty(record).expect("records serialise");
    fsutil::write_atomic(&path(state_dir, &record.network), &text, 0o600)
}

/// Removes the record of `network` durably (a missing one is fine).
pub fn remove(state_dir: &Path, network: &str) -> io::Result<()> {
    fsutil::remove_durably(&path(state_dir, network))
}

/// The record of `network`, if there is one; an error says what is wrong
/// with the file.
pub fn load(state_dir: &Path, network: &str) -> Result<Option<Record>, RecordError> {
    let path = path(state_dir, network);
    let read = |source| RecordError::Read {
        path: path.clone(),
        source,
    };
    let file = match fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    match parse(&bytes, network) {
        Ok(record) => Ok(Some(record)),
        Err(source) => Err(RecordError::Bad { path, source }),
    }
}

/// A record file that cannot be used.
#[derive(Debug, Error)]
pub enum RecordError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Bad { path: PathBuf, source: BadRecord },
}

/// What is wrong with a record's content.
#[derive(Debug, Error)]
pub enum BadRecord {
    #[error("larger than {MAX_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("version {0} (this daemon reads {VERSION})")]
    Version(u32),
    #[error("names network `{named}`, not `{network}`")]
    OtherNetwork { named: String, network: String },
    #[error("too many addresses or routes")]
    TooMany,
    #[error("a prefix length is out of range")]
    PrefixLength,
    #[error("an address label is not an interface label")]
    Label,
}

/// The networks with a record (by file name; `load` checks the content).
pub fn networks(state_dir: &Path) -> Vec<String> {
    let dir = state_dir.join(LAN_DIR);
    fsutil::remove_temp_files(&dir);
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| name.strip_suffix(".json").map(str::to_owned))
        .filter(|name| name.parse::<NetName>().is_ok())
        .collect();
    names.sort();
    names
}

/// A record's bytes, checked: the version, the network it names (that of
/// its file), the size of its lists, prefix lengths.
pub fn parse(bytes: &[u8], network: &str) -> Result<Record, BadRecord> {
    if bytes.len() as u64 > MAX_BYTES {
        return Err(BadRecord::TooLarge);
    }
    let record: Record = serde_json::from_slice(bytes)?;
    if record.version != VERSION {
        return Err(BadRecord::Version(record.version));
    }
    if record.network != network {
        return Err(BadRecord::OtherNetwork {
            named: record.network.to_string(),
            network: network.to_owned(),
        });
    }
    let snap = &record.snapshot;
    if snap.addresses.len() > MAX_ADDRESSES || snap.routes.len() > MAX_ROUTES {
        return Err(BadRecord::TooMany);
    }
    let max_len = |v6: bool| if v6 { 128 } else { 32 };
    if snap
        .addresses
        .iter()
        .any(|a| a.prefix_len > max_len(a.ip.is_ipv6()))
        || snap.routes.iter().any(|r| r.dst_len > max_len(r.v6))
    {
        return Err(BadRecord::PrefixLength);
    }
    let bad_label = |l: &String| l.len() > 15 || l.chars().any(|c| c.is_control());
    if snap
        .addresses
        .iter()
        .any(|a| a.label.as_ref().is_some_and(bad_label))
    {
        return Err(BadRecord::Label);
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let snapshot = super::super::plan::tests::snapshot();
        Record::new("lan".parse().unwrap(), "boot".into(), snapshot)
    }

    #[test]
    fn a_record_survives_a_round_trip_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = record();
        save(dir.path(), &rec).unwrap();
        assert_eq!(load(dir.path(), "lan").unwrap(), Some(rec.clone()));
        rec.phase = Phase::Complete;
        save(dir.path(), &rec).unwrap();
        assert_eq!(
            load(dir.path(), "lan").unwrap().unwrap().phase,
            Phase::Complete
        );
        assert_eq!(networks(dir.path()), ["lan"]);
        remove(dir.path(), "lan").unwrap();
        assert_eq!(load(dir.path(), "lan").unwrap(), None);
        assert!(networks(dir.path()).is_empty());
    }

    #[test]
    fn tampered_records_are_refused_with_the_reason() {
        let good = serde_json::to_vec(&record()).unwrap();
        assert!(parse(&good, "lan").is_ok());
        assert!(parse(&good, "other")
            .unwrap_err()
            .to_string()
            .contains("names network `lan`"));
        assert!(parse(b"{", "lan").is_err());
        // Why `parse` refuses the record tampered with by `tamper`.
        let refusal = |tamper: fn(&mut Record)| {
            let mut rec = record();
            tamper(&mut rec);
            let bytes = serde_json::to_vec(&rec).unwrap();
            parse(&bytes, "lan").unwrap_err().to_string()
        };
        assert!(refusal(|rec| rec.snapshot.addresses[0].prefix_len = 33).contains("prefix length"));
        assert!(
            refusal(|rec| rec.snapshot.addresses[0].label = Some("eth0\n:1".into()))
                .contains("label")
        );
        let too_many = |rec: &mut Record| {
            rec.snapshot.addresses = vec![rec.snapshot.addresses[0].clone(); MAX_ADDRESSES + 1];
        };
        assert!(refusal(too_many).contains("too many"));
        let mut json: serde_json::Value = serde_json::from_slice(&good).unwrap();
        json["snapshot"]["uplink"] = "not a/name".into();
        assert!(parse(&serde_json::to_vec(&json).unwrap(), "lan").is_err());
        assert!(parse(&vec![b' '; MAX_BYTES as usize + 1], "lan").is_err());
    }
}
