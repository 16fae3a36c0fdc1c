//! dnsmasq.rs with a real dnsmasq on a real bridge, and a real DHCP client
//! (busybox udhcpc) in a guest namespace plugged into it.

mod common;

use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::{network, own, own_mut, plug_guest, require, NetNs};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use qnet_hookd::api::Mode;
use qnet_hookd::config::{Ipv6Config, NetworkConfig};
use qnet_hookd::dnsmasq::{spawn, DhcpHost, DnsHost, DnsmasqError, Paths};
use qnet_hookd::network::bring_up;
use qnet_tests::dnsmasq::reservation_reads;

/// Generous failure bound for dnsmasq to (re)start.
const READY: Duration = Duration::from_secs(20);
const GUEST_MAC: &str = "52:54:00:00:00:42";

/// Run and state directories in a fresh temporary directory that
/// dnsmasq's unprivileged user can traverse (as /run/qnet would be).
fn paths() -> (tempfile::TempDir, Paths) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let paths = Paths {
        run_dir: dir.path().join("run"),
        state_dir: dir.path().join("state"),
    };
    (dir, paths)
}

/// A daemon namespace tagged `tag` with each of `nets` up, and the run
/// and state directories of its dnsmasqs (see [`paths`]).
fn daemon_with(tag: &str, nets: &[&NetworkConfig]) -> (NetNs, tempfile::TempDir, Paths) {
    require(&["ip", "dnsmasq"]);
    let daemon = NetNs::new(tag);
    for net in nets {
        daemon.block_on(|| bring_up(net)).expect("bring_up");
    }
    let (tmp, paths) = paths();
    (daemon, tmp, paths)
}

/// A daemon namespace with a network up and a guest plugged into its
/// bridge, the dnsmasq directories, and a DHCP client's script.
struct Lan {
    daemon: NetNs,
    guest: NetNs,
    paths: Paths,
    /// See [`lease_script`].
    script: String,
    _tmp: tempfile::TempDir,
}

/// The [`Lan`] of `net`, its namespaces tagged `what`.
fn lan(what: &str, net: &NetworkConfig) -> Lan {
    require(&["busybox"]);
    let (daemon, tmp, paths) = daemon_with(&format!("{what}-d"), &[net]);
    let guest = NetNs::new(&format!("{what}-g"));
    plug_guest(&daemon, &net.bridge, "gport", &guest, GUEST_MAC);
    let script = lease_script(tmp.path());
    Lan {
        daemon,
        guest,
        paths,
        script,
        _tmp: tmp,
    }
}

/// A udhcpc script that prints the address it was given.
fn lease_script(dir: &Path) -> String {
    let path = dir.join("udhcpc.sh");
    std::fs::write(
        &path,
        "#!/bin/sh\n[ \"$1\" = bound ] && echo \"QNET-LEASE $ip\"\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

impl Lan {
    /// Gives the guest a static address in 10.42.0.0/24 outside the DHCP
    /// range, to talk DNS from whatever its lease.
    fn static_guest_address(&self) {
        self.guest
            .ip(&["addr", "add", "10.42.0.250/24", "dev", "eth0"]);
    }

    /// Asks for a lease from inside the guest (a fresh DISCOVER every
    /// time: the script configures nothing) and returns the address
    /// offered.
    async fn dhcp(&self) -> Ipv4Addr {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", self.guest.name(), "busybox", "udhcpc"])
            .args(["-i", "eth0", "-f", "-q", "-n", "-t", "10", "-T", "2", "-s"])
            .arg(&self.script)
            .output()
            .await
            .expect("cannot run udhcpc");
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("QNET-LEASE "))
            .and_then(|ip| ip.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "udhcpc got no lease ({}):\n{stdout}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }
}

/// The guest's reservation as `vm1` at `ip`, and that name in DNS.
fn vm1_at(ip: Ipv4Addr) -> (DhcpHost, DnsHost) {
    let name = DnsHost {
        ip,
        name: "vm1".parse().unwrap(),
    };
    let reservation = DhcpHost {
        mac: GUEST_MAC.parse().unwrap(),
        ip,
        name: Some(name.name.clone()),
    };
    (reservation, name)
}

/// Resolves `name` at `server` from inside `guest`.
async fn resolve(guest: &NetNs, name: &str, server: &str) -> Option<Ipv4Addr> {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            guest.name(),
            "busybox",
            "nslookup",
            name,
            server,
        ])
        .output()
        .await
        .expect("cannot run nslookup");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The server's own "Address: 10.42.0.1:53" comes first; answers follow
    // the "Name:" line.
    stdout.split_once("Name:").and_then(|(_, answer)| {
        answer
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Address:"))
            .find_map(|a| a.trim().parse().ok())
    })
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().to_owned());
            !matches!(
                state.as_deref().and_then(|s| s.chars().next()),
                Some('Z' | 'X')
            )
        })
        .unwrap_or(false)
}

/// `(uid, session id, process group)` of `pid`.
fn owner_and_session(pid: u32) -> (u32, u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    (uid, fields[3].parse().unwrap(), fields[2].parse().unwrap())
}

async fn wait_for_new_pid(handle: &qnet_hookd::dnsmasq::DnsmasqHandle, old: u32) -> u32 {
    let deadline = tokio::time::Instant::now() + READY;
    loop {
        if let Some(pid) = handle.pid() {
            if pid != old {
                return pid;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dnsmasq was not restarted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn reservations_reload_on_sighup_and_the_supervisor_restarts_dnsmasq() {
    let net = network("lab", "qnlab", Mode::Nat, "10.42.0.0/24");
    let lab = lan("dhcp", &net);
    lab.static_guest_address();

    lab.daemon.block_on(|| async {
        let handle = spawn(&net, own(&net), &lab.paths).expect("spawn");
        let pid = handle.wait_ready(READY).await.expect("dnsmasq starts");
        assert_eq!(handle.pid(), Some(pid));
        let config = std::fs::read_to_string(lab.paths.config_file("lab")).unwrap();
        assert!(!config.contains("user=root"), "{config}");
        let (uid, sid, pgid) = owner_and_session(pid);
        assert_ne!(uid, 0, "dnsmasq dropped root");
        assert_eq!((sid, pgid), (pid, pid), "dnsmasq has a session of its own");

        // A reservation, then a real DHCP client gets it; DNS knows the name.
        let reserve = async |ip: [u8; 4]| {
            let (reservation, name) = vm1_at(Ipv4Addr::from(ip));
            handle
                .set_hosts(vec![reservation], vec![name])
                .await
                .expect("set_hosts");
            assert_eq!(lab.dhcp().await, Ipv4Addr::from(ip));
            assert_eq!(
                resolve(&lab.guest, "vm1.lab.qnet", "10.42.0.1").await,
                Some(Ipv4Addr::from(ip))
            );
        };
        reserve([10, 42, 0, 50]).await;

        // A new reservation needs no SIGHUP: dnsmasq read its new file
        // through inotify (which it logs), not by re-reading every host.
        let log = std::fs::read_to_string(lab.paths.log_file("lab")).unwrap_or_default();
        assert!(
            log.lines()
                .any(|l| l.contains("inotify") && l.contains(&GUEST_MAC.to_lowercase())),
            "{log}"
        );

        // Moved: SIGHUP, same process, the next request gets the new one.
        reserve([10, 42, 0, 60]).await;
        assert_eq!(handle.pid(), Some(pid), "reloaded, not restarted");

        // Unchanged: the files are not even rewritten.
        let host_file = lab
            .paths
            .dhcp_hosts_dir("lab")
            .join(GUEST_MAC.to_lowercase());
        let inode = std::fs::metadata(&host_file).unwrap().ino();
        let (reservation, name) = vm1_at(Ipv4Addr::new(10, 42, 0, 60));
        handle
            .set_hosts(vec![reservation], vec![name])
            .await
            .expect("set_hosts");
        assert_eq!(std::fs::metadata(&host_file).unwrap().ino(), inode);

        // Killed: restarted by the supervisor, and DHCP answers again.
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        let new_pid = wait_for_new_pid(&handle, pid).await;
        assert_eq!(handle.wait_ready(READY).await.expect("restarted"), new_pid);
        assert_eq!(lab.dhcp().await, Ipv4Addr::new(10, 42, 0, 60));

        // Stopped: process and run directory gone, leases kept.
        handle.stop().await;
        assert!(!alive(new_pid), "dnsmasq {new_pid} still runs");
        assert!(!lab.paths.net_dir("lab").exists());
        let leases = std::fs::read_to_string(lab.paths.lease_file("lab")).expect("lease file kept");
        assert!(leases.contains(GUEST_MAC), "{leases}");
    });
}

#[test]
fn spawn_replaces_a_dnsmasq_left_by_a_previous_daemon() {
    let net = network("lab", "qnlab", Mode::Nat, "10.42.0.0/24");
    let lab = lan("adopt", &net);
    lab.daemon.block_on(|| async {
        let first = spawn(&net, own(&net), &lab.paths).expect("spawn");
        let old = first.wait_ready(READY).await.expect("dnsmasq starts");
        first
            .set_hosts(
                vec![DhcpHost {
                    mac: GUEST_MAC.parse().unwrap(),
                    ip: Ipv4Addr::new(10, 42, 0, 77),
                    name: None,
                }],
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(lab.dhcp().await, Ipv4Addr::new(10, 42, 0, 77));
        // The daemon goes away without stopping it (as on a crash).
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(alive(old), "dnsmasq must outlive the daemon's handle");

        let second = spawn(&net, own(&net), &lab.paths).expect("spawn again");
        let new = second
            .wait_ready(READY)
            .await
            .expect("dnsmasq starts again");
        assert_ne!(new, old);
        assert!(!alive(old), "the old dnsmasq was replaced");
        // The reservation file was kept across the restart.
        assert_eq!(lab.dhcp().await, Ipv4Addr::new(10, 42, 0, 77));
        second.stop().await;
    });
}

/// A guest leaving takes its name out of DNS and keeps its reservation.
/// dnsmasq 2.89 and later follow the name file going by themselves, so
/// nothing is re-read (a SIGHUP would re-read every reservation file,
/// which dnsmasq logs); an older one is sent a SIGHUP.
#[test]
fn a_name_that_goes_leaves_dns_without_a_sighup_where_dnsmasq_follows_it() {
    let net = network("lab", "qnlab", Mode::Nat, "10.42.0.0/24");
    let lab = lan("names", &net);
    lab.static_guest_address();
    let ip = Ipv4Addr::new(10, 42, 0, 50);
    let (reservation, name) = vm1_at(ip);
    let reads = || {
        let log = std::fs::read_to_string(lab.paths.log_file("lab")).unwrap_or_default();
        reservation_reads(&log)
    };
    lab.daemon.block_on(|| async {
        let handle = spawn(&net, own(&net), &lab.paths).expect("spawn");
        handle.wait_ready(READY).await.expect("dnsmasq starts");
        handle
            .set_hosts(vec![reservation.clone()], vec![name])
            .await
            .unwrap();
        assert_eq!(
            resolve(&lab.guest, "vm1.lab.qnet", "10.42.0.1").await,
            Some(ip)
        );
        let reads_before = reads();

        // The guest leaves: its name goes, its reservation stays.
        handle
            .set_hosts(vec![reservation], Vec::new())
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while resolve(&lab.guest, "vm1.lab.qnet", "10.42.0.1")
            .await
            .is_some()
        {
            assert!(std::time::Instant::now() < deadline, "vm1 still resolves");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reread = reads() > reads_before;
        assert_eq!(
            reread,
            !handle.names_follow_files(),
            "re-read every reservation: {reread}"
        );
        assert_eq!(lab.dhcp().await, ip, "the reservation stays");
        handle.stop().await;
    });
}

#[test]
fn two_networks_run_their_own_dnsmasq_side_by_side() {
    let mut a = network("a", "qna", Mode::Nat, "10.42.0.0/24");
    let mut b = network("b", "qnb", Mode::Isolated, "10.43.0.0/24");
    // With IPv6 too, so that dnsmasq accepts the RA settings of both modes.
    own_mut(&mut a).ipv6 = Ipv6Config::first_router("fd42::/64".parse().unwrap());
    own_mut(&mut b).ipv6 = Ipv6Config::first_router("fd43::/64".parse().unwrap());
    let (daemon, _tmp, paths) = daemon_with("two", &[&a, &b]);
    daemon.block_on(|| async {
        let ha = spawn(&a, own(&a), &paths).unwrap();
        let hb = spawn(&b, own(&b), &paths).unwrap();
        let pa = ha.wait_ready(READY).await.expect("a's dnsmasq");
        let pb = hb.wait_ready(READY).await.expect("b's dnsmasq");
        assert_ne!(pa, pb);
        ha.stop().await;
        // b is untouched by a's stop.
        assert_eq!(hb.pid(), Some(pb));
        assert!(alive(pb));
        hb.stop().await;
    });
}

#[test]
fn a_dnsmasq_that_cannot_start_is_retried_and_its_error_reported() {
    let mut net = network("lab", "qnlab", Mode::Nat, "10.42.0.0/24");
    // Not a range within one /24: dnsmasq refuses its config.
    own_mut(&mut net).dhcp_range = (Ipv4Addr::new(10, 42, 0, 9), Ipv4Addr::new(10, 42, 1, 3));
    let (daemon, _tmp, paths) = daemon_with("broken", &[&net]);
    daemon.block_on(|| async {
        let handle = spawn(&net, own(&net), &paths).unwrap();
        let err = handle
            .wait_ready(Duration::from_secs(2))
            .await
            .expect_err("this dnsmasq cannot start");
        let DnsmasqError::NotReady { last_exit, .. } = &err else {
            panic!("{err}");
        };
        let last_exit = last_exit.as_deref().expect("it exited at least once");
        assert!(last_exit.contains("exit status: 1"), "{last_exit}");
        assert!(last_exit.contains("inconsistent DHCP range"), "{last_exit}");
        handle.stop().await;
        assert!(!paths.net_dir("lab").exists());
    });
}

#[test]
fn router_advertisements_give_guests_an_ipv6_address() {
    let mut net = network("lab", "qnlab", Mode::Nat, "10.42.0.0/24");
    own_mut(&mut net).ipv6 = Ipv6Config::first_router("fd42::/64".parse().unwrap());
    let lab = lan("ra", &net);
    lab.daemon.block_on(|| async {
        let handle = spawn(&net, own(&net), &lab.paths).expect("spawn");
        handle.wait_ready(READY).await.expect("dnsmasq starts");
        // SLAAC from dnsmasq's RAs.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = tokio::process::Command::new("ip")
                .args([
                    "-n",
                    lab.guest.name(),
                    "-6",
                    "addr",
                    "show",
                    "dev",
                    "eth0",
                    "scope",
                    "global",
                ])
                .output()
                .await
                .expect("ip");
            if String::from_utf8_lossy(&out.stdout).contains("inet6 fd42::") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the guest got no SLAAC address in fd42::/64"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        handle.stop().await;
    });
}
