//! The host firewalls qnet must live next to, run for real inside a test
//! network namespace: dockerd, firewalld on a private system bus,
//! iptables (nft and legacy backends) with a drop policy; plus a veth
//! "guest" namespace registered the way the libvirt hook registers one,
//! with an HTTP server, and the check that no qnet mark is left anywhere.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::NetNs;
use crate::process::{spawn_logged, stop, wait_serving};
use crate::{require_tool, workspace_binary};

/// The program's output, or a panic naming the command and its stderr.
fn must(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(ns: &NetNs, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), program]);
    cmd
}

/// An iptables backend's binary for a family.
pub fn iptables(backend: &str, v6: bool) -> String {
    format!("{}-{backend}", if v6 { "ip6tables" } else { "iptables" })
}

/// Runs `iptables-BACKEND ARGS` in `ns`.
pub fn ipt(ns: &NetNs, backend: &str, v6: bool, args: &[&str]) -> String {
    must(in_ns(ns, &iptables(backend, v6)).arg("-w").args(args))
}

/// Sets the `FORWARD` and `INPUT` policies of a backend's filter tables
/// to DROP, as ufw or a hand-written firewall does.
pub fn drop_policies(ns: &NetNs, backend: &str) {
    require_tool(&iptables(backend, false), "iptables");
    for v6 in [false, true] {
        for chain in ["FORWARD", "INPUT"] {
            ipt(ns, backend, v6, &["-P", chain, "DROP"]);
        }
        // The host's own replies (e.g. to DHCP) and loopback still pass;
        // over IPv6 also neighbour discovery for the host's own addresses,
        // as ufw's before6.rules allow it (IPv4's ARP is not filtered).
        let mut accepts: Vec<&[&str]> = vec![
            &["-i", "lo"],
            &["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"],
        ];
        if v6 {
            accepts.push(&["-p", "ipv6-icmp", "--icmpv6-type", "neighbour-solicitation"]);
            accepts.push(&[
                "-p",
                "ipv6-icmp",
                "--icmpv6-type",
                "neighbour-advertisement",
            ]);
        }
        for spec in accepts {
            ipt(
                ns,
                backend,
                v6,
                &[&["-A", "INPUT"], spec, &["-j", "ACCEPT"]].concat(),
            );
        }
    }
}

/// Every rule carrying a qnet mark, in every filter table of both
/// backends that exists in `ns` (`BACKEND: RULE` lines).
pub fn iptables_marks(ns: &NetNs) -> Vec<String> {
    let mut marks = Vec::new();
    let tables = ns.exec("nft", &["list", "tables"]).unwrap_or_default();
    for backend in ["nft", "legacy"] {
        for v6 in [false, true] {
            let exists = match backend {
                "nft" => tables.lines().any(|l| {
                    l.trim()
                        == if v6 {
                            "table ip6 filter"
                        } else {
                            "table ip filter"
                        }
                }),
                _ => {
                    let names = if v6 {
                        "ip6_tables_names"
                    } else {
                        "ip_tables_names"
                    };
                    ns.exec("cat", &[&format!("/proc/net/{names}")])
                        .is_ok_and(|t| t.lines().any(|l| l == "filter"))
                }
            };
            if !exists {
                continue;
            }
            for line in ipt(ns, backend, v6, &["-S"]).lines() {
                if line.contains("qnet:") {
                    marks.push(format!("{}: {line}", iptables(backend, v6)));
                }
            }
        }
    }
    marks
}

/// A real dockerd in `ns` (started with `nsenter --net`, not `ip netns
/// exec`, which would hide the cgroup mounts), its data and exec roots in
/// a temp dir. Dropping it stops it and unmounts its data root.
pub struct Dockerd {
    netns: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Dockerd {
    pub fn start(ns: &NetNs) -> Dockerd {
        require_tool("dockerd", "docker.io");
        let dir = tempfile::Builder::new()
            .prefix("qnet-docker-")
            .tempdir()
            .unwrap();
        let mut docker = Dockerd {
            netns: ns.name().to_string(),
            dir,
            child: None,
        };
        docker.spawn(ns);
        docker
    }

    fn spawn(&mut self, ns: &NetNs) {
        let d = self.dir.path();
        let mut dockerd = Command::new("nsenter");
        dockerd
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("dockerd")
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()));
        let log = d.join("dockerd.log");
        let child = self
            .child
            .insert(spawn_logged(&mut dockerd, &log, "dockerd"));
        // Ready once its chains are there and its API answers.
        let sock = d.join("docker.sock");
        wait_serving("dockerd", child, &log, MINUTE, POLL, || {
            sock.exists()
                && in_ns(ns, "iptables-nft")
                    .args(["-w", "-S", "DOCKER-USER"])
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Stops dockerd (SIGTERM, by pid) and starts it again on the same
    /// roots: it rebuilds its chains.
    pub fn restart(&mut self, ns: &NetNs) {
        self.stop();
        self.spawn(ns);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
        let data = self.dir.path().join("data");
        // dockerd bind-mounts parts of its data root; unmount them all.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(&data)
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long dockerd and firewalld may take to serve, and how often to
/// look.
const MINUTE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// Runs `firewall-cmd ARGS` against the firewalld on the bus of
/// `dbus_pid`'s mount namespace, in the network namespace `netns`.
fn firewall_cmd(dbus_pid: i32, netns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("nsenter")
        .args(["-t", &dbus_pid.to_string(), "-m"])
        .args(["ip", "netns", "exec", netns, "firewall-cmd"])
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "firewall-cmd {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A real firewalld in `ns`, with its own system bus (a private mount
/// namespace with tmpfs on `/run/dbus`) and its own `/etc/firewalld` (a
/// copy of the host's, so permanent changes stay in the test).
pub struct Firewalld {
    netns: String,
    dir: tempfile::TempDir,
    dbus_pid: i32,
    child: Option<Child>,
}

impl Firewalld {
    pub fn start(ns: &NetNs) -> Firewalld {
        let mut fw = Firewalld::bus_only(ns);
        fw.start_daemon();
        fw
    }

    /// The private system bus only; [`Firewalld::start_daemon`] later.
    pub fn bus_only(ns: &NetNs) -> Firewalld {
        require_tool("firewalld", "firewalld");
        require_tool("dbus-daemon", "dbus");
        let dir = tempfile::Builder::new()
            .prefix("qnet-firewalld-")
            .tempdir()
            .unwrap();
        let etc = dir.path().join("etc");
        must(Command::new("cp").arg("-a").arg("/etc/firewalld").arg(&etc));
        let pidfile = dir.path().join("dbus.pid");
        let script = format!(
            "mount -t tmpfs none /run/dbus && mount --bind {etc} /etc/firewalld && \
             dbus-daemon --system --fork --print-pid > {pid}",
            etc = etc.display(),
            pid = pidfile.display()
        );
        must(Command::new("unshare").args(["-m", "sh", "-c", &script]));
        let dbus_pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Firewalld {
            netns: ns.name().to_string(),
            dir,
            dbus_pid,
            child: None,
        }
    }

    /// `DBUS_SYSTEM_BUS_ADDRESS` of the private bus, reachable from any
    /// mount namespace through dbus-daemon's root.
    pub fn bus_address(&self) -> String {
        format!(
            "unix:path=/proc/{}/root/run/dbus/system_bus_socket",
            self.dbus_pid
        )
    }

    /// Starts firewalld on the bus and waits until it runs.
    pub fn start_daemon(&mut self) {
        let mut firewalld = Command::new("nsenter");
        firewalld
            .args(["-t", &self.dbus_pid.to_string(), "-m"])
            .args([
                "ip",
                "netns",
                "exec",
                &self.netns,
                "firewalld",
                "--nofork",
                "--nopid",
            ]);
        let log = self.dir.path().join("firewalld.log");
        let child = self
            .child
            .insert(spawn_logged(&mut firewalld, &log, "firewalld"));
        let (dbus_pid, netns) = (self.dbus_pid, &self.netns);
        wait_serving("firewalld", child, &log, MINUTE, POLL, || {
            firewall_cmd(dbus_pid, netns, &["--state"]).is_ok_and(|s| s.trim() == "running")
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("firewalld.log")).unwrap_or_default()
    }

    /// Runs `firewall-cmd ARGS` against this firewalld.
    pub fn cmd(&self, args: &[&str]) -> Result<String, String> {
        firewall_cmd(self.dbus_pid, &self.netns, args)
    }

    /// Stops firewalld (by pid) and starts it again on the same bus.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
        self.start_daemon();
    }

    /// The zones and policies named `qnet…`, runtime and permanent, with
    /// their interfaces: empty when no trace of qnet is left.
    pub fn marks(&self) -> Vec<String> {
        let mut marks = Vec::new();
        for permanent in [false, true] {
            let flag: &[&str] = if permanent { &["--permanent"] } else { &[] };
            for kind in ["zones", "policies"] {
                let list = self
                    .cmd(&[flag, &[&format!("--get-{kind}")]].concat())
                    .unwrap_or_default();
                for name in list.split_whitespace().filter(|n| n.starts_with("qnet")) {
                    marks.push(format!("{kind} {name} (permanent: {permanent})"));
                }
            }
        }
        marks
    }

    /// The zone firewalld puts `interface` in now.
    pub fn zone_of(&self, interface: &str) -> String {
        self.cmd(&["--get-zone-of-interface", interface])
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

impl Drop for Firewalld {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
        let _ = kill(Pid::from_raw(self.dbus_pid), Signal::SIGTERM);
    }
}

/// A "guest": a namespace on a veth whose other end is a port of a qnet
/// bridge, with an HTTP server on port 80, registered with qnet-hookd by
/// the real qnet-libvirt-hook (its `started` operation, with the domain
/// XML and the pid of the "QEMU", here the HTTP server), the way libvirt
/// registers a guest.
pub struct VethGuest {
    pub ns: NetNs,
    pub name: String,
    pub mac: String,
    dir: tempfile::TempDir,
    server: Child,
}

impl VethGuest {
    pub fn new(host: &NetNs, bridge: &str, name: &str, mac: &str) -> VethGuest {
        let ns = NetNs::new(&format!("{name}-g"));
        let port = format!("v{}", &name[..name.len().min(12)]);
        host.add_veth_to(&port, None, &ns, "eth0", None);
        host.ip(&["link", "set", &port, "master", bridge]);
        ns.ip(&["link", "set", "eth0", "address", mac]);
        ns.ip(&["link", "set", "lo", "up"]);
        let dir = tempfile::Builder::new()
            .prefix("qnet-vguest-")
            .tempdir()
            .unwrap();
        let www = dir.path().join("www");
        std::fs::create_dir(&www).unwrap();
        std::fs::write(www.join("index.html"), format!("hello from {name}\n")).unwrap();
        let server = in_ns(&ns, "busybox")
            .args(["httpd", "-f", "-p", "80", "-h"])
            .arg(&www)
            .stdin(Stdio::null())
            .spawn()
            .expect("busybox httpd");
        VethGuest {
            ns,
            name: name.to_string(),
            mac: mac.to_string(),
            dir,
            server,
        }
    }

    /// Registers the guest through qnet-libvirt-hook's `started`;
    /// `forwards`: the `<q:forward …/>` elements of its qnet metadata.
    pub fn register(&self, ctl_socket: &Path, bridge: &str, forwards: &str) {
        let pid_dir = self.dir.path().join("pids");
        std::fs::create_dir_all(&pid_dir).unwrap();
        std::fs::write(
            pid_dir.join(format!("{}.pid", self.name)),
            self.server.id().to_string(),
        )
        .unwrap();
        let xml = format!(
            "<domain type='kvm'><name>{n}</name><uuid>{uuid}</uuid>\
             <metadata><q:qnet xmlns:q='https://qnet.example/xmlns/libvirt/1'>{forwards}</q:qnet></metadata>\
             <devices><interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/></interface></devices></domain>",
            n = self.name,
            uuid = uuid_of(&self.name),
            mac = self.mac,
        );
        let mut hook = Command::new(workspace_binary("qnet-libvirt-hook"))
            .arg("--socket")
            .arg(ctl_socket)
            .arg("--pid-dir")
            .arg(&pid_dir)
            .args([&self.name, "started", "begin", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        hook.stdin
            .take()
            .unwrap()
            .write_all(xml.as_bytes())
            .unwrap();
        let out = hook.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "qnet-libvirt-hook started: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Asks for a DHCP lease (busybox udhcpc), configures it, and returns
    /// the address; `Err` when no lease came.
    pub fn dhcp(&self) -> Result<String, String> {
        let script = self.dir.path().join("udhcpc.sh");
        // `ip -4`: flushing every address would take the IPv6 ones
        // (link-local, SLAAC) too, and no router advertisement may come
        // for minutes to give them back.
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip -4 addr flush dev \"$interface\"\n  ip addr add \"$ip/$mask\" dev \"$interface\"\n  \
             ip route replace default via \"$router\"\n  echo \"$ip\" > \"$(dirname \"$0\")/lease\";;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let out = in_ns(&self.ns, "busybox")
            .args([
                "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s",
            ])
            .arg(&script)
            .output()
            .unwrap();
        match std::fs::read_to_string(self.dir.path().join("lease")) {
            Ok(ip) if out.status.success() => Ok(ip.trim().to_string()),
            _ => Err(format!(
                "no DHCP lease: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Waits up to `timeout` for the address the guest gives itself from
    /// the router advertisement (SLAAC, global scope, past duplicate
    /// address detection) and the default route it advertises; returns
    /// the address, or what is missing.
    pub fn slaac(&self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let addr = self
                .ns
                .try_ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"])
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.contains("tentative"))
                .find_map(|l| {
                    let cidr = l.split_whitespace().skip_while(|w| *w != "inet6").nth(1)?;
                    cidr.split('/').next().map(str::to_string)
                });
            let route = self
                .ns
                .try_ip(&["-6", "route", "show", "default"])
                .unwrap_or_default();
            match addr {
                Some(addr) if !route.trim().is_empty() => return Ok(addr),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                addr => {
                    return Err(format!(
                        "no IPv6 from the router advertisement within {timeout:?}: address {addr:?}, default route {:?}; {}",
                        route.trim(),
                        self.ns.try_ip(&["-6", "addr", "show", "dev", "eth0"]).unwrap_or_default()
                    ))
                }
            }
        }
    }
}

impl Drop for VethGuest {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A stable UUID for a test guest's name.
fn uuid_of(name: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        h >> 32,
        h & 0xffff_ffff_ffff
    )
}

/// A busybox HTTP server in `ns` on `port` answering `body`; killed on
/// drop.
pub struct HttpServer {
    child: Child,
    _dir: tempfile::TempDir,
}

impl HttpServer {
    pub fn start(ns: &NetNs, port: u16, body: &str) -> HttpServer {
        let dir = tempfile::Builder::new()
            .prefix("qnet-www-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("index.html"), body).unwrap();
        let child = in_ns(ns, "busybox")
            .args(["httpd", "-f", "-p", &port.to_string(), "-h"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .spawn()
            .expect("busybox httpd");
        HttpServer { child, _dir: dir }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
