//! dnsmasq's own CPU for one guest connecting, against how many guests are
//! already there: what a guest connecting costs dnsmasq, apart from qnet.
//!
//! Run as root: `cargo bench -p qnet-hookd --bench dnsmasq_inotify [N...]`
//! (N = 100, 1,000 and 3,000 by default). For each N and each kind of
//! change, network namespaces of their own (`qnet-test-dnsb-*`, deleted on
//! exit and on panic) with a network brought up by the daemon's own code
//! and its dnsmasq spawned by the daemon's own handle, with the daemon's
//! config. dnsmasq starts with N reservations, each with its name, and N
//! leases (its lease file), then 200 more guests come, each once dnsmasq
//! is done with the one before, and each adding:
//! - `reservation`: its reservation file only (a guest without a name);
//! - `name`: its name file only (a guest whose reservation was kept);
//! - `both`: both (a new guest with a name);
//! - `lease`: nothing of qnet's (its reservation was there from the
//!   start); it takes its lease, as a booting guest does, with busybox
//!   `udhcpc` from a namespace plugged into the bridge;
//! - `SIGHUP`: nothing; dnsmasq is sent a SIGHUP, as it is for a
//!   reservation that changes or goes (a row is then per SIGHUP).
//!
//! Printed: dnsmasq's CPU time over those 200 (`/proc/PID/schedstat`, in
//! nanoseconds), per guest. Waiting for dnsmasq to be done with each guest
//! means that a dnsmasq that cannot keep up is measured whole, not
//! capped by how fast guests came.
//!
//! Why: dnsmasq reads a new file in `dhcp-hostsdir` or `hostsdir` by
//! itself, and after each one re-derives every reservation and lease
//! (its inotify handler calls `dhcp_update_configs`,
//! `lease_update_from_configs`, `lease_update_file` and
//! `lease_update_dns`), so this grows with N whatever qnet does. `lease`
//! shows what no way of feeding dnsmasq avoids: each lease it grants
//! rewrites its whole lease file (`lease_update_file`), and each DHCP
//! packet looks the client up in its list of reservations.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{network, own, own_mut, plug_guest, NetNs};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use qnet_hookd::api::{DnsLabel, Mac, Mode};
use qnet_hookd::dnsmasq::{spawn, DhcpHost, DnsHost, Paths};
use qnet_hookd::network::bring_up;
use qnet_tests::procfs::wait_idle;

const ADDED: u32 = 200;
/// dnsmasq is done with a change once it has run and then not for this.
const QUIET: Duration = Duration::from_millis(50);
/// The longest one change may take it.
const LIMIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy)]
enum Kind {
    Reservation,
    Name,
    Both,
    Lease,
    Reload,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Reservation => "reservation",
            Kind::Name => "name",
            Kind::Both => "both",
            Kind::Lease => "lease",
            Kind::Reload => "SIGHUP",
        }
    }
}

fn main() {
    qnet_tests::require_root();
    qnet_tests::require_tool("dnsmasq", "dnsmasq");
    qnet_tests::require_tool("busybox", "busybox-static");
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
        for kind in [
            Kind::Reservation,
            Kind::Name,
            Kind::Both,
            Kind::Lease,
            Kind::Reload,
        ] {
            let ms = measure(n, kind);
            println!("| {n} | {} | {ms:.3} ms |", kind.label());
        }
    }
}

/// Guest `i`'s reservation (its name `g<i>`, with one) and name.
fn guest(i: u32, named: bool) -> (DhcpHost, DnsHost) {
    let ip = Ipv4Addr::from(u32::from(FIRST) + i);
    let [_, b, c, d] = i.to_be_bytes();
    let name: DnsLabel = format!("g{i}").parse().unwrap();
    let reservation = DhcpHost {
        mac: Mac::from_octets([0x52, 0x54, 0, b, c, d]),
        ip,
        name: named.then(|| name.clone()),
    };
    (reservation, DnsHost { ip, name })
}

/// The first guest's address; the DHCP range runs from it to the end of
/// the /16, so that every guest's reservation is in it and dnsmasq's
/// lease limit (the range's size) is never reached.
const FIRST: Ipv4Addr = Ipv4Addr::new(10, 98, 1, 0);

/// A lease file holding a lease for each of the first `n` guests, as
/// dnsmasq writes it: expiry, MAC, address, name, client id.
fn lease_file(n: u32) -> String {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    (0..n)
        .map(|i| {
            let (host, name) = guest(i, true);
            format!("{expiry} {} {} {} *\n", host.mac, host.ip, name.name)
        })
        .collect()
}

/// Guest `i`'s DHCP, from `client`'s `eth0` with the guest's MAC: a
/// fresh DISCOVER, as a booting guest sends. Panics unless it gets its
/// reservation.
fn take_lease(client: &NetNs, i: u32) {
    let (host, _) = guest(i, true);
    // A veth takes a new MAC while up: taking it down would take the
    // bridge's carrier down with it, and dnsmasq would be measured
    // following its interface as well.
    client.ip(&["link", "set", "eth0", "address", &host.mac.to_string()]);
    let out = client.exec_output(&[
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-f",
        "-q",
        "-n",
        "-t",
        "5",
        "-T",
        "1",
        "-s",
        "/bin/true",
    ]);
    // udhcpc says what it got on stderr.
    let out = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.contains(&format!("lease of {} obtained", host.ip)),
        "guest {i} did not get its reservation:\n{out}"
    );
}

/// dnsmasq's CPU per guest of `kind` added to `n` (see the module doc).
fn measure(n: u32, kind: Kind) -> f64 {
    let ns = NetNs::new("dnsb");
    let client = NetNs::new("dnsb-c");
    let mut net = network("bench", "qnbench", Mode::Nat, "10.98.0.0/16");
    own_mut(&mut net).dhcp_range = (FIRST, Ipv4Addr::new(10, 98, 255, 254));
    let dir = tempfile::tempdir().expect("tempdir");
    // dnsmasq drops root and reads its files as another user.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let paths = Paths {
        run_dir: dir.path().join("run"),
        state_dir: dir.path().join("state"),
    };
    std::fs::create_dir_all(&paths.state_dir).unwrap();
    std::fs::write(paths.lease_file("bench"), lease_file(n)).unwrap();
    ns.block_on(|| async {
        bring_up(&net).await.expect("bring_up");
        plug_guest(&ns, "qnbench", "cport", &client, "52:54:00:ff:ff:ff");
        let handle = spawn(&net, own(&net), &paths).expect("spawn dnsmasq");
        // A guest that takes a lease had its reservation from the start.
        let there = if matches!(kind, Kind::Lease) {
            n + ADDED
        } else {
            n
        };
        let (mut dhcp, mut dns): (Vec<_>, Vec<_>) = (0..there).map(|i| guest(i, true)).unzip();
        // Before dnsmasq is ready: it reads them all once, with a SIGHUP.
        handle
            .set_hosts(dhcp.clone(), dns.clone())
            .await
            .expect("hosts");
        let pid = handle
            .wait_ready(Duration::from_secs(20))
            .await
            .expect("dnsmasq starts");
        let mut cpu = wait_idle(pid, 0, QUIET, LIMIT);

        let before = cpu;
        for i in n..n + ADDED {
            match kind {
                Kind::Lease => take_lease(&client, i),
                Kind::Reload => {
                    let pid = Pid::from_raw(i32::try_from(pid).unwrap());
                    nix::sys::signal::kill(pid, Signal::SIGHUP).expect("SIGHUP dnsmasq");
                }
                Kind::Reservation | Kind::Name | Kind::Both => {
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
                }
            }
            cpu = wait_idle(pid, cpu, QUIET, LIMIT);
        }
        handle.stop().await;
        (cpu - before) as f64 / 1e6 / f64::from(ADDED)
    })
}
