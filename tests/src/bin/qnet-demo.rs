//! The demo a new user runs (`./demo.sh`): qnet-hookd brings up its
//! default NAT network, a tiny guest boots on it through
//! qnet-bridge-helper and gets its sticky address, a port forward
//! host:8080 → guest:80 is added, and the guest's page is fetched through
//! the forward from an "outside" namespace. Each step is printed.
//!
//! Everything happens in private network namespaces and a private mount
//! namespace (with its own `/etc/qemu`); the host's network and files are
//! left alone, and everything is removed at the end.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use qnet_tests::guest::{
    check_prerequisites, guest_image, random_mac, random_token, GuestSpec, RunningGuest,
};
use qnet_tests::hookd::{qmp_client_args, Hookd};
use qnet_tests::http::http_get_in_netns;
use qnet_tests::netns::{host_and_outside, OUTSIDE, UPLINK};
use qnet_tests::sandbox::{sandboxed, ConfigDir};
use qnet_tests::workspace_binary;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!(
                "\nDone: network, lease, forward and fetch all worked. Everything was cleaned up."
            );
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
            "run the demo as root (./demo.sh uses sudo): it creates network namespaces".into(),
        );
    }
    check_prerequisites()?;
    let helper = workspace_binary("qnet-bridge-helper");

    step(1, "building the tiny guest (Debian cloud kernel + busybox initramfs; cached under target/qnet-guest)");
    let image = guest_image()?;

    // "host" runs the daemon and the guest; "outside" is another machine on
    // the host's uplink (all addresses live inside these namespaces).
    let (host, outside) = host_and_outside("demo-host", "demo-out", UPLINK, OUTSIDE);
    step(
        2,
        format!(
            "namespaces: {} (the host, uplink {UPLINK}) and {} (the outside, {OUTSIDE})",
            host.name(),
            outside.name()
        ),
    );

    let hookd = Hookd::start(&host, None);
    let status = hookd.qnetctl(&["status"])?;
    let net = &status["networks"][0];
    let bridge = net["bridge"].as_str().unwrap_or("qnet0").to_string();
    step(
        3,
        format!(
            "{} up with its default network: {} ({}, {} on bridge {bridge}, dnsmasq for DHCP/DNS)",
            workspace_binary("qnet-hookd").display(),
            net["name"].as_str().unwrap_or("?"),
            net["mode"].as_str().unwrap_or("?"),
            net["subnet"].as_str().unwrap_or("?"),
        ),
    );

    let config = ConfigDir::new();
    config.write("bridge.conf", &format!("allow {bridge}\n"));
    let mac = random_mac();
    let token = random_token();
    let serial = hookd.dir().join("demo-guest.log");
    let netdev = format!("bridge,id=n0,br={bridge},helper={}", helper.display());
    let mut qemu = sandboxed("qemu-system-x86_64", &host, &config, None);
    qemu.args(GuestSpec::new(&image, &mac, &token).qemu_args(&netdev, &serial))
        .args(["-name", "demo"])
        .args(qmp_client_args(&hookd.qmp_socket()));
    step(4, format!(
        "booting QEMU (TCG) with -netdev {netdev}, dialing the daemon over QMP (private /etc/qemu/bridge.conf: `allow {bridge}`)"
    ));
    let started = Instant::now();
    let guest = RunningGuest::spawn(qemu, &serial)?;
    let leased = guest.wait_for_lease(Duration::from_secs(90))?;
    let reserved = hookd.reservation(net["name"].as_str().unwrap_or("qnet0"), &mac);
    step(
        5,
        format!(
            "guest `demo` ({mac}) leased {leased} after {:.1} s (its sticky reservation: {})",
            started.elapsed().as_secs_f64(),
            reserved.as_deref().unwrap_or("none")
        ),
    );
    if reserved.as_deref() != Some(leased.to_string().as_str()) {
        return Err("the lease is not the daemon's reservation".into());
    }
    guest.wait_for_ready(Duration::from_secs(30))?;

    let added = hookd.qnetctl(&["forward", "add", "demo", "tcp", "8080:80"])?;
    step(
        6,
        format!(
            "qnetctl forward add demo tcp 8080:80 -> {}",
            added["message"].as_str().unwrap_or("?")
        ),
    );

    let target: SocketAddr = format!("{UPLINK}:8080").parse().unwrap();
    // Retried briefly while the forward settles.
    let page = http_get_in_netns(outside.name(), target, "/", Duration::from_secs(30))?;
    step(
        7,
        format!("from the outside: GET http://{target}/ -> {page:?}"),
    );
    if page != token {
        return Err(format!("the page should be the guest's token {token:?}"));
    }

    drop(guest);
    step(8, "QEMU stopped; the daemon removed its forward; removing the daemon, dnsmasq, bridge, rules and namespaces");
    Ok(())
}
