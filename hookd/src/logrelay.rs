//! Relays the lines dnsmasq appends to its log file into the daemon's own
//! log (so, under systemd, into the journal next to the daemon's lines).
//!
//! dnsmasq writes a file, not a pipe to the daemon, because it outlives
//! the daemon (KillMode=process): a pipe would break at every daemon
//! restart. The relay follows the file from where it was when the relay
//! started (older lines were relayed by an earlier daemon), and from the
//! start again when the file was truncated (rotation).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// At most this much of the log is read per call: a dnsmasq that floods
/// its log cannot make the daemon hold more.
const MAX_READ: u64 = 64 * 1024;
/// A longer line is cut (dnsmasq's lines are far shorter).
const MAX_LINE: usize = 4096;

pub struct LogRelay {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl LogRelay {
    /// Follows `path` from its current end.
    pub fn new(path: &Path) -> LogRelay {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        LogRelay {
            path: path.to_path_buf(),
            offset,
            partial: Vec::new(),
        }
    }

    /// The complete lines appended since the last call.
    pub fn new_lines(&mut self) -> Vec<String> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated by rotation: start over.
            self.offset = 0;
            self.partial.clear();
        }
        let mut chunk = Vec::new();
        if file.seek(SeekFrom::Start(self.offset)).is_err()
            || file.take(MAX_READ).read_to_end(&mut chunk).is_err()
        {
            return Vec::new();
        }
        self.offset += chunk.len() as u64;
        self.partial.extend_from_slice(&chunk);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            let text = text.trim();
            if !text.is_empty() {
                lines.push(text.chars().take(MAX_LINE).collect());
            }
        }
        self.partial.truncate(MAX_LINE);
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn relays_new_complete_lines_once_and_restarts_after_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dnsmasq.log");
        std::fs::write(&path, "old line\n").unwrap();
        let mut relay = LogRelay::new(&path);
        assert!(relay.new_lines().is_empty(), "history is not relayed");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"DHCPACK(qnet0) 10.0.0.2\nhalf").unwrap();
        assert_eq!(relay.new_lines(), vec!["DHCPACK(qnet0) 10.0.0.2"]);
        f.write_all(b" a line\n").unwrap();
        assert_eq!(relay.new_lines(), vec!["half a line"]);
        assert!(relay.new_lines().is_empty());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        f.write_all(b"after rotation\n").unwrap();
        assert_eq!(relay.new_lines(), vec!["after rotation"]);
    }
}
