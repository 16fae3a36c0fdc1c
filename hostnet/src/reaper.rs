//! A detached process that outlives a one-shot helper and acts when
//! another process (QEMU) exits: `pidfd_open`, a double fork, and a
//! two-message handshake with the helper.
//!
//! ```text
//! helper                                   reaper (grandchild, own session)
//! ------                                   -------------------------------
//! spawn_detached() ── fork ─ fork ───────▶ closes every fd but its own,
//!   waits for the middle child (exits at     stdin/out/err on /dev/null
//!   once) and for `ready`          ◀────── control.ready()
//! sends the fd to QEMU
//! detached.commit()                ──────▶ control.verdict() == Committed
//! exit 0                                   → waits for QEMU, cleans up
//!
//! (helper fails or dies before commit)  ─▶ verdict() == Abandoned
//!                                          → cleans up at once
//! ```
//!
//! The double fork makes the reaper a child of init (or of the nearest
//! subreaper), never of QEMU: QEMU's `waitpid` on the helper returns as
//! soon as the helper exits, and nothing the reaper does can delay QEMU.
//! The reaper holds no descriptor of its parent's (in particular not
//! stderr: a caller that reads the helper's stderr to end-of-file would
//! otherwise block until QEMU exits).
//!
//! Everything here assumes a single-threaded process, as the helpers are
//! (no async runtime, no threads): only then is it safe to allocate in the
//! child of a `fork`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, setsid, ForkResult};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReaperError {
    #[error("{what}: {errno}")]
    Sys { what: &'static str, errno: Errno },
    #[error("the reaper process did not start (its set-up failed)")]
    NotStarted,
    #[error("the reaper process is gone")]
    Gone,
}

fn sys(what: &'static str) -> impl FnOnce(Errno) -> ReaperError {
    move |errno| ReaperError::Sys { what, errno }
}

/// `pidfd_open(2)`: a descriptor that becomes readable when process `pid`
/// exits. Unlike a pid it can never come to mean another process.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor (close-on-exec).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Blocks until the process behind `pidfd` has exited.
pub fn wait_for_exit(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    poll_one(pidfd, libc::POLLIN, -1).map(drop)
}

/// Whether the process behind `pidfd` has exited, without blocking.
pub fn has_exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(poll_one(pidfd, libc::POLLIN, 0)? & libc::POLLIN != 0)
}

/// Whether the other end of the stream socket `socket` is closed (the
/// process that held it exited), without blocking.
pub fn peer_gone(socket: BorrowedFd<'_>) -> io::Result<bool> {
    let revents = poll_one(socket, libc::POLLRDHUP, 0)?;
    Ok(revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0)
}

fn poll_one(fd: BorrowedFd<'_>, events: libc::c_short, timeout_ms: i32) -> io::Result<i16> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, timeout_ms) } {
            n if n >= 0 => return Ok(pfd.revents),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

/// The helper's end of the handshake.
#[derive(Debug)]
pub struct Detached {
    control: OwnedFd,
}

impl Detached {
    /// Tells the reaper that QEMU has the descriptor: from now on the
    /// reaper owns the clean-up (it waits for QEMU first).
    pub fn commit(self) -> Result<(), ReaperError> {
        match nix::sys::socket::send(self.control.as_raw_fd(), &[1], MsgFlags::MSG_NOSIGNAL) {
            Ok(1) => Ok(()),
            Ok(_) | Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => Err(ReaperError::Gone),
            Err(errno) => Err(sys("telling the reaper to go on")(errno)),
        }
    }
}

impl Detached {
    /// Reads one report line the reaper sent with [`Control::report`].
    pub fn wait_report(&self) -> Result<String, ReaperError> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.len() < MAX_REPORT {
            match nix::unistd::read(self.control.as_fd(), &mut byte) {
                Ok(1) if byte[0] == b'\n' => {
                    return Ok(String::from_utf8_lossy(&line).into_owned());
                }
                Ok(1) => line.push(byte[0]),
                Err(Errno::EINTR) => continue,
                _ => break,
            }
        }
        Err(ReaperError::Gone)
    }

    /// The helper gives up: the reaper cleans up at once, and this waits
    /// (at most 5 s) until it has, so that a refused request leaves nothing
    /// behind by the time the helper exits.
    pub fn abandon(self) {
        let _ =
            nix::sys::socket::shutdown(self.control.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut buf = [0u8; 64];
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            match poll_one(self.control.as_fd(), libc::POLLIN, ms) {
                Ok(revents) if revents != 0 => {}
                _ => return,
            }
            match nix::unistd::read(self.control.as_fd(), &mut buf) {
                Ok(0) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => return,
            }
        }
    }
}

/// Longest report line [`Detached::wait_report`] accepts.
const MAX_REPORT: usize = 4096;

/// What the helper decided, as the reaper sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The helper handed the descriptor over and exits successfully.
    Committed,
    /// The helper failed or died before committing.
    Abandoned,
}

/// The reaper's end of the handshake.
#[derive(Debug)]
pub struct Control {
    fd: OwnedFd,
}

impl Control {
    /// Tells the helper that the reaper is set up. Must be called once,
    /// before [`Control::verdict`]; the helper waits for it.
    pub fn ready(&self) -> bool {
        matches!(
            nix::sys::socket::send(self.fd.as_raw_fd(), &[1], MsgFlags::MSG_NOSIGNAL),
            Ok(1)
        )
    }

    /// Blocks until the helper commits or goes away.
    pub fn verdict(&self) -> Verdict {
        let mut byte = [0u8; 1];
        loop {
            match nix::unistd::read(self.fd.as_fd(), &mut byte) {
                Ok(1) => return Verdict::Committed,
                Err(Errno::EINTR) => continue,
                _ => return Verdict::Abandoned,
            }
        }
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends one line (no newline inside; cut to fit) to the helper, which
    /// reads it with [`Detached::wait_report`].
    pub fn report(&self, line: &str) -> bool {
        let mut bytes: Vec<u8> = line
            .bytes()
            .filter(|&b| b != b'\n')
            .take(MAX_REPORT - 1)
            .collect();
        bytes.push(b'\n');
        matches!(
            nix::sys::socket::send(self.fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL),
            Ok(n) if n == bytes.len()
        )
    }

    /// The rest of a reaper's life once its device exists: waits for the
    /// helper's verdict and, if it committed, for QEMU (`qemu`, a pidfd) to
    /// exit; then runs `cleanup` until it succeeds (5 tries, 200 ms apart).
    /// Dropping the control socket on return tells a helper waiting in
    /// [`Detached::abandon`] that the clean-up is done.
    pub fn guard(self, qemu: BorrowedFd<'_>, mut cleanup: impl FnMut() -> bool) {
        // Committed: the socket to the helper is closed at once, so the
        // reaper holds only what it needs while QEMU runs.
        let abandoned = match self.verdict() {
            Verdict::Committed => {
                drop(self);
                // An error here (there is none for a valid pidfd) must not
                // leave the device behind forever: fall through.
                let _ = wait_for_exit(qemu);
                None
            }
            Verdict::Abandoned => Some(self),
        };
        for _ in 0..5 {
            if cleanup() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        drop(abandoned);
    }
}

/// Starts `body` in a detached grandchild and returns once it has called
/// [`Control::ready`].
///
/// In the grandchild, before `body` runs: a session of its own (`setsid`,
/// in the middle child, so the grandchild can never acquire a controlling
/// terminal), working directory `/`, the signal mask cleared, stdin, stdout
/// and stderr on `/dev/null`, the process name `name`, and every other
/// descriptor closed except `keep` and the control socket. `body` must only
/// use what it captured and the descriptors in `keep`; when it returns
/// the process exits (destructors of the parent's objects never run
/// there). In the helper, `body` (and whatever it captured) is dropped.
///
/// # Safety of the fork
/// The calling process must be single-threaded.
pub fn spawn_detached<F>(name: &CStr, keep: &[RawFd], body: F) -> Result<Detached, ReaperError>
where
    F: FnOnce(Control),
{
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(sys("socketpair"))?;
    // SAFETY: the helpers are single-threaded (see the module docs), so the
    // child may do anything the parent could.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Parent { child } => {
            drop(theirs);
            drop(body);
            match waitpid(child, None) {
                // ECHILD: the caller ignores SIGCHLD (inherited across exec),
                // so the kernel reaped the middle child itself; the handshake
                // below still tells whether the reaper started.
                Ok(WaitStatus::Exited(_, 0)) | Err(Errno::ECHILD) => {}
                Ok(_) => return Err(ReaperError::NotStarted),
                Err(errno) => return Err(sys("waitpid")(errno)),
            }
            let mut byte = [0u8; 1];
            loop {
                match nix::unistd::read(ours.as_fd(), &mut byte) {
                    Ok(1) => return Ok(Detached { control: ours }),
                    Err(Errno::EINTR) => continue,
                    _ => return Err(ReaperError::NotStarted),
                }
            }
        }
        ForkResult::Child => {
            drop(ours);
            if setsid().is_err() {
                // SAFETY: _exit is always safe; no destructor may run here.
                unsafe { libc::_exit(1) };
            }
            // SAFETY: still single-threaded.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {}
                // SAFETY: as above.
                Ok(ForkResult::Parent { .. }) => unsafe { libc::_exit(0) },
                // SAFETY: as above.
                Err(_) => unsafe { libc::_exit(1) },
            }
            let mut kept: Vec<RawFd> = keep.to_vec();
            kept.push(theirs.as_raw_fd());
            if detach_from_parent(name, &kept).is_err() {
                // SAFETY: as above.
                unsafe { libc::_exit(1) };
            }
            let control = Control { fd: theirs };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(control)));
            // SAFETY: as above.
            unsafe { libc::_exit(if outcome.is_ok() { 0 } else { 1 }) };
        }
    }
}

/// The grandchild's set-up (see [`spawn_detached`]).
fn detach_from_parent(name: &CStr, keep: &[RawFd]) -> Result<(), Errno> {
    nix::unistd::chdir("/")?;
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    )?;
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors, which we own here.
        if unsafe { libc::dup2(null.as_raw_fd(), target) } < 0 {
            return Err(Errno::last());
        }
    }
    if null.as_raw_fd() <= 2 {
        // It is one of 0..=2 now; do not close it.
        std::mem::forget(null);
    } else {
        drop(null);
    }
    close_all_except(keep)?;
    // SAFETY: PR_SET_NAME copies at most 16 bytes from a NUL-terminated
    // string.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    Ok(())
}

/// Closes every descriptor from 3 up except those in `keep`.
fn close_all_except(keep: &[RawFd]) -> Result<(), Errno> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for fd in keep.into_iter().chain([u32::MAX]) {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd.saturating_add(1);
    }
    Ok(())
}

fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: close_range only closes descriptors; everything in the range
    // belongs to objects the grandchild never uses again.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if rc == 0 {
        return Ok(());
    }
    if Errno::last() != Errno::ENOSYS {
        return Err(Errno::last());
    }
    // Kernels before 5.9: close one by one up to the descriptor limit.
    let mut rlimit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: getrlimit fills one struct rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlimit) };
    let limit = rlimit.rlim_cur.min(u64::from(u32::MAX)) as u32;
    for fd in first..=last.min(limit) {
        // SAFETY: as above.
        unsafe { libc::close(fd as RawFd) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_of_a_child_becomes_readable_when_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let pidfd = pidfd_open(child.id()).unwrap();
        wait_for_exit(pidfd.as_fd()).unwrap();
        child.wait().unwrap();
        assert!(pidfd_open(0).is_err());
    }

    #[test]
    fn peer_gone_sees_a_closed_socket() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        assert!(!peer_gone(a.as_fd()).unwrap());
        drop(b);
        assert!(peer_gone(a.as_fd()).unwrap());
    }
}
