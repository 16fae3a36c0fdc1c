//! Network namespaces owned by one test.
//!
//! Every namespace is named `qnet-test-<tag>-<pid>-<n>` so parallel tests
//! (and parallel test binaries) never collide, and is deleted on drop,
//! also when the test panics. Nothing here changes the host's own
//! namespace: commands run with `ip -n`, and Rust code that must run inside
//! does so on a thread of its own (`setns` of a network namespace applies
//! to the calling thread only).

use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

/// The host's uplink address and the outside's, on the /24 between them,
/// in the tests' worlds of a host and "the outside" ([`host_and_outside`]).
pub const UPLINK: &str = "10.254.0.1";
pub const OUTSIDE: &str = "10.254.0.2";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short suffix (`<pid>-<n>`) for names that must not collide
/// across parallel tests.
pub fn unique_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `qnet-test-<tag>-<pid>-<n>` with its loopback up.
    pub fn new(tag: &str) -> NetNs {
        crate::require_root();
        let name = format!("qnet-test-{tag}-{}", unique_suffix());
        run("ip", &["netns", "add", &name]).expect("ip netns add");
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `setns`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `ip -n <ns> ARGS`, panicking with ip's stderr on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`NetNs::ip`] but returns the error instead of panicking.
    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip netns exec <ns> ARGV...`, panicking with its stderr on failure;
    /// returns stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let (program, args) = argv.split_first().expect("a program to run");
        self.exec(program, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ip netns exec <ns> ARGV...`, whatever its outcome.
    pub fn exec_output(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", self.name.as_str()])
            .args(argv)
            .output()
            .expect("cannot run ip netns exec")
    }

    /// `ip -j -n <ns> ARGS`, parsed.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ip(&all)).expect("ip -j prints JSON")
    }

    /// Gives link `dev` the alternative name `altname`.
    pub fn add_altname(&self, dev: &str, altname: &str) {
        self.ip(&["link", "property", "add", "dev", dev, "altname", altname]);
    }

    /// Adds a bridge with the given address (CIDR) and brings it up.
    pub fn add_bridge(&self, name: &str, cidr: Option<&str>) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        if let Some(cidr) = cidr {
            self.ip(&["addr", "add", cidr, "dev", name]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// Connects this namespace to `peer` with a veth pair, `name` here and
    /// `peer_name` there, each with its address (CIDR) when one is given,
    /// both up.
    pub fn add_veth_to(
        &self,
        name: &str,
        cidr: Option<&str>,
        peer: &NetNs,
        peer_name: &str,
        peer_cidr: Option<&str>,
    ) {
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ]);
        for (ns, dev, cidr) in [(self, name, cidr), (peer, peer_name, peer_cidr)] {
            if let Some(cidr) = cidr {
                ns.ip(&["addr", "add", cidr, "dev", dev]);
            }
            ns.ip(&["link", "set", dev, "up"]);
        }
    }

    /// A host namespace `HOST_TAG` and an "outside" one `OUT_TAG` joined
    /// by a veth pair, `up0` in the host (the uplink) with `host_addrs`
    /// and `out0` outside with `out_addrs` (CIDRs; IPv6 ones without
    /// duplicate address detection, so they work at once).
    pub fn with_outside(
        host_tag: &str,
        out_tag: &str,
        host_addrs: &[&str],
        out_addrs: &[&str],
    ) -> (NetNs, NetNs) {
        let host = NetNs::new(host_tag);
        let out = NetNs::new(out_tag);
        host.add_veth_to("up0", None, &out, "out0", None);
        for (ns, dev, addrs) in [(&host, "up0", host_addrs), (&out, "out0", out_addrs)] {
            for cidr in addrs {
                let nodad = if cidr.contains(':') { "nodad" } else { "" };
                let args: Vec<&str> = ["addr", "add", cidr, "dev", dev, nodad]
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .collect();
                ns.ip(&args);
            }
        }
        (host, out)
    }

    /// Uses up `2 * pairs` ifindexes of this namespace by creating and
    /// deleting veth pairs: ifindexes are handed out cyclically from the last
    /// one, so afterwards the next device gets the ifindex after them. Lets
    /// a test predict (and collide with) the ifindex of the next device,
    /// e.g. to make `/dev/tap<ifindex>` belong to another namespace.
    pub fn use_up_ifindexes(&self, pairs: u32) {
        let batch = tempfile::NamedTempFile::new().expect("temp file");
        let mut text = String::new();
        for i in 0..pairs {
            text.push_str(&format!("link add qadv{i}a type veth peer name qadv{i}b\n"));
        }
        for i in 0..pairs {
            text.push_str(&format!("link del qadv{i}a\n"));
        }
        std::fs::write(batch.path(), text).unwrap();
        self.ip(&["-batch", batch.path().to_str().unwrap()]);
    }

    /// Names of all links in the namespace.
    pub fn link_names(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .collect()
    }

    /// The devices whose names start with `prefix`.
    pub fn links_named(&self, prefix: &str) -> Vec<String> {
        self.link_names()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    /// Runs `f` on a thread that has entered this namespace and returns its
    /// result; a panic in `f` is re-raised here, message intact.
    pub fn run_in<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                setns(ns, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("enter {path}: {e}"));
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs the future made by `f` on a current-thread tokio runtime built
    /// on a thread inside the namespace: the runtime's sockets (rtnetlink,
    /// nfnetlink) and its child processes all belong to the namespace.
    pub fn block_on<F, Fut>(&self, f: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        self.run_in(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cannot build a tokio runtime")
                .block_on(f())
        })
    }

    /// A TCP listener bound inside the namespace (a socket stays in the
    /// namespace it was made in, whichever thread uses it later).
    pub fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().expect("socket address");
        self.run_in(move || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"))
        })
    }

    /// Connects from inside the namespace.
    pub fn connect(&self, addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
        let addr: SocketAddr = addr.parse().expect("socket address");
        self.run_in(move || TcpStream::connect_timeout(&addr, timeout))
    }

    /// Kills every process still running inside the namespace.
    fn kill_all(&self) {
        if let Ok(pids) = run("ip", &["netns", "pids", &self.name]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.kill_all();
        if let Err(err) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {err}");
        }
    }
}

/// Accepts one connection on `listener` (in a background thread) and
/// reports the peer's address, or nothing if none came within `timeout`.
pub fn accept_one(listener: TcpListener, timeout: Duration) -> mpsc::Receiver<SocketAddr> {
    let (tx, rx) = mpsc::channel();
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((_stream, peer)) => {
                    let _ = tx.send(peer);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
    });
    rx
}

/// A host namespace named `host` and "the outside" named `outside`,
/// joined like a host and its uplink: veth `up0` in the host with
/// `uplink` (/24), `out0` outside with `outside_ip` (/24).
pub fn host_and_outside(
    host: &str,
    outside: &str,
    uplink: &str,
    outside_ip: &str,
) -> (NetNs, NetNs) {
    NetNs::with_outside(
        host,
        outside,
        &[&format!("{uplink}/24")],
        &[&format!("{outside_ip}/24")],
    )
}

/// Runs a command and returns its stdout, or an error naming the command
/// and quoting its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
