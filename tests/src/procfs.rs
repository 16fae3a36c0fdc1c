//! What `/proc/PID/status` says of a process (capabilities, memory,
//! threads) and `/proc/PID/stat` of its CPU time.

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

/// The CPU time `pid` has used (utime + stime, `/proc/PID/stat` fields 14
/// and 15), in clock ticks ([`clock_ticks_per_sec`]); 0 when it is gone.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the
    // first, utime and stime the 12th and 13th.
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0)
}

/// The kernel's clock ticks per second (`_SC_CLK_TCK`, usually 100).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(100)
}
