//! Network namespaces owned by one test.
//!
//! Every namespace is named `qnet-test-<tag>-<pid>-<n>` so parallel tests
//! (and parallel test binaries) never collide, and is deleted on drop,
//! also when the test panics. Nothing here changes the host's own
//! namespace: commands run with `ip -n`, and Rust code that must run inside
//! does so on a thread of its own (`setns` of a network namespace applies
//! to the calling thread only).

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

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

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run_in<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = File::open(&path).expect("open netns");
                    setns(ns, CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("thread in netns panicked")
        })
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
