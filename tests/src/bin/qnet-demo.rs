//! The demo a new user runs (`./demo.sh`): boots the tiny guest on a
//! bridge through qnet-bridge-helper and fetches a page from it, printing
//! each step. Everything happens in a private network namespace and a
//! private mount namespace (with its own `/etc/qemu`); the host's network
//! and files are left alone, and everything is removed at the end.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use qnet_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use qnet_tests::guest::{
    check_prerequisites, guest_image, random_mac, random_token, GuestSpec, RunningGuest, HTTP_PORT,
};
use qnet_tests::http::http_get_in_netns;
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::{sandboxed, ConfigDir};
use qnet_tests::workspace_binary;

const BRIDGE: &str = "qnbr0";
const ROUTER: &str = "10.99.0.1/24";
const RESERVED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("\nDone: the guest got its address through the bridge and served its page. Everything was cleaned up.");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("\ndemo failed: {err}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: u32, text: impl AsRef<str>) {
    println!("[{n}] {}", text.as_ref());
}

fn run() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "run the demo as root (./demo.sh uses sudo): it creates a network namespace".into(),
        );
    }
    check_prerequisites()?;
    let helper = workspace_binary("qnet-bridge-helper");

    step(1, "building the tiny guest (Debian cloud kernel + busybox initramfs; cached under target/qnet-guest)");
    let image = guest_image()?;

    let netns = NetNs::new("demo");
    netns.add_bridge(BRIDGE, Some(ROUTER));
    step(
        2,
        format!(
            "network namespace {} with bridge {BRIDGE} ({ROUTER})",
            netns.name()
        ),
    );

    let config = ConfigDir::new();
    config.write("bridge.conf", &format!("allow {BRIDGE}\n"));
    step(
        3,
        format!(
            "private /etc/qemu/bridge.conf: `allow {BRIDGE}` (the host's /etc/qemu is not touched)"
        ),
    );

    let mac = random_mac();
    let logs = tempfile::Builder::new()
        .prefix("qnet-demo-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let _dnsmasq = Dnsmasq::start(
        &DnsmasqConfig::new(
            netns.name(),
            BRIDGE,
            Ipv4Addr::new(10, 99, 0, 100),
            Ipv4Addr::new(10, 99, 0, 150),
            logs.path().join("dnsmasq.log"),
        )
        .host(&mac, RESERVED, Some("demo-guest")),
    )?;
    step(
        4,
        format!("dnsmasq serves DHCP on {BRIDGE}, reserving {RESERVED} for {mac}"),
    );

    let token = random_token();
    let netdev = format!("bridge,id=n0,br={BRIDGE},helper={}", helper.display());
    let serial = logs.path().join("serial.log");
    let planned = GuestSpec::new(&image, &mac, &token).qemu_command(&netdev, &serial);
    let mut qemu = sandboxed(planned.get_program(), &netns, &config, None);
    qemu.args(planned.get_args());
    step(5, format!("booting QEMU (TCG) with -netdev {netdev}"));
    let started = Instant::now();
    let guest = RunningGuest::spawn(qemu, &serial)?;

    let leased = guest.wait_for_lease(Duration::from_secs(90))?;
    step(
        6,
        format!(
            "the guest leased {leased} after {:.1} s",
            started.elapsed().as_secs_f64()
        ),
    );
    if leased != RESERVED {
        return Err(format!(
            "expected the reserved address {RESERVED}, got {leased}"
        ));
    }

    let ports = netns.ip(&["-o", "link", "show", "master", BRIDGE]);
    for port in ports.lines() {
        let fields: Vec<&str> = port.split_whitespace().collect();
        step(
            7,
            format!(
                "the helper attached TAP {} to {BRIDGE}: {}",
                fields.get(1).unwrap_or(&"?").trim_end_matches(':'),
                summary(port)
            ),
        );
    }

    let page = http_get_in_netns(
        netns.name(),
        SocketAddr::from((leased, HTTP_PORT)),
        "/",
        Duration::from_secs(30),
    )?;
    step(8, format!("GET http://{leased}/ -> {page:?}"));
    if page != token {
        return Err(format!("the page should be the guest's token {token:?}"));
    }

    drop(guest);
    step(
        9,
        "QEMU stopped; its TAP went with it; removing dnsmasq, the namespace and the config",
    );
    Ok(())
}

/// The interesting part of an `ip -o link` line: mtu, master, state, MAC.
fn summary(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .copied()
            .unwrap_or("?")
    };
    format!(
        "mtu {}, master {}, MAC {}",
        after("mtu"),
        after("master"),
        after("link/ether")
    )
}
