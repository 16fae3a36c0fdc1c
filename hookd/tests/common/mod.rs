//! Test helpers: throw-away network namespaces and veth plumbing.
//!
//! Every test builds its own namespaces (`qnet-test-<what>-<pid>-<n>`) and
//! never touches the host's. The code under test runs on a dedicated thread
//! that enters the namespace (`setns`) and then builds a current-thread
//! tokio runtime there ([`Netns::block_on`]); the rtnetlink sockets, the
//! `/proc/sys/net` files and the child processes (nft, dnsmasq) of that
//! thread all belong to the namespace. Setup and inspection use
//! `ip -n NAME ...` / `ip netns exec NAME ...`.
//!
//! A [`Netns`] deletes its namespace on drop, after killing whatever still
//! runs in it (`ip netns pids`), also when a test panics.
#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Fails (never skips) if the test cannot run as intended.
pub fn require(programs: &[&str]) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (network namespaces, bridges, nftables)"
    );
    for program in programs {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|dir| dir.join(program).is_file());
        assert!(
            found,
            "`{program}` is needed by this test but is not installed"
        );
    }
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace with `lo` up.
    pub fn new(what: &str) -> Netns {
        require(&["ip"]);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("qnet-test-{what}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`; panics on failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME ARGS...`, whatever its outcome.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        Command::new("ip")
            .args(&all)
            .output()
            .expect("cannot run ip netns exec")
    }

    /// `ip netns exec NAME ARGS...`, panicking on failure; returns stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a new thread inside the namespace and returns its
    /// result; a panic in `f` is re-raised here.
    pub fn run<'a, T: Send + 'a>(&self, f: impl FnOnce() -> T + Send + 'a) -> T {
        let path = self.path();
        thread::scope(|scope| {
            let handle = scope.spawn(move || {
                let file = std::fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("cannot enter {}: {e}", path.display()));
                f()
            });
            match handle.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs the future made by `f` to completion on a current-thread tokio
    /// runtime built on a thread inside the namespace.
    pub fn block_on<'a, F, Fut>(&self, f: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send + 'a,
        Fut: Future,
        Fut::Output: Send + 'a,
    {
        self.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cannot build a tokio runtime");
            rt.block_on(f())
        })
    }

    /// A TCP listener bound inside the namespace (a socket stays in the
    /// namespace it was created in, whichever thread uses it later).
    pub fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().expect("socket address");
        self.run(move || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"))
        })
    }

    /// Connects from inside the namespace.
    pub fn connect(&self, addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
        let addr: SocketAddr = addr.parse().expect("socket address");
        self.run(move || TcpStream::connect_timeout(&addr, timeout))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair: `a_if` in `a`, `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// Accepts one connection on `listener` (in a background thread) and
/// reports the peer's address, or nothing if none came within `timeout`.
pub fn accept_one(listener: TcpListener, timeout: Duration) -> mpsc::Receiver<SocketAddr> {
    let (tx, rx) = mpsc::channel();
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    thread::spawn(move || {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((_stream, peer)) => {
                    let _ = tx.send(peer);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
    });
    rx
}

/// `ip -j` output of `args` in `ns`, parsed.
pub fn ip_json(ns: &Netns, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    serde_json::from_str(&ns.ip(&all)).expect("ip -j prints JSON")
}

/// Polls `check` every 20 ms until it is true; panics with `what` if it is
/// still false after `timeout` (a generous failure bound, not a timing
/// assertion).
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A network config as the config file would give it: router `.1`, DHCP
/// `.100`-`.199`, domain `<name>.qnet`.
pub fn network(
    name: &str,
    bridge: &str,
    mode: qnet_hookd::api::Mode,
    subnet: &str,
) -> qnet_hookd::config::NetworkConfig {
    let subnet: ipnet::Ipv4Net = subnet.parse().expect("subnet");
    let base = u32::from(subnet.network());
    qnet_hookd::config::NetworkConfig {
        name: name.parse().unwrap(),
        bridge: bridge.parse().unwrap(),
        mode,
        subnet,
        router: (base + 1).into(),
        dhcp_range: ((base + 100).into(), (base + 199).into()),
        domain: format!("{name}.qnet").parse().unwrap(),
        uplink: None,
        blocked_ports: Vec::new(),
        ipv6: None,
    }
}

/// Plugs `guest`'s `eth0` (with MAC `mac`) into bridge `bridge` of
/// `daemon` through the veth port `port`.
pub fn plug_guest(daemon: &Netns, bridge: &str, port: &str, guest: &Netns, mac: &str) {
    veth(daemon, port, guest, "eth0");
    guest.ip(&["link", "set", "eth0", "address", mac]);
    daemon.ip(&["link", "set", port, "master", bridge]);
}
