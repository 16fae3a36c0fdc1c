//! dnsmasq's own CPU for one guest's hosts files, against how many are
//! already there: what a guest connecting costs dnsmasq, apart from qnet.
//!
//! Run as root: `cargo bench -p qnet-hookd --bench dnsmasq_inotify [N...]`
//! (N = 100, 1,000 and 3,000 by default). For each N and each kind of
//! change, a network namespace of its own (`qnet-test-dnsb-*`, deleted on
//! exit and on panic) with a network brought up by the daemon's own code
//! and its dnsmasq spawned by the daemon's own handle, with the daemon's
//! config. The handle gets N reservations, each with its name, then 200
//! more guests one every 10 ms, each adding:
//! - `reservation`: its reservation file only (a guest without a name);
//! - `name`: its name file only (a guest whose reservation was kept);
//! - `both`: both (a new guest with a name).
//!
//! Printed: dnsmasq's utime + stime over those 200 (plus one settling
//! second) per guest. A tick is 10 ms, so the resolution is 0.05 ms.
//!
//! Why: dnsmasq reads a new file in `dhcp-hostsdir` or `hostsdir` by
//! itself, and after each one re-derives every reservation and lease
//! (its inotify handler calls `dhcp_update_configs`,
//! `lease_update_from_configs`, `lease_update_file` and
//! `lease_update_dns`), so this grows with N whatever qnet does.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{network, own, NetNs};
use qnet_hookd::api::{DnsLabel, Mac, Mode};
use qnet_hookd::dnsmasq::{spawn, DhcpHost, DnsHost, Paths};
use qnet_hookd::network::bring_up;
use qnet_tests::procfs::{clock_ticks_per_sec, cpu_ticks};

const ADDED: u32 = 200;
const EVERY: Duration = Duration::from_millis(10);

#[derive(Clone, Copy)]
enum Kind {
    Reservation,
    Name,
    Both,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Reservation => "reservation",
            Kind::Name => "name",
            Kind::Both => "both",
        }
    }
}

fn main() {
    qnet_tests::require_root();
    qnet_tests::require_tool("dnsmasq", "dnsmasq");
    let counts: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![100, 1_000, 3_000]
    } else {
        counts
    };
    let version = std::process::Command::new("dnsmasq")
        .arg("--version")
        .output()
        .expect("dnsmasq --version");
    let version = String::from_utf8_lossy(&version.stdout);
    println!("{}", version.lines().next().unwrap_or("dnsmasq"));
    println!();
    println!("| guests already there | each new guest adds | dnsmasq CPU per guest |");
    println!("|---|---|---|");
    for n in counts {
        for kind in [Kind::Reservation, Kind::Name, Kind::Both] {
            let ms = measure(n, kind);
            println!("| {n} | {} | {ms:.2} ms |", kind.label());
        }
    }
}

/// Guest `i`'s reservation (its name `g<i>`, with one) and name.
fn guest(i: u32, named: bool) -> (DhcpHost, DnsHost) {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 98, 1, 0)) + i);
    let [_, b, c, d] = i.to_be_bytes();
    let name: DnsLabel = format!("g{i}").parse().unwrap();
    let reservation = DhcpHost {
        mac: Mac::from_octets([0x52, 0x54, 0, b, c, d]),
        ip,
        name: named.then(|| name.clone()),
    };
    (reservation, DnsHost { ip, name })
}

/// dnsmasq's CPU per guest of `kind` added to `n` (see the module doc).
fn measure(n: u32, kind: Kind) -> f64 {
    let ns = NetNs::new("dnsb");
    let net = network("bench", "qnbench", Mode::Nat, "10.98.0.0/16");
    let dir = tempfile::tempdir().expect("tempdir");
    // dnsmasq drops root and reads its files as another user.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let paths = Paths {
        run_dir: dir.path().join("run"),
        state_dir: dir.path().join("state"),
    };
    ns.block_on(|| async {
        bring_up(&net).await.expect("bring_up");
        let handle = spawn(&net, own(&net), &paths).expect("spawn dnsmasq");
        let (mut dhcp, mut dns): (Vec<_>, Vec<_>) = (0..n).map(|i| guest(i, true)).unzip();
        // Before dnsmasq is ready: it reads them all once, with a SIGHUP.
        handle
            .set_hosts(dhcp.clone(), dns.clone())
            .await
            .expect("hosts");
        let pid = handle
            .wait_ready(Duration::from_secs(20))
            .await
            .expect("dnsmasq starts");
        tokio::time::sleep(Duration::from_secs(1)).await;

        let before = cpu_ticks(pid);
        for i in n..n + ADDED {
            let (reservation, name) = guest(i, !matches!(kind, Kind::Reservation));
            if !matches!(kind, Kind::Name) {
                dhcp.push(reservation);
            }
            if !matches!(kind, Kind::Reservation) {
                dns.push(name);
            }
            handle
                .set_hosts(dhcp.clone(), dns.clone())
                .await
                .expect("hosts");
            tokio::time::sleep(EVERY).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ticks = cpu_ticks(pid) - before;
        handle.stop().await;
        (ticks * 1000) as f64 / clock_ticks_per_sec() as f64 / f64::from(ADDED)
    })
}
