//! Port forwards end to end with real guests: from the outside through the
//! uplink, from the host to its own address and to 127.0.0.1, from another
//! guest through the public address (hairpin), UDP, a port range, IPv6;
//! removed when QEMU dies and back when it returns, intact across a daemon
//! restart, conflicts refused, unprivileged users limited.

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use qnet_tests::guest::{
    guest_image, random_mac, random_token, GuestSpec, ProbeOutcome, RunningGuest, LONG,
};
use qnet_tests::hookd::{count_where, network, Hookd};
use qnet_tests::http::{http_get_in_netns, http_get_once, ONE_TRY};
use qnet_tests::netns::{NetNs, OUTSIDE, UPLINK};
use qnet_tests::sandbox::{unused_user, ConfigDir};
use qnet_tests::workspace_binary;

const SHORT: Duration = Duration::from_secs(20);

const UPLINK6: &str = "fd99::1";
const OUTSIDE6: &str = "fd99::2";

/// A dual-stack network and a forward of the config.
fn hookd_toml() -> String {
    let lab = network(
        "lab",
        "qnlab",
        &[
            r#"subnet = "10.77.0.0/24""#,
            r#"ipv6 = { subnet = "fd77::/64" }"#,
        ],
    );
    lab + FORWARD
}

const FORWARD: &str = r#"
[[forward]]
guest = "cfg-guest"
proto = "tcp"
ports = "7070:80"
"#;

struct World {
    hookd: Hookd,
    config: ConfigDir,
    hk: NetNs,
    out: NetNs,
}

impl World {
    fn new(tag: &str) -> World {
        let (hk, out) = NetNs::with_outside(
            &format!("{tag}-hk"),
            &format!("{tag}-out"),
            &[&format!("{UPLINK}/24"), &format!("{UPLINK6}/64")],
            &[&format!("{OUTSIDE}/24"), &format!("{OUTSIDE6}/64")],
        );
        let (hookd, config) = Hookd::start_for_guests(&hk, &hookd_toml(), &["qnlab"]);
        World {
            hookd,
            config,
            hk,
            out,
        }
    }

    fn boot(&self, name: &str, mac: &str, token: &str, append: &[&str]) -> RunningGuest {
        let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
        let mut spec = GuestSpec::new(&image, mac, token);
        spec.extra_append = append.iter().map(|s| s.to_string()).collect();
        let guest = (self.hookd).spawn_guest(&self.hk, &self.config, name, &spec, "qnlab", &[]);
        guest.wait_for_ready(LONG).unwrap_or_else(|e| panic!("{e}"));
        guest
    }

    fn forward(&self, args: &[&str]) {
        let mut full = vec!["forward", "add"];
        full.extend_from_slice(args);
        self.hookd
            .qnetctl(&full)
            .unwrap_or_else(|e| panic!("forward add {args:?}: {e}\n{}", self.hookd.log()));
    }
}

/// One try, no retries: does `addr` answer at all?
fn refused(ns: &NetNs, addr: SocketAddr) -> bool {
    ns.run_in(|| http_get_once(addr, "/", ONE_TRY)).is_err()
}

fn udp_echo(ns: &NetNs, addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, String> {
    let payload = payload.to_vec();
    ns.run_in(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        for _ in 0..10 {
            socket.send_to(&payload, addr).map_err(|e| e.to_string())?;
            let mut buf = [0; 2048];
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                return Ok(buf[..n].to_vec());
            }
        }
        Err(format!("no UDP echo from {addr}"))
    })
}

fn sock(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

#[test]
fn forwards_work_from_every_direction() {
    let world = World::new("fwdall");
    let token = random_token();
    let web = world.boot("web", &random_mac(), &token, &[]);
    world.forward(&["web", "tcp", "8080:80"]);
    world.forward(&["web", "udp", "7007:7"]);
    world.forward(&["web", "tcp", "9080-9081:80"]);

    // From the outside, through the uplink address.
    assert_eq!(
        http_get_in_netns(world.out.name(), sock(UPLINK, 8080), "/", LONG).unwrap(),
        token
    );
    // From the host itself, to its own address and to 127.0.0.1.
    assert_eq!(
        http_get_in_netns(world.hk.name(), sock(UPLINK, 8080), "/", SHORT).unwrap(),
        token
    );
    assert_eq!(
        http_get_in_netns(world.hk.name(), sock("127.0.0.1", 8080), "/", SHORT).unwrap(),
        token
    );
    // UDP.
    assert_eq!(
        udp_echo(&world.out, sock(UPLINK, 7007), b"qnet-udp").unwrap(),
        b"qnet-udp"
    );
    // A range keeps its offsets: 9080 → 80 answers, 9081 → 81 does not.
    assert_eq!(
        http_get_in_netns(world.out.name(), sock(UPLINK, 9080), "/", SHORT).unwrap(),
        token
    );
    assert!(refused(&world.out, sock(UPLINK, 9081)));
    // IPv6, from the outside through the uplink's IPv6 address.
    assert_eq!(
        http_get_in_netns(world.out.name(), sock(UPLINK6, 8080), "/", LONG).unwrap(),
        token
    );

    // Hairpin: another guest on the same network, through the public address.
    let other = world.boot(
        "other",
        &random_mac(),
        &random_token(),
        &[&format!("qnet.probe={UPLINK}:8080"), "qnet.probe_tries=5"],
    );
    match other
        .wait_for_probe_to(&format!("{UPLINK}:8080"), LONG)
        .unwrap_or_else(|e| panic!("{e}"))
    {
        ProbeOutcome::Reached { body } => assert_eq!(body, token),
        ProbeOutcome::Failed => panic!("hairpin forward failed"),
    }

    let list = world.hookd.qnetctl(&["forward", "list"]).unwrap();
    let forwards = list["forwards"].as_array().unwrap();
    assert_eq!(forwards.len(), 4, "{list}");
    assert!(forwards
        .iter()
        .any(|f| f["guest"] == "cfg-guest" && f["origin"] == "config"));
    drop(web);
}

#[test]
fn forwards_follow_the_guest_and_survive_a_daemon_restart() {
    let mut world = World::new("fwdlife");
    let mac = random_mac();
    let token = random_token();
    let web = world.boot("web", &mac, &token, &[]);
    world.forward(&["web", "tcp", "8080:80"]);
    assert_eq!(
        http_get_in_netns(world.out.name(), sock(UPLINK, 8080), "/", LONG).unwrap(),
        token
    );

    // QEMU killed: the forward goes (the port then refuses).
    drop(web);
    world.hookd.wait_until("forward removed", SHORT, |_| {
        refused(&world.out, sock(UPLINK, 8080))
    });
    let listed = world.hookd.qnetctl(&["forward", "list"]).unwrap();
    assert!(listed["forwards"][0]["guest_addr"].is_null(), "{listed}");

    // Back with the same MAC: same address, forward back.
    let token2 = random_token();
    let _web = world.boot("web", &mac, &token2, &[]);
    assert_eq!(
        http_get_in_netns(world.out.name(), sock(UPLINK, 8080), "/", LONG).unwrap(),
        token2
    );

    // kill -9 the daemon: forwards keep working, and after the restart
    // they are there exactly once.
    let before = world
        .hk
        .exec("nft", &["list", "table", "inet", "qnet"])
        .unwrap();
    world.hookd.kill9();
    assert_eq!(
        http_get_in_netns(world.out.name(), sock(UPLINK, 8080), "/", SHORT).unwrap(),
        token2
    );
    world.hookd.spawn();
    let after = world
        .hk
        .exec("nft", &["list", "table", "inet", "qnet"])
        .unwrap();
    let mut a: Vec<&str> = before.lines().map(str::trim).collect();
    let mut b: Vec<&str> = after.lines().map(str::trim).collect();
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "ruleset (with its forward elements) changed across a restart"
    );
    assert_eq!(
        http_get_in_netns(world.out.name(), sock(UPLINK, 8080), "/", SHORT).unwrap(),
        token2
    );

    // The forward is kept as a file of its own; removed, the file goes,
    // and after another kill -9 and restart the forward stays removed.
    let forward_files = || {
        std::fs::read_dir(world.hookd.dir().join("state/forwards"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert_eq!(forward_files(), 1);
    world
        .hookd
        .qnetctl(&["forward", "rm", "tcp", "8080"])
        .unwrap();
    assert!(refused(&world.out, sock(UPLINK, 8080)), "removed");
    assert_eq!(forward_files(), 0);
    world.hookd.kill9();
    world.hookd.spawn();
    let listed = world.hookd.qnetctl(&["forward", "list"]).unwrap();
    let runtime = count_where(&listed["forwards"], "origin", "runtime");
    assert_eq!(runtime, 0, "{listed}");
    assert!(refused(&world.out, sock(UPLINK, 8080)), "still removed");
}

#[test]
fn conflicting_forwards_are_refused_and_users_are_limited() {
    let world = World::new("fwdconf");
    let _web = world.boot("web", &random_mac(), &random_token(), &[]);
    world.forward(&["web", "tcp", "8080:80"]);
    let err = world
        .hookd
        .qnetctl(&["forward", "add", "web", "tcp", "8075-8085:80"])
        .unwrap_err();
    assert!(err.contains("taken by guest `web`"), "{err}");
    // The port of a forward in hookd.toml is taken too.
    let err = world
        .hookd
        .qnetctl(&["forward", "add", "web", "tcp", "7070"])
        .unwrap_err();
    assert!(err.contains("cfg-guest") && err.contains("config"), "{err}");

    // A host socket holds 8181.
    let holder = world.hk.listen("0.0.0.0:8181");
    let err = world
        .hookd
        .qnetctl(&["forward", "add", "web", "tcp", "8181:80"])
        .unwrap_err();
    assert!(
        err.contains("tcp/8181 is taken by a host socket of pid"),
        "{err}"
    );
    drop(holder);

    // An ordinary user (as a member of group qnet would be) may not
    // forward to root's guest, nor below port 1024.
    let user = unused_user();
    std::fs::set_permissions(world.hookd.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        world.hookd.ctl_socket(),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    for (args, expect) in [
        (
            ["forward", "add", "web", "tcp", "8282:80"],
            "not one of your running guests",
        ),
        (
            ["forward", "add", "web", "tcp", "80"],
            "only root may forward ports below 1024",
        ),
    ] {
        let out = Command::new(workspace_binary("qnetctl"))
            .arg("--socket")
            .arg(world.hookd.ctl_socket())
            .args(args)
            .uid(user.uid)
            .gid(user.gid)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
    // Removing works, and then the port is free again.
    world
        .hookd
        .qnetctl(&["forward", "rm", "tcp", "8080"])
        .unwrap();
    world.forward(&["web", "tcp", "8075-8085:80"]);
}
