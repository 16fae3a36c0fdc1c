//! qnet-hookd under systemd's protocols, as qnet-hookd.service and
//! qnet-hookd.socket run it (systemd is not PID 1 here, so the test plays
//! the service manager): the two sockets are held by systemd's own
//! `systemd-socket-activate` and passed as LISTEN_FDS when the first
//! client connects, and NOTIFY_SOCKET is a datagram socket the test reads.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qnet_tests::hookd::{Hookd, Launch};
use qnet_tests::netns::NetNs;
use qnet_tests::{require_root, require_tool};

/// `systemd-socket-activate` holding the daemon's two sockets (names as in
/// qnet-hookd.socket) and launching the daemon, with NOTIFY_SOCKET set, at
/// the first connection. It execs the daemon, so the child is the daemon.
fn socket_activated(hookd: &Hookd, notify: &Path, listen: [&Path; 2], names: &str) -> Command {
    let activate = require_tool("systemd-socket-activate", "systemd");
    let daemon = hookd.command();
    let mut cmd = Command::new(activate);
    cmd.arg("--listen")
        .arg(listen[0])
        .arg("--listen")
        .arg(listen[1])
        .arg(format!("--fdname={names}"))
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.display()))
        .arg(format!(
            "--setenv=PATH={}",
            std::env::var("PATH").unwrap_or_default()
        ))
        .arg(daemon.get_program())
        .args(daemon.get_args())
        .stdin(Stdio::null())
        .stdout(hookd.log_file())
        .stderr(hookd.log_file());
    cmd
}

/// The next notification, or None after `timeout`.
fn next_notification(socket: &UnixDatagram, timeout: Duration) -> Option<String> {
    socket.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn socket_activation_serves_the_first_client_and_notifies_ready_then_stopping() {
    require_root();
    let ns = NetNs::new("hksd");
    let mut hookd = Hookd::prepare(&ns, None, Launch::default());
    let notify_path = hookd.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let listen = [hookd.ctl_socket(), hookd.qmp_socket()];
    let child = socket_activated(&hookd, &notify_path, [&listen[0], &listen[1]], "ctl:qmp")
        .spawn()
        .expect("start systemd-socket-activate");
    // The sockets exist before the daemon runs (as after `dpkg -i`, with
    // only qnet-hookd.socket started).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hookd.qmp_socket().exists() || !hookd.ctl_socket().exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate made no sockets"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let inode = |p: std::path::PathBuf| std::fs::metadata(p).unwrap().ino();
    let (ctl_ino, qmp_ino) = (inode(hookd.ctl_socket()), inode(hookd.qmp_socket()));
    let pid = child.id();
    hookd.adopt(child);

    // The first client starts the daemon and is answered by it: qnetctl's
    // connection waits in the passed socket's backlog meanwhile.
    let status = hookd
        .qnetctl(&["status"])
        .expect("qnetctl status through the passed socket");
    assert_eq!(status["networks"][0]["name"], "qnet0", "{status}");
    assert_eq!(status["networks"][0]["up"], true, "{status}");

    let ready = next_notification(&notify, Duration::from_secs(20)).expect("READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // READY comes only once every network is up.
    assert!(
        ns.ip(&["link", "show", "qnet0"]).contains("UP"),
        "qnet0 not up at READY"
    );
    let log = hookd.log();
    assert!(log.contains("socket_activated=true"), "{log}");
    // The daemon serves systemd's sockets and bound none of its own.
    assert_eq!(inode(hookd.ctl_socket()), ctl_ino);
    assert_eq!(inode(hookd.qmp_socket()), qmp_ino);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopping = next_notification(&notify, Duration::from_secs(20)).expect("STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    hookd.terminate();
    // systemd's sockets stay for the next start.
    assert!(hookd.ctl_socket().exists() && hookd.qmp_socket().exists());
}

#[test]
fn a_passed_socket_that_is_neither_ctl_nor_qmp_is_refused() {
    require_root();
    let ns = NetNs::new("hksdbad");
    let mut hookd = Hookd::prepare(&ns, None, Launch::default());
    let notify_path = hookd.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // The first socket is the control socket by name; the second is
    // neither by name nor by path.
    let other = hookd.dir().join("other.sock");
    let ctl = hookd.ctl_socket();
    let child = socket_activated(&hookd, &notify_path, [&ctl, &other], "ctl:bogus")
        .spawn()
        .unwrap();
    hookd.adopt(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !other.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate made no sockets"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Wake it.
    let _ = std::os::unix::net::UnixStream::connect(hookd.ctl_socket());
    let status = hookd
        .wait_exit(Duration::from_secs(20))
        .expect("the daemon exits");
    assert!(!status.success());
    let log = hookd.log();
    assert!(
        log.contains("socket activation: socket `bogus`") && log.contains("qnet-hookd.socket"),
        "{log}"
    );
    assert!(
        next_notification(&notify, Duration::from_millis(200)).is_none(),
        "no READY"
    );
    assert!(
        ns.try_ip(&["link", "show", "qnet0"]).is_err(),
        "nothing brought up"
    );
}
