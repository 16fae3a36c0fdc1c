//! What `/proc` says about a process: the daemon's only reader of
//! `/proc/PID/*`, so every probe agrees on what "alive" and "the same
//! process" mean.
//!
//! A pid alone names a process only until it exits: pids are recycled.
//! Whoever keeps a pid across time keeps a [`Process`]: the pid with its
//! start time ([`start_time`]), compared together ([`is_running`]).

use std::os::unix::fs::MetadataExt;

/// Start time of process `pid` in clock ticks since boot
/// (`/proc/PID/stat` field 22); `None` if there is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.nth(19)?.parse().ok()
}

/// A process, named so that it stays the same one: a recycled pid has
/// another start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Process {
    pub pid: u32,
    /// Clock ticks since boot (see [`start_time`]).
    pub start_time: u64,
}

impl Process {
    /// Process `pid` as it is now; `None` if there is no such process.
    pub fn of(pid: u32) -> Option<Process> {
        Some(Process {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// Whether this is still the running process (see [`is_running`]).
    pub fn is_running(self) -> bool {
        is_running(self.pid, self.start_time)
    }
}

/// Whether `pid` is still the process that started at `start_time`, and
/// has not exited. A zombie keeps its pid and start time until its parent
/// reaps it, but is gone for every purpose here: a guest that exited must
/// not stay listed because its parent has not waited for it yet.
pub fn is_running(pid: u32, start_time: u64) -> bool {
    let Some(mut fields) = stat_fields(pid) else {
        return false;
    };
    fields.next().is_some_and(|state| !has_exited(&state))
        && fields.nth(18).and_then(|t| t.parse().ok()) == Some(start_time)
}

/// Alive and not a zombie: a process that exited but was not reaped yet
/// holds its pid, but nothing else.
pub fn is_alive(pid: u32) -> bool {
    stat_fields(pid)
        .and_then(|mut fields| fields.next())
        .is_some_and(|state| !has_exited(&state))
}

/// Whether a `/proc/PID/stat` state (field 3) is that of a process that
/// exited: a zombie (`Z`) or one being reaped (`X`).
fn has_exited(state: &str) -> bool {
    matches!(state, "Z" | "X")
}

/// The uid owning process `pid` (its real uid, as `/proc/PID` shows it).
pub fn uid_of(pid: u32) -> Option<u32> {
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

/// The process' command line, one argument each; empty if it is gone.
pub fn cmdline(pid: u32) -> Vec<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| {
            bytes
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(<[u8]>::to_vec)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `arg` is one of the process' arguments.
pub fn has_arg(pid: u32, arg: &str) -> bool {
    cmdline(pid).iter().any(|a| a == arg.as_bytes())
}

/// The fields of `/proc/PID/stat` after the command name, starting with
/// the state (field 3). The command name (field 2) may hold spaces and
/// parentheses, so the fields are those after the *last* `)`.
fn stat_fields(pid: u32) -> Option<std::vec::IntoIter<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
    Some(fields.into_iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_known_and_a_missing_one_is_not() {
        let me = std::process::id();
        let started = start_time(me).expect("our own start time");
        assert!(is_running(me, started));
        assert!(!is_running(me, started + 1));
        assert!(is_alive(me));
        assert_eq!(uid_of(me), Some(nix::unistd::getuid().as_raw()));
        assert!(!cmdline(me).is_empty());
        assert!(start_time(u32::MAX).is_none());
        assert!(!is_alive(u32::MAX));
        assert!(cmdline(u32::MAX).is_empty());
    }
}
