//! qnet-hookd under systemd's protocols, as qnet-hookd.service and
//! qnet-hookd.socket run it (systemd is not PID 1 here, so the test plays
//! the service manager): the two sockets are held by systemd's own
//! `systemd-socket-activate` and passed as LISTEN_FDS when the first
//! client connects, NOTIFY_SOCKET is a datagram socket the test reads,
//! and the daemon has only the unit's CapabilityBoundingSet and
//! no_new_privs, so the test also shows the unit's hardening lets it work
//! (its network and dnsmasq come up and answer).

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qnet_tests::hookd::{Hookd, Launch};
use qnet_tests::netns::NetNs;
use qnet_tests::procfs::ProcStatus;
use qnet_tests::{require_root, require_tool};

/// The capabilities qnet-hookd.service leaves the daemon
/// (`CapabilityBoundingSet=`), as setpriv names them: `net_admin,...`.
fn unit_capabilities() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/qnet-hookd.service");
    let text = std::fs::read_to_string(unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit limits the bounding set");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

/// `systemd-socket-activate` holding the daemon's two sockets (names as in
/// the socket units) and launching the daemon at the first connection in
/// the unit's environment: NOTIFY_SOCKET set, only the unit's bounding set
/// of capabilities and no_new_privs (NoNewPrivileges=yes), applied by
/// setpriv inside the namespace. Everything execs the next, so the child
/// is the daemon.
fn socket_activated(hookd: &Hookd, notify: &Path, listen: [&Path; 2], names: &str) -> Command {
    let activate = require_tool("systemd-socket-activate", "systemd");
    let setpriv = require_tool("setpriv", "util-linux");
    let daemon = hookd.command();
    // ip netns exec NS | setpriv ... | qnet-hookd ARGS
    let args: Vec<_> = daemon.get_args().collect();
    let (netns_exec, hookd_args) = args.split_at(3);
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
        .args(netns_exec)
        .arg(setpriv)
        .arg(format!(
            "--bounding-set=-all,+{}",
            unit_capabilities().replace(',', ",+")
        ))
        .arg("--no-new-privs")
        .args(hookd_args)
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
    // As /run/qnet is: traversable, so dnsmasq drops root for its own user
    // (which needs CAP_SETUID, CAP_SETGID, and CAP_KILL to signal it).
    for dir in [hookd.dir().to_path_buf(), hookd.run_dir()] {
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
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
    // It ran with the unit's restrictions: no CAP_SYS_ADMIN (bit 21) in
    // its bounding set, no_new_privs set.
    let proc_status = ProcStatus::of(pid);
    let field = |name: &str| proc_status.field(name).unwrap().to_string();
    let bounding = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
    assert_eq!(bounding & (1 << 21), 0, "CapBnd {bounding:x}");
    assert_ne!(
        bounding & (1 << 12),
        0,
        "CAP_NET_ADMIN kept: CapBnd {bounding:x}"
    );
    assert_eq!(field("NoNewPrivs:"), "1");
    // With only those capabilities dnsmasq runs (ports 53/67, NET_RAW,
    // its switch to another user) and takes the daemon's SIGHUP.
    hookd
        .qnetctl(&[
            "reserve",
            "add",
            "qnet0",
            "52:54:00:00:00:01",
            "--name",
            "probe",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let log = hookd.log();
    assert!(
        !log.contains("dnsmasq exited unexpectedly") && !log.contains("cannot SIGHUP"),
        "dnsmasq does not work with the unit's capabilities:\n{log}"
    );
    // dnsmasq's log reaches the daemon's (the journal, under systemd):
    // the reservation made it re-read its hosts files, and it says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    let relayed = |log: String| {
        log.lines()
            .any(|l| l.contains("dnsmasq: ") && l.contains("]: read ") && l.contains("dhcp-hosts"))
    };
    while !relayed(hookd.log()) {
        assert!(
            Instant::now() < deadline,
            "dnsmasq's log not relayed:\n{}",
            hookd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let dnsmasq_pid = std::fs::read_to_string(hookd.run_dir().join("qnet0/dnsmasq.pid")).unwrap();
    let dnsmasq = std::fs::read_to_string(format!("/proc/{}/status", dnsmasq_pid.trim())).unwrap();
    assert!(
        dnsmasq
            .lines()
            .any(|l| l.starts_with("Uid:") && !l.contains("\t0\t")),
        "dnsmasq kept root:\n{dnsmasq}"
    );
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
