//! Exec → fd-received latency of qnet-macvtap-helper next to
//! qnet-bridge-helper, measured alternately in one run.
//!
//! Run as root: `make helpers && cargo build --release --workspace &&
//! cargo bench -p qnet-tests --bench macvtap_latency [ROUNDS]`.
//!
//! The parent makes a network namespace with a bridge (`qbrbench`) and a
//! veth pair (`qvbench`/`qvbench-p`, the macvtap's lower device), a config
//! dir allowing both, and re-runs itself as a worker inside the sandbox
//! (its own netns, `/etc/qemu` and sysfs), so the timed spawns pay no
//! namespace set-up. Each sample acts as QEMU does: socketpair, spawn
//! `HELPER [ARGS] --use-vnet --fd=N --br=DEV`, receive the fd, wait for the
//! exit. `/bin/true` is timed the same way as the floor of starting any
//! process.
//!
//! A macvtap outlives its fd, and the worker plays QEMU for every sample, so
//! each sample's macvtap is deleted by the worker after the sample (outside
//! the timing); that keeps every sample at the same cost (`qmvtap0` is
//! free again). The reapers the samples leave wait for the worker and exit
//! with it. Results are printed as a Markdown table.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use qnet_hostnet::fdpass::recv_fd;
use qnet_hostnet::link::LinkSocket;
use qnet_hostnet::tap::tap_info;
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::{sandboxed, ConfigDir};
use qnet_tests::workspace_binary;

const BRIDGE: &str = "qbrbench";
const LOWER: &str = "qvbench";
const WORKER_ENV: &str = "QNET_BENCH_WORKER";

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    if std::env::var_os(WORKER_ENV).is_some() {
        worker(rounds);
        return;
    }
    let macvtap = installed_helper("qnet-macvtap-helper");
    let bridge = installed_helper("qnet-bridge-helper");
    println!("measuring {} and {}", macvtap.display(), bridge.display());
    let netns = NetNs::new("mvbench");
    netns.add_bridge(BRIDGE, None);
    netns.ip(&[
        "link",
        "add",
        LOWER,
        "type",
        "veth",
        "peer",
        "name",
        "qvbench-p",
    ]);
    netns.ip(&["link", "set", LOWER, "up"]);
    let config = ConfigDir::new();
    config.write("bridge.conf", &format!("allow {BRIDGE}\n"));
    config.write("macvtap.conf", &format!("allow {LOWER}\n"));

    let status = sandboxed(std::env::current_exe().unwrap(), &netns, &config, None)
        .env(WORKER_ENV, "1")
        .env("QNET_BENCH_MACVTAP", &macvtap)
        .env("QNET_BENCH_BRIDGE", &bridge)
        .arg(rounds.to_string())
        .status()
        .expect("run worker");
    assert!(status.success(), "benchmark worker failed: {status}");
}

/// The helper as installed: the static build `make helpers` makes, else
/// the plain release build.
fn installed_helper(name: &str) -> PathBuf {
    let release = workspace_binary(name);
    let host = env!("QNET_HOST_TRIPLE");
    let static_build = release
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join(host).join("release").join(name));
    match static_build {
        Some(path) if path.exists() => path,
        _ => release,
    }
}

struct Candidate {
    label: &'static str,
    program: PathBuf,
    args: Vec<String>,
    /// The device to pass as `--br=`; `None`: not a helper (sends no fd).
    br: Option<&'static str>,
    /// Delete the received device after the sample (a macvtap).
    delete_after: bool,
    fd_received: Vec<Duration>,
    exited: Vec<Duration>,
}

fn worker(rounds: usize) {
    let env_path = |key: &str| PathBuf::from(std::env::var_os(key).unwrap());
    let mut netlink = LinkSocket::new().expect("netlink");
    let mut candidates = [
        Candidate {
            label: "qnet-macvtap-helper (bridge mode)",
            program: env_path("QNET_BENCH_MACVTAP"),
            args: vec!["--mode=bridge".into(), "--mac=52:54:00:be:0c:01".into()],
            br: Some(LOWER),
            delete_after: true,
            fd_received: Vec::new(),
            exited: Vec::new(),
        },
        Candidate {
            label: "qnet-bridge-helper",
            program: env_path("QNET_BENCH_BRIDGE"),
            args: Vec::new(),
            br: Some(BRIDGE),
            delete_after: false,
            fd_received: Vec::new(),
            exited: Vec::new(),
        },
        Candidate {
            label: "/bin/true (process floor)",
            program: PathBuf::from("/bin/true"),
            args: Vec::new(),
            br: None,
            delete_after: false,
            fd_received: Vec::new(),
            exited: Vec::new(),
        },
    ];
    let warmup = 20;
    let count = candidates.len();
    for round in 0..warmup + rounds {
        // Rotate the order so no program always runs right after another's
        // teardown.
        for i in 0..count {
            let c = &mut candidates[(i + round) % count];
            let (to_fd, to_exit) = sample(c, &mut netlink);
            if round >= warmup {
                c.fd_received.push(to_fd);
                c.exited.push(to_exit);
            }
        }
    }

    let bridge_median = median(&mut candidates[1].fd_received.clone());
    println!(
        "helper latency: {rounds} rounds after {warmup} warm-up, alternating; devices in a \
         private netns"
    );
    println!();
    println!(
        "| program | median exec→fd | p10 | p90 | median exec→exit | ratio to qnet-bridge-helper (median exec→fd) |"
    );
    println!("|---|---|---|---|---|---|");
    for c in &mut candidates {
        let med = median(&mut c.fd_received);
        let p10 = percentile(&c.fd_received, 10);
        let p90 = percentile(&c.fd_received, 90);
        let exit = median(&mut c.exited);
        println!(
            "| {} | {} | {} | {} | {} | {:.2}× |",
            c.label,
            ms(med),
            ms(p10),
            ms(p90),
            ms(exit),
            med.as_secs_f64() / bridge_median.as_secs_f64()
        );
    }
}

/// One QEMU-style run: (time until the fd arrived, time until the helper
/// exited). For a program that sends no fd, both are its exit.
fn sample(c: &Candidate, netlink: &mut LinkSocket) -> (Duration, Duration) {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::empty(),
    )
    .unwrap();
    // The helper's end is inherited (no CLOEXEC) so std can use
    // posix_spawn; ours is closed in the child.
    fcntl(&ours, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    let mut cmd = Command::new(&c.program);
    if let Some(br) = c.br {
        cmd.args(&c.args)
            .arg("--use-vnet")
            .arg(format!("--fd={}", theirs.as_raw_fd()))
            .arg(format!("--br={br}"));
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());

    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    drop(theirs);
    // Like QEMU, hold the fd until the helper has exited.
    let received = c.br.map(|_| {
        let fd = recv_fd(ours.as_fd()).unwrap_or_else(|e| panic!("{}: {e}", c.program.display()));
        (start.elapsed(), fd)
    });
    let status = child.wait().unwrap();
    let to_exit = start.elapsed();
    assert!(status.success(), "{} failed: {status}", c.program.display());
    match received {
        Some((to_fd, fd)) => {
            if c.delete_after {
                let (name, _) = tap_info(fd.as_fd()).unwrap();
                let link = netlink.link_by_name(&name).unwrap().unwrap();
                netlink.delete(link.index).unwrap();
            }
            (to_fd, to_exit)
        }
        None => (to_exit, to_exit),
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() - 1) * pct / 100]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}
