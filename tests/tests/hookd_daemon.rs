//! qnet-hookd without guests: the default network, bad configs, the
//! control protocol and its authorisation, hostile QMP peers, network
//! down/up, reservations across restarts, orphaned macvtaps. Each test runs
//! the daemon in a namespace of its own.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qnet_tests::hookd::{qnetctl_error, run_with_config, Hookd, LAB};
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::unused_user;
use qnet_tests::workspace_binary;

const WAIT: Duration = Duration::from_secs(20);

fn nft_table(ns: &NetNs) -> Option<String> {
    ns.exec("nft", &["list", "table", "inet", "qnet"]).ok()
}

#[test]
fn without_config_the_default_network_avoids_used_subnets() {
    let ns = NetNs::new("hkdef");
    // Something already uses the first candidate /24.
    ns.ip(&["link", "add", "qv0", "type", "veth", "peer", "name", "qv1"]);
    ns.ip(&["addr", "add", "10.213.0.5/24", "dev", "qv0"]);
    let hookd = Hookd::start(&ns, None);
    let status = hookd.qnetctl(&["status"]).unwrap();
    let net = &status["networks"][0];
    assert_eq!(net["name"], "qnet0");
    assert_eq!(net["mode"], "nat");
    assert_eq!(net["up"], true);
    let subnet = net["subnet"].as_str().unwrap().to_string();
    assert_ne!(subnet, "10.213.0.0/24", "collides with qv0");
    assert!(hookd.log().contains(&subnet), "the log names the pick");
    let addrs = ns.ip(&["-o", "addr", "show", "dev", "qnet0"]);
    assert!(
        addrs.contains(&net["router"].as_str().unwrap().to_string()),
        "{addrs}"
    );
    assert!(nft_table(&ns).unwrap().contains("masquerade"));
}

#[test]
fn the_default_subnet_survives_restarts() {
    let (_ns, mut hookd) = Hookd::start_in_new_netns("hkdefrst", None);
    let before = hookd.qnetctl(&["status"]).unwrap()["networks"][0]["subnet"].clone();
    hookd.kill9();
    hookd.spawn();
    let after = hookd.qnetctl(&["status"]).unwrap()["networks"][0]["subnet"].clone();
    assert_eq!(
        before, after,
        "its own bridge route must not push it elsewhere"
    );
}

#[test]
fn a_bad_config_is_refused_with_file_line_and_key_and_changes_nothing() {
    let ns = NetNs::new("hkbad");
    let links = ns.link_names();
    for (text, expect) in [
        (
            "[[network]]\nname = \"lab\"\nsubnet = \"10.77.0.0/24\"\nrouter = \"10.1.1.1\"\n",
            ":1: network `lab`: `router`",
        ),
        (
            "[[network]]\nname = \"lab\"\nsubnet = \"10.77.0.0/24\"\ncolour = 1\n",
            "line 4",
        ),
        ("this is not toml", "line 1"),
    ] {
        let out = run_with_config(&ns, text);
        assert!(!out.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.trim_end().lines().last().unwrap_or("");
        assert!(last.starts_with("qnet-hookd: "), "{stderr}");
        assert!(last.contains("hookd.toml"), "{last}");
        assert!(last.contains(expect), "{last} lacks {expect}");
        assert_eq!(ns.link_names(), links, "a refused config created devices");
        assert!(nft_table(&ns).is_none(), "a refused config created rules");
    }
}

#[test]
fn bad_control_requests_get_errors_and_the_daemon_goes_on() {
    let (_ns, hookd) = Hookd::start_in_new_netns("hkctl", Some(LAB));
    for (bytes, expect) in [
        (b"garbage\n".to_vec(), "bad request"),
        (b"{\"op\":\"format-disk\"}\n".to_vec(), "bad request"),
        (b"{\"op\":\"network-down\"}\n".to_vec(), "bad request"),
        (b"\n".to_vec(), "empty request"),
        (vec![b'x'; 200_000], "longer than"),
    ] {
        let reply = hookd.ctl_raw(&bytes);
        assert!(reply.starts_with("{\"error\":"), "{reply}");
        assert!(reply.contains(expect), "{reply}");
    }
    // A client that says nothing is cut off, and does not block others.
    let silent = UnixStream::connect(hookd.ctl_socket()).unwrap();
    hookd.qnetctl(&["status"]).unwrap();
    drop(silent);
    for (args, expect) in [
        (
            vec!["network", "down", "nosuch"],
            "no network `nosuch` (networks: lab)",
        ),
        (
            vec!["reserve", "add", "lab", "not-a-mac"],
            "not a MAC address",
        ),
        (
            vec![
                "reserve",
                "add",
                "lab",
                "52:54:00:00:00:01",
                "--ip",
                "10.9.9.9",
            ],
            "not a guest address",
        ),
        (
            vec!["reserve", "rm", "lab", "52:54:00:00:00:01"],
            "has no reservation",
        ),
    ] {
        let err = hookd.qnetctl(&args).unwrap_err();
        assert!(err.starts_with("qnetctl: "), "{err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    assert_eq!(
        hookd.qnetctl(&["status"]).unwrap()["networks"][0]["name"],
        "lab"
    );
}

#[test]
fn qnetctl_says_when_the_daemon_is_not_running() {
    let stderr = qnetctl_error(Path::new("/nonexistent/qnet/ctl.sock"), &["status"]);
    assert!(stderr.contains("qnet-hookd is not running"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

/// What a hostile QMP peer does on its connection.
type HostilePeer = Box<dyn Fn(&mut UnixStream)>;

#[test]
fn hostile_qmp_peers_never_crash_the_daemon() {
    let (_ns, hookd) = Hookd::start_in_new_netns("hkqmp", Some(LAB));
    let peers: Vec<HostilePeer> = vec![
        Box::new(|s| drop(s.write_all(b"garbage\n{not json\n"))),
        Box::new(|s| drop(s.write_all(&vec![b'{'; 6 << 20]))),
        Box::new(|_| {}),
        Box::new(|s| {
            let _ = s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n");
            let mut buf = [0; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"{\"return\": {}, \"id\": \"not-ours\"}\n{\"event\":");
        }),
    ];
    for peer in &peers {
        let mut stream = UnixStream::connect(hookd.qmp_socket()).unwrap();
        peer(&mut stream);
        // The daemon answers while a hostile peer is connected...
        hookd.qnetctl(&["status"]).unwrap();
        drop(stream);
    }
    // ... and after, with no guest left behind.
    hookd.qnetctl(&["status"]).unwrap();
    assert!(hookd.guests().is_empty());
}

#[test]
fn network_down_removes_bridge_rules_and_dnsmasq_and_up_restores_them() {
    let (ns, mut hookd) = Hookd::start_in_new_netns("hknet", Some(LAB));
    let pid_file = hookd.run_dir().join("lab/dnsmasq.pid");
    assert!(pid_file.exists());
    hookd.qnetctl(&["network", "down", "lab"]).unwrap();
    assert!(!ns.link_names().contains(&"qnlab".to_string()));
    assert!(!nft_table(&ns).unwrap_or_default().contains("qnlab"));
    assert!(!pid_file.exists(), "dnsmasq's run dir is removed");
    // Down stays down across a restart.
    hookd.terminate();
    hookd.spawn();
    assert_eq!(
        hookd.qnetctl(&["status"]).unwrap()["networks"][0]["up"],
        false
    );
    assert!(!ns.link_names().contains(&"qnlab".to_string()));

    hookd.qnetctl(&["network", "up", "lab"]).unwrap();
    assert!(ns.link_names().contains(&"qnlab".to_string()));
    assert!(nft_table(&ns).unwrap().contains("qnlab"));
    hookd.wait_until("dnsmasq back", WAIT, |_| pid_file.exists());
}

#[test]
fn reservations_survive_restarts_and_reach_dnsmasq() {
    let (_ns, mut hookd) = Hookd::start_in_new_netns("hkres", Some(LAB));
    let mac = "52:54:00:aa:bb:01";
    let reply = hookd
        .qnetctl(&[
            "reserve",
            "add",
            "lab",
            "52:54:00:AA:BB:01",
            "--ip",
            "10.77.0.50",
            "--name",
            "db",
        ])
        .unwrap();
    assert!(
        reply["message"].as_str().unwrap().contains("10.77.0.50"),
        "{reply}"
    );
    let auto = hookd
        .qnetctl(&["reserve", "add", "lab", "52:54:00:aa:bb:02"])
        .unwrap();
    assert!(
        auto["message"]
            .as_str()
            .unwrap()
            .contains("reserved 10.77.0."),
        "{auto}"
    );
    // The address is taken: another MAC cannot have it.
    let err = hookd
        .qnetctl(&[
            "reserve",
            "add",
            "lab",
            "52:54:00:aa:bb:03",
            "--ip",
            "10.77.0.50",
        ])
        .unwrap_err();
    assert!(
        err.contains("already reserved for 52:54:00:aa:bb:01"),
        "{err}"
    );

    assert!(hookd
        .dhcp_hosts("lab")
        .contains(&format!("{mac},10.77.0.50")));
    assert!(hookd.dns_hosts("lab").contains("10.77.0.50 db.lab.qnet"));

    let before = hookd.qnetctl(&["reserve", "list"]).unwrap();
    hookd.kill9();
    hookd.spawn();
    assert_eq!(hookd.qnetctl(&["reserve", "list"]).unwrap(), before);
    assert!(hookd
        .dhcp_hosts("lab")
        .contains(&format!("{mac},10.77.0.50")));

    hookd.qnetctl(&["reserve", "rm", "lab", mac]).unwrap();
    assert!(!hookd.dhcp_hosts("lab").contains(mac));
    assert_eq!(hookd.reservation("lab", mac), None);
}

#[test]
fn other_users_may_look_but_only_act_on_their_own_guests() {
    let (ns, hookd) = Hookd::start_in_new_netns("hkuser", Some(LAB));
    let user = unused_user();
    let qnetctl_as_user = |args: &[&str]| {
        let mut cmd = Command::new(workspace_binary("qnetctl"));
        cmd.arg("--socket").arg(hookd.ctl_socket()).args(args);
        cmd.uid(user.uid).gid(user.gid);
        cmd.output().unwrap()
    };
    // The socket is root:qnet 0660: a stranger cannot even connect.
    let out = qnetctl_as_user(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("group `qnet`"));

    // As a member of the group would: the daemon then authorises by uid.
    std::fs::set_permissions(hookd.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(hookd.ctl_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(qnetctl_as_user(&["status"]).status.success());
    for (args, expect) in [
        (
            vec!["network", "down", "lab"],
            "only root may take networks down",
        ),
        (
            vec!["reserve", "add", "lab", "52:54:00:00:00:09"],
            "not a NIC of one of your running guests",
        ),
        // doctor is anyone's; its probe adds a port and a table: root's.
        (
            vec!["doctor", "--trace", "lab"],
            "only root may trace packets through the firewall",
        ),
    ] {
        let out = qnetctl_as_user(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
    assert!(ns.link_names().contains(&"qnlab".to_string()));
}

#[test]
fn orphaned_qnet_devices_are_removed_at_start() {
    let ns = NetNs::new("hkorph");
    ns.ip(&[
        "link", "add", "qlow0", "type", "veth", "peer", "name", "qlow1",
    ]);
    let lower_index = ns.exec("cat", &["/sys/class/net/qlow0/ifindex"]).unwrap();
    let pidns = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
    let me = std::process::id();
    let started = qnet_hostnet::owner::start_time(me).unwrap();
    // A pid that no longer exists; this test's pid with the wrong start
    // time (what a recycled pid looks like); this test, alive; this test,
    // seen from another pid namespace (cannot be judged: kept).
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let owners = [
        ("90", dead, started, pidns),
        ("91", me, started + 1, pidns),
        ("92", me, started, pidns),
        ("93", dead, started, pidns + 1),
    ];
    for (n, pid, start, ns_ino) in owners {
        let owner = format!("uid=0 pid={pid} start={start} pidns={ns_ino}");
        let mvtap = format!("qmvtap{n}");
        ns.ip(&[
            "link", "add", "link", "qlow0", "name", &mvtap, "type", "macvtap", "mode", "bridge",
        ]);
        let alias = format!(
            "qnet-macvtap {owner} lower=qlow0 lower-ifindex={} mode=bridge",
            lower_index.trim()
        );
        ns.ip(&["link", "set", &mvtap, "alias", &alias]);
        // A TAP its holder persisted (TUNSETPERSIST), marked by the
        // bridge helper.
        let tap = format!("qtap{n}");
        ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
        ns.ip(&["link", "set", &tap, "alias", &format!("qnet-tap {owner}")]);
    }
    // A qmvtap left unmarked by a reaper killed before it could mark it.
    ns.ip(&[
        "link", "add", "link", "qlow0", "name", "qmvtap94", "type", "macvtap",
    ]);
    // Devices without our marker are never touched.
    ns.ip(&[
        "link", "add", "link", "qlow0", "name", "othertap", "type", "macvtap",
    ]);
    ns.ip(&["tuntap", "add", "dev", "othertun", "mode", "tap"]);
    let _hookd = Hookd::start(&ns, Some(LAB));
    let gone = ["qmvtap90", "qmvtap91", "qtap90", "qtap91", "qmvtap94"];
    let removed = qnet_tests::fake_qemu::wait_until(Duration::from_secs(30), || {
        let links = ns.link_names();
        gone.iter().all(|name| !links.contains(&name.to_string()))
    });
    let links = ns.link_names();
    assert!(removed, "orphans not removed: {links:?}");
    for kept in [
        "qmvtap92", "qmvtap93", "qtap92", "qtap93", "othertap", "othertun",
    ] {
        assert!(
            links.contains(&kept.to_string()),
            "{kept} removed: {links:?}"
        );
    }
}
