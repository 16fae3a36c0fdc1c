//! A network's reservations as an append-only journal,
//! `reservations/NET.jsonl`: a line per change (`saved::JournalEntry`),
//! the last line of each MAC saying what it holds.
//!
//! Why a journal and not a file per reservation: a new guest's reservation
//! must be durable before dnsmasq hears of it, and a new file costs a new
//! inode, an fsync of the file and one of its directory. Appending a line
//! to a file that exists costs one `fdatasync` and no new inode; on a disk
//! that is the larger part of a connect.
//!
//! Lines are only ever appended whole, each ending in `\n`, and a change
//! is acknowledged once the `fdatasync` returned. So a crash can only
//! leave a torn last line (no `\n`), which was never acknowledged and is
//! dropped at the next start. A complete line that does not parse is not
//! a crash's: the file is set aside and rewritten from what did parse.
//! The journal is rewritten whole, atomically (`fsutil`), when it holds
//! more than twice as many lines as reservations (plus [`SLACK`]), so a
//! network's journal stays within a few times its reservations and each
//! rewrite is paid for by as many appends.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;

use qnet_api::Mac;

use super::saved::{JournalEntry, SavedReservation};

/// The journals' extension: `reservations/NET.jsonl`.
pub const EXTENSION: &str = "jsonl";

/// Lines a journal may hold beyond twice its reservations before it is
/// rewritten: a small network is not rewritten at every change.
pub const SLACK: usize = 64;

/// What a journal's bytes say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// The reservations, as the last line of each MAC says.
    pub table: BTreeMap<Mac, SavedReservation>,
    /// Complete lines that parsed.
    pub lines: usize,
    /// The numbers (from 1) of complete lines that did not parse.
    pub bad: Vec<usize>,
    /// The bytes after the last `\n`: a line a crash cut short.
    pub torn: usize,
}

impl Replay {
    /// Whether the file holds exactly what a journal written by us holds:
    /// whole lines that parse, nothing after the last.
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty() && self.torn == 0
    }
}

/// Reads a journal's `bytes` into the reservations they say, on top of
/// `table` (what an older layout held, or nothing). Never fails: what
/// does not parse is counted, for the caller to set aside.
pub fn replay(bytes: &[u8], table: BTreeMap<Mac, SavedReservation>) -> Replay {
    let mut replay = Replay {
        table,
        ..Replay::default()
    };
    let mut rest = bytes;
    let mut number = 0;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        number += 1;
        let (line, after) = rest.split_at(end);
        rest = &after[1..];
        match serde_json::from_slice::<JournalEntry>(line) {
            Ok(entry) => {
                replay.lines += 1;
                apply(&mut replay.table, entry);
            }
            Err(_) if line.iter().all(u8::is_ascii_whitespace) => {}
            Err(_) => replay.bad.push(number),
        }
    }
    replay.torn = rest.len();
    replay
}

fn apply(table: &mut BTreeMap<Mac, SavedReservation>, entry: JournalEntry) {
    match entry {
        JournalEntry::Set { mac, reservation } => {
            table.insert(mac, reservation);
        }
        JournalEntry::Remove { mac } => {
            table.remove(&mac);
        }
    }
}

/// `entries` as journal lines.
pub fn encode<'a>(entries: impl IntoIterator<Item = &'a JournalEntry>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in entries {
        serde_json::to_writer(&mut bytes, entry).expect("journal entries serialise");
        bytes.push(b'\n');
    }
    bytes
}

/// A journal holding `table` and nothing else: a line per reservation,
/// in the order given (MAC order, from a map).
pub fn compacted(table: impl IntoIterator<Item = (Mac, SavedReservation)>) -> Vec<u8> {
    let entries: Vec<JournalEntry> = table
        .into_iter()
        .map(|(mac, reservation)| JournalEntry::Set { mac, reservation })
        .collect();
    encode(&entries)
}

/// Whether a journal of `lines` lines for `live` reservations is due to be
/// rewritten.
pub fn needs_compaction(lines: usize, live: usize) -> bool {
    lines > 2 * live + SLACK
}

/// Appends `bytes` to the journal at `path` and waits until they are on
/// disk (`fdatasync`). Returns the new length, or `None` without writing
/// anything when the file is not the one this daemon wrote: missing, or
/// of another length than `expected` (somebody removed or edited it).
/// The caller then rewrites it whole from what it knows.
pub fn append(path: &Path, expected: u64, bytes: &[u8]) -> io::Result<Option<u64>> {
    let mut file = match OpenOptions::new().append(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() != expected {
        return Ok(None);
    }
    if let Err(e) = file.write_all(bytes).and_then(|()| file.sync_data()) {
        // Leave no part of these lines behind: the change is refused, and
        // a torn line would only be dropped at the next start. If even
        // this fails, the next append sees another length and rewrites.
        let _ = file.set_len(expected);
        return Err(e);
    }
    Ok(Some(expected + bytes.len() as u64))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn mac(n: u8) -> Mac {
        Mac::from_octets([0x52, 0x54, 0, 0, 0, n])
    }

    fn reservation(last: u8) -> SavedReservation {
        SavedReservation {
            ip: Ipv4Addr::new(10, 0, 0, last),
            name: None,
            explicit: false,
            owner_uid: None,
            nic: None,
            last_seen: 1,
        }
    }

    fn set(n: u8, last: u8) -> JournalEntry {
        JournalEntry::Set {
            mac: mac(n),
            reservation: reservation(last),
        }
    }

    fn remove(n: u8) -> JournalEntry {
        JournalEntry::Remove { mac: mac(n) }
    }

    #[test]
    fn the_last_line_of_each_mac_wins() {
        let bytes = encode(&[set(1, 5), set(2, 6), set(1, 7), remove(2), set(3, 8)]);
        let replay = replay(&bytes, BTreeMap::new());
        let expected = BTreeMap::from([(mac(1), reservation(7)), (mac(3), reservation(8))]);
        assert_eq!(replay.table, expected);
        assert_eq!(replay.lines, 5);
        assert!(replay.is_clean());
    }

    #[test]
    fn lines_apply_on_top_of_an_older_layout() {
        let older = BTreeMap::from([(mac(1), reservation(5)), (mac(2), reservation(6))]);
        let replay = replay(&encode(&[remove(1), set(2, 9)]), older);
        assert_eq!(replay.table, BTreeMap::from([(mac(2), reservation(9))]));
    }

    #[test]
    fn what_does_not_parse_is_counted_and_the_rest_applies() {
        struct Case {
            bytes: Vec<u8>,
            table: Vec<Mac>,
            bad: Vec<usize>,
            torn: usize,
        }
        let good = encode(&[set(1, 5)]);
        let with = |tail: &[u8]| [good.as_slice(), tail].concat();
        let cases = [
            // A crash in the middle of an append: the tail has no `\n`.
            Case {
                bytes: with(br#"{"op":"set","mac":"52:54"#),
                table: vec![mac(1)],
                bad: vec![],
                torn: 24,
            },
            // A power cut can leave zeros where the data never got to.
            Case {
                bytes: with(&[0; 40]),
                table: vec![mac(1)],
                bad: vec![],
                torn: 40,
            },
            // A whole line that is not an entry: an edit, not a crash.
            Case {
                bytes: [with(b"{\"op\":\"grow\"}\n"), encode(&[set(2, 6)])].concat(),
                table: vec![mac(1), mac(2)],
                bad: vec![2],
                torn: 0,
            },
            // An unknown field is refused, as in every saved record.
            Case {
                bytes: with(b"{\"op\":\"remove\",\"mac\":\"52:54:00:00:00:01\",\"x\":1}\n"),
                table: vec![mac(1)],
                bad: vec![2],
                torn: 0,
            },
            // A bad MAC is refused by its type.
            Case {
                bytes: with(b"{\"op\":\"remove\",\"mac\":\"01:00:5e:00:00:01x\"}\n"),
                table: vec![mac(1)],
                bad: vec![2],
                torn: 0,
            },
            // Empty lines are nothing.
            Case {
                bytes: with(b"\n  \n"),
                table: vec![mac(1)],
                bad: vec![],
                torn: 0,
            },
        ];
        for (i, case) in cases.iter().enumerate() {
            let replay = replay(&case.bytes, BTreeMap::new());
            let macs: Vec<Mac> = replay.table.keys().copied().collect();
            assert_eq!(macs, case.table, "case {i}");
            assert_eq!(replay.bad, case.bad, "case {i}");
            assert_eq!(replay.torn, case.torn, "case {i}");
            assert_eq!(replay.is_clean(), case.bad.is_empty() && case.torn == 0);
        }
    }

    #[test]
    fn a_compacted_journal_replays_to_its_table() {
        let table = BTreeMap::from([(mac(2), reservation(6)), (mac(1), reservation(5))]);
        let bytes = compacted(table.clone());
        let replay = replay(&bytes, BTreeMap::new());
        assert_eq!(replay.table, table);
        assert_eq!(replay.lines, 2);
        assert!(!needs_compaction(2 * 2 + SLACK, 2));
        assert!(needs_compaction(2 * 2 + SLACK + 1, 2));
    }

    #[test]
    fn an_append_to_a_file_not_as_we_left_it_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.jsonl");
        let line = encode(&[set(1, 5)]);
        assert_eq!(append(&path, 0, &line).unwrap(), None, "missing");
        std::fs::write(&path, &line).unwrap();
        assert_eq!(append(&path, 0, &line).unwrap(), None, "another length");
        assert_eq!(std::fs::read(&path).unwrap(), line);
        let len = line.len() as u64;
        assert_eq!(append(&path, len, &line).unwrap(), Some(2 * len));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [&line[..], &line[..]].concat()
        );
    }
}
