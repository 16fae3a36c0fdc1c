//! `qnet-fake-qemu`: a stand-in for QEMU towards a network helper, as a
//! process of its own, so a test can kill it (`kill -9`) and watch what
//! the helper left behind do its job.
//!
//! ```text
//! qnet-fake-qemu [--sh] [--persist] HELPER [ARGS...]
//! qnet-fake-qemu --attach TAPNAME
//! qnet-fake-qemu --listen PATH
//! ```
//!
//! Like QEMU it makes a socketpair and runs `HELPER ARGS --use-vnet --fd=N`
//! (with `--sh`: `/bin/sh -c "HELPER ARGS --use-vnet --fd=N"`, QEMU's form
//! for a helper string with spaces), receives one fd, waits for the
//! helper's exit, then prints one line on stdout:
//!
//! ```text
//! QNET-FAKE-QEMU pid=<own pid> status=<exit code|signal N> fd=<ifname|none> flags=<IFF_* hex>
//! ```
//!
//! If the helper succeeded and sent an fd, it then holds the fd until it is
//! killed (with `--persist`, after making the TAP persistent with
//! `TUNSETPERSIST`, as a hostile holder can); otherwise it exits 1.
//!
//! `--attach TAPNAME` instead tries to attach to an existing TAP through
//! `/dev/net/tun` (as any user may try) and prints `attach=ok` or
//! `attach=<errno>`. `--listen PATH` plays an unrelated daemon with a
//! world-connectable socket: it listens on PATH (mode 0777), prints
//! `listening` and accepts connections until killed. The helper inherits stderr (so a test can
//! see whether anything the helper left behind keeps it open).

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use qnet_hostnet::fdpass::recv_fd;
use qnet_hostnet::tap::tap_info;
use qnet_tests::fake_qemu::helper_socketpair;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--attach") {
        attach(&args[1]);
        return;
    }
    if args.first().is_some_and(|a| a == "--listen") {
        listen(&args[1]);
    }
    let sh = args.first().is_some_and(|a| a == "--sh");
    if sh {
        args.remove(0);
    }
    let persist = args.first().is_some_and(|a| a == "--persist");
    if persist {
        args.remove(0);
    }
    assert!(
        !args.is_empty(),
        "usage: qnet-fake-qemu [--sh] HELPER [ARGS...]"
    );

    let (ours, theirs) = helper_socketpair();
    let child_fd = theirs.as_raw_fd();
    args.push("--use-vnet".into());
    args.push(format!("--fd={child_fd}"));
    let mut cmd = if sh {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(args.join(" "));
        cmd
    } else {
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..]);
        cmd
    };
    // SAFETY: fcntl is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            fcntl(
                BorrowedFd::borrow_raw(child_fd),
                FcntlArg::F_SETFD(FdFlag::empty()),
            )?;
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let mut child = cmd.spawn().expect("spawn helper");
    drop(theirs);
    let fd = recv_fd(ours.as_fd()).ok();
    let status = child.wait().expect("wait helper");
    drop(ours);

    let status_text = match (status.code(), status.signal()) {
        (Some(code), _) => code.to_string(),
        (None, Some(signal)) => format!("signal-{signal}"),
        _ => "unknown".into(),
    };
    let (name, flags) = fd
        .as_ref()
        .and_then(|fd| tap_info(fd.as_fd()).ok())
        .unwrap_or_else(|| ("none".into(), 0));
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "QNET-FAKE-QEMU pid={} status={status_text} fd={name} flags={flags:#x}",
        std::process::id()
    )
    .unwrap();
    stdout.flush().unwrap();
    let Some(fd) = fd.filter(|_| status.success()) else {
        std::process::exit(1);
    };
    if persist {
        // SAFETY: TUNSETPERSIST takes an integer argument.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
        assert_eq!(rc, 0, "TUNSETPERSIST: {}", std::io::Error::last_os_error());
    }
    // Hold the fd like a running guest would, until killed.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// `--attach`: what anybody can try on a persistent TAP.
fn attach(name: &str) {
    let outcome = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .and_then(|file| {
            // SAFETY: ifreq is plain data; the name fits (IFNAMSIZ checked).
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(15)) {
                *dst = src as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF reads a struct ifreq.
            if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    match outcome {
        Ok(()) => println!("attach=ok"),
        Err(err) => println!("attach={}", err.raw_os_error().unwrap_or(0)),
    }
}

/// `--listen`: a daemon's socket that anybody may connect to.
fn listen(path: &str) -> ! {
    use std::os::unix::fs::PermissionsExt;
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    println!("listening");
    std::io::stdout().flush().unwrap();
    let mut held = Vec::new();
    for stream in listener.incoming() {
        held.extend(stream.ok());
    }
    std::process::exit(0)
}
