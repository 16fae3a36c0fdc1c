//! LAN mode (`mode = "bridged"`, the "shared physical interface") end to
//! end: the daemon's bridge takes over the host's uplink while the host
//! keeps talking to the LAN, a real guest on the bridge leases from the
//! LAN's own DHCP server and is reachable from the LAN, and the uplink gets
//! exactly what it had back: after `network down`, after the network's
//! removal from the config, and after kill -9 of the daemon at every step
//! of the switch-over.
//!
//! Two namespaces: "host" runs the daemon; its `eth0` (a veth) leads to
//! "upstream", the LAN, which runs its own dnsmasq as the LAN's DHCP
//! server. The host has IPv4 and IPv6 addresses on `eth0`, a default route
//! for each and a route in another table: all of it must move and come
//! back. Nothing touches the host's own namespace.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qnet_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use qnet_tests::guest::{
    check_prerequisites, guest_image, random_mac, random_token, GuestSpec, LONG,
};
use qnet_tests::hookd::{network, Hookd, Launch};
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::ConfigDir;
use qnet_tests::{require_programs, wait_until};
use serde_json::Value;

const SHORT: Duration = Duration::from_secs(30);

const HOST: &str = "192.168.77.10";
const UPSTREAM: &str = "192.168.77.1";
const BRIDGE: &str = "qnlan";

/// The LAN network: [`BRIDGE`] takes `eth0` over.
fn hookd_toml() -> String {
    network(
        "lan",
        BRIDGE,
        &[r#"mode = "bridged""#, r#"uplink = "eth0""#],
    )
}

/// The network removed from the file (on purpose: `default-network`).
const NO_NETWORK: &str = "default-network = false\n";

/// The pause hook of debug builds (see hookd's `lan` module).
const PAUSE: &str = "QNET_TEST_LAN_PAUSE_AT";

struct World {
    dnsmasq: Dnsmasq,
    _logs: tempfile::TempDir,
    host: NetNs,
    upstream: NetNs,
}

impl World {
    fn new(tag: &str) -> World {
        require_programs(&["ip", "busybox", "dnsmasq", "nft"]);
        let host = NetNs::new(&format!("{tag}-host"));
        let upstream = NetNs::new(&format!("{tag}-up"));
        host.add_veth_to(
            "eth0",
            Some(&format!("{HOST}/24")),
            &upstream,
            "lan0",
            Some(&format!("{UPSTREAM}/24")),
        );
        host.ip(&["-6", "addr", "add", "fd77::10/64", "dev", "eth0", "nodad"]);
        upstream.ip(&["-6", "addr", "add", "fd77::1/64", "dev", "lan0", "nodad"]);
        host.ip(&["route", "add", "default", "via", UPSTREAM, "metric", "100"]);
        host.ip(&[
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            UPSTREAM,
            "table",
            "100",
        ]);
        host.ip(&[
            "-6", "route", "add", "default", "via", "fd77::1", "metric", "1024",
        ]);
        // The link-local address the kernel gives eth0 is part of what
        // must come back: compare only once its DAD is over.
        wait_until("eth0's addresses past DAD", SHORT, || {
            !host
                .ip(&["addr", "show", "dev", "eth0"])
                .contains("tentative")
        });
        let logs = tempfile::tempdir().unwrap();
        let dhcp = DnsmasqConfig::new(
            upstream.name(),
            "lan0",
            Ipv4Addr::new(192, 168, 77, 100),
            Ipv4Addr::new(192, 168, 77, 150),
            logs.path().join("lan-dnsmasq.log"),
        );
        let dnsmasq = Dnsmasq::start(&dhcp).unwrap_or_else(|e| panic!("{e}"));
        World {
            dnsmasq,
            _logs: logs,
            host,
            upstream,
        }
    }

    /// Everything the uplink has that the switch-over changes: its link
    /// (MAC, MTU, state, master), addresses and the routes through it, in
    /// every table (the kernel's own included), as `ip -j` prints them.
    fn uplink(&self) -> Vec<String> {
        let link = &self.host.ip_json(&["link", "show", "eth0"])[0];
        let mut view = vec![format!(
            "link {} mtu {} flags {} master {}",
            link["address"], link["mtu"], link["flags"], link["master"]
        )];
        for info in self.host.ip_json(&["addr", "show", "dev", "eth0"])[0]["addr_info"]
            .as_array()
            .unwrap()
        {
            view.push(format!("addr {info}"));
        }
        for family in ["-4", "-6"] {
            for route in self
                .host
                .ip_json(&[family, "route", "show", "table", "all"])
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["dev"] == "eth0")
            {
                view.push(format!("route {route}"));
            }
        }
        view.sort();
        view
    }

    /// The bridge holds what the uplink had, and the uplink is its port.
    fn assert_switched(&self, hookd: &Hookd) {
        let eth0 = &self.host.ip_json(&["link", "show", "eth0"])[0];
        assert_eq!(eth0["master"], BRIDGE, "{eth0}\n{}", hookd.log());
        let addrs = self.host.ip(&["-o", "addr", "show", "dev", BRIDGE]);
        for want in [format!("{HOST}/24"), "fd77::10/64".into()] {
            assert!(addrs.contains(&want), "{want} not on {BRIDGE}: {addrs}");
        }
        let on_eth0 = self.host.ip(&["-o", "addr", "show", "dev", "eth0"]);
        assert!(!on_eth0.contains(HOST), "eth0 kept {HOST}: {on_eth0}");
        for (family, table, want) in [
            ("-4", "main", "default via 192.168.77.1 dev qnlan"),
            ("-4", "100", "198.51.100.0/24 via 192.168.77.1 dev qnlan"),
            ("-6", "main", "default via fd77::1 dev qnlan"),
        ] {
            let routes = self.host.ip(&[family, "route", "show", "table", table]);
            assert!(
                routes.contains(want),
                "no `{want}` in table {table}:\n{routes}"
            );
        }
        assert_eq!(
            self.host.ip_json(&["link", "show", BRIDGE])[0]["address"],
            eth0["address"],
            "the bridge has the uplink's MAC"
        );
    }

    /// One ping from the host to the LAN gets its answer.
    fn assert_online(&self) {
        self.host
            .exec_ok(&["busybox", "ping", "-c", "1", "-W", "5", UPSTREAM]);
        self.host
            .exec_ok(&["busybox", "ping", "-6", "-c", "1", "-W", "5", "fd77::1"]);
    }

    fn bridge_exists(&self) -> bool {
        self.bridge_exists_named(BRIDGE)
    }

    fn bridge_exists_named(&self, name: &str) -> bool {
        self.host.link_names().iter().any(|n| n == name)
    }
}

/// `busybox ping -i 0.05` from the host to the LAN; a thread collects the
/// sequence numbers of its replies as they come.
struct PingLoop {
    child: Child,
    seqs: Arc<Mutex<Vec<u64>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl PingLoop {
    fn start(ns: &NetNs) -> PingLoop {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "busybox",
                "ping",
                "-i",
                "0.05",
                UPSTREAM,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ping");
        let out = child.stdout.take().unwrap();
        let seqs = Arc::new(Mutex::new(Vec::new()));
        let collected = seqs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let seq = line
                    .split(" seq=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|n| n.parse().ok());
                if let Some(seq) = seq {
                    collected.lock().unwrap().push(seq);
                }
            }
        });
        PingLoop {
            child,
            seqs,
            reader: Some(reader),
        }
    }

    fn replies(&self) -> usize {
        self.seqs.lock().unwrap().len()
    }

    /// Stops it and returns the sequence numbers of the replies.
    fn stop(mut self) -> Vec<u64> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let seqs = self.seqs.lock().unwrap().clone();
        seqs
    }
}

impl Drop for PingLoop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The longest run of lost replies: the largest gap between the sequence
/// numbers of two consecutive replies, less one.
fn longest_loss(seqs: &[u64]) -> u64 {
    seqs.windows(2)
        .map(|w| w[1].saturating_sub(w[0]).saturating_sub(1))
        .max()
        .unwrap_or(0)
}

/// The status entry of network `lan`.
fn lan_status(hookd: &Hookd) -> Value {
    let status = hookd.qnetctl(&["status"]).unwrap();
    status["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "lan")
        .cloned()
        .unwrap_or_else(|| panic!("no network lan in {status}"))
}

/// The whole life of a LAN network with the daemon running throughout.
///
/// Connectivity across the switch-over is judged by ping's sequence
/// numbers, never by time: a reply lost shows as a gap however slow the
/// machine is. The switch-over is ordered so that no state in between
/// drops anything (see hookd's `lan::plan`), so a gap of more than 3
/// replies in a row (150 ms of pings) would be a real outage, not noise;
/// 3 leaves room for the odd packet a loaded veth drops anyway.
#[test]
fn lan_network_takes_the_uplink_over_keeps_the_host_online_and_gives_it_back() {
    check_prerequisites().unwrap_or_else(|e| panic!("{e}"));
    let world = World::new("lan");
    let original = world.uplink();
    world.assert_online();

    // Replies before the switch-over, through it, and 20 after it.
    let ping = PingLoop::start(&world.host);
    wait_until("replies before the switch-over", SHORT, || {
        ping.replies() >= 5
    });
    let mut hookd = Hookd::start(&world.host, Some(&hookd_toml()));
    world.assert_switched(&hookd);
    let switched = ping.replies();
    wait_until("replies after the switch-over", SHORT, || {
        ping.replies() >= switched + 20
    });
    let seqs = ping.stop();
    eprintln!(
        "ping across the switch-over: {} replies, seq {:?}..{:?}, longest loss {}",
        seqs.len(),
        seqs.first(),
        seqs.last(),
        longest_loss(&seqs)
    );
    assert!(
        longest_loss(&seqs) <= 3,
        "the host lost {} replies in a row during the switch-over: {seqs:?}\n{}",
        longest_loss(&seqs),
        hookd.log()
    );
    world.assert_online();

    let status = lan_status(&hookd);
    assert_eq!(status["mode"], "bridged");
    assert_eq!(status["subnet"], "LAN of eth0");
    assert_eq!(status["up"], true);

    // A real guest leases from the LAN's dnsmasq and is reachable there.
    let config = ConfigDir::new();
    config.write("bridge.conf", &format!("allow {BRIDGE}\n"));
    let mac = random_mac();
    let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
    let spec = GuestSpec::new(&image, &mac, random_token());
    let guest = hookd.spawn_guest(&world.host, &config, "lan-guest", &spec, BRIDGE, &[]);
    let leased = guest.wait_for_lease(LONG).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        (100..=150).contains(&leased.octets()[3]) && leased.octets()[..3] == [192, 168, 77],
        "{leased} is not from the LAN's DHCP range"
    );
    let dhcp_log = world.dnsmasq.log();
    assert!(
        dhcp_log.contains(&format!("DHCPACK(lan0) {leased} {mac}")),
        "the LAN's dnsmasq did not lease {leased} to {mac}:\n{dhcp_log}"
    );
    world.upstream.exec_ok(&[
        "busybox",
        "ping",
        "-c",
        "1",
        "-W",
        "10",
        &leased.to_string(),
    ]);
    assert!(
        !hookd.run_dir().join("lan").exists(),
        "qnet ran something for the LAN network"
    );
    hookd.wait_until("the guest on network lan", LONG, |h| {
        lan_status(h)["guests"] == 1
    });

    // Forwards and reservations do not apply.
    let err = hookd
        .qnetctl(&[
            "forward",
            "add",
            "lan-guest",
            "tcp",
            "8080:80",
            "--network",
            "lan",
        ])
        .unwrap_err();
    assert!(err.contains("bridged network"), "{err}");
    let err = hookd.qnetctl(&["reserve", "add", "lan", &mac]).unwrap_err();
    assert!(err.contains("bridged network"), "{err}");
    // qnet's table holds nothing for it.
    let table = world
        .host
        .exec_output(&["nft", "list", "table", "inet", "qnet"]);
    let listing = String::from_utf8_lossy(&table.stdout);
    assert!(!listing.contains(BRIDGE), "{listing}");
    drop(guest);

    // A restart adopts the switch-over without touching it.
    let bridge_index = world.host.ip_json(&["link", "show", BRIDGE])[0]["ifindex"].clone();
    hookd.kill9();
    hookd.spawn();
    assert_eq!(
        world.host.ip_json(&["link", "show", BRIDGE])[0]["ifindex"],
        bridge_index,
        "the bridge was made anew on restart"
    );
    world.assert_switched(&hookd);

    hookd.qnetctl(&["network", "down", "lan"]).unwrap();
    assert!(!world.bridge_exists());
    assert_eq!(world.uplink(), original, "after network down");
    world.assert_online();

    hookd.qnetctl(&["network", "up", "lan"]).unwrap();
    world.assert_switched(&hookd);
    hookd.terminate();
    hookd.write_config(NO_NETWORK);
    hookd.spawn();
    assert!(!world.bridge_exists());
    assert_eq!(world.uplink(), original, "after removal from the config");
    world.assert_online();

    // The same at run time: `network create` takes over, `delete` gives back.
    let created = hookd
        .qnetctl(&[
            "network", "create", "lan", "--mode", "bridged", "--uplink", "eth0",
        ])
        .unwrap_or_else(|e| panic!("{e}\n{}", hookd.log()))
        .to_string();
    // Told and shown without addresses of its own: it has none.
    assert!(
        created.contains("on the LAN of eth0") && !created.contains("0.0.0.0"),
        "{created}"
    );
    let shown = hookd.qnetctl(&["network", "show", "lan"]).unwrap();
    let keys: Vec<&str> = (shown["network"]["settings"].as_array().unwrap().iter())
        .filter_map(|s| s["key"].as_str())
        .collect();
    assert_eq!(
        keys,
        ["name", "bridge", "mode", "uplink", "firewall-integration"],
        "{shown}"
    );
    let bridge = world.host.ip_json(&["link", "show", "eth0"])[0]["master"].clone();
    assert!(world.bridge_exists_named(bridge.as_str().unwrap_or_default()));
    world.assert_online();
    // Edited to nat: the uplink is given back and, as `network create`
    // would, the network gets a free subnet of its own.
    hookd
        .qnetctl(&["network", "edit", "lan", "--mode", "nat"])
        .unwrap_or_else(|e| panic!("{e}\n{}", hookd.log()));
    assert_eq!(world.uplink(), original, "after network edit to nat");
    let status = lan_status(&hookd);
    assert_eq!(status["mode"], "nat", "{status}");
    let subnet = status["subnet"].as_str().unwrap_or_default();
    let (network, prefix) = subnet.split_once('/').unwrap_or_default();
    assert!(
        network.parse::<std::net::Ipv4Addr>().is_ok() && prefix == "24",
        "not a /24: {status}"
    );
    world.assert_online();
    hookd.qnetctl(&["network", "delete", "lan"]).unwrap();
    assert_eq!(world.uplink(), original, "after network delete");
    world.assert_online();
}

/// kill -9 of the daemon before each step of the switch-over (and after
/// the last, before it is marked complete): the debug-build hook stops
/// the daemon there for good, the test kills it, and a restart either
/// finishes the switch-over (the network still configured) or gives the
/// uplink back exactly (the network removed), alternately.
#[test]
fn lan_switch_over_killed_at_every_step_is_completed_or_restored() {
    let world = World::new("lank9");
    let original = world.uplink();
    let mut hookd = Hookd::prepare(&world.host, Some(&hookd_toml()), Launch::default());
    let mut step = 0;
    let mut steps = None;
    while steps.is_none_or(|total| step <= total) {
        hookd.write_config(&hookd_toml());
        hookd.set_env(&[(PAUSE, &step.to_string())]);
        hookd.spawn_nowait();
        let marker = format!("LAN test pause before step {step} of ");
        hookd.wait_until(&format!("the pause before step {step}"), LONG, |h| {
            h.log().contains(&marker)
        });
        let log = hookd.log();
        let total: usize = log
            .split(&marker)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("the pause line names the number of steps");
        steps = Some(total);
        hookd.kill9();

        hookd.set_env(&[]);
        if step % 2 == 1 {
            hookd.spawn();
            world.assert_switched(&hookd);
            world.assert_online();
            hookd.terminate();
        }
        hookd.write_config(NO_NETWORK);
        hookd.spawn();
        assert_eq!(
            world.uplink(),
            original,
            "after kill -9 before step {step} of {total}\n{}",
            hookd.log()
        );
        assert!(!world.bridge_exists(), "step {step}");
        world.assert_online();
        hookd.terminate();
        step += 1;
    }
    assert!(step > 8, "only {step} steps were tried");
}

/// A step of the switch-over that fails (the debug-build hook fails each
/// in turn) undoes the steps before it: the uplink is exactly as it was,
/// the bridge and the record are gone, and the daemon says why it cannot
/// bring the network up.
#[test]
fn lan_switch_over_failing_at_any_step_is_rolled_back() {
    let world = World::new("lanfail");
    let original = world.uplink();
    let mut hookd = Hookd::prepare(&world.host, Some(&hookd_toml()), Launch::default());
    let record = hookd.dir().join("state/lan/lan.json");
    let mut step = 0;
    let mut steps = None;
    while steps.is_none_or(|total| step < total) {
        hookd.set_env(&[("QNET_TEST_LAN_FAIL_AT", &step.to_string())]);
        hookd.spawn_nowait();
        let status = hookd.wait_exit(LONG).unwrap_or_else(|| {
            panic!("the daemon ran on with step {step} failed\n{}", hookd.log())
        });
        let log = hookd.log();
        let marker = format!("step {step} of ");
        let total: usize = log
            .split(&marker)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("step {step} did not fail:\n{log}"));
        steps = Some(total);
        assert!(!status.success(), "step {step}: {status}");
        assert_eq!(world.uplink(), original, "after step {step} failed\n{log}");
        assert!(!world.bridge_exists(), "step {step}");
        assert!(!record.exists(), "step {step}: the record stayed");
        world.assert_online();
        step += 1;
    }
    assert!(step > 8, "only {step} steps were tried");
}
