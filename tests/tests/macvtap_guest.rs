//! End to end: real QEMU guests attached through qnet-macvtap-helper.
//!
//! Namespace A holds QEMU and the lower device `qv0`, one end of a veth
//! pair; the other end, `qv1`, sits in namespace B, which runs dnsmasq
//! (with a reserved lease per guest) and plays "the rest of the LAN". QEMU
//! runs in A's sandbox (A's netns, a test `/etc/qemu` with macvtap.conf)
//! and starts the helper itself, through `/bin/sh -c` as with any helper
//! string holding options:
//!
//! ```text
//! -netdev tap,id=n0,helper=<helper> --mode=MODE --mac=MAC --br=qv0
//! ```
//!
//! When QEMU is killed at the end, the reaper the helper left behind must
//! remove the macvtap.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use qnet_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use qnet_tests::fake_qemu::wait_until;
use qnet_tests::guest::{
    check_prerequisites, guest_image, random_bytes, random_mac, random_token, GuestImage,
    GuestSpec, ProbeOutcome, RunningGuest, HTTP_PORT, HTTP_TIMEOUT, LONG, READY_TIMEOUT,
};
use qnet_tests::http::http_get_in_netns;
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::{sandboxed, ConfigDir};
use qnet_tests::workspace_binary;

/// Generous failure bounds, not expectations.
/// The guest gives up probing after at most a minute.
const PROBE_TIMEOUT: Duration = Duration::from_secs(120);
const REAPER_BOUND: Duration = Duration::from_secs(10);

/// One guest to boot: its MAC, reserved address and token.
struct GuestPlan {
    mac: String,
    ip: Ipv4Addr,
    token: String,
}

/// Namespaces A and B, the veth between them, dnsmasq in B and the
/// sandbox config for QEMU in A.
struct Lan {
    // Field order is drop order: dnsmasq dies before the namespaces.
    dnsmasq: Dnsmasq,
    config: ConfigDir,
    logs: PathBuf,
    guests: Vec<GuestPlan>,
    image: GuestImage,
    a: NetNs,
    b: NetNs,
}

impl Lan {
    fn new(tag: &str, guests: usize) -> Lan {
        qnet_tests::require_root();
        check_prerequisites().expect("prerequisites");
        let image = guest_image().expect("guest image");
        let a = NetNs::new(&format!("{tag}-a"));
        let b = NetNs::new(&format!("{tag}-b"));
        let logs = qnet_tests::guest::fresh_log_dir(a.name());

        let [subnet] = random_bytes::<1>();
        let net = |host: u8| Ipv4Addr::new(10, 78, subnet, host);
        a.add_veth_to("qv0", None, &b, "qv1", Some(&format!("{}/24", net(1))));

        // Reservations outside the dynamic range: getting one proves dnsmasq
        // saw this guest's MAC, i.e. the macvtap carries the guest's frames.
        let guests: Vec<GuestPlan> = (0..guests)
            .map(|i| GuestPlan {
                mac: random_mac(),
                ip: net(10 + i as u8),
                token: random_token(),
            })
            .collect();
        let mut cfg = DnsmasqConfig::new(
            b.name(),
            "qv1",
            net(100),
            net(150),
            logs.join("dnsmasq.log"),
        );
        for (i, guest) in guests.iter().enumerate() {
            cfg = cfg.host(&guest.mac, guest.ip, Some(&format!("guest{i}")));
        }
        let dnsmasq = Dnsmasq::start(&cfg).expect("start dnsmasq");

        let config = ConfigDir::new();
        config.write("macvtap.conf", "allow qv0\n");
        Lan {
            dnsmasq,
            config,
            logs,
            guests,
            image,
            a,
            b,
        }
    }

    /// Boots guest `i` in namespace A on a `mode` macvtap on qv0, with
    /// extra kernel parameters.
    fn boot(&self, i: usize, mode: &str, extra_append: &[String]) -> RunningGuest {
        let plan = &self.guests[i];
        let mut spec = GuestSpec::new(&self.image, &plan.mac, &plan.token);
        spec.extra_append.extend(extra_append.iter().cloned());
        let helper = workspace_binary("qnet-macvtap-helper");
        assert!(!helper.to_string_lossy().contains([',', ' ']));
        let netdev = format!(
            "tap,id=n0,helper={} --mode={mode} --mac={} --br=qv0",
            helper.display(),
            plan.mac
        );
        let serial_log = self.logs.join(format!("guest{i}-serial.log"));
        let mut qemu = sandboxed("qemu-system-x86_64", &self.a, &self.config, None);
        qemu.args(spec.qemu_args(&netdev, &serial_log));
        RunningGuest::spawn(qemu, &serial_log).expect("start QEMU")
    }

    /// Waits for guest `i`'s reserved lease and servers.
    fn wait_ready(&self, i: usize, guest: &RunningGuest) {
        let lease = guest
            .wait_for_lease_info(LONG)
            .unwrap_or_else(|e| panic!("{e}\n--- dnsmasq log ---\n{}", self.dnsmasq.log()));
        assert_eq!(
            lease.ip, self.guests[i].ip,
            "guest {i} must get its reserved address"
        );
        assert_eq!(lease.mac, self.guests[i].mac);
        guest.wait_for_ready(READY_TIMEOUT).expect("guest servers");
    }

    /// Boots guest 0 in `mode` and, once it serves, guest 1, which probes
    /// guest 0's page as it boots; returns both, ready.
    fn boot_two(&self, mode: &str) -> (RunningGuest, RunningGuest) {
        let first = self.boot(0, mode, &[]);
        self.wait_ready(0, &first);
        let second = self.boot(1, mode, &probe_param(self.guests[0].ip));
        self.wait_ready(1, &second);
        (first, second)
    }

    /// B (the LAN behind the lower device) fetches guest `i`'s page.
    fn fetch_from_b(&self, i: usize) -> String {
        http_get_in_netns(
            self.b.name(),
            SocketAddr::from((self.guests[i].ip, HTTP_PORT)),
            "/",
            HTTP_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("HTTP GET of guest {i} from namespace B: {e}"))
    }

    fn macvtaps(&self) -> Vec<String> {
        self.a.links_named("qmvtap")
    }

    /// The macvtaps' `ip -d` lines, for assertions about modes.
    fn macvtap_lines(&self) -> String {
        self.a.ip(&["-d", "-o", "link", "show", "type", "macvtap"])
    }

    /// Kills the guests (QEMU) and checks that the reapers remove every
    /// macvtap.
    fn shut_down(&self, guests: Vec<RunningGuest>) {
        drop(guests);
        assert!(
            wait_until(REAPER_BOUND, || self.macvtaps().is_empty()),
            "macvtaps outlived QEMU: {:?}",
            self.macvtaps()
        );
    }
}

fn probe_param(target: Ipv4Addr) -> Vec<String> {
    vec![format!("qnet.probe={target}:{HTTP_PORT}")]
}

#[test]
fn guest_on_a_macvtap_gets_its_lease_and_serves_the_lan() {
    let lan = Lan::new("mvg-lan", 1);
    let guest = lan.boot(0, "bridge", &[]);
    lan.wait_ready(0, &guest);
    let lines = lan.macvtap_lines();
    assert!(
        lines.contains("macvtap mode bridge") && lines.contains(&lan.guests[0].mac),
        "{lines}"
    );
    assert!(
        lines.contains(&format!("qnet-macvtap uid=0 pid={} start=", guest.pid()))
            && lines.contains(" lower=qv0 "),
        "the marker must name QEMU: {lines}"
    );
    assert_eq!(
        lan.fetch_from_b(0),
        lan.guests[0].token,
        "B must get this guest's page"
    );
    lan.shut_down(vec![guest]);
}

#[test]
fn two_guests_in_bridge_mode_reach_each_other() {
    let lan = Lan::new("mvg-br", 2);
    let (first, second) = lan.boot_two("bridge");
    assert_eq!(
        second.wait_for_probe(PROBE_TIMEOUT).expect("probe result"),
        ProbeOutcome::Reached {
            body: lan.guests[0].token.clone()
        },
        "in bridge mode the second guest must reach the first"
    );
    assert_eq!(lan.fetch_from_b(1), lan.guests[1].token);
    lan.shut_down(vec![first, second]);
}

#[test]
fn two_guests_in_private_mode_do_not_reach_each_other() {
    let lan = Lan::new("mvg-priv", 2);
    let (first, second) = lan.boot_two("private");
    let lines = lan.macvtap_lines();
    assert_eq!(lines.matches("macvtap mode private").count(), 2, "{lines}");
    // Both are on the LAN (B reaches both)...
    assert_eq!(lan.fetch_from_b(0), lan.guests[0].token);
    assert_eq!(lan.fetch_from_b(1), lan.guests[1].token);
    // ...but not on each other's.
    assert_eq!(
        second.wait_for_probe(PROBE_TIMEOUT).expect("probe result"),
        ProbeOutcome::Failed,
        "in private mode the second guest must not reach the first"
    );
    lan.shut_down(vec![first, second]);
}
