//! End to end: a real QEMU boots the tiny guest with its NIC attached
//! through qnet-bridge-helper; dnsmasq on the bridge hands out a reserved
//! address; the test fetches the guest's page. Everything runs inside a
//! namespace of the test's own, with the test's own `/etc/qemu`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use qnet_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use qnet_tests::guest::{
    check_prerequisites, guest_image, random_bytes, random_mac, random_token, GuestSpec,
    RunningGuest, HTTP_PORT, HTTP_TIMEOUT, LONG,
};
use qnet_tests::http::http_get_in_netns;
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::{sandboxed, ConfigDir};
use qnet_tests::workspace_binary;

/// A generous failure bound, not an expectation.
const GONE_TIMEOUT: Duration = Duration::from_secs(20);

const BRIDGE: &str = "qbr0";

/// Boots the guest with `-netdev <netdev>` (where `{helper}` is replaced by
/// the helper's path) and checks lease, page and teardown.
fn boot_through_helper(tag: &str, netdev_template: &str) {
    check_prerequisites().unwrap_or_else(|e| panic!("{e}"));
    let image = guest_image().unwrap_or_else(|e| panic!("{e}"));
    let netns = NetNs::new(tag);
    netns.add_bridge(BRIDGE, Some("10.77.0.1/24"));
    let config = ConfigDir::new();
    config.write("bridge.conf", &format!("allow {BRIDGE}\n"));

    let logs = qnet_tests::guest::fresh_log_dir(netns.name());
    let mac = random_mac();
    let reserved = Ipv4Addr::new(10, 77, 0, 2 + random_bytes::<1>()[0] % 90);
    let _dnsmasq = Dnsmasq::start(
        &DnsmasqConfig::new(
            netns.name(),
            BRIDGE,
            Ipv4Addr::new(10, 77, 0, 100),
            Ipv4Addr::new(10, 77, 0, 150),
            logs.join("dnsmasq.log"),
        )
        .host(&mac, reserved, Some("guest")),
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let helper = workspace_binary("qnet-bridge-helper");
    let netdev = netdev_template.replace("{helper}", helper.to_str().unwrap());
    let token = random_token();
    let serial = logs.join("serial.log");
    let spec = GuestSpec::new(&image, &mac, &token);
    let planned = spec.qemu_command(&netdev, &serial);
    let mut qemu = sandboxed(planned.get_program(), &netns, &config, None);
    qemu.args(planned.get_args());
    let guest = RunningGuest::spawn(qemu, &serial).unwrap_or_else(|e| panic!("{e}"));

    let leased = guest.wait_for_lease(LONG).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(leased, reserved, "guest did not get its reserved address");

    // The helper's TAP is the bridge's only port, with a fe: MAC.
    let ports = netns.ip(&["-o", "link", "show", "master", BRIDGE]);
    assert_eq!(ports.lines().count(), 1, "{ports}");
    assert!(ports.contains("link/ether fe:"), "{ports}");
    let tap = ports.split(": ").nth(1).unwrap().to_string();

    let page = http_get_in_netns(
        netns.name(),
        SocketAddr::from((reserved, HTTP_PORT)),
        "/",
        HTTP_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(page, token, "page did not come from this guest");

    // QEMU gone → the TAP (not persistent) is gone.
    drop(guest);
    let deadline = Instant::now() + GONE_TIMEOUT;
    while netns.link_names().contains(&tap) {
        assert!(Instant::now() < deadline, "{tap} outlived QEMU");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn guest_on_netdev_bridge_gets_its_lease_and_serves_its_page() {
    boot_through_helper("guest-bridge", "bridge,id=n0,br=qbr0,helper={helper}");
}

#[test]
fn guest_on_netdev_tap_helper_in_sh_c_form() {
    // A space in the helper string makes QEMU run it through /bin/sh -c;
    // `-netdev tap` has no br= of its own, so the bridge comes from there.
    boot_through_helper("guest-tap", "tap,id=n0,helper={helper} --br=qbr0");
}
