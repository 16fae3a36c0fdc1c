//! Acting as QEMU towards a network helper: make a socketpair, run the
//! helper with `--use-vnet --fd=N --br=BRIDGE` (N = the child's end, left
//! open across exec), receive one byte with one fd, wait for the exit.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use qnet_hostnet::fdpass;

/// What a helper run produced.
pub struct HelperOutcome {
    pub status: ExitStatus,
    pub stderr: String,
    /// The descriptor QEMU would have received, if any.
    pub fd: Option<OwnedFd>,
}

impl HelperOutcome {
    /// Panics with the helper's stderr unless it exited 0 and sent an fd.
    pub fn expect_fd(self) -> OwnedFd {
        assert!(
            self.status.success(),
            "helper failed ({}): {}",
            self.status,
            self.stderr
        );
        self.fd.expect("helper exited 0 but sent no fd")
    }

    /// Panics unless the helper exited 1 with no fd and one line on stderr;
    /// returns that line.
    pub fn expect_refusal(self) -> String {
        assert_eq!(
            self.status.code(),
            Some(1),
            "expected exit 1, got {} (stderr: {})",
            self.status,
            self.stderr
        );
        assert!(self.fd.is_none(), "a refused helper must not send an fd");
        let line = self.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "expected one line, got: {line:?}");
        line.to_string()
    }
}

/// Runs `cmd` (program and any extra leading args already set) with QEMU's
/// protocol arguments appended: `--use-vnet --fd=N` and `--br=BRIDGE`
/// unless `bridge` is None.
pub fn run_helper(mut cmd: Command, bridge: Option<&str>) -> HelperOutcome {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    let child_fd = theirs.as_raw_fd();
    cmd.arg("--use-vnet").arg(format!("--fd={child_fd}"));
    if let Some(bridge) = bridge {
        cmd.arg(format!("--br={bridge}"));
    }
    run_with_socket(cmd, ours, theirs)
}

/// Runs `cmd` as is (its args must already name `--fd=<theirs>`), like
/// QEMU's `/bin/sh -c` form where the fd number is part of a string.
pub fn run_with_socket(mut cmd: Command, ours: OwnedFd, theirs: OwnedFd) -> HelperOutcome {
    let child_fd = theirs.as_raw_fd();
    // SAFETY: fcntl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            fcntl(
                std::os::fd::BorrowedFd::borrow_raw(child_fd),
                FcntlArg::F_SETFD(FdFlag::empty()),
            )?;
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn helper");
    drop(theirs);

    // Read stderr on a thread so a chatty helper cannot block on a full pipe
    // while we wait for its fd.
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let fd = fdpass::recv_fd(std::os::fd::AsFd::as_fd(&ours)).ok();
    let status = child.wait().expect("wait helper");
    let stderr = stderr_reader.join().unwrap();
    HelperOutcome { status, stderr, fd }
}

/// A fresh socketpair for [`run_with_socket`]: (QEMU's end, helper's end).
pub fn helper_socketpair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}
