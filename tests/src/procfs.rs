//! What `/proc/PID/status` says of a process (capabilities, memory,
//! threads), and `/proc/PID/stat` and `schedstat` of its CPU time.

use std::fmt;
use std::time::{Duration, Instant};

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

/// The CPU time `pid` has run, in nanoseconds (`/proc/PID/schedstat`'s
/// first field: the scheduler's own count, unlike [`cpu_ticks`] not
/// rounded to a tick); 0 when it is gone.
pub fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until `pid` has run past `since` nanoseconds of CPU (it took up
/// what it was given) and then ran no more for `quiet`; at most `limit`.
/// Returns its CPU time then. A bench that waits for this between steps
/// measures each step whole, and never a process that could not keep up.
pub fn wait_idle(pid: u32, since: u64, quiet: Duration, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut last = cpu_ns(pid);
    let mut still_since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
        let now = cpu_ns(pid);
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if now > since && still_since.elapsed() >= quiet {
            break;
        }
    }
    last
}
