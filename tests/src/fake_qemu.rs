//! Acting as QEMU towards a network helper: make a socketpair, run the
//! helper with `--use-vnet --fd=N --br=BRIDGE` (N = the child's end, left
//! open across exec), receive one byte with one fd, wait for the exit.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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
pub fn run_with_socket(cmd: Command, ours: OwnedFd, theirs: OwnedFd) -> HelperOutcome {
    run_with_stderr(cmd, ours, theirs, Stdio::piped())
}

/// Like [`run_helper`], with the helper's stderr on a pipe whose reading
/// end is already closed (writing to it fails with EPIPE); `stderr` of the
/// outcome is empty.
pub fn run_helper_with_closed_stderr(mut cmd: Command, bridge: &str) -> HelperOutcome {
    let (ours, theirs) = helper_socketpair();
    cmd.arg("--use-vnet")
        .arg(format!("--fd={}", theirs.as_raw_fd()))
        .arg(format!("--br={bridge}"));
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    drop(read_end);
    run_with_stderr(cmd, ours, theirs, Stdio::from(write_end))
}

fn run_with_stderr(
    mut cmd: Command,
    ours: OwnedFd,
    theirs: OwnedFd,
    stderr: Stdio,
) -> HelperOutcome {
    inherit_fd(&mut cmd, theirs.as_raw_fd());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut child = cmd.spawn().expect("spawn helper");
    drop(theirs);

    // Read stderr on a thread so a chatty helper cannot block on a full pipe
    // while we wait for its fd.
    let stderr_pipe = child.stderr.take();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = stderr_pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let fd = fdpass::recv_fd(std::os::fd::AsFd::as_fd(&ours)).ok();
    let status = child.wait().expect("wait helper");
    let stderr = stderr_reader.join().unwrap();
    HelperOutcome { status, stderr, fd }
}

/// Keeps `fd` (close-on-exec here) open in the program `cmd` runs, as
/// QEMU leaves a helper its `--fd`.
pub fn inherit_fd(cmd: &mut Command, fd: std::os::fd::RawFd) {
    // SAFETY: fcntl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            fcntl(
                std::os::fd::BorrowedFd::borrow_raw(fd),
                FcntlArg::F_SETFD(FdFlag::empty()),
            )?;
            Ok(())
        });
    }
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

/// A `qnet-fake-qemu` process (`tests/src/bin/fake_qemu.rs`) that ran a
/// helper and now holds the fd it received, like a running guest. It is
/// killed (SIGKILL) and reaped on drop.
pub struct HeldFd {
    child: std::process::Child,
    /// The fake QEMU's pid (what `SO_PEERCRED` tells the helper).
    pub pid: u32,
    /// Interface name of the fd (TUNGETIFF).
    pub ifname: String,
    /// `IFF_*` flags of the fd.
    pub flags: i32,
    stderr_log: tempfile::NamedTempFile,
}

impl HeldFd {
    /// Starts `cmd` (a command for `qnet-fake-qemu HELPER ARGS...`, e.g.
    /// from [`crate::sandbox::sandboxed`]) and waits for its report. Err
    /// holds the report and stderr if the helper failed or sent no fd.
    pub fn start(mut cmd: Command) -> Result<HeldFd, String> {
        use std::io::BufRead;
        let stderr_log = tempfile::NamedTempFile::new().expect("temp file");
        let stderr = stderr_log.reopen().expect("reopen temp file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn qnet-fake-qemu");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        let ok =
            field("status").as_deref() == Some("0") && field("fd").is_some_and(|fd| fd != "none");
        if !ok {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "fake QEMU: {:?}; stderr: {}",
                line.trim(),
                std::fs::read_to_string(stderr_log.path()).unwrap_or_default()
            ));
        }
        Ok(HeldFd {
            pid: child.id(),
            ifname: field("fd").unwrap(),
            flags: field("flags")
                .and_then(|f| i32::from_str_radix(f.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0),
            child,
            stderr_log,
        })
    }

    /// What the fake QEMU and the helper wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_log.path()).unwrap_or_default()
    }

    /// `kill -9` and reap: the guest "crashes".
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HeldFd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 20 ms until it returns true or `bound` has passed;
/// returns whether it became true. `bound` is a generous failure bound, not
/// an expectation.
pub fn wait_until(bound: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + bound;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Checks that `fd` is a TAP-style queue (a TAP's or a macvtap's) in
/// QEMU's form: IFF_TAP, IFF_NO_PI and IFF_VNET_HDR; returns the device's
/// name.
pub fn assert_vnet_hdr_tap(fd: &OwnedFd) -> String {
    let (name, flags) = qnet_hostnet::tap::tap_info(fd.as_fd()).expect("fd is a tun/tap queue");
    assert!(flags & libc::IFF_TAP != 0, "not a TAP: flags {flags:#x}");
    assert!(
        flags & libc::IFF_NO_PI != 0,
        "IFF_NO_PI missing: {flags:#x}"
    );
    assert!(
        flags & libc::IFF_VNET_HDR != 0,
        "vnet_hdr missing: {flags:#x}"
    );
    name
}
