//! Exec → fd-received latency of bridge helpers, ours against the anchor
//! (`/usr/lib/qemu/qemu-bridge-helper`), measured alternately in one run
//! on the same bridge with the same ACL.
//!
//! Run as root: `make bench` (builds the helpers as installed, statically
//! linked, then runs `cargo bench -p qnet-tests --bench helper_latency`).
//!
//! The parent makes a network namespace with a bridge and a config dir
//! holding `allow qbrbench`, then re-runs itself as a worker inside the
//! sandbox (its own netns and `/etc/qemu`), so the timed spawns pay no
//! namespace set-up. Each sample acts exactly as QEMU does: socketpair,
//! spawn `HELPER --use-vnet --fd=N --br=qbrbench`, receive the fd, wait for
//! the exit. `/bin/true` is timed the same way as the floor of starting any
//! process. Results are printed as a Markdown table.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use qnet_hostnet::fdpass::recv_fd;
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::{sandboxed, ConfigDir};
use qnet_tests::{require_tool, workspace_binary};

const ANCHOR: &str = "/usr/lib/qemu/qemu-bridge-helper";
const BRIDGE: &str = "qbrbench";
const WORKER_ENV: &str = "QNET_BENCH_WORKER";

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(400);
    if std::env::var_os(WORKER_ENV).is_some() {
        worker(rounds);
        return;
    }
    require_tool(ANCHOR, "qemu-system-common");
    let ours = helper_under_test();
    println!("measuring {}", ours.display());
    let netns = NetNs::new("bench");
    netns.add_bridge(BRIDGE, None);
    let config = ConfigDir::new();
    config.write("bridge.conf", &format!("allow {BRIDGE}\n"));

    let status = sandboxed(std::env::current_exe().unwrap(), &netns, &config, None)
        .env(WORKER_ENV, "1")
        .env("QNET_BENCH_OURS", &ours)
        .arg(rounds.to_string())
        .status()
        .expect("run worker");
    assert!(status.success(), "benchmark worker failed: {status}");
}

/// The helper as installed: the static build `make helpers` makes, else
/// the plain release build (or `QNET_BENCH_HELPER`).
fn helper_under_test() -> PathBuf {
    if let Some(path) = std::env::var_os("QNET_BENCH_HELPER") {
        return PathBuf::from(path);
    }
    let release = workspace_binary("qnet-bridge-helper");
    let host = env!("QNET_HOST_TRIPLE");
    let static_build = release
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join(host).join("release/qnet-bridge-helper"));
    match static_build {
        Some(path) if path.exists() => path,
        _ => release,
    }
}

struct Candidate {
    label: &'static str,
    program: PathBuf,
    /// Whether the program speaks the helper protocol (sends an fd).
    sends_fd: bool,
    fd_received: Vec<Duration>,
    exited: Vec<Duration>,
}

fn worker(rounds: usize) {
    let ours = PathBuf::from(std::env::var_os("QNET_BENCH_OURS").unwrap());
    let mut candidates = [
        candidate("qnet-bridge-helper", &ours, true),
        candidate("qemu-bridge-helper (anchor)", Path::new(ANCHOR), true),
        candidate("/bin/true (process floor)", Path::new("/bin/true"), false),
    ];
    let warmup = 20;
    for round in 0..warmup + rounds {
        // Rotate the order so neither helper always runs right after the
        // other's TAP teardown.
        for i in 0..candidates.len() {
            let c = &mut candidates[(i + round) % 3];
            let (to_fd, to_exit) = sample(&c.program, c.sends_fd);
            if round >= warmup {
                c.fd_received.push(to_fd);
                c.exited.push(to_exit);
            }
        }
    }

    let anchor_median = median(&mut candidates[1].fd_received.clone());
    println!("bridge helper latency: {rounds} rounds after {warmup} warm-up, alternating; bridge in a private netns, same ACL");
    println!();
    println!("| program | median exec→fd | p10 | p90 | median exec→exit | ratio to anchor (median exec→fd) |");
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
            med.as_secs_f64() / anchor_median.as_secs_f64()
        );
    }
}

fn candidate(label: &'static str, program: &Path, sends_fd: bool) -> Candidate {
    Candidate {
        label,
        program: program.to_path_buf(),
        sends_fd,
        fd_received: Vec::new(),
        exited: Vec::new(),
    }
}

/// One QEMU-style helper run: (time until the fd arrived, time until the
/// helper exited). For a program that sends no fd, both are its exit.
fn sample(program: &Path, sends_fd: bool) -> (Duration, Duration) {
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
    let mut cmd = Command::new(program);
    if sends_fd {
        cmd.arg("--use-vnet")
            .arg(format!("--fd={}", theirs.as_raw_fd()))
            .arg(format!("--br={BRIDGE}"));
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());

    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    drop(theirs);
    // Like QEMU, hold the fd until the helper has exited: closing it first
    // would make the helper's own exit tear the TAP down.
    let received = sends_fd.then(|| {
        let fd = recv_fd(ours.as_fd()).unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        (start.elapsed(), fd)
    });
    let status = child.wait().unwrap();
    let to_exit = start.elapsed();
    assert!(status.success(), "{} failed: {status}", program.display());
    match received {
        Some((to_fd, _fd)) => (to_fd, to_exit),
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
