//! qnet networks next to the host's other firewalls, with the real
//! daemons in test namespaces: dockerd (before and after qnet-hookd, and
//! restarted), iptables with drop policies (nft and legacy backends),
//! firewalld (before and after, `--reload`, restart). Each time a guest
//! gets its DHCP lease, reaches the outside (NAT), is reached from the
//! outside through a port forward and from a neighbour through the
//! public address (hairpin), and over IPv6 gets its SLAAC address and
//! default route from the router advertisement, reaches the outside (NAT)
//! and is reached through the forward; a hookd kill -9 and restart adopts
//! qnet's rules without duplicates; `network down` and `qnet-hookd
//! --cleanup` leave no trace. `doctor` names each drop with integration
//! off, and `doctor --trace` one that only a traced packet shows.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use qnet_tests::hookd::{network, Hookd};
use qnet_tests::http::http_get_in_netns;
use qnet_tests::netns::NetNs;
use qnet_tests::peers::{drop_policies, iptables_marks, Dockerd, Firewalld, HttpServer, VethGuest};
use qnet_tests::{require_root, workspace_binary};

const UPLINK: &str = "10.253.0.1";
const OUTSIDE: &str = "10.253.0.2";
const UPLINK6: &str = "fd53::1";
const OUTSIDE6: &str = "fd53::2";
const BRIDGE: &str = "qnfw";
/// A dual-stack network on [`BRIDGE`].
fn hookd_toml() -> String {
    network(
        "lab",
        BRIDGE,
        &[
            r#"subnet = "10.78.0.0/24""#,
            r#"ipv6 = { subnet = "fd78::/64" }"#,
        ],
    )
}
const FORWARD: &str = "<q:forward proto='tcp' host-port='8080' guest-port='80'/>";
const TRY: Duration = Duration::from_secs(10);

/// The host namespace with hookd, an outside namespace behind an uplink
/// with a web server, and a veth guest.
struct World {
    guest: Option<VethGuest>,
    /// Another guest on the bridge (a dynamic lease): the hairpin client.
    neighbour: Option<VethGuest>,
    _web: HttpServer,
    hookd: Hookd,
    out: NetNs,
    hk: NetNs,
}

impl World {
    /// The host and outside namespaces and the outside web server; a
    /// peer may start in the host namespace before [`World::start`].
    fn namespaces(tag: &str) -> (NetNs, NetNs, HttpServer) {
        require_root();
        let (hk, out) = NetNs::with_outside(
            &format!("{tag}-hk"),
            &format!("{tag}-out"),
            &[&format!("{UPLINK}/24"), &format!("{UPLINK6}/64")],
            &[&format!("{OUTSIDE}/24"), &format!("{OUTSIDE6}/64")],
        );
        let web = HttpServer::start(&out, 80, "the outside\n");
        (hk, out, web)
    }

    /// The namespaces and hookd, with no other firewall before it.
    fn new(tag: &str) -> World {
        let (hk, out, web) = World::namespaces(tag);
        World::start(hk, out, web, &[])
    }

    fn start(hk: NetNs, out: NetNs, web: HttpServer, env: &[(&str, &str)]) -> World {
        let hookd = Hookd::start_with_env(&hk, Some(&hookd_toml()), env);
        let guest = VethGuest::new(
            &hk,
            BRIDGE,
            &format!("{}g", &hk.name()[..4.min(hk.name().len())]),
            "52:54:00:7e:00:01",
        );
        guest.register(&hookd.ctl_socket(), BRIDGE, FORWARD);
        let neighbour = VethGuest::new(
            &hk,
            BRIDGE,
            &format!("{}n", &hk.name()[..4.min(hk.name().len())]),
            "52:54:00:7e:00:02",
        );
        World {
            guest: Some(guest),
            neighbour: Some(neighbour),
            _web: web,
            hookd,
            out,
            hk,
        }
    }

    fn guest(&self) -> &VethGuest {
        self.guest.as_ref().unwrap()
    }

    /// Lease, outbound NAT, inbound forward, hairpin, then the same over
    /// IPv6 (SLAAC address and default route from the router
    /// advertisement, outbound NAT, inbound forward): the first failure.
    fn check(&self) -> Result<(), String> {
        let g = self.guest();
        let ip = g.dhcp()?;
        if !ip.starts_with("10.78.0.") {
            return Err(format!("lease {ip} is not on the network"));
        }
        let outside: SocketAddr = format!("{OUTSIDE}:80").parse().unwrap();
        let forward: SocketAddr = format!("{UPLINK}:8080").parse().unwrap();
        expect("guest -> outside (NAT)", &g.ns, outside, "the outside")?;
        expect(
            "outside -> forward -> guest",
            &self.out,
            forward,
            "hello from",
        )?;
        let n = self.neighbour.as_ref().unwrap();
        n.dhcp()?;
        expect(
            "neighbour -> forward -> guest (hairpin)",
            &n.ns,
            forward,
            "hello from",
        )?;
        let ip6 = g.slaac(TRY)?;
        if !ip6.starts_with("fd78::") {
            return Err(format!("IPv6 address {ip6} is not on the network"));
        }
        let outside6: SocketAddr = format!("[{OUTSIDE6}]:80").parse().unwrap();
        let forward6: SocketAddr = format!("[{UPLINK6}]:8080").parse().unwrap();
        expect(
            "guest -> outside over IPv6 (NAT)",
            &g.ns,
            outside6,
            "the outside",
        )?;
        expect(
            "outside -> forward -> guest over IPv6",
            &self.out,
            forward6,
            "hello from",
        )
    }

    fn assert_works(&self, when: &str, extra_log: impl Fn() -> String) {
        if let Err(e) = self.check() {
            panic!(
                "{when}: {e}\n--- iptables ---\n{}\n--- ip6tables ---\n{}\n--- nft ---\n{}\n--- peer log ---\n{}\n--- hookd log ---\n{}",
                self.hk.exec("iptables-nft", &["-S"]).unwrap_or_default(),
                self.hk.exec("ip6tables-nft", &["-S"]).unwrap_or_default(),
                self.hk.exec("nft", &["list", "ruleset"]).unwrap_or_default(),
                extra_log(),
                self.hookd.log()
            );
        }
    }

    fn network_down(&self) {
        self.hookd.qnetctl(&["network", "down", "lab"]).unwrap();
    }
}

/// `from` fetches `addr`: the step `what` of [`World::check`] works if the
/// answer holds `want`.
fn expect(what: &str, from: &NetNs, addr: SocketAddr, want: &str) -> Result<(), String> {
    match http_get_in_netns(from.name(), addr, "/", TRY) {
        Ok(body) if body.contains(want) => Ok(()),
        Ok(body) => Err(format!("{what}: unexpected answer {body:?}")),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Panics unless no qnet mark is left in any iptables backend of `ns`.
fn assert_no_marks(ns: &NetNs, why: &str) {
    assert_eq!(iptables_marks(ns), Vec::<String>::new(), "{why}");
}

/// `qnetctl --json doctor [TARGET]`: whether it exited 0, and the
/// problems as `SUBJECT: PROBLEM` lines with their fixes.
fn doctor(hookd: &Hookd, target: Option<&str>) -> (bool, Vec<(String, String)>) {
    doctor_with(hookd, target.as_slice())
}

/// `qnetctl --json doctor ARGS...`, as [`doctor`].
fn doctor_with(hookd: &Hookd, args: &[&str]) -> (bool, Vec<(String, String)>) {
    let out = std::process::Command::new(workspace_binary("qnetctl"))
        .arg("--socket")
        .arg(hookd.ctl_socket())
        .args(["--json", "doctor"])
        .args(args)
        .output()
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let problems = reply["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"))
        .iter()
        .map(|p| {
            (
                format!(
                    "{}: {}",
                    p["subject"].as_str().unwrap(),
                    p["problem"].as_str().unwrap()
                ),
                p["fix"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (out.status.success(), problems)
}

/// Integrated, doctor finds nothing (and says so with exit status 0).
fn assert_doctor_clean(world: &World) {
    let (ok, problems) = doctor(&world.hookd, None);
    assert!(ok && problems.is_empty(), "doctor: {problems:#?}");
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `qnet-hookd --cleanup` in `ns`, which must succeed.
fn cleanup(ns: &NetNs, env: &[(&str, &str)]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(workspace_binary("qnet-hookd"))
        .arg("--cleanup")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "--cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kill -9 and restart: the same marks, no duplicates.
fn assert_restart_adopts(world: &mut World, marks: impl Fn(&NetNs) -> Vec<String>) {
    let before = marks(&world.hk);
    assert!(!before.is_empty(), "nothing of qnet's to adopt");
    world.hookd.kill9();
    world.hookd.spawn();
    let mut after = marks(&world.hk);
    after.sort();
    let mut sorted = before.clone();
    sorted.sort();
    assert_eq!(
        after, sorted,
        "a restart after kill -9 must adopt qnet's rules, not add more"
    );
}

#[test]
fn no_other_firewall() {
    let world = World::new("fwno");
    world.assert_works("no other firewall", String::new);
    assert_no_marks(&world.hk, "nothing drops: nothing added");
}

#[test]
fn dockerd_started_before_hookd() {
    let (hk, out, web) = World::namespaces("fwdk1");
    let mut docker = Dockerd::start(&hk);
    assert_eq!(
        hk.exec("iptables-nft", &["-S", "FORWARD"])
            .unwrap()
            .lines()
            .next(),
        Some("-P FORWARD DROP"),
        "dockerd turning ip_forward on sets the FORWARD policy to DROP"
    );
    let mut world = World::start(hk, out, web, &[]);
    world.assert_works("dockerd before hookd", || docker.log());
    assert_doctor_clean(&world);
    let marks = iptables_marks(&world.hk);
    assert!(marks.iter().all(|m| m.contains("DOCKER-USER")), "{marks:?}");

    docker.restart(&world.hk);
    world.assert_works("after a dockerd restart", || docker.log());
    assert_restart_adopts(&mut world, iptables_marks);
    world.assert_works("after hookd kill -9 and restart", || docker.log());

    world.network_down();
    assert_no_marks(&world.hk, "network down leaves nothing");
}

#[test]
fn dockerd_started_after_hookd() {
    let world = World::new("fwdk2");
    let docker = Dockerd::start(&world.hk);
    // The policy does not matter then (ip_forward was on already), but a
    // later `iptables -P FORWARD DROP` would: qnet opens its bridge in
    // DOCKER-USER as soon as it appears.
    wait_until("qnet's accepts in DOCKER-USER", || {
        iptables_marks(&world.hk)
            .iter()
            .any(|m| m.contains("-A DOCKER-USER"))
    });
    world
        .hk
        .exec("iptables-nft", &["-P", "FORWARD", "DROP"])
        .unwrap();
    world.assert_works("dockerd after hookd, FORWARD policy DROP", || docker.log());
}

#[test]
fn iptables_nft_drop_policy_before_hookd() {
    let (hk, out, web) = World::namespaces("fwin");
    drop_policies(&hk, "nft");
    let mut world = World::start(hk, out, web, &[]);
    world.assert_works("iptables-nft with DROP policies", String::new);
    assert_doctor_clean(&world);
    assert_restart_adopts(&mut world, iptables_marks);
    world.network_down();
    assert_no_marks(&world.hk, "network down leaves nothing");
}

#[test]
fn iptables_legacy_drop_policy_after_hookd() {
    let world = World::new("fwil");
    drop_policies(&world.hk, "legacy");
    wait_until("qnet's accepts in the legacy FORWARD chain", || {
        iptables_marks(&world.hk)
            .iter()
            .any(|m| m.starts_with("iptables-legacy: -A FORWARD"))
    });
    world.assert_works(
        "iptables-legacy with DROP policies set after hookd",
        String::new,
    );
    // Uninstall: the daemon stopped, --cleanup removes every mark.
    let mut world = world;
    world.hookd.terminate();
    cleanup(&world.hk, &[]);
    assert_no_marks(&world.hk, "--cleanup leaves nothing");
}

#[test]
fn firewalld_started_before_hookd_then_reload_restart_and_cleanup() {
    let (hk, out, web) = World::namespaces("fwfd1");
    let mut fw = Firewalld::start(&hk);
    let bus = fw.bus_address();
    let mut world = World::start(hk, out, web, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)]);
    assert_eq!(fw.zone_of(BRIDGE), "qnet-nat");
    world.assert_works("firewalld before hookd", || fw.log());
    assert_doctor_clean(&world);

    fw.cmd(&["--reload"]).unwrap();
    wait_until("the bridge back in its zone after --reload", || {
        fw.zone_of(BRIDGE) == "qnet-nat"
    });
    world.assert_works("after firewall-cmd --reload", || fw.log());

    fw.restart();
    wait_until("the bridge back in its zone after a restart", || {
        fw.zone_of(BRIDGE) == "qnet-nat"
    });
    world.assert_works("after a firewalld restart", || fw.log());

    world.hookd.kill9();
    world.hookd.spawn();
    assert_eq!(fw.zone_of(BRIDGE), "qnet-nat");
    world.network_down();
    assert_ne!(
        fw.zone_of(BRIDGE),
        "qnet-nat",
        "network down takes the bridge out of qnet's zone"
    );
    assert_eq!(
        fw.cmd(&["--permanent", "--zone", "qnet-nat", "--list-interfaces"])
            .unwrap()
            .trim(),
        ""
    );

    world.hookd.terminate();
    cleanup(&world.hk, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)]);
    assert_eq!(
        fw.marks(),
        Vec::<String>::new(),
        "--cleanup leaves no zone or policy"
    );
    assert!(
        world
            .hk
            .exec("nft", &["list", "table", "inet", "qnet"])
            .is_err(),
        "--cleanup removes table inet qnet"
    );
    world.guest.take();
    world.neighbour.take();
}

#[test]
fn firewalld_started_after_hookd() {
    let (hk, out, web) = World::namespaces("fwfd2");
    // The bus comes first, then hookd, then firewalld (NameOwnerChanged).
    let mut fw = Firewalld::bus_only(&hk);
    let bus = fw.bus_address();
    let world = World::start(hk, out, web, &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)]);
    fw.start_daemon();
    wait_until("the bridge in qnet's zone", || {
        fw.zone_of(BRIDGE) == "qnet-nat"
    });
    world.assert_works("firewalld (re)started after hookd", || fw.log());
}

#[test]
fn doctor_names_every_drop_when_integration_is_off() {
    let (hk, out, web) = World::namespaces("fwdo");
    drop_policies(&hk, "nft");
    let fw = Firewalld::start(&hk);
    let bus = fw.bus_address();
    let config = format!("firewall-integration = false\n{}", hookd_toml());
    let hookd = Hookd::start_with_env(&hk, Some(&config), &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)]);
    let guest = VethGuest::new(&hk, BRIDGE, "fwdog", "52:54:00:7e:00:03");
    guest.register(&hookd.ctl_socket(), BRIDGE, FORWARD);
    // The setup is really broken: no lease.
    assert!(
        guest.dhcp().is_err(),
        "a lease through firewalld and a DROP policy?"
    );

    let (ok, problems) = doctor(&hookd, None);
    assert!(!ok, "doctor must fail when it finds problems");
    let lines: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
    let expected = [
        "lab: iptables-nft: policy DROP of chain FORWARD drops the guests' outbound and forwarded packets; firewall-integration is off",
        "lab: iptables-nft: policy DROP of chain INPUT drops the guests' DHCP and DNS to the host; firewall-integration is off",
        "lab: ip6tables-nft: policy DROP of chain FORWARD drops the guests' outbound and forwarded packets; firewall-integration is off",
        "lab: ip6tables-nft: policy DROP of chain INPUT drops the guests' DHCP and DNS to the host; firewall-integration is off",
        "lab: firewalld puts bridge qnfw in zone `public`, which rejects the guests' DHCP and DNS and their forwarded packets; firewall-integration is off",
    ];
    assert_eq!(lines, expected, "{problems:#?}\n{}", hookd.log());
    assert!(
        problems[1]
            .1
            .contains("`iptables-nft -I INPUT 1 -i qnfw -p udp -m udp --dport 67 -j ACCEPT`"),
        "{}",
        problems[1].1
    );
    assert!(
        problems[4].1.contains("--change-interface=qnfw"),
        "{}",
        problems[4].1
    );
    // By guest: the same problems (its one network).
    assert_eq!(doctor(&hookd, Some("fwdog")).1, problems);
    // Nothing was integrated.
    assert_no_marks(&hk, "nothing was integrated");
    assert_eq!(fw.marks(), Vec::<String>::new());
    drop(guest);
    drop((hookd, web, out));
}

/// A hand-written nftables firewall (as in /etc/nftables.conf: a table of
/// its own, no iptables, no firewalld) with a forward policy of drop: the
/// static checks cannot see it; `doctor --trace` sends a synthetic guest
/// packet through the real ruleset and names the table, chain and
/// verdict, and leaves nothing behind. Also: a bridge whose MAC someone
/// changed is named with the command that sets it back.
#[test]
fn doctor_trace_names_a_drop_the_static_checks_cannot_see() {
    let (hk, out, web) = World::namespaces("fwtr");
    // Routed somewhere, so that the probe reaches the forward hook.
    hk.ip(&["route", "add", "default", "via", OUTSIDE]);
    let world = World::start(hk, out, web, &[]);
    world.guest().dhcp().unwrap();
    let rules = "table inet filter {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n}\n";
    let script = world.hookd.dir().join("nftables.conf");
    std::fs::write(&script, rules).unwrap();
    world
        .hk
        .exec("nft", &["-f", script.to_str().unwrap()])
        .unwrap();
    assert_doctor_clean(&world);

    let (ok, problems) = doctor_with(&world.hookd, &["--trace", "lab"]);
    assert!(!ok, "doctor --trace must fail when it finds a drop");
    let lines: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        lines,
        ["lab: nftrace: a guest's new connection out (TCP 10.78.0.254:40404 -> 203.0.113.1:80) is dropped in table inet filter, chain forward, by policy drop"],
        "{problems:#?}\n{}",
        world.hookd.log()
    );
    assert_eq!(
        problems[0].1,
        "accept it in that chain: `nft insert rule inet filter forward iifname \"qnfw\" accept`"
    );
    let leftovers = |ns: &NetNs| {
        (
            ns.try_ip(&["link", "show", "qnprobe0"]).is_ok(),
            ns.exec("nft", &["list", "table", "inet", "qnet_probe"])
                .is_ok(),
        )
    };
    assert_eq!(
        leftovers(&world.hk),
        (false, false),
        "the probe leaves nothing"
    );
    // The fix doctor gave (and the replies), then the trace is clean.
    world
        .hk
        .exec(
            "nft",
            &[
                "insert", "rule", "inet", "filter", "forward", "iifname", BRIDGE, "accept",
            ],
        )
        .unwrap();
    world
        .hk
        .exec(
            "nft",
            &[
                "insert",
                "rule",
                "inet",
                "filter",
                "forward",
                "ct",
                "state",
                "established,related",
                "accept",
            ],
        )
        .unwrap();
    let (ok, problems) = doctor_with(&world.hookd, &["--trace", "lab"]);
    assert!(ok && problems.is_empty(), "{problems:#?}");
    // The bridge's fixed MAC, changed behind qnet's back.
    world
        .hk
        .ip(&["link", "set", BRIDGE, "address", "02:00:00:00:00:42"]);
    let (ok, problems) = doctor(&world.hookd, None);
    assert!(!ok);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0]
            .0
            .starts_with("lab: bridge qnfw has MAC 02:00:00:00:00:42, not qnet's fixed 02:"),
        "{problems:#?}"
    );
    assert!(
        problems[0].1.starts_with("`ip link set qnfw address 02:"),
        "{problems:#?}"
    );
}

/// The real test guest (QEMU, TCG) on a qnet network next to a dockerd
/// that started first: its lease, outbound NAT (the guest's own probe)
/// and the forward from outside.
#[test]
fn real_guest_next_to_dockerd() {
    use qnet_tests::guest::{
        check_prerequisites, guest_image, random_token, target_dir, GuestSpec, ProbeOutcome,
        RunningGuest,
    };
    use qnet_tests::hookd::qmp_client_args;
    use qnet_tests::sandbox::{sandboxed, ConfigDir};
    check_prerequisites().unwrap_or_else(|e| panic!("{e}"));
    let (hk, out, _web) = World::namespaces("fwrg");
    let docker = Dockerd::start(&hk);
    let hookd = Hookd::start(&hk, Some(&hookd_toml()));
    let config = ConfigDir::new();
    config.write("bridge.conf", &format!("allow {BRIDGE}\n"));
    let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
    let token = random_token();
    let mut spec = GuestSpec::new(&image, "52:54:00:7e:00:09", &token);
    spec.extra_append = vec![
        format!("qnet.probe={OUTSIDE}:80"),
        "qnet.probe_tries=5".into(),
    ];
    let logs = target_dir().join("qnet-test-logs").join(hk.name());
    std::fs::create_dir_all(&logs).unwrap();
    let serial = logs.join(format!("real-{token}.log"));
    let helper = workspace_binary("qnet-bridge-helper");
    let mut qemu = sandboxed("qemu-system-x86_64", &hk, &config, None);
    qemu.args(spec.qemu_args(
        &format!("bridge,id=n0,br={BRIDGE},helper={}", helper.display()),
        &serial,
    ))
    .args(["-name", "fwreal"])
    .args(qmp_client_args(&hookd.qmp_socket()));
    let guest = RunningGuest::spawn(qemu, &serial).unwrap_or_else(|e| panic!("{e}"));
    let context = || {
        format!(
            "--- dockerd ---\n{}\n--- hookd ---\n{}",
            docker.log(),
            hookd.log()
        )
    };
    let lease = guest
        .wait_for_lease(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", context()));
    assert!(lease.to_string().starts_with("10.78.0."), "{lease}");
    match guest.wait_for_probe_to(&format!("{OUTSIDE}:80"), Duration::from_secs(90)) {
        Ok(ProbeOutcome::Reached { body }) => assert!(body.contains("outside"), "{body}"),
        other => panic!("guest -> outside: {other:?}\n{}", context()),
    }
    guest
        .wait_for_ready(Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}\n{}", context()));
    hookd
        .qnetctl(&["forward", "add", "fwreal", "tcp", "8080:80"])
        .unwrap_or_else(|e| panic!("forward add: {e}\n{}", context()));
    let forward: SocketAddr = format!("{UPLINK}:8080").parse().unwrap();
    let body = http_get_in_netns(out.name(), forward, "/", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("outside -> forward -> guest: {e}\n{}", context()));
    assert_eq!(body.trim(), token);
}
