//! What the helper latency benchmarks (`benches/helper_latency.rs`,
//! `benches/macvtap_latency.rs`) share: the helpers as installed, the
//! worker each re-runs itself as in the sandbox, one QEMU-style run timed,
//! programs measured alternately, and the table.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use qnet_hostnet::fdpass::recv_fd;

use crate::netns::NetNs;
use crate::sandbox::{sandboxed, ConfigDir};
use crate::workspace_binary;

/// Samples taken before measuring, per program.
pub const WARMUP: usize = 20;

/// Set in the environment of the worker a bench re-runs itself as.
const WORKER_ENV: &str = "QNET_BENCH_WORKER";

/// A helper bench's `main`: with the rounds asked for (the first numeric
/// argument, else `default_rounds`), `parent` sets up the sandbox and
/// calls [`run_sandboxed`]; in the worker it started, `worker` measures.
pub fn bench_main(default_rounds: usize, parent: fn(usize), worker: fn(usize)) {
    let rounds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(default_rounds);
    if std::env::var_os(WORKER_ENV).is_some() {
        worker(rounds);
    } else {
        parent(rounds);
    }
}

/// The bridge every helper bench attaches to, in its sandbox.
pub const BRIDGE: &str = "qbrbench";

/// A helper bench's parent: prints the `helpers` measured, makes the
/// sandbox (network namespace `tag` with [`BRIDGE`], and a config dir
/// whose `bridge.conf` allows it), lets `setup` add to both, then runs
/// the worker (see [`bench_main`]) there with `rounds`, each helper's path
/// in its environment variable (read back with [`helper_from_env`]).
pub fn run_sandboxed(
    tag: &str,
    helpers: &[(&str, &Path)],
    setup: impl FnOnce(&NetNs, &ConfigDir),
    rounds: usize,
) {
    let names: Vec<String> = helpers
        .iter()
        .map(|(_, p)| p.display().to_string())
        .collect();
    println!("measuring {}", names.join(" and "));
    let netns = NetNs::new(tag);
    netns.add_bridge(BRIDGE, None);
    let config = ConfigDir::new();
    config.write("bridge.conf", &format!("allow {BRIDGE}\n"));
    setup(&netns, &config);
    run_worker(&netns, &config, helpers, rounds);
}

/// In the worker: the helper the parent passed in `key` (see
/// [`run_sandboxed`]).
pub fn helper_from_env(key: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(key).unwrap_or_else(|| panic!("{key} is not set")))
}

/// Re-runs this bench as its worker (see [`bench_main`]) in the sandbox of `netns` and
/// `config` (so the timed spawns pay no namespace set-up), with `env` and
/// `rounds`; panics unless the worker succeeds.
fn run_worker(netns: &NetNs, config: &ConfigDir, env: &[(&str, &Path)], rounds: usize) {
    let status = sandboxed(std::env::current_exe().unwrap(), netns, config, None)
        .env(WORKER_ENV, "1")
        .envs(env.iter().copied())
        .arg(rounds.to_string())
        .status()
        .expect("run worker");
    assert!(status.success(), "benchmark worker failed: {status}");
}

/// The helper as installed: the static build `make helpers` makes
/// (target/<host triple>/release), else the plain release build.
pub fn installed_helper(name: &str) -> PathBuf {
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

/// One program measured, and its samples.
pub struct Candidate {
    pub label: &'static str,
    pub program: PathBuf,
    /// Arguments before QEMU's.
    pub args: Vec<String>,
    /// The device to pass as `--br=`; `None`: not a helper (sends no fd).
    pub br: Option<&'static str>,
    pub fd_received: Vec<Duration>,
    pub exited: Vec<Duration>,
}

impl Candidate {
    pub fn new(label: &'static str, program: &Path, br: Option<&'static str>) -> Candidate {
        Candidate {
            label,
            program: program.to_path_buf(),
            args: Vec::new(),
            br,
            fd_received: Vec::new(),
            exited: Vec::new(),
        }
    }

    /// `/bin/true`, timed as a helper is: the floor of starting any
    /// process.
    pub fn process_floor() -> Candidate {
        Candidate::new("/bin/true (process floor)", Path::new("/bin/true"), None)
    }

    /// One QEMU-style run: (time until the fd arrived, time until the
    /// helper exited, the fd). For a program that sends no fd, both times
    /// are its exit.
    fn sample(&self) -> (Duration, Duration, Option<OwnedFd>) {
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
        let mut cmd = Command::new(&self.program);
        if let Some(br) = self.br {
            cmd.args(&self.args)
                .arg("--use-vnet")
                .arg(format!("--fd={}", theirs.as_raw_fd()))
                .arg(format!("--br={br}"));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());

        let start = Instant::now();
        let mut child = cmd.spawn().expect("spawn");
        drop(theirs);
        // Like QEMU, hold the fd until the helper has exited: closing it
        // first would make the helper's own exit tear a TAP down.
        let received = self.br.map(|_| {
            let fd =
                recv_fd(ours.as_fd()).unwrap_or_else(|e| panic!("{}: {e}", self.program.display()));
            (start.elapsed(), fd)
        });
        let status = child.wait().unwrap();
        let to_exit = start.elapsed();
        assert!(
            status.success(),
            "{} failed: {status}",
            self.program.display()
        );
        match received {
            Some((to_fd, fd)) => (to_fd, to_exit, Some(fd)),
            None => (to_exit, to_exit, None),
        }
    }
}

/// Runs every candidate once per round, [`WARMUP`] rounds unrecorded, then
/// `rounds` recorded; the order rotates so that no program always runs
/// right after another's teardown. `received` gets each fd a sample
/// received, outside the timing.
pub fn measure_alternately(
    candidates: &mut [Candidate],
    rounds: usize,
    mut received: impl FnMut(&Candidate, OwnedFd),
) {
    let count = candidates.len();
    for round in 0..WARMUP + rounds {
        for i in 0..count {
            let c = &mut candidates[(i + round) % count];
            let (to_fd, to_exit, fd) = c.sample();
            if round >= WARMUP {
                c.fd_received.push(to_fd);
                c.exited.push(to_exit);
            }
            if let Some(fd) = fd {
                received(c, fd);
            }
        }
    }
}

/// A helper bench's worker after its set-up: measures `candidates`
/// alternately (see [`measure_alternately`], which hands `received` each
/// fd), then prints `title` with how it was measured and `setting`, and
/// the table (see [`print_table`]).
pub fn measure_and_print(
    title: &str,
    setting: &str,
    candidates: &mut [Candidate],
    rounds: usize,
    received: impl FnMut(&Candidate, OwnedFd),
    (base, base_label): (usize, &str),
) {
    measure_alternately(candidates, rounds, received);
    println!("{title}: {rounds} rounds after {WARMUP} warm-up, alternating; {setting}");
    println!();
    print_table(candidates, base, base_label);
}

/// The results as a Markdown table, each median exec→fd also as a ratio
/// to that of `candidates[base]` (named `base_label` in the header).
pub fn print_table(candidates: &mut [Candidate], base: usize, base_label: &str) {
    let base_median = median(&mut candidates[base].fd_received.clone());
    println!(
        "| program | median exec→fd | p10 | p90 | median exec→exit | ratio to {base_label} (median exec→fd) |"
    );
    println!("|---|---|---|---|---|---|");
    for c in candidates {
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
            med.as_secs_f64() / base_median.as_secs_f64()
        );
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
