//! Whom a device is made for: the QEMU process behind the helper's
//! `--fd` socket, checked, and identified so that a recycled pid can
//! never come to mean another process.
//!
//! `SO_PEERCRED` names whoever created (or connected) the other end of the
//! socket. A caller can pass any socket, e.g. one connected to a
//! world-connectable socket of an unrelated root daemon: a device "owned"
//! by that daemon would outlive every check that asks whether its owner
//! still runs. So the peer must be an ancestor of the helper (QEMU forks
//! the helper, possibly through `/bin/sh -c`) and run as the caller or as
//! root (a root process that started the helper with its own socket chose
//! to). The owner is then recorded as uid, pid, start time and pid
//! namespace: pid and start time together name one process for ever, and
//! the namespace says whose pids they are.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use thiserror::Error;

use crate::{fdpass, reaper};

/// How many generations are walked up looking for the peer.
const MAX_ANCESTRY: usize = 4096;

/// A process, identified for ever, and the user a device was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The caller's uid (who ran the helper).
    pub uid: u32,
    /// QEMU's pid, in the pid namespace `pidns`.
    pub pid: u32,
    /// QEMU's start time, clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// Inode number of the pid namespace the pid belongs to.
    pub pidns: u64,
}

/// What a daemon can tell about an owner process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Running,
    /// Exited (or a zombie: its descriptors are closed already).
    Gone,
    /// Its pid belongs to another pid namespace than the observer's.
    Unknown,
}

impl Owner {
    /// Whether the owner process still runs, as seen from this process.
    pub fn liveness(&self) -> Liveness {
        if current_pidns() != Some(self.pidns) {
            return Liveness::Unknown;
        }
        match stat(self.pid) {
            Some(stat) if stat.start_time == self.start_time && !stat.zombie => Liveness::Running,
            _ => Liveness::Gone,
        }
    }

    /// Reads `key=value` words of a marker into an owner; `None` unless
    /// all four are present and valid.
    pub fn from_words<'a>(words: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Owner> {
        let (mut uid, mut pid, mut start_time, mut pidns) = (None, None, None, None);
        for (key, value) in words {
            match key {
                "uid" => uid = Some(value.parse().ok()?),
                "pid" => pid = Some(value.parse().ok()?),
                "start" => start_time = Some(value.parse().ok()?),
                "pidns" => pidns = Some(value.parse().ok()?),
                _ => {}
            }
        }
        Some(Owner {
            uid: uid?,
            pid: pid?,
            start_time: start_time?,
            pidns: pidns?,
        })
    }
}

/// `uid=1000 pid=4242 start=123456 pidns=4026531836`, as markers carry it.
impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uid={} pid={} start={} pidns={}",
            self.uid, self.pid, self.start_time, self.pidns
        )
    }
}

/// QEMU, checked: who it is and a pidfd that tells when it exits.
#[derive(Debug)]
pub struct Qemu {
    pub owner: Owner,
    pub pidfd: OwnedFd,
}

#[derive(Debug, Error)]
pub enum OwnerError {
    #[error("cannot read the peer credentials of --fd={fd}: {source}")]
    Credentials {
        fd: i32,
        source: fdpass::FdPassError,
    },
    #[error("the process at the other end of --fd={fd} is not visible in this pid namespace")]
    NotVisible { fd: i32 },
    #[error(
        "the other end of --fd={fd} belongs to uid {peer} (pid {pid}), not to you: pass the \
         socket QEMU made for this helper"
    )]
    OtherUser { fd: i32, peer: u32, pid: u32 },
    #[error(
        "the other end of --fd={fd} is held by pid {pid}, which did not start this helper: pass \
         the socket QEMU made for this helper (QEMU runs the helper itself)"
    )]
    NotAncestor { fd: i32, pid: u32 },
    #[error("QEMU (pid {pid}) exited before its NIC was ready")]
    Gone { pid: u32 },
    #[error("cannot watch QEMU (pid {pid}) with pidfd_open: {source} (needs Linux 5.3 or later)")]
    PidFd { pid: u32, source: std::io::Error },
}

/// Identifies QEMU from the helper's `--fd` socket `socket` (number `fd`,
/// for messages): see the module documentation.
pub fn identify_qemu(socket: BorrowedFd<'_>, fd: i32) -> Result<Qemu, OwnerError> {
    let creds = fdpass::peer_credentials(socket)
        .map_err(|source| OwnerError::Credentials { fd, source })?;
    let pid = u32::try_from(creds.pid())
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or(OwnerError::NotVisible { fd })?;
    let uid = nix::unistd::getuid().as_raw();
    if creds.uid() != uid && creds.uid() != 0 {
        return Err(OwnerError::OtherUser {
            fd,
            peer: creds.uid(),
            pid,
        });
    }
    // The pidfd first: once the ancestry check has passed and the pidfd
    // still shows the process running, the pid cannot have been recycled
    // in between.
    let pidfd = reaper::pidfd_open(pid).map_err(|source| match source.raw_os_error() {
        Some(libc::ESRCH) => OwnerError::Gone { pid },
        _ => OwnerError::PidFd { pid, source },
    })?;
    if !is_ancestor(pid) {
        return Err(OwnerError::NotAncestor { fd, pid });
    }
    let start_time = stat(pid).map(|s| s.start_time);
    let exited = reaper::has_exited(pidfd.as_fd()).unwrap_or(true);
    let (Some(start_time), false) = (start_time, exited) else {
        return Err(OwnerError::Gone { pid });
    };
    let pidns = current_pidns().ok_or(OwnerError::NotVisible { fd })?;
    Ok(Qemu {
        owner: Owner {
            uid,
            pid,
            start_time,
            pidns,
        },
        pidfd,
    })
}

/// Whether `pid` is this process' parent, grandparent, ...
fn is_ancestor(pid: u32) -> bool {
    let mut current = std::os::unix::process::parent_id();
    for _ in 0..MAX_ANCESTRY {
        if current == pid {
            return true;
        }
        match stat(current) {
            Some(stat) if current > 1 => current = stat.ppid,
            _ => return false,
        }
    }
    false
}

/// The inode of this process' pid namespace.
pub fn current_pidns() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Start time of process `pid` (clock ticks after boot); `None` if there
/// is no such process.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start_time)
}

struct Stat {
    zombie: bool,
    ppid: u32,
    start_time: u64,
}

/// The fields of `/proc/PID/stat` used here. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after the last
/// `)`.
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    // Field 22 is the 20th after the state (field 3).
    let start_time = fields.nth(17)?.parse().ok()?;
    Some(Stat {
        zombie: matches!(state, "Z" | "X"),
        ppid,
        start_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_is_read_after_the_last_parenthesis() {
        let text = "42 (a) b (c) R 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 123456 1 2 3\n";
        let stat = parse_stat(text).unwrap();
        assert_eq!(
            (stat.ppid, stat.start_time, stat.zombie),
            (7, 123456, false)
        );
        assert!(parse_stat("42 (x) Z 1 2").is_none());
        assert!(parse_stat("").is_none());
    }

    #[test]
    fn this_process_runs_and_its_parent_is_an_ancestor() {
        let me = Owner {
            uid: 0,
            pid: std::process::id(),
            start_time: start_time(std::process::id()).unwrap(),
            pidns: current_pidns().unwrap(),
        };
        assert_eq!(me.liveness(), Liveness::Running);
        let older = Owner {
            start_time: me.start_time.wrapping_sub(1),
            ..me
        };
        assert_eq!(older.liveness(), Liveness::Gone);
        let elsewhere = Owner {
            pidns: me.pidns.wrapping_add(1),
            ..me
        };
        assert_eq!(elsewhere.liveness(), Liveness::Unknown);
        assert!(is_ancestor(std::os::unix::process::parent_id()));
        assert!(!is_ancestor(std::process::id()));
    }

    #[test]
    fn owner_words_round_trip() {
        let owner = Owner {
            uid: 1000,
            pid: 4242,
            start_time: 99,
            pidns: 4026531836,
        };
        let text = owner.to_string();
        let words = text.split(' ').filter_map(|w| w.split_once('='));
        assert_eq!(Owner::from_words(words), Some(owner));
        assert_eq!(Owner::from_words([("uid", "1"), ("pid", "2")]), None);
        assert_eq!(
            Owner::from_words([("uid", "x"), ("pid", "2"), ("start", "3"), ("pidns", "4")]),
            None
        );
    }
}
