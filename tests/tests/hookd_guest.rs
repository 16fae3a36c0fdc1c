//! qnet-hookd end to end with real guests: NAT and isolated networks, sticky
//! reservations, DNS names, masquerade, blocked ports, teardown when QEMU
//! is killed, a daemon killed and restarted, dnsmasq killed, guests
//! stopped and powered down through the daemon.
//!
//! Three namespaces: "hk" runs the daemon (and the guests, attached through
//! qnet-bridge-helper and dialing the daemon's QMP socket); "out" plays the
//! outside world behind a veth uplink and runs a small HTTP server that
//! answers with the address it sees the client from. Nothing touches the
//! host's own namespace.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qnet_tests::guest::{
    guest_image, random_mac, random_token, target_dir, GuestSpec, ProbeOutcome, RunningGuest,
    INIT_MARKER, LONG,
};
use qnet_tests::hookd::{network, qmp_client_args, Hookd};
use qnet_tests::netns::{host_and_outside, NetNs, OUTSIDE, UPLINK};
use qnet_tests::sandbox::{sandboxed, unused_user, ConfigDir, RunAs};
use qnet_tests::workspace_binary;

const TEARDOWN: Duration = Duration::from_secs(20);

/// A NAT network with a domain and a blocked port, and an isolated one.
fn hookd_toml() -> String {
    let lab = network(
        "lab",
        "qnlab",
        &[
            r#"mode = "nat""#,
            r#"subnet = "10.77.0.0/24""#,
            r#"domain = "lab.qnet""#,
            r#"blocked-ports = ["tcp/2525"]"#,
        ],
    );
    let iso = network(
        "iso",
        "qniso",
        &[r#"mode = "isolated""#, r#"subnet = "10.78.0.0/24""#],
    );
    lab + &iso
}

/// The daemon's namespace with an uplink to an "outside" namespace.
struct World {
    // Field order is drop order: guests are dropped by the tests first.
    hookd: Hookd,
    _servers: Vec<OutsideServer>,
    config: ConfigDir,
    hk: NetNs,
    _out: NetNs,
}

impl World {
    fn new(tag: &str) -> World {
        let (hk, out) =
            host_and_outside(&format!("{tag}-hk"), &format!("{tag}-out"), UPLINK, OUTSIDE);
        let servers = vec![
            OutsideServer::start(&out, format!("{OUTSIDE}:8080").parse().unwrap()),
            OutsideServer::start(&out, format!("{OUTSIDE}:2525").parse().unwrap()),
        ];
        let (hookd, config) = Hookd::start_for_guests(&hk, &hookd_toml(), &["qnlab", "qniso"]);
        World {
            hookd,
            _servers: servers,
            config,
            hk,
            _out: out,
        }
    }

    /// Boots a guest named `name` on `bridge` through the bridge helper,
    /// dialing the daemon's QMP socket.
    fn boot(&self, name: &str, mac: &str, bridge: &str, append: &[&str]) -> RunningGuest {
        self.boot_with(name, mac, bridge, append, &[])
    }

    /// [`World::boot`], then waits for the guest's DHCP lease: the guest
    /// and its address.
    fn boot_leased(
        &self,
        name: &str,
        mac: &str,
        bridge: &str,
        append: &[&str],
    ) -> (RunningGuest, Ipv4Addr) {
        let guest = self.boot(name, mac, bridge, append);
        let leased = guest.wait_for_lease(LONG).unwrap_or_else(|e| panic!("{e}"));
        (guest, leased)
    }

    /// [`World::boot`] with extra QEMU arguments.
    fn boot_with(
        &self,
        name: &str,
        mac: &str,
        bridge: &str,
        append: &[&str],
        qemu_args: &[&str],
    ) -> RunningGuest {
        let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
        let mut spec = GuestSpec::new(&image, mac, random_token());
        spec.extra_append = append.iter().map(|s| s.to_string()).collect();
        self.hookd
            .spawn_guest(&self.hk, &self.config, name, &spec, bridge, qemu_args)
    }

    /// Boots a guest named `name` whose QEMU runs as `user`, on QEMU's own
    /// isolated user-mode network (no helper needed), dialing the daemon.
    /// Its files are copies in a directory of the user's own (a checkout
    /// may sit where the user cannot read).
    fn boot_as(&self, name: &str, user: RunAs) -> RunningGuest {
        let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
        let dir = self.hookd.dir().join(format!("vm-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut spec = GuestSpec::new(&image, random_mac(), random_token());
        spec.kernel = dir.join("vmlinuz");
        spec.initrd = dir.join("initrd.gz");
        std::fs::copy(&image.kernel, &spec.kernel).unwrap();
        std::fs::copy(&image.initrd, &spec.initrd).unwrap();
        for path in [&dir, &spec.kernel, &spec.initrd] {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).unwrap();
        }
        // The daemon's directory, with qmp.sock (0666) in it.
        std::fs::set_permissions(self.hookd.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let serial = dir.join("console.log");
        let mut qemu = sandboxed("qemu-system-x86_64", &self.hk, &self.config, Some(user));
        qemu.args(spec.qemu_args("user,id=n0,restrict=on", &serial))
            .args(["-name", name])
            .args(qmp_client_args(&self.hookd.qmp_socket()));
        RunningGuest::spawn(qemu, &serial).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `qnetctl ARGS` as `user`, as a member of group `qnet` would run it.
    fn qnetctl_as(&self, user: RunAs, args: &[&str]) -> std::process::Output {
        std::fs::set_permissions(self.hookd.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            self.hookd.ctl_socket(),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        std::process::Command::new(workspace_binary("qnetctl"))
            .arg("--socket")
            .arg(self.hookd.ctl_socket())
            .args(args)
            .uid(user.uid)
            .gid(user.gid)
            .output()
            .unwrap()
    }

    fn guest_named(&self, name: &str) -> Option<serde_json::Value> {
        self.hookd.guests().into_iter().find(|g| g["name"] == name)
    }

    /// Kills QEMU of `guest` (kill -9, by dropping it) and waits until the
    /// daemon no longer lists it as `name`.
    fn kill_and_wait_gone(&self, guest: RunningGuest, name: &str) {
        drop(guest);
        self.hookd
            .wait_until(&format!("{name} gone"), TEARDOWN, |h| {
                h.guests().iter().all(|g| g["name"] != name)
            });
    }
}

/// Whether the daemon lists guest `name` with address `ip`.
fn listed_at(hookd: &Hookd, name: &str, ip: Ipv4Addr) -> bool {
    hookd
        .guests()
        .iter()
        .any(|g| g["name"] == name && ip_of(g) == Some(ip.to_string()))
}

/// An HTTP server in the outside namespace that answers every request with
/// `from-<client address>`: what masquerade made of the guest's address.
struct OutsideServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OutsideServer {
    fn start(ns: &NetNs, addr: SocketAddr) -> OutsideServer {
        let listener = ns.listen(&addr.to_string());
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(2)))
                            .unwrap();
                        let mut buf = [0; 1024];
                        let _ = stream.read(&mut buf);
                        let body = format!("from-{}", peer.ip());
                        let _ = write!(
                            stream,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        OutsideServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for OutsideServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What `guest`'s probe (`qnet.probe=`) of the outside's `port` came to.
fn probe(guest: &RunningGuest, port: u16) -> ProbeOutcome {
    guest
        .wait_for_probe_to(&format!("{OUTSIDE}:{port}"), LONG)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn ip_of(nic_owner: &serde_json::Value) -> Option<String> {
    nic_owner["nics"][0]["ip"].as_str().map(str::to_string)
}

#[test]
fn nat_guest_gets_sticky_address_name_masquerade_and_blocked_port() {
    let world = World::new("hkgnat");
    let mac = random_mac();
    let (guest, leased) = world.boot_leased(
        "guest-a",
        &mac,
        "qnlab",
        &[
            "qnet.resolve=guest-a.lab.qnet",
            &format!("qnet.probe={OUTSIDE}:8080,{OUTSIDE}:2525"),
            "qnet.probe_tries=2",
        ],
    );

    // The address is the daemon's sticky reservation for this MAC.
    let reserved = world
        .hookd
        .reservation("lab", &mac)
        .unwrap_or_else(|| panic!("no reservation for {mac}\n{}", world.hookd.log()));
    assert_eq!(leased.to_string(), reserved);
    let listed = world.guest_named("guest-a").expect("guest-a listed");
    assert_eq!(ip_of(&listed).as_deref(), Some(reserved.as_str()));
    assert_eq!(listed["nics"][0]["network"], "lab");
    assert_eq!(listed["nics"][0]["mac"], mac.as_str());

    // Its own name resolves to it through the network's dnsmasq.
    let resolved = guest
        .wait_for_resolve(LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resolved, Some(leased), "guest-a.lab.qnet");

    // Outbound through masquerade: the outside sees the uplink address.
    match probe(&guest, 8080) {
        ProbeOutcome::Reached { body } => assert_eq!(body, format!("from-{UPLINK}")),
        ProbeOutcome::Failed => panic!("guest could not reach the outside"),
    }
    // The blocked port is refused.
    assert_eq!(
        probe(&guest, 2525),
        ProbeOutcome::Failed,
        "tcp/2525 is blocked for network lab"
    );

    let status = world.hookd.qnetctl(&["status"]).unwrap();
    let lab = status["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "lab")
        .unwrap()
        .clone();
    assert_eq!(lab["up"], true);
    assert_eq!(lab["guests"], 1);
    assert!(lab["rx_bytes"].as_u64().unwrap() > 0, "{lab}");

    // kill -9 QEMU: its runtime state goes, its reservation stays.
    world.kill_and_wait_gone(guest, "guest-a");
    let dns_hosts = world.hookd.dns_hosts("lab");
    assert!(!dns_hosts.contains("guest-a"), "{dns_hosts}");
    assert_eq!(world.hookd.reservation("lab", &mac), Some(reserved.clone()));

    // Started again: the same address.
    let (_again, leased_again) = world.boot_leased("guest-a", &mac, "qnlab", &[]);
    assert_eq!(leased_again, leased, "the reservation is sticky");
}

#[test]
fn isolated_guest_cannot_reach_the_outside() {
    let world = World::new("hkgiso");
    let mac = random_mac();
    let (guest, leased) = world.boot_leased(
        "guest-i",
        &mac,
        "qniso",
        &[&format!("qnet.probe={OUTSIDE}:8080"), "qnet.probe_tries=2"],
    );
    assert_eq!(
        world.hookd.reservation("iso", &mac),
        Some(leased.to_string())
    );
    assert_eq!(
        probe(&guest, 8080),
        ProbeOutcome::Failed,
        "an isolated network must not reach the outside"
    );
}

#[test]
fn daemon_killed_and_restarted_rebuilds_exactly_and_readopts_guests() {
    let mut world = World::new("hkgrst");
    let mac = random_mac();
    let (guest, leased) = world.boot_leased("guest-r", &mac, "qnlab", &[]);
    world.hookd.wait_until("guest-r listed", TEARDOWN, |h| {
        h.guests().iter().any(|g| g["name"] == "guest-r")
    });
    let rules_before = world
        .hk
        .exec("nft", &["list", "table", "inet", "qnet"])
        .unwrap();
    let reservations_before = world.hookd.qnetctl(&["reserve", "list"]).unwrap();

    world.hookd.kill9();
    // Networking keeps working without the daemon.
    assert!(world.hk.link_names().contains(&"qnlab".to_string()));
    world.hookd.spawn();

    let rules_after = world
        .hk
        .exec("nft", &["list", "table", "inet", "qnet"])
        .unwrap();
    assert_eq!(
        sorted_lines(&rules_after),
        sorted_lines(&rules_before),
        "ruleset changed"
    );
    let tables = world.hk.exec("nft", &["list", "tables"]).unwrap();
    assert_eq!(tables.matches("inet qnet").count(), 1, "{tables}");
    assert_eq!(
        world.hookd.qnetctl(&["reserve", "list"]).unwrap(),
        reservations_before
    );

    // The client-mode QEMU reconnects by itself and is followed again.
    world.hookd.wait_until("guest-r re-adopted", LONG, |h| {
        listed_at(h, "guest-r", leased)
    });

    // Killing QEMU after the restart still tears down.
    world.kill_and_wait_gone(guest, "guest-r");
}

#[test]
fn killed_dnsmasq_is_restarted_and_still_serves_leases() {
    let world = World::new("hkgdns");
    let pid_file = world.hookd.run_dir().join("lab/dnsmasq.pid");
    let read_pid = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
    };
    let first = read_pid().expect("dnsmasq pid file");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    world.hookd.wait_until("dnsmasq restarted", TEARDOWN, |_| {
        matches!(read_pid(), Some(pid) if pid != first
            && std::path::Path::new(&format!("/proc/{pid}")).exists())
    });

    let mac = random_mac();
    let (_guest, leased) = world.boot_leased("guest-d", &mac, "qnlab", &[]);
    assert_eq!(
        world.hookd.reservation("lab", &mac),
        Some(leased.to_string())
    );
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
    lines.sort();
    lines
}

#[test]
fn guest_changing_its_mac_gets_a_reservation_for_the_new_one() {
    let world = World::new("hkgmac");
    let mac = random_mac();
    let new_mac = random_mac();
    let guest = world.boot(
        "guest-m",
        &mac,
        "qnlab",
        &[&format!("qnet.newmac={new_mac}")],
    );
    guest.wait_for_lease(LONG).unwrap_or_else(|e| panic!("{e}"));
    guest
        .wait_for_line("QNET-GUEST-NEWMAC", LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    // NIC_RX_FILTER_CHANGED → the daemon re-reads the NICs.
    world.hookd.wait_until("the new MAC followed", LONG, |h| {
        h.guests()
            .iter()
            .any(|g| g["name"] == "guest-m" && g["nics"][0]["mac"] == new_mac.as_str())
    });
    assert!(world.hookd.reservation("lab", &new_mac).is_some());
    // The old MAC keeps its sticky reservation.
    assert!(world.hookd.reservation("lab", &mac).is_some());
}

#[test]
fn guest_poweroff_tears_down_unless_qemu_runs_with_no_shutdown() {
    let world = World::new("hkgoff");
    // Without -no-shutdown QEMU exits: SHUTDOWN (or EOF) tears down.
    let plain = world.boot("guest-p", &random_mac(), "qnlab", &["qnet.poweroff=1"]);
    // With -no-shutdown QEMU stays (paused): the guest is kept.
    let kept = world.boot_with(
        "guest-k",
        &random_mac(),
        "qnlab",
        &["qnet.poweroff=1"],
        &["-no-shutdown"],
    );
    for guest in [&plain, &kept] {
        guest
            .wait_for_line("QNET-GUEST-POWEROFF", LONG)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    world.hookd.wait_until("guest-p gone", LONG, |h| {
        h.guests().iter().all(|g| g["name"] != "guest-p")
    });
    world
        .hookd
        .wait_until("guest-k's SHUTDOWN event seen", LONG, |h| {
            h.log().lines().any(|l| {
                l.contains("QMP event")
                    && l.contains("Shutdown")
                    && l.contains(&kept.pid().to_string())
            })
        });
    assert!(
        world.guest_named("guest-k").is_some(),
        "a -no-shutdown guest stays followed after SHUTDOWN"
    );
}

#[test]
fn qemu_with_its_own_qmp_server_is_attached_and_redialed_after_a_restart() {
    let mut world = World::new("hkgatt");
    let mac = random_mac();
    let qmp = world.hookd.dir().join("vm-att.qmp");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    // No -chardev to the daemon: this QEMU only listens.
    let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
    let spec = GuestSpec::new(&image, &mac, random_token());
    let serial = target_dir()
        .join("qnet-test-logs")
        .join(format!("{}-att.log", world.hk.name()));
    std::fs::create_dir_all(serial.parent().unwrap()).unwrap();
    let helper = workspace_binary("qnet-bridge-helper");
    let netdev = format!("bridge,id=n0,br=qnlab,helper={}", helper.display());
    let mut qemu = sandboxed("qemu-system-x86_64", &world.hk, &world.config, None);
    qemu.args(spec.qemu_args(&netdev, &serial))
        .args(["-name", "guest-att", "-qmp", &qmp_arg]);
    let guest = RunningGuest::spawn(qemu, &serial).unwrap_or_else(|e| panic!("{e}"));
    world
        .hookd
        .wait_until("QEMU's QMP socket", LONG, |_| qmp.exists());

    let reply = world
        .hookd
        .qnetctl(&["attach", "--qmp", qmp.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        reply["message"].as_str().unwrap().contains("guest-att"),
        "{reply}"
    );
    let leased = guest.wait_for_lease(LONG).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        world.hookd.reservation("lab", &mac),
        Some(leased.to_string())
    );

    // SIGTERM leaves the guest's networking alone...
    world.hookd.terminate();
    assert!(world.hk.link_names().contains(&"qnlab".to_string()));
    assert!(world.hookd.run_dir().join("lab/dnsmasq.pid").exists());
    // ... and the next start dials QEMU's socket again by itself.
    world.hookd.spawn();
    world.hookd.wait_until("guest-att re-attached", LONG, |h| {
        let connects = h
            .log()
            .lines()
            .filter(|l| l.contains("guest connected") && l.contains("guest-att"))
            .count();
        connects == 2 && listed_at(h, "guest-att", leased)
    });
    world.kill_and_wait_gone(guest, "guest-att");
}

#[test]
fn guests_are_stopped_by_root_or_their_owner_and_an_ignored_powerdown_escalates_to_quit() {
    let world = World::new("hkgstop");
    let owner = unused_user();
    let stranger = RunAs {
        uid: owner.uid + 1,
        gid: owner.gid + 1,
    };
    let owned = world.boot_as("guest-own", owner);
    let roots = world.boot("guest-root", &random_mac(), "qnlab", &[]);
    // The guest's kernel runs (and has no ACPI handler: no acpid).
    owned
        .wait_for_line(INIT_MARKER, LONG)
        .unwrap_or_else(|e| panic!("{e}"));
    world.hookd.wait_until("both guests followed", LONG, |h| {
        let guests = h.guests();
        ["guest-own", "guest-root"]
            .iter()
            .all(|name| guests.iter().any(|g| g["name"] == *name))
    });

    // Anyone else is refused, with one line.
    for args in [
        ["guest", "powerdown", "guest-own"],
        ["guest", "stop", "guest-own"],
        ["guest", "stop", "guest-root"],
    ] {
        let out = world.qnetctl_as(stranger, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("`guest-own` is not one of your running guests")
                || stderr.contains("`guest-root` is not one of your running guests"),
            "{args:?}: {stderr}"
        );
    }
    assert!(owned.exit_status().is_none() && roots.exit_status().is_none());

    // The owner powers theirs down: the button is ignored, so after the
    // grace QEMU is told to quit, and exits.
    let out = world.qnetctl_as(
        owner,
        &["--timeout", "2", "guest", "powerdown", "guest-own"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("did not power down within 2 s")
            && stdout.contains("QEMU was told to quit and exited"),
        "{stdout}"
    );
    qnet_tests::wait_until("the owner's QEMU to exit", TEARDOWN, || {
        owned.exit_status().is_some()
    });

    // Root stops any guest, at once.
    let reply = world
        .hookd
        .qnetctl(&["guest", "stop", "guest-root"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        reply["message"].as_str().unwrap().contains("QEMU quit"),
        "{reply}"
    );
    qnet_tests::wait_until("root's QEMU to exit", TEARDOWN, || {
        roots.exit_status().is_some()
    });
    world
        .hookd
        .wait_until("both guests gone", TEARDOWN, |h| h.guests().is_empty());
}
