//! Networks as live objects: `qnetctl network create/edit/delete/show`,
//! reload (`qnetctl reload`, SIGHUP) and `qnet-hookd --check`, against a
//! real daemon, real bridges, dnsmasq and nftables in a namespace, with
//! fake guests (a TAP on the bridge and a QMP connection) holding
//! reservations.
//!
//! What "untouched" means is checked on the kernel's and dnsmasq's side:
//! the bridge keeps its ifindex (it was not made again), its ports stay
//! on it, dnsmasq keeps its pid, and the reservations keep their address.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use qnet_tests::fake_guest::FakeGuest;
use qnet_tests::fake_qemu::run_helper;
use qnet_tests::guest::{
    check_prerequisites, guest_image, random_mac, random_token, GuestSpec, RunningGuest, LONG,
};
use qnet_tests::hookd::{count_where, network, qmp_client_args, Hookd, Launch};
use qnet_tests::http::http_get_in_netns;
use qnet_tests::install::{Install, Installed};
use qnet_tests::mountns::MountNs;
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::{sandboxed, unused_user, ConfigDir, RunAs};
use qnet_tests::workspace_binary;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn lab_toml() -> String {
    network("lab", "qnlab", &[r#"subnet = "10.61.0.0/24""#])
}

/// What identifies a network's bridge and dnsmasq instance.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    ifindex: u64,
    dnsmasq: String,
}

fn fingerprint(ns: &NetNs, hookd: &Hookd, network: &str, bridge: &str) -> Fingerprint {
    let link = ns.ip_json(&["link", "show", "dev", bridge]);
    let pid_file = hookd.run_dir().join(network).join("dnsmasq.pid");
    hookd.wait_until("dnsmasq's pid file", WAIT, |_| pid_file.exists());
    Fingerprint {
        ifindex: link[0]["ifindex"].as_u64().unwrap(),
        dnsmasq: std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .to_string(),
    }
}

/// The bridge a device is a port of.
fn master(ns: &NetNs, dev: &str) -> Option<String> {
    ns.ip_json(&["link", "show", "dev", dev])[0]["master"]
        .as_str()
        .map(str::to_string)
}

fn addresses(ns: &NetNs, dev: &str) -> String {
    ns.ip(&["-4", "-o", "addr", "show", "dev", dev])
}

fn status_of(hookd: &Hookd, network: &str) -> Option<Value> {
    let status = hookd.qnetctl(&["status"]).unwrap();
    status["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == network)
        .cloned()
}

fn setting(show: &Value, key: &str) -> (String, String) {
    let s = show["network"]["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == key)
        .unwrap_or_else(|| panic!("no `{key}` in {show}"));
    (
        s["value"].as_str().unwrap().to_string(),
        s["source"].as_str().unwrap().to_string(),
    )
}

fn runtime_file(hookd: &Hookd, network: &str) -> PathBuf {
    hookd
        .dir()
        .join("networks.d")
        .join(format!("{network}.toml"))
}

/// A fake guest `name` with `mac` on `bridge` of `network`, once the
/// daemon has reserved its address.
fn reserved_guest(
    ns: &NetNs,
    hookd: &Hookd,
    (network, bridge): (&str, &str),
    mac: &str,
    name: &str,
) -> FakeGuest {
    let guest = FakeGuest::spawn(ns, &hookd.qmp_socket(), bridge, mac, name);
    hookd.wait_until(&format!("{network}'s reservation"), WAIT, |h| {
        h.reservation(network, &guest.mac).is_some()
    });
    guest
}

#[test]
fn networks_are_created_edited_and_deleted_at_run_time_touching_only_what_changed() {
    let (ns, mut hookd) = Hookd::start_in_new_netns("hklive", Some(&lab_toml()));
    let lab_guest = reserved_guest(&ns, &hookd, ("lab", "qnlab"), "52:54:00:61:00:01", "labvm");
    let lab_ip = hookd.reservation("lab", &lab_guest.mac);
    let lab = fingerprint(&ns, &hookd, "lab", "qnlab");

    // Create, with a subnet picked for us; it survives a restart.
    let reply = hookd
        .qnetctl(&["network", "create", "dev", "--mode", "nat"])
        .unwrap();
    assert!(
        reply["message"].as_str().unwrap().contains("created"),
        "{reply}"
    );
    let created = status_of(&hookd, "dev").expect("dev is listed");
    assert_eq!(
        (created["up"].clone(), created["mode"].clone()),
        (true.into(), "nat".into())
    );
    let subnet = created["subnet"].as_str().unwrap().to_string();
    assert_ne!(subnet, "10.61.0.0/24");
    assert!(
        std::fs::read_to_string(runtime_file(&hookd, "dev"))
            .unwrap()
            .contains(&subnet),
        "the picked subnet is saved, so it never moves"
    );
    let show = hookd.qnetctl(&["network", "show", "dev"]).unwrap();
    assert_eq!(
        setting(&show, "mode"),
        ("\"nat\"".into(), "run-time".into())
    );
    assert_eq!(
        setting(&show, "domain"),
        ("\"dev.qnet\"".into(), "default".into())
    );
    let show_lab = hookd.qnetctl(&["network", "show", "lab"]).unwrap();
    assert_eq!(setting(&show_lab, "subnet").1, "toml");
    let dev_guest = reserved_guest(&ns, &hookd, ("dev", "dev"), "52:54:00:61:00:02", "devvm");
    let dev = fingerprint(&ns, &hookd, "dev", "dev");
    assert_eq!(
        fingerprint(&ns, &hookd, "lab", "qnlab"),
        lab,
        "creating dev touched lab"
    );

    // A rules-only change: nothing restarts.
    hookd
        .qnetctl(&["network", "edit", "dev", "--blocked-ports", "tcp/25"])
        .unwrap();
    assert_eq!(fingerprint(&ns, &hookd, "dev", "dev"), dev);
    let rules = ns.exec_ok(&["nft", "list", "table", "inet", "qnet"]);
    assert!(
        rules.contains("25"),
        "the blocked port is in the rules:\n{rules}"
    );

    // A link is an edit of the run-time network's file: rules only.
    let reply = hookd.qnetctl(&["network", "link", "dev", "lab"]).unwrap();
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("may connect to each other"),
        "{reply}"
    );
    let show = hookd.qnetctl(&["network", "show", "dev"]).unwrap();
    assert_eq!(
        setting(&show, "connect-to"),
        ("[\"lab\"]".into(), "run-time".into())
    );
    assert_eq!(fingerprint(&ns, &hookd, "dev", "dev"), dev);
    hookd.refused(&["network", "link", "lab", "dev"], &["hookd.toml:2"]);
    hookd.qnetctl(&["network", "unlink", "dev", "lab"]).unwrap();
    let show = hookd.qnetctl(&["network", "show", "dev"]).unwrap();
    assert!(!show.to_string().contains("connect-to"), "{show}");

    // A dnsmasq change: dnsmasq restarts, the bridge and its port stay.
    hookd
        .qnetctl(&["network", "edit", "dev", "--domain", "dev.example"])
        .unwrap();
    let after = fingerprint(&ns, &hookd, "dev", "dev");
    assert_eq!(after.ifindex, dev.ifindex);
    assert_ne!(
        after.dnsmasq, dev.dnsmasq,
        "dnsmasq restarted with the new domain"
    );
    assert_eq!(master(&ns, &dev_guest.tap).as_deref(), Some("dev"));

    // A subnet under a reservation and a guest moves only with --force;
    // the bridge stays (readdressed), and so does the guest's TAP.
    hookd.refused(
        &["network", "edit", "dev", "--subnet", "10.62.5.0/24"],
        &["--force", "1 reservation"],
    );
    hookd
        .qnetctl(&[
            "network",
            "edit",
            "dev",
            "--subnet",
            "10.62.5.0/24",
            "--force",
        ])
        .unwrap();
    let moved = fingerprint(&ns, &hookd, "dev", "dev");
    assert_eq!(moved.ifindex, dev.ifindex, "readdressed, not made again");
    assert!(
        addresses(&ns, "dev").contains("10.62.5.1/24"),
        "{}",
        addresses(&ns, "dev")
    );
    let old_router = format!("{}/", created["router"].as_str().unwrap());
    assert!(
        !addresses(&ns, "dev").contains(&old_router),
        "{}",
        addresses(&ns, "dev")
    );
    assert_eq!(master(&ns, &dev_guest.tap).as_deref(), Some("dev"));

    // Refusals: the admin's network, a bad value (hookd.toml's message),
    // a clash with another network. Nothing is left behind.
    hookd.refused(
        &["network", "edit", "lab", "--domain", "x.example"],
        &["hookd.toml:2", "qnetctl reload"],
    );
    hookd.refused(
        &[
            "network",
            "create",
            "bad",
            "--subnet",
            "10.63.0.0/24",
            "--dhcp-range",
            "10.63.0.1-10.63.0.9",
        ],
        &["`dhcp-range`", "router address"],
    );
    hookd.refused(
        &["network", "create", "clash", "--subnet", "10.61.0.0/25"],
        &["overlaps network `lab`"],
    );
    assert!(!runtime_file(&hookd, "bad").exists() && !runtime_file(&hookd, "clash").exists());
    assert!(status_of(&hookd, "bad").is_none());

    // Kept across a restart (kill -9: nothing to save at exit).
    hookd.kill9();
    hookd.spawn();
    let again = status_of(&hookd, "dev").expect("dev after a restart");
    assert_eq!(again["subnet"], "10.62.5.0/24");
    assert_eq!(
        fingerprint(&ns, &hookd, "lab", "qnlab").ifindex,
        lab.ifindex
    );

    // Delete: refused under a running guest, then forced; bridge, file
    // and reservations go; lab never noticed.
    hookd.refused(&["network", "delete", "dev"], &["running guest"]);
    hookd
        .qnetctl(&["network", "delete", "dev", "--force"])
        .unwrap();
    assert!(status_of(&hookd, "dev").is_none());
    assert!(!ns.link_names().contains(&"dev".to_string()));
    assert!(!runtime_file(&hookd, "dev").exists());
    let left = hookd.qnetctl(&["reserve", "list"]).unwrap();
    assert_eq!(
        count_where(&left["reservations"], "network", "dev"),
        0,
        "{left}"
    );
    assert_eq!(hookd.reservation("lab", &lab_guest.mac), lab_ip);
    assert_eq!(master(&ns, &lab_guest.tap).as_deref(), Some("qnlab"));
}

#[test]
fn reload_applies_the_diff_and_a_bad_config_keeps_the_running_one() {
    let (ns, hookd) = Hookd::start_in_new_netns("hkreload", Some(&lab_toml()));
    let guest = FakeGuest::spawn(&ns, &hookd.qmp_socket(), "qnlab", "52:54:00:61:01:01", "vm");
    hookd.wait_until("the reservation", WAIT, |h| {
        h.reservation("lab", &guest.mac).is_some()
    });
    let ip = hookd.reservation("lab", &guest.mac);
    let lab = fingerprint(&ns, &hookd, "lab", "qnlab");
    let config = hookd.dir().join("hookd.toml");
    let check = |path: &PathBuf| {
        Command::new(workspace_binary("qnet-hookd"))
            .arg("--check")
            .arg("--config")
            .arg(path)
            .output()
            .unwrap()
    };

    // A second network and a new forward: `qnetctl reload`.
    let more = format!(
        "{}{}\n[[forward]]\nguest = \"vm\"\nproto = \"tcp\"\nports = \"8080:80\"\n",
        lab_toml(),
        network("lab2", "qnlab2", &[r#"subnet = "10.64.0.0/24""#])
    );
    std::fs::write(&config, &more).unwrap();
    let out = check(&config);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok: 2 network(s)"),
        "{out:?}"
    );
    let reply = hookd.qnetctl(&["reload"]).unwrap();
    assert!(
        reply["message"].as_str().unwrap().contains("added lab2"),
        "{reply}"
    );
    assert_eq!(status_of(&hookd, "lab2").unwrap()["up"], true);
    assert_eq!(
        fingerprint(&ns, &hookd, "lab", "qnlab"),
        lab,
        "lab did not change"
    );
    let forwards = hookd.qnetctl(&["forward", "list"]).unwrap();
    assert!(forwards.to_string().contains("8080"), "{forwards}");

    // A config that does not validate: `--check` says why, SIGHUP keeps
    // the running networks, and the log says why too.
    let bad = more.replace("10.64.0.0/24", "10.61.0.128/25");
    std::fs::write(&config, &bad).unwrap();
    let out = check(&config);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("overlaps network `lab`"),
        "{out:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let pid = nix::unistd::Pid::from_raw(hookd.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    hookd.wait_until("the refusal in the log", WAIT, |h| {
        h.log().contains("reload refused")
    });
    assert_eq!(status_of(&hookd, "lab2").unwrap()["subnet"], "10.64.0.0/24");
    hookd.refused(&["reload"], &["overlaps network `lab`"]);

    // SIGHUP with a good file: lab2 goes, lab stays as it was.
    std::fs::write(&config, lab_toml()).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    hookd.wait_until("lab2 removed", WAIT, |h| status_of(h, "lab2").is_none());
    assert!(!ns.link_names().contains(&"qnlab2".to_string()));
    assert_eq!(fingerprint(&ns, &hookd, "lab", "qnlab"), lab);
    assert_eq!(hookd.reservation("lab", &guest.mac), ip);
    assert_eq!(master(&ns, &guest.tap).as_deref(), Some("qnlab"));
}

/// Two throwaway users in group qnet, as the daemon sees them: its mount
/// namespace has copies of /etc/passwd and /etc/group with them added
/// (each with a private group), so the host's files never change.
struct Users {
    a: RunAs,
    b: RunAs,
    group_file: PathBuf,
    group_text: String,
    _dir: tempfile::TempDir,
}

impl Users {
    fn new(mount: &MountNs) -> Users {
        let a = unused_user();
        let b = RunAs {
            uid: a.uid + 1,
            gid: a.gid + 1,
        };
        let qnet_gid = a.uid + 2;
        let dir = tempfile::tempdir().unwrap();
        let mut passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let mut group: String = std::fs::read_to_string("/etc/group")
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("qnet:"))
            .map(|l| format!("{l}\n"))
            .collect();
        for (name, user) in [("qnetua", a), ("qnetub", b)] {
            passwd.push_str(&format!(
                "{name}:x:{}:{}::/nonexistent:/usr/sbin/nologin\n",
                user.uid, user.gid
            ));
            group.push_str(&format!("{name}:x:{}:\n", user.gid));
        }
        let group_text = group.clone();
        group.push_str(&format!("qnet:x:{qnet_gid}:qnetua,qnetub\n"));
        let (passwd_file, group_file) = (dir.path().join("passwd"), dir.path().join("group"));
        std::fs::write(&passwd_file, passwd).unwrap();
        std::fs::write(&group_file, group).unwrap();
        for (file, target) in [(&passwd_file, "/etc/passwd"), (&group_file, "/etc/group")] {
            mount
                .run("mount", &["--bind", file.to_str().unwrap(), target])
                .unwrap();
        }
        Users {
            a,
            b,
            group_file,
            group_text,
            _dir: dir,
        }
    }

    /// Takes user A out of group qnet: a new copy mounted over the old
    /// one, so the daemon reads the old file or the new, never a file
    /// half rewritten.
    fn remove_a_from_group(&self, mount: &MountNs) {
        let qnet_gid = self.a.uid + 2;
        let text = format!("{}qnet:x:{qnet_gid}:qnetub\n", self.group_text);
        let file = self.group_file.with_file_name("group.new");
        std::fs::write(&file, text).unwrap();
        mount
            .run("mount", &["--bind", file.to_str().unwrap(), "/etc/group"])
            .unwrap();
    }
}

fn qnetctl_as(hookd: &Hookd, user: RunAs, args: &[&str]) -> Result<Value, String> {
    let mut cmd = Command::new(workspace_binary("qnetctl"));
    cmd.arg("--socket")
        .arg(hookd.ctl_socket())
        .arg("--json")
        .args(args)
        .uid(user.uid)
        .gid(user.gid);
    let out = cmd.output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn names(status: &Value) -> Vec<String> {
    status["networks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn users_own_networks_within_the_policy_and_attach_real_guests_to_them() {
    check_prerequisites().unwrap_or_else(|e| panic!("{e}"));
    let ns = NetNs::new("hkusers");
    let mount = MountNs::new(&ns);
    let users = Users::new(&mount);
    let config = format!("{}\n[user-networks]\nper-user = 2\n", lab_toml());
    let hookd = Hookd::start_with(
        &ns,
        Some(&config),
        Launch {
            mount_ns: Some(&mount),
            ..Launch::default()
        },
    );
    // As members of group qnet would reach it (see hookd_daemon).
    std::fs::set_permissions(hookd.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(hookd.ctl_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(hookd.qmp_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let (a, b) = (users.a, users.b);

    // A creates a network of their own, from the users' pool.
    let reply = qnetctl_as(&hookd, a, &["network", "create", "mine"]).unwrap();
    let message = reply["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("include ") && message.contains("10.214."),
        "{message}"
    );
    let show = qnetctl_as(&hookd, a, &["network", "show", "mine"]).unwrap();
    assert_eq!(setting(&show, "owner").0, a.uid.to_string());
    let bridge = setting(&show, "bridge").0.trim_matches('"').to_string();
    assert!(ns.link_names().contains(&bridge), "{bridge}");

    // Beyond the policy: refused, each with its reason.
    for (args, expected) in [
        (
            vec!["--mode", "routed"],
            "mode `routed` is not one users may use",
        ),
        (vec!["--uplink", "up0"], "only root may set `uplink`"),
        (vec!["--set", "bridge=eth0"], "only root may set `bridge`"),
        (
            vec!["--subnet", "192.168.77.0/24"],
            "outside the users' pool",
        ),
    ] {
        let mut full = vec!["network", "create", "more"];
        full.extend(args);
        let err = qnetctl_as(&hookd, a, &full).unwrap_err();
        assert!(err.contains(expected), "{full:?}: {err}");
    }
    qnetctl_as(&hookd, a, &["network", "create", "second"]).unwrap();
    let err = qnetctl_as(&hookd, a, &["network", "create", "third"]).unwrap_err();
    assert!(err.contains("per-user"), "{err}");
    qnetctl_as(&hookd, a, &["network", "delete", "second"]).unwrap();

    // B sees nothing of A's network, and cannot touch it.
    assert_eq!(names(&qnetctl_as(&hookd, b, &["status"]).unwrap()), ["lab"]);
    assert!(names(&hookd.qnetctl(&["status"]).unwrap()).contains(&"mine".to_string()));
    for args in [
        vec!["network", "show", "mine"],
        vec!["network", "delete", "mine"],
        vec!["network", "edit", "mine", "--domain", "b.example"],
        vec!["reserve", "list", "mine"],
    ] {
        let err = qnetctl_as(&hookd, b, &args).unwrap_err();
        assert!(err.contains("no network `mine`"), "{args:?}: {err}");
    }

    // A's QEMU attaches to A's bridge through the installed setuid
    // helper, allowed by the one include line an admin adds; B's is not.
    let acl = ConfigDir::new();
    let users_acl = hookd.run_dir().join("users").join("bridge.conf");
    acl.write(
        "bridge.conf",
        &format!("allow qnlab\ninclude {}\n", users_acl.display()),
    );
    let helper = Installed::new("qnet-bridge-helper", &[("setuid", 0o4755, None)]);
    let helper_path = helper.path(Install::Setuid);
    let refusal =
        run_helper(sandboxed(&helper_path, &ns, &acl, Some(b)), Some(&bridge)).expect_refusal();
    assert!(refusal.contains("not allowed"), "{refusal}");
    let token = random_token();
    // The serial log, writable by A's QEMU; removed after the guest.
    let logs = qnet_tests::tempdir_with_mode("qnet-test-serial-", 0o777);
    let guest = boot_as(
        &ns,
        &acl,
        a,
        &helper_path,
        &bridge,
        &hookd,
        "mineguest",
        logs.path(),
        &token,
    );
    let lease = guest.wait_for_lease(LONG).unwrap_or_else(|e| panic!("{e}"));
    assert!(lease.to_string().starts_with("10.214."), "{lease}");
    hookd.wait_until("A's guest followed", WAIT, |h| {
        qnetctl_as(h, a, &["reserve", "list", "mine"])
            .is_ok_and(|r| r.to_string().contains(&lease.to_string()))
    });

    // A forwards a port to it; B may not.
    qnetctl_as(
        &hookd,
        a,
        &["forward", "add", "mineguest", "tcp", "18080:80"],
    )
    .unwrap();
    let page = http_get_in_netns(ns.name(), "127.0.0.1:18080".parse().unwrap(), "/", LONG).unwrap();
    assert_eq!(page, token);
    let err = qnetctl_as(
        &hookd,
        b,
        &["forward", "add", "mineguest", "tcp", "18081:80"],
    )
    .unwrap_err();
    assert!(err.contains("not one of your running guests"), "{err}");
    drop(guest);

    // A leaves group qnet: on reload, A's network goes.
    users.remove_a_from_group(&mount);
    let reply = hookd.qnetctl(&["reload"]).unwrap();
    assert!(
        reply["message"].as_str().unwrap().contains("removed mine"),
        "{reply}\n{}",
        hookd.log()
    );
    assert!(!names(&hookd.qnetctl(&["status"]).unwrap()).contains(&"mine".to_string()));
    assert!(!ns.link_names().contains(&bridge));
    assert!(!runtime_file(&hookd, "mine").exists());
}

/// Boots the test guest `name` as `user`, on `bridge` through `helper`,
/// dialing the daemon's QMP socket; its serial log goes in `logs`.
#[allow(clippy::too_many_arguments)]
fn boot_as(
    ns: &NetNs,
    acl: &ConfigDir,
    user: RunAs,
    helper: &std::path::Path,
    bridge: &str,
    hookd: &Hookd,
    name: &str,
    logs: &std::path::Path,
    token: &str,
) -> RunningGuest {
    let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
    let spec = GuestSpec::new(&image, random_mac(), token);
    let serial = logs.join(format!("{name}.log"));
    let netdev = format!("bridge,id=n0,br={bridge},helper={}", helper.display());
    let mut qemu = sandboxed("qemu-system-x86_64", ns, acl, Some(user));
    qemu.args(spec.qemu_args(&netdev, &serial))
        .args(["-name", name])
        .args(qmp_client_args(&hookd.qmp_socket()));
    let guest = RunningGuest::spawn(qemu, &serial).unwrap_or_else(|e| panic!("{e}"));
    guest.wait_for_ready(LONG).unwrap_or_else(|e| panic!("{e}"));
    guest
}
