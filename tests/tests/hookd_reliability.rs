//! qnet-hookd under hostile and unlucky conditions (issue 10): one
//! regression test per failure found by the reliability run. Peers are
//! written here in Rust (control requests as raw JSON lines, fake QEMUs
//! from the kit), with the real dnsmasq and nftables; the full disk is a
//! tmpfs of a few pages in a private mount namespace, the descriptor limit
//! a real `RLIMIT_NOFILE`, the attacker a throwaway unprivileged user.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qnet_tests::fake_guest::{FakeGuest, Flood};
use qnet_tests::hookd::{network, qnetctl_error, run_with_config, Hookd, Launch, LAB};
use qnet_tests::mountns::MountNs;
use qnet_tests::netns::NetNs;
use qnet_tests::procfs::ProcStatus;
use qnet_tests::sandbox::unused_user;
use qnet_tests::{require_root, workspace_binary};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// One raw request line on the control socket; the reply, parsed.
fn ctl(hookd: &Hookd, line: &str) -> Value {
    let reply = hookd.ctl_raw(format!("{line}\n").as_bytes());
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{line} → {reply:?}: {e}"))
}

fn error_of(reply: &Value) -> String {
    reply["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| panic!("expected an error, got {reply}"))
}

fn forward_add(guest: &str, from: u16, to: u16, guest_port: u32) -> String {
    format!(
        r#"{{"op":"forward-add","guest":"{guest}","proto":"tcp","host_ports":[{from},{to}],"guest_port":{guest_port}}}"#
    )
}

fn forwards(hookd: &Hookd) -> Vec<Value> {
    hookd.qnetctl(&["forward", "list"]).unwrap()["forwards"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A new namespace `tag` with a mount namespace of its own, and the daemon
/// with the lab network in them, its state directory a tmpfs of `size`.
fn on_tmpfs_state(tag: &str, size: &'static str) -> (NetNs, MountNs, Hookd) {
    let ns = NetNs::new(tag);
    let mount = MountNs::new(&ns);
    let launch = Launch {
        mount_ns: Some(&mount),
        state_tmpfs: Some(size),
        ..Launch::default()
    };
    let hookd = Hookd::start_with(&ns, Some(LAB), launch);
    (ns, mount, hookd)
}

/// The first host port of each forward.
fn forward_ports(hookd: &Hookd) -> Vec<u64> {
    forwards(hookd)
        .iter()
        .filter_map(|f| f["host_ports"][0].as_u64())
        .collect()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `tcp . PORT : ADDR . GPORT` elements of the `fwd4_any` map.
fn nft_forwards(ns: &NetNs) -> Vec<(u16, String)> {
    let text = ns
        .exec("nft", &["list", "map", "inet", "qnet", "fwd4_any"])
        .unwrap_or_default();
    let mut found = Vec::new();
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
        .filter(|w| !w.is_empty())
        .collect();
    for w in words.windows(5) {
        if (w[0] == "tcp" || w[0] == "udp") && w[1] == "." && w[3] == ":" {
            if let Ok(port) = w[2].parse() {
                found.push((port, w[4].to_string()));
            }
        }
    }
    found.sort();
    found
}

fn guest_ip(hookd: &Hookd, name: &str) -> Option<String> {
    hookd
        .guests()
        .iter()
        .find(|g| g["name"] == name)
        .and_then(|g| g["nics"][0]["ip"].as_str().map(str::to_string))
}

fn wait_guest(hookd: &Hookd, name: &str) -> String {
    hookd.wait_until(&format!("guest {name} with an address"), WAIT, |h| {
        guest_ip(h, name).is_some()
    });
    guest_ip(hookd, name).unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    ProcStatus::of(pid).number("VmRSS:")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Processes named `comm` in `ns`.
fn processes_in(ns: &NetNs, comm: &str) -> Vec<u32> {
    let pids = qnet_tests::netns::run("ip", &["netns", "pids", ns.name()]).unwrap_or_default();
    pids.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

// ----- 1, 2 and 12d: requests and saved records are validated -------------

#[test]
fn f01_an_overflowing_forward_is_refused_and_a_bad_saved_one_never_stops_a_start() {
    let (_ns, mut hookd) = Hookd::start_in_new_netns("rl01", Some(LAB));
    // The request that panicked the daemon after saving it.
    let reply = ctl(&hookd, &forward_add("web", 60000, 60010, 65530));
    let message = error_of(&reply);
    assert!(message.contains("65535"), "{message}");
    hookd
        .qnetctl(&["status"])
        .expect("the daemon still answers");
    let forwards_dir = hookd.dir().join("state/forwards");
    assert!(file_names(&forwards_dir).is_empty(), "nothing saved");

    // The same record written into the state directory (by an older
    // daemon, a restore, a hand), and one truncated file: the daemon
    // starts, sets both aside with a line each, and keeps the good one.
    hookd
        .qnetctl(&["forward", "add", "web", "tcp", "8080:80"])
        .unwrap();
    let good = file_names(&forwards_dir);
    assert_eq!(good.len(), 1, "{good:?}");
    let text = std::fs::read_to_string(forwards_dir.join(&good[0])).unwrap();
    let overflow = text
        .replace("[\n    8080,\n    8080\n  ]", "[60000, 60010]")
        .replace("[8080,8080]", "[60000,60010]")
        .replace("\"guest_port\": 80", "\"guest_port\": 65530")
        .replace("\"guest_port\":80", "\"guest_port\":65530");
    assert_ne!(overflow, text, "the test's edit of {text}");
    hookd.kill9();
    std::fs::write(
        forwards_dir.join("tcp-60000-0000000000000001.json"),
        &overflow,
    )
    .unwrap();
    std::fs::write(
        forwards_dir.join("tcp-7000-0000000000000002.json"),
        &text[..text.len() / 2],
    )
    .unwrap();
    hookd.spawn();
    let listed = forwards(&hookd);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["host_ports"][0], 8080);
    let names = file_names(&forwards_dir);
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".bad")).count(),
        2,
        "{names:?}"
    );
    let log = hookd.log();
    assert!(log.contains("tcp-60000-0000000000000001.json"), "{log}");
    assert!(log.contains("set aside"), "{log}");
}

#[test]
fn f02_reversed_and_zero_port_ranges_are_refused_on_the_wire_and_on_disk() {
    let (_ns, mut hookd) = Hookd::start_in_new_netns("rl02", Some(LAB));
    for (from, to, guest_port) in [(9000, 8000, 80), (0, 0, 80), (8000, 8000, 0)] {
        let reply = ctl(&hookd, &forward_add("web", from, to, guest_port));
        let message = error_of(&reply);
        assert!(
            message.contains("range") || message.contains("port"),
            "[{from},{to}]→{guest_port}: {message}"
        );
    }
    assert!(forwards(&hookd).is_empty());
    // Nothing blocks the range the reversed one named.
    hookd
        .qnetctl(&["forward", "add", "web", "tcp", "8000-8100:80"])
        .unwrap();
    let forwards_dir = hookd.dir().join("state/forwards");
    let good = file_names(&forwards_dir);
    let text = std::fs::read_to_string(forwards_dir.join(&good[0])).unwrap();
    let compact: Value = serde_json::from_str(&text).unwrap();
    let mut reversed = compact.clone();
    let ports = serde_json::json!([9100, 9000]);
    if reversed.get("host_ports").is_some() {
        reversed["host_ports"] = ports;
    } else {
        reversed["spec"]["host_ports"] = ports;
    }
    assert_ne!(reversed, compact, "the test's edit of {text}");
    hookd.kill9();
    std::fs::write(
        forwards_dir.join("tcp-9100-0000000000000003.json"),
        reversed.to_string(),
    )
    .unwrap();
    hookd.spawn();
    let listed = forwards(&hookd);
    assert_eq!(listed.len(), 1, "reversed range loaded: {listed:?}");
    assert!(forwards_dir
        .join("tcp-9100-0000000000000003.json.bad")
        .exists());
    // And it can be removed like any other.
    hookd.qnetctl(&["forward", "rm", "tcp", "8000"]).unwrap();
    assert!(forwards(&hookd).is_empty());
}

// ----- 3: a guest changing its MAC cannot exhaust the pool -----------------

#[test]
fn f03_a_guest_changing_its_mac_cannot_exhaust_the_pool() {
    require_root();
    let ns = NetNs::new("rl03");
    let config = format!("{LAB}\n[limits]\nauto-reservations-per-nic = 2\n");
    let hookd = Hookd::start(&ns, Some(&config));
    let mut g0 = FakeGuest::spawn(&ns, &hookd.qmp_socket(), "qnlab", "52:54:00:03:00:00", "g0");
    wait_guest(&hookd, "g0");
    for i in 1..=30u8 {
        let mac = format!("52:54:00:03:00:{i:02x}");
        g0.set_mac(&mac);
        hookd.wait_until(&format!("g0 on {mac}"), WAIT, |h| {
            h.guests()
                .iter()
                .any(|g| g["name"] == "g0" && g["nics"][0]["mac"] == mac.as_str())
        });
    }
    let count = |h: &Hookd| {
        h.qnetctl(&["reserve", "list", "lab"]).unwrap()["reservations"]
            .as_array()
            .map_or(0, Vec::len)
    };
    hookd.wait_until("g0's current MAC reserved", WAIT, |h| {
        h.reservation("lab", "52:54:00:03:00:1e").is_some()
    });
    assert!(count(&hookd) <= 2, "30 MAC changes took {}", count(&hookd));
    // Another guest still gets an address.
    let _g1 = FakeGuest::spawn(&ns, &hookd.qmp_socket(), "qnlab", "52:54:00:03:01:00", "g1");
    wait_guest(&hookd, "g1");
    assert!(count(&hookd) <= 3);
    assert!(
        hookd
            .log()
            .contains("the NIC holds too many automatic reservations"),
        "the eviction is logged"
    );
}

#[test]
fn f03_an_empty_pool_reclaims_only_old_automatic_reservations() {
    require_root();
    let ns = NetNs::new("rl03rc");
    let config = r#"
[[network]]
name = "lab"
bridge = "qnlab"
subnet = "10.79.0.0/24"
dhcp-range = ["10.79.0.10", "10.79.0.13"]

[limits]
reclaim-after-days = 1
"#;
    let mut hookd = Hookd::start(&ns, Some(config));
    hookd.kill9();
    // A full pool: one manual reservation and three automatic ones, two
    // unseen since 1970 and one seen now, in files of their own as
    // version 2 kept them (the daemon moves them into its journal).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let dir = hookd.dir().join("state/reservations/lab");
    std::fs::create_dir_all(&dir).unwrap();
    for (last, ip, explicit, last_seen) in [
        (0x10, "10.79.0.10", true, 1),
        (0x11, "10.79.0.11", false, 1),
        (0x12, "10.79.0.12", false, 2),
        (0x13, "10.79.0.13", false, now),
    ] {
        let record = serde_json::json!({"ip": ip, "explicit": explicit, "last_seen": last_seen});
        std::fs::write(
            dir.join(format!("52-54-00-03-0f-{last:02x}.json")),
            record.to_string(),
        )
        .unwrap();
    }
    hookd.spawn();
    let socket = hookd.qmp_socket();
    let _a = FakeGuest::spawn(&ns, &socket, "qnlab", "52:54:00:03:0e:01", "a");
    assert_eq!(
        wait_guest(&hookd, "a"),
        "10.79.0.11",
        "the oldest goes first"
    );
    let _b = FakeGuest::spawn(&ns, &socket, "qnlab", "52:54:00:03:0e:02", "b");
    assert_eq!(wait_guest(&hookd, "b"), "10.79.0.12");
    // Nothing else may go: the manual one, and the one seen recently.
    let _c = FakeGuest::spawn(&ns, &socket, "qnlab", "52:54:00:03:0e:03", "c");
    hookd.wait_until("the refusal logged", WAIT, |h| {
        h.log().contains("has no free address left")
    });
    assert_eq!(guest_ip(&hookd, "c"), None);
    assert_eq!(
        hookd.reservation("lab", "52:54:00:03:0f:10").as_deref(),
        Some("10.79.0.10")
    );
    assert_eq!(
        hookd.reservation("lab", "52:54:00:03:0f:13").as_deref(),
        Some("10.79.0.13")
    );
}

// ----- 4: a local user cannot exhaust the daemon's descriptors -------------

#[test]
fn f04_a_local_user_cannot_exhaust_the_daemons_descriptors() {
    require_root();
    let ns = NetNs::new("rl04");
    let nofile = 256;
    let hookd = Hookd::start_with(
        &ns,
        Some(LAB),
        Launch {
            nofile: Some(nofile),
            ..Launch::default()
        },
    );
    let pid = hookd.pid().unwrap();
    // qmp.sock is open to every local user (QEMUs run as anyone).
    std::fs::set_permissions(hookd.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let user = unused_user();
    // 40 processes of one user, 10 handshaking connections each: far more
    // than the 256 descriptors the daemon has.
    let floods: Vec<Flood> = (0..40)
        .map(|_| Flood::start(&hookd.qmp_socket(), 10, user.uid, user.gid))
        .collect();
    assert!(floods.iter().map(|f| f.opened).sum::<usize>() >= 100);
    std::thread::sleep(Duration::from_secs(2));
    let fds = fd_count(pid);
    assert!(fds < nofile as usize - 100, "{fds} descriptors in use");
    // qnetctl works, a root QEMU is followed, a change is saved.
    hookd.qnetctl(&["status"]).expect("qnetctl under attack");
    let _guest = FakeGuest::spawn(
        &ns,
        &hookd.qmp_socket(),
        "qnlab",
        "52:54:00:04:00:01",
        "victim",
    );
    wait_guest(&hookd, "victim");
    hookd
        .qnetctl(&["reserve", "add", "lab", "52:54:00:04:00:02"])
        .expect("a reservation is saved under attack");
    let listed_flood = hookd
        .guests()
        .iter()
        .filter(|g| g["name"].as_str().is_some_and(|n| n.starts_with("flood-")))
        .count();
    assert!(listed_flood <= 16, "{listed_flood} flood sessions followed");
    // Refused once per user, not once per connection.
    let refusals = hookd
        .log()
        .lines()
        .filter(|l| l.contains("refusing QMP connections"))
        .count();
    assert!((1..=3).contains(&refusals), "{refusals} refusal lines");
    drop(floods);
}

// ----- 5: kill -9 never publishes an unsaved reservation -------------------

#[test]
fn f05_kill_9_during_a_burst_never_changes_a_sticky_address() {
    let (ns, mut hookd) = Hookd::start_in_new_netns("rl05", Some(LAB));
    let mut rng = qnet_tests::netns::unique_suffix().len() as u64 ^ u64::from(std::process::id());
    let mut known: std::collections::BTreeMap<String, String> = Default::default();
    let mut guests = Vec::new();
    for round in 0..12u32 {
        // A burst of guests, and the daemon killed somewhere in it.
        for i in 0..4u32 {
            let mac = format!("52:54:00:05:{:02x}:{:02x}", round, i);
            guests.push(FakeGuest::spawn(
                &ns,
                &hookd.qmp_socket(),
                "qnlab",
                &mac,
                &format!("b{round}-{i}"),
            ));
        }
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(rng >> 58));
        hookd.kill9();
        // Persist, then publish: every MAC dnsmasq was told about is in
        // the network's journal.
        let saved = hookd.saved_reservations("lab");
        for line in hookd.dhcp_hosts("lab").lines() {
            let mac = line.split(',').next().unwrap();
            assert!(
                saved.contains_key(mac),
                "round {round}: {mac} in dhcp-hosts but not saved"
            );
        }
        hookd.spawn();
        for r in hookd.qnetctl(&["reserve", "list", "lab"]).unwrap()["reservations"]
            .as_array()
            .unwrap()
        {
            let (mac, ip) = (r["mac"].as_str().unwrap(), r["ip"].as_str().unwrap());
            if let Some(before) = known.insert(mac.to_string(), ip.to_string()) {
                assert_eq!(before, ip, "round {round}: {mac} moved");
            }
        }
    }
    assert!(known.len() >= 12, "{known:?}");
}

// ----- 6: a full or read-only state directory ------------------------------

#[test]
fn f06_a_full_state_dir_never_loses_an_acknowledged_change() {
    let (_ns, mount, mut hookd) = on_tmpfs_state("rl06", "64k");
    let state = mount.host_path(&hookd.dir().join("state"));
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for port in 20000..20040u16 {
        match hookd.qnetctl(&["forward", "add", "web", "tcp", &format!("{port}:80")]) {
            Ok(_) => acknowledged.push(port),
            Err(e) => {
                assert!(e.contains("No space left"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the 64 KiB disk never filled");
    let mut reserved = Vec::new();
    for i in 0..10u8 {
        let mac = format!("52:54:00:06:00:{i:02x}");
        if hookd.qnetctl(&["reserve", "add", "lab", &mac]).is_ok() {
            reserved.push(mac);
        }
    }
    let leftovers: Vec<String> = file_names(&state.join("forwards"))
        .into_iter()
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let before_restart = forward_ports(&hookd);
    hookd.kill9();
    hookd.spawn();
    let mut after = forward_ports(&hookd);
    after.sort();
    let expected: Vec<u64> = acknowledged.iter().map(|p| u64::from(*p)).collect();
    assert_eq!(after, expected, "acknowledged forwards after a restart");
    assert_eq!(
        before_restart.len(),
        expected.len(),
        "rolled back in memory"
    );
    for mac in &reserved {
        assert!(hookd.reservation("lab", mac).is_some(), "{mac} lost");
    }
}

#[test]
fn f06_a_read_only_state_dir_refuses_changes_and_keeps_what_it_has() {
    let (_ns, mount, mut hookd) = on_tmpfs_state("rl06ro", "256k");
    hookd
        .qnetctl(&["forward", "add", "web", "tcp", "8080:80"])
        .unwrap();
    // forwards/ read-only (the state directory's lease file stays
    // writable for dnsmasq).
    let state = hookd.dir().join("state/forwards");
    mount.set_read_only(&state, true);
    let err = hookd
        .qnetctl(&["forward", "add", "web", "tcp", "8181:80"])
        .unwrap_err();
    assert!(err.contains("Read-only"), "{err}");
    let err = hookd
        .qnetctl(&["forward", "rm", "tcp", "8080"])
        .unwrap_err();
    assert!(err.contains("Read-only"), "{err}");
    assert_eq!(forward_ports(&hookd), [8080], "rolled back");
    hookd.kill9();
    mount.set_read_only(&state, false);
    hookd.spawn();
    assert_eq!(forward_ports(&hookd), [8080], "after a restart");
}

#[test]
fn f06_status_says_degraded_while_dnsmasq_keeps_failing() {
    let (_ns, mut hookd) = Hookd::start_in_new_netns("rl06dg", Some(LAB));
    let status = hookd.qnetctl(&["status"]).unwrap();
    assert!(status["networks"][0].get("degraded").is_none(), "{status}");
    hookd.terminate();
    // dnsmasq cannot open its lease file (root ignores modes: a directory
    // in its place fails for anyone).
    let leases = hookd.dir().join("state/lab.leases");
    let _ = std::fs::remove_file(&leases);
    std::fs::create_dir_all(&leases).unwrap();
    hookd.spawn();
    hookd.wait_until("status degraded", WAIT, |h| {
        h.qnetctl(&["status"]).unwrap()["networks"][0]["degraded"]
            .as_str()
            .is_some_and(|d| d.contains("dnsmasq exited"))
    });
    let out = Command::new(workspace_binary("qnetctl"))
        .arg("--socket")
        .arg(hookd.ctl_socket())
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("degraded"), "{text}");
}

// ----- 7, 8: configs that name fewer networks -----------------------------

#[test]
fn f07_an_empty_config_never_tears_down_running_networks() {
    let (ns, mut hookd) = Hookd::start_in_new_netns("rl07", Some(LAB));
    hookd.terminate();
    let config = hookd.dir().join("hookd.toml");
    std::fs::write(&config, "").unwrap();
    let out = hookd.command().output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to tear them down"), "{stderr}");
    assert!(stderr.contains("lab"), "{stderr}");
    assert!(ns.link_names().contains(&"qnlab".to_string()));
    // Said explicitly, it is done.
    std::fs::write(&config, "default-network = true\n").unwrap();
    hookd.spawn();
    let status = hookd.qnetctl(&["status"]).unwrap();
    let names: Vec<&str> = status["networks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["qnet0"]);
    assert!(!ns.link_names().contains(&"qnlab".to_string()));
}

#[test]
fn f08_removing_a_network_from_the_config_stops_its_dnsmasq_and_run_dir() {
    let two = LAB.to_string() + &network("lab2", "qnlab2", &[r#"subnet = "10.78.0.0/24""#]);
    let (ns, mut hookd) = Hookd::start_in_new_netns("rl08", Some(&two));
    let pid_file = hookd.run_dir().join("lab2/dnsmasq.pid");
    hookd.wait_until("lab2's dnsmasq", WAIT, |_| pid_file.exists());
    let old: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // A crash leaves both dnsmasqs running; the admin then removes lab2.
    hookd.kill9();
    std::fs::write(hookd.dir().join("hookd.toml"), LAB).unwrap();
    hookd.spawn();
    hookd.wait_until("lab2's dnsmasq gone", WAIT, |_| {
        !Path::new(&format!("/proc/{old}")).exists()
    });
    assert!(!hookd.run_dir().join("lab2").exists(), "run dir left");
    hookd.wait_until("one dnsmasq", WAIT, |_| {
        processes_in(&ns, "dnsmasq").len() == 1
    });
}

// ----- 9: config and run-time forwards on one port -------------------------

#[test]
fn f09_a_config_forward_wins_over_a_saved_one_and_unrelated_ones_stay() {
    let (ns, mut hookd) = Hookd::start_in_new_netns("rl09", Some(LAB));
    let socket = hookd.qmp_socket();
    let _g0 = FakeGuest::spawn(&ns, &socket, "qnlab", "52:54:00:09:00:00", "g0");
    let _g1 = FakeGuest::spawn(&ns, &socket, "qnlab", "52:54:00:09:00:01", "g1");
    let ip0 = wait_guest(&hookd, "g0");
    let ip1 = wait_guest(&hookd, "g1");
    hookd
        .qnetctl(&["forward", "add", "g0", "tcp", "9090:80"])
        .unwrap();
    hookd
        .qnetctl(&["forward", "add", "g1", "tcp", "9191:80"])
        .unwrap();
    assert_eq!(
        nft_forwards(&ns),
        [(9090, ip0.clone()), (9191, ip1.clone())]
    );
    hookd.kill9();
    let config =
        format!("{LAB}\n[[forward]]\nguest = \"g1\"\nproto = \"tcp\"\nports = \"9090:80\"\n");
    std::fs::write(hookd.dir().join("hookd.toml"), config).unwrap();
    hookd.spawn();
    hookd.wait_until("both guests followed again", WAIT, |h| {
        guest_ip(h, "g0").is_some() && guest_ip(h, "g1").is_some()
    });
    hookd.wait_until("forwards installed", WAIT, |_| nft_forwards(&ns).len() == 2);
    assert_eq!(
        nft_forwards(&ns),
        [(9090, ip1.clone()), (9191, ip1.clone())],
        "config wins; the unrelated forward stays"
    );
    assert!(hookd.log().contains("clashes with the forward"));
    // forward list shows what is installed.
    for f in forwards(&hookd) {
        let port = f["host_ports"][0].as_u64().unwrap() as u16;
        let installed = nft_forwards(&ns)
            .into_iter()
            .find(|(p, _)| *p == port)
            .map(|(_, a)| a);
        match f["inactive"].as_str() {
            None => assert_eq!(
                installed.as_deref(),
                f["guest_addr"].as_str(),
                "listed active: {f}"
            ),
            Some(_) => assert!(
                f["origin"] != "config" || installed.is_none(),
                "listed inactive but installed: {f}"
            ),
        }
    }
}

// ----- 10: names and clients that never read -------------------------------

#[test]
fn f10_a_huge_guest_name_and_clients_that_never_read_hold_no_memory() {
    let (ns, hookd) = Hookd::start_in_new_netns("rl10", Some(LAB));
    let pid = hookd.pid().unwrap();
    let before = rss_kib(pid);
    let _g = FakeGuest::spawn(
        &ns,
        &hookd.qmp_socket(),
        "qnlab",
        "52:54:00:10:00:00",
        "@3000000",
    );
    hookd.wait_until("the guest", WAIT, |h| h.guests().len() == 1);
    let name = hookd.guests()[0]["name"].as_str().unwrap().to_string();
    assert!(name.len() <= 255, "a name of {} bytes kept", name.len());
    // 50 clients ask for the guest list and never read the reply.
    let silent: Vec<UnixStream> = (0..50)
        .map(|_| {
            let mut s = UnixStream::connect(hookd.ctl_socket()).unwrap();
            s.write_all(b"{\"op\":\"guests\"}\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    hookd.qnetctl(&["guests"]).expect("others are served");
    let after = rss_kib(pid);
    assert!(after < before + 32 * 1024, "RSS {before} → {after} KiB");
    drop(silent);
}

// ----- 11: temp files of a crash --------------------------------------------

#[test]
fn f11_temp_files_left_by_kill_9_are_removed_at_start() {
    let (_ns, mut hookd) = Hookd::start_in_new_netns("rl11", Some(LAB));
    hookd
        .qnetctl(&["reserve", "add", "lab", "52:54:00:11:00:01"])
        .unwrap();
    hookd
        .qnetctl(&["forward", "add", "web", "tcp", "8080:80"])
        .unwrap();
    hookd.kill9();
    let state = hookd.dir().join("state");
    let planted: Vec<PathBuf> = vec![
        state.join(".state.json.tmp.4242"),
        state.join("reservations/.lab.jsonl.tmp.4242"),
        state.join("forwards/.tcp-9-00.json.tmp.77"),
        hookd.run_dir().join("guests/.1.json.tmp.8"),
    ];
    for path in &planted {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"{\"half").unwrap();
    }
    hookd.spawn();
    for path in &planted {
        assert!(!path.exists(), "{} left", path.display());
    }
    assert!(hookd.log().contains("temp file(s) of interrupted writes"));
    assert!(hookd.reservation("lab", "52:54:00:11:00:01").is_some());
}

/// A daemon before the run directory kept its guests' records in
/// `STATE/guests/`: the next start moves them to `RUN/guests/` and still
/// follows their guests.
#[test]
fn f11_an_older_daemons_guest_records_move_to_the_run_dir() {
    let (_ns, mut hookd) = Hookd::start_in_new_netns("rl11g", Some(LAB));
    hookd.kill9();
    // This test's process stands for a running QEMU the older daemon
    // recorded (pid and start time are what make it the same process).
    let me = std::process::id();
    let started = qnet_hostnet::owner::start_time(me).unwrap();
    let record = serde_json::json!({"pid": me, "start_time": started, "uid": 0,
        "name": "older", "uuid": null, "qmp_server": null, "nics": []});
    let old = hookd.dir().join("state/guests");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join(format!("{me}.json")), record.to_string()).unwrap();
    hookd.spawn();
    let followed = hookd.guests();
    assert!(
        followed
            .iter()
            .any(|g| g["pid"].as_u64() == Some(u64::from(me))),
        "{followed:?}"
    );
    assert!(hookd.run_dir().join(format!("guests/{me}.json")).is_file());
    assert!(!old.exists(), "{} left", old.display());
    assert!(
        hookd.log().contains("moved 1 guest record(s)"),
        "{}",
        hookd.log()
    );
}

// ----- 12: the smaller ones --------------------------------------------------

#[test]
fn f12_a_qnetctl_timeout_says_the_daemon_did_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ctl.sock");
    // A "daemon" that accepts and never answers.
    let listener = UnixListener::bind(&socket).unwrap();
    let holder = std::thread::spawn(move || {
        let conn = listener.accept();
        std::thread::sleep(Duration::from_secs(3));
        drop(conn);
    });
    let stderr = qnetctl_error(&socket, &["--timeout", "1", "status"]);
    assert!(stderr.contains("did not answer within 1 s"), "{stderr}");
    assert!(!stderr.contains("os error"), "{stderr}");
    holder.join().unwrap();
}

#[test]
fn f12_overlapping_subnets_are_reported_at_their_line() {
    let ns = NetNs::new("rl12ov");
    let text = LAB.to_string() + &network("lab2", "qnlab2", &[r#"subnet = "10.77.0.128/25""#]);
    let out = run_with_config(&ns, &text);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains(":0:"), "{stderr}");
    // `[[network]]` of lab2 is on line 7.
    assert!(stderr.contains("hookd.toml:7:"), "{stderr}");
    assert!(stderr.contains("overlap"), "{stderr}");
}

#[test]
fn f12_hostile_qmp_connections_are_logged_at_a_bounded_rate() {
    let (_ns, hookd) = Hookd::start_in_new_netns("rl12rl", Some(LAB));
    for _ in 0..300 {
        let mut s = UnixStream::connect(hookd.qmp_socket()).unwrap();
        let _ = s.write_all(b"garbage\n");
    }
    hookd.wait_until("the last one handled", WAIT, |h| {
        h.log().contains("suppressed") || h.log().matches("QMP").count() >= 20
    });
    std::thread::sleep(Duration::from_secs(1));
    let warnings = hookd
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("QMP"))
        .count();
    assert!(
        (1..=25).contains(&warnings),
        "{warnings} warning lines for 300 hostile peers"
    );
    hookd.qnetctl(&["status"]).unwrap();
}
