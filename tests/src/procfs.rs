//! What `/proc/PID/status` says of a process: capabilities, memory,
//! threads.

use std::fmt;

/// `/proc/PID/status`, read once; empty when the process is gone.
pub struct ProcStatus(String);

impl ProcStatus {
    pub fn of(pid: u32) -> ProcStatus {
        ProcStatus(std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default())
    }

    /// The value of `key` (with its colon, e.g. `"CapEff:"`), trimmed.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    }

    /// The number `key` starts with (`VmRSS:` in KiB, `Threads:`); 0
    /// when there is none.
    pub fn number(&self, key: &str) -> u64 {
        self.field(key)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl fmt::Display for ProcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
