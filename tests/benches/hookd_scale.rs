//! qnet-hookd under many guests: QMP connect → reservation in dnsmasq's
//! hosts file, and the daemon's (and its dnsmasq's) memory and CPU with 1,
//! 100 and 1000 guests connected, then all of them exiting at once.
//!
//! Run as root: `cargo build --release --workspace && cargo bench -p
//! qnet-tests --bench hookd_scale -- [MAX_GUESTS]` (the bench runs the release
//! `qnet-hookd`; MAX_GUESTS defaults to 1000, at most 1023: one bridge
//! port each).
//! `cargo bench -p qnet-tests --bench hookd_scale -- rounds [N]` instead runs
//! three rounds of N (default 1000) guests connecting and all exiting, and
//! reports the daemon's RSS at each round's peak, when all have exited and
//! after 10 s idle (issue 10: allocator retention after rounds).
//! `cargo bench -p qnet-tests --bench hookd_scale -- forwards` instead times
//! adding forward #1, #1,000 and #10,000 through the daemon's control
//! socket for one running (fake) guest.
//!
//! The bench makes a network namespace, starts the daemon in it with one
//! NAT network on a /16 (`qnbench`, 10.90.0.0/16) and logging at `info`
//! (`RUST_LOG=info`, the daemon's default; the test kit asks for debug),
//! then adds guests one at a time. Each fake guest is a process of its own
//! (this program re-run with `QNET_HOOKD_SCALE_WORKER` set, entered into the
//! namespace before exec) because the daemon finds a guest's network
//! through the TAPs its process holds (`/proc/<SO_PEERCRED pid>/fd`). A
//! worker creates a TAP (`TUNSETIFF`), enslaves it to the bridge and brings
//! it up (one `RTM_SETLINK`), says it is ready, and on "go" takes a
//! `CLOCK_MONOTONIC` timestamp, connects to the daemon's QMP socket and
//! plays QEMU 7.2: greeting, then a reply to every command
//! (`query-rx-filter` as QEMU sends it for one virtio-net NIC, with its
//! 4096-entry `vlan-table`; HMP `info network` with the NIC on a TAP). It
//! stays connected until it is killed.
//!
//! Latency is measured by this (parent) process, which blocks in `poll()`
//! on an inotify watch of `RUN/bench/dhcp-hosts.d/` (the daemon renames
//! each new reservation's file into place: `IN_MOVED_TO`), with a 1 ms
//! timeout as a fallback, takes a `CLOCK_MONOTONIC` timestamp on waking and
//! then looks for the guest's file: connect → reservation is that
//! timestamp minus the worker's. Resolution: the wake-up plus one read of the file (tens of
//! µs), at worst the 1 ms fallback. Guests are connected one after the
//! other, each once the previous one's reservation is in the file, so the
//! k-th sample is the latency with k-1 guests already connected.
//!
//! Memory and CPU come from `/proc/<pid>/status` (`VmRSS`, `Threads`),
//! `/proc/<pid>/stat` (utime + stime, in clock ticks: 10 ms) and
//! `/proc/<pid>/fd`, for the daemon and its dnsmasq. dnsmasq logs `read
//! .../dhcp-hosts.d/MAC` for every reservation file it reads (a new one
//! through inotify, all of them at a SIGHUP); those lines are counted. Results are
//! printed as Markdown tables. Every worker is killed and reaped, and the
//! namespace (with the daemon and dnsmasq) deleted, on exit.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use qnet_tests::dnsmasq::reservation_reads;
use qnet_tests::fake_guest::{self, Identity};
use qnet_tests::hookd::{network, Hookd};
use qnet_tests::netns::{run, NetNs};
use qnet_tests::procfs::{clock_ticks_per_sec, cpu_ticks, ProcStatus};
use serde_json::{json, Value};

const NET: &str = "bench";
const BRIDGE: &str = "qnbench";
const WORKER_ENV: &str = "QNET_HOOKD_SCALE_WORKER";
const SOCKET_ENV: &str = "QNET_HOOKD_SCALE_SOCKET";
const STEPS: [usize; 3] = [1, 100, 1000];
/// A Linux bridge has at most 1023 ports (`BR_MAX_PORTS` - 1).
const MAX_PORTS: usize = 1023;
/// Latency is summarised over buckets of this many consecutive guests.
const BUCKET: usize = 50;
const IDLE: Duration = Duration::from_secs(10);
/// Bound on any one wait for the daemon (not a timing assertion: a daemon
/// that never writes the reservation would otherwise hang the bench).
const PATIENCE: Duration = Duration::from_secs(120);

fn hookd_toml() -> String {
    network(
        NET,
        BRIDGE,
        &[r#"mode = "nat""#, r#"subnet = "10.90.0.0/16""#],
    )
}

/// The bench's daemon in a new namespace `tag`, logging at `info` (its
/// default; `Hookd::start` passes `--log debug`, which `RUST_LOG`
/// overrides), and its network's run directory. Call it before any thread
/// exists (it sets the environment).
fn start_daemon(tag: &str) -> (NetNs, Hookd, PathBuf) {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "info");
    }
    let (netns, hookd) = Hookd::start_in_new_netns(tag, Some(&hookd_toml()));
    let net_dir = hookd.run_dir().join(NET);
    (netns, hookd, net_dir)
}

fn main() {
    if let Some(index) = std::env::var_os(WORKER_ENV) {
        let index: u32 = index.to_str().and_then(|s| s.parse().ok()).unwrap();
        let socket = PathBuf::from(std::env::var_os(SOCKET_ENV).unwrap());
        worker(index, &socket);
        return;
    }
    if std::env::args().skip(1).any(|a| a == "forwards") {
        forwards_through_the_daemon();
        return;
    }
    if std::env::args().skip(1).any(|a| a == "rounds") {
        let n = std::env::args()
            .skip(1)
            .find_map(|a| a.parse().ok())
            .unwrap_or(1000);
        assert!((1..=MAX_PORTS).contains(&n), "N must be 1..={MAX_PORTS}");
        rounds_of_guests(n);
        return;
    }
    let max: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    assert!(
        (1..=MAX_PORTS).contains(&max),
        "MAX_GUESTS must be 1..={MAX_PORTS} (one bridge port each)"
    );
    let mut steps: Vec<usize> = STEPS.iter().copied().filter(|&n| n < max).collect();
    steps.push(max);

    let (netns, hookd, net_dir) = start_daemon("hkscale");
    let daemon = process_in(&netns, "qnet-hookd").expect("qnet-hookd runs in the namespace");
    let hosts_dir = net_dir.join("dhcp-hosts.d");
    let dns_dir = net_dir.join("dns-hosts.d");
    let watch = Watch::new(&net_dir);
    let dnsmasq = wait_for_dnsmasq(&net_dir);
    let ns_file = File::open(netns.path()).expect("open the namespace");
    let socket = hookd.qmp_socket();
    println!(
        "qnet-hookd pid {daemon}, dnsmasq pid {dnsmasq}, run dir {}",
        hookd.run_dir().display()
    );

    let target = Target {
        daemon,
        net_dir: net_dir.clone(),
        state_file: hookd.dir().join("state/state.json"),
        log_reads: Default::default(),
    };

    // Let start-up settle before the first sample.
    std::thread::sleep(Duration::from_secs(2));
    let mut rows = vec![measure_step(&target, 0, 0, || {})];

    let mut guests = Guests::default();
    let mut latencies: Vec<Duration> = Vec::new();
    for &step in &steps {
        let from = guests.0.len();
        rows.push(measure_step(&target, from, step, || {
            while guests.0.len() < step {
                let index = guests.0.len() as u32;
                let mut guest = Guest::spawn(index, &socket, &ns_file);
                let t0 = guest.go();
                let seen = wait_for(&watch, Duration::from_millis(1), "reservation", |now| {
                    has_mac(&hosts_dir, &guest.mac).then_some(now)
                });
                latencies.push(Duration::from_nanos(seen - t0));
                guests.0.push(guest);
            }
        }));
        eprintln!("{step} guests connected");
    }

    // dnsmasq's cost per SIGHUP with every reservation in its files, apart
    // from its netlink work for new TAPs.
    let sighup = sighup_cost(&target);

    // Every guest exits at once (a host shutting down): the daemon drops
    // each one's DNS name; sticky DHCP reservations stay.
    let before = target.snapshot();
    let n = guests.0.len();
    guests.kill_all();
    // Every worker has exited (its TAP deleted: the kernel serialises
    // those on the RTNL lock) and been reaped.
    let reaped = before.at.elapsed();
    wait_for(
        &watch,
        Duration::from_millis(50),
        "empty dns-hosts.d",
        |_| (files_in(&dns_dir) == 0).then_some(()),
    );
    let wall = before.at.elapsed();
    // dnsmasq's last re-reads come a little later.
    std::thread::sleep(Duration::from_secs(1));
    let after = target.snapshot();
    let listed = hookd.qnetctl(&["guests"]).expect("qnetctl guests")["guests"]
        .as_array()
        .map_or(0, Vec::len);
    let teardown = Teardown {
        guests: n,
        reaped,
        wall,
        before,
        after,
        listed,
    };
    print_results(&rows, &latencies, &teardown, sighup);
    drop(hookd);
    drop(netns);
}

// ----- memory after rounds of guests -------------------------------------------

const ROUNDS: usize = 3;

/// Three rounds of `n` guests connecting (all at once) and then all
/// exiting: the daemon's RSS at each round's peak, right after every guest
/// has gone, and after [`IDLE`] with none; `VmHWM` is the high-water mark.
fn rounds_of_guests(n: usize) {
    let (netns, hookd, net_dir) = start_daemon("hkround");
    let daemon = process_in(&netns, "qnet-hookd").expect("qnet-hookd runs in the namespace");
    let dns_dir = net_dir.join("dns-hosts.d");
    let watch = Watch::new(&net_dir);
    wait_for_dnsmasq(&net_dir);
    let ns_file = File::open(netns.path()).expect("open the namespace");
    let socket = hookd.qmp_socket();
    std::thread::sleep(Duration::from_secs(2));
    let start = usage(daemon);
    let names = |dir: &Path| files_in(dir);
    println!();
    println!(
        "### Daemon memory over {ROUNDS} rounds of {n} guests (started at {:.1} MiB)",
        mib(start.rss_kib)
    );
    println!();
    println!("| round | RSS with {n} guests (peak) | threads (peak) | RSS when all have exited | RSS after {}s idle | VmHWM | fds after | guests still listed |", IDLE.as_secs());
    println!("|---|---|---|---|---|---|---|---|");
    for round in 1..=ROUNDS {
        let mut guests = Guests::default();
        for i in 0..n {
            // Each round's guests have MACs of their own.
            let index = (round * 2048 + i) as u32;
            guests.0.push(Guest::spawn(index, &socket, &ns_file));
        }
        let (mut peak, mut threads) = (0, 0);
        let mut sample = || {
            let now = usage(daemon);
            peak = peak.max(now.rss_kib);
            threads = threads.max(now.threads);
        };
        for guest in &mut guests.0 {
            guest.go();
        }
        wait_for(
            &watch,
            Duration::from_millis(50),
            "every guest named",
            |_| {
                sample();
                (names(&dns_dir) >= n).then_some(())
            },
        );
        std::thread::sleep(Duration::from_secs(1));
        sample();
        guests.kill_all();
        wait_for(
            &watch,
            Duration::from_millis(50),
            "empty dns-hosts.d",
            |_| (names(&dns_dir) == 0).then_some(()),
        );
        std::thread::sleep(Duration::from_secs(1));
        let exited = usage(daemon);
        std::thread::sleep(IDLE);
        let idle = usage(daemon);
        let listed = hookd.qnetctl(&["guests"]).expect("qnetctl guests")["guests"]
            .as_array()
            .map_or(0, Vec::len);
        println!(
            "| {round} | {:.1} MiB | {threads} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} | {listed} |",
            mib(peak),
            mib(exited.rss_kib),
            mib(idle.rss_kib),
            mib(vm_hwm_kib(daemon)),
            idle.fds,
        );
    }
    drop(hookd);
    drop(netns);
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn vm_hwm_kib(pid: u32) -> u64 {
    ProcStatus::of(pid).number("VmHWM:")
}

// ----- forwards through the daemon --------------------------------------------

const FORWARD_POINTS: [usize; 3] = [1, 1000, 10_000];
const FORWARD_SAMPLES: usize = 25;
const QNETCTL_SAMPLES: usize = 10;
/// The measured forward's host port; the fill uses 20000 and up.
const MEASURED_PORT: u16 = 40000;

/// Adding forward #1, #1,000 and #10,000 end to end: a ctl request to the
/// running daemon (its checks, state file, nfnetlink change, reply), for a
/// running (fake) guest, with k-1 forwards added before it one request
/// each. Also as a `qnetctl forward add` process.
fn forwards_through_the_daemon() {
    let (netns, hookd, net_dir) = start_daemon("hkfwd");
    let hosts_dir = net_dir.join("dhcp-hosts.d");
    wait_for_dnsmasq(&net_dir);
    let watch = Watch::new(&net_dir);
    let ns_file = File::open(netns.path()).expect("open the namespace");
    let mut guests = Guests::default();
    guests
        .0
        .push(Guest::spawn(0, &hookd.qmp_socket(), &ns_file));
    guests.0[0].go();
    let mac = guests.0[0].mac.clone();
    wait_for(&watch, Duration::from_millis(10), "reservation", |_| {
        has_mac(&hosts_dir, &mac).then_some(())
    });
    let ctl = hookd.ctl_socket();
    let add = |port: u16| {
        json!({"op": "forward-add", "guest": mac, "proto": "tcp",
               "host_ports": [port, port], "guest_port": 80})
    };
    let rm = |port: u16| json!({"op": "forward-rm", "proto": "tcp", "host_port": port});
    let installed = |port: u16| {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns.name(),
                "nft",
                "list",
                "map",
                "inet",
                "qnet",
                "fwd4_any",
            ])
            .output()
            .expect("nft list map");
        String::from_utf8_lossy(&out.stdout).contains(&format!("tcp . {port} : "))
    };
    let state_file = hookd.dir().join("state/state.json");

    println!();
    println!("### Adding forward #k through the daemon (median of {FORWARD_SAMPLES}; qnetctl: of {QNETCTL_SAMPLES})");
    println!();
    println!("| forward # | ctl request `forward-add` (in-process client) | `qnetctl forward add` (process) | ctl request `forward-rm` | filling k-1 forwards, per request | state.json |");
    println!("|---|---|---|---|---|---|");
    let mut filled = 0usize;
    for k in FORWARD_POINTS {
        let fill_start = Instant::now();
        for i in filled..k - 1 {
            ctl_request(&ctl, &add(20000 + i as u16));
        }
        let fill_each = (k - 1 > filled).then(|| fill_start.elapsed() / (k - 1 - filled) as u32);
        filled = k - 1;
        // Let the file system write back the fill's files first.
        nix::unistd::sync();
        std::thread::sleep(Duration::from_secs(3));
        let mut adds = Vec::new();
        let mut removals = Vec::new();
        for _ in 0..FORWARD_SAMPLES {
            adds.push(ctl_request(&ctl, &add(MEASURED_PORT)));
            assert!(installed(MEASURED_PORT), "forward #{k} is in the map");
            removals.push(ctl_request(&ctl, &rm(MEASURED_PORT)));
        }
        assert!(!installed(MEASURED_PORT), "forward #{k} removed");
        let mut processes = Vec::new();
        for _ in 0..QNETCTL_SAMPLES {
            let start = Instant::now();
            let out = Command::new(qnet_tests::workspace_binary("qnetctl"))
                .arg("--socket")
                .arg(&ctl)
                .args([
                    "forward",
                    "add",
                    &mac,
                    "tcp",
                    &format!("{MEASURED_PORT}:80"),
                ])
                .output()
                .expect("run qnetctl");
            processes.push(start.elapsed());
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            ctl_request(&ctl, &rm(MEASURED_PORT));
        }
        let state_kib = std::fs::metadata(&state_file).map_or(0, |m| m.len()) as f64 / 1024.0;
        println!(
            "| {k} | {} | {} | {} | {} | {state_kib:.1} KiB |",
            ms(median(&mut adds)),
            ms(median(&mut processes)),
            ms(median(&mut removals)),
            fill_each.map_or("—".into(), ms),
        );
    }
    drop(guests);
    drop(hookd);
    drop(netns);
}

/// One request on the control socket, as any client speaks it; panics on
/// an error reply. Returns the time from connect to the reply.
fn ctl_request(socket: &Path, request: &Value) -> Duration {
    let start = Instant::now();
    let mut stream = UnixStream::connect(socket).expect("connect to the ctl socket");
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).expect("send");
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .expect("reply");
    let took = start.elapsed();
    let reply: Value = serde_json::from_str(&reply).expect("JSON reply");
    assert!(reply.get("ok").is_some(), "{request} → {reply}");
    took
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

// ----- the fake QEMU ----------------------------------------------------------

fn guest_mac(index: u32) -> String {
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (index >> 16) & 0xff,
        (index >> 8) & 0xff,
        index & 0xff
    )
}

/// A worker: one fake QEMU process with one TAP on the bridge.
fn worker(index: u32, socket: &Path) {
    let tap = fake_guest::tap_on_bridge(BRIDGE);

    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {}", tap.name()).unwrap();
    out.flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    if line.trim() != "go" {
        return;
    }
    let t0 = monotonic_ns();
    // Reported before connecting: the parent is then already waiting.
    writeln!(out, "t0 {t0}").unwrap();
    out.flush().unwrap();
    let stream = UnixStream::connect(socket).expect("connect to the QMP socket");
    play_qemu(stream, index);
    drop(tap);
}

/// Answers like QEMU 7.2 (the test kit's fake guest) until the daemon
/// hangs up.
fn play_qemu(stream: UnixStream, index: u32) {
    let identity = Identity {
        name: format!("bench-{index}"),
        bridge: BRIDGE.to_string(),
        mac: std::sync::Mutex::new(guest_mac(index)),
    };
    let writer = fake_guest::writer_of(&stream);
    fake_guest::play_qemu(stream, &writer, &identity);
}

// ----- the parent's side of a guest -------------------------------------------

struct Guest {
    child: Child,
    mac: String,
}

impl Guest {
    /// Starts worker `index` in the namespace and waits until its TAP is on
    /// the bridge.
    fn spawn(index: u32, socket: &Path, ns: &File) -> Guest {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(WORKER_ENV, index.to_string())
            .env(SOCKET_ENV, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        fake_guest::in_netns_until_parent_dies(&mut cmd, ns);
        let mut child = cmd.spawn().expect("spawn a worker");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let ready = read_line(&mut stdout);
        assert!(ready.starts_with("ready "), "worker {index}: {ready:?}");
        child.stdout = Some(stdout.into_inner());
        Guest {
            child,
            mac: guest_mac(index),
        }
    }

    /// Lets the worker connect; returns its timestamp from just before
    /// connect().
    fn go(&mut self) -> u64 {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        drop(stdin);
        let mut stdout = BufReader::new(self.child.stdout.take().unwrap());
        let line = read_line(&mut stdout);
        line.strip_prefix("t0 ")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("worker: {line:?}"))
    }
}

fn read_line(reader: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("read from a worker");
    line.trim_end().to_string()
}

/// The workers; killed (SIGKILL) and reaped on drop.
#[derive(Default)]
struct Guests(Vec<Guest>);

impl Guests {
    fn kill_all(&mut self) {
        for guest in &mut self.0 {
            let _ = guest.child.kill();
        }
        for guest in self.0.drain(..) {
            let mut child = guest.child;
            let _ = child.wait();
        }
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        self.kill_all();
    }
}

// ----- watching the hosts files ----------------------------------------------

/// An inotify watch on a directory: files renamed into it or written.
struct Watch {
    fd: OwnedFd,
}

impl Watch {
    fn new(dir: &Path) -> Watch {
        // SAFETY: plain system calls; the fd is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The network's run dir and its two hosts directories, where
        // files appear (renamed into place) and go.
        for dir in [
            dir.to_path_buf(),
            dir.join("dhcp-hosts.d"),
            dir.join("dns-hosts.d"),
        ] {
            let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: `path` is a NUL-terminated string that outlives the call.
            let wd = unsafe {
                libc::inotify_add_watch(
                    fd.as_raw_fd(),
                    path.as_ptr(),
                    libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE | libc::IN_DELETE,
                )
            };
            assert!(
                wd >= 0,
                "inotify_add_watch {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        Watch { fd }
    }

    /// Blocks until something changed in the directory or `timeout` passed.
    fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if n > 0 {
            // Drain the events (non-blocking fd): only "something
            // changed" matters.
            let mut buf = [0u8; 4096];
            // SAFETY: reads into a buffer of the length given.
            while unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0
            {
            }
        }
    }
}

/// Calls `check` with the time (`CLOCK_MONOTONIC`, ns) at once and then
/// after every change in the watched directory (or every `fallback`) until
/// it returns something.
fn wait_for<T>(
    watch: &Watch,
    fallback: Duration,
    what: &str,
    mut check: impl FnMut(u64) -> Option<T>,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(found) = check(monotonic_ns()) {
            return found;
        }
        assert!(Instant::now() < deadline, "no {what} after {PATIENCE:?}");
        watch.wait(fallback);
    }
}

/// Whether the daemon has told dnsmasq of `mac`'s reservation (its file in
/// `dhcp-hosts.d`).
fn has_mac(hosts_dir: &Path, mac: &str) -> bool {
    hosts_dir.join(mac.to_lowercase()).exists()
}

/// The hosts files in a hosts directory (temp files, `.`-prefixed, aside).
fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ----- /proc ----------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss_kib: u64,
    threads: u64,
    /// utime + stime, clock ticks.
    cpu_ticks: u64,
    fds: usize,
}

fn usage(pid: u32) -> Usage {
    let status = ProcStatus::of(pid);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    Usage {
        rss_kib: status.number("VmRSS:"),
        threads: status.number("Threads:"),
        cpu_ticks: cpu_ticks(pid),
        fds,
    }
}

fn ticks_ms(ticks: u64) -> u64 {
    ticks * 1000 / clock_ticks_per_sec()
}

/// The process called `comm` inside the namespace.
fn process_in(netns: &NetNs, comm: &str) -> Option<u32> {
    let pids = run("ip", &["netns", "pids", netns.name()]).ok()?;
    pids.split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
}

fn wait_for_dnsmasq(net_dir: &Path) -> u32 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(pid) = dnsmasq_pid(net_dir) {
            return pid;
        }
        assert!(Instant::now() < deadline, "dnsmasq did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dnsmasq_pid(net_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(net_dir.join("dnsmasq.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The daemon's and dnsmasq's usage, and how often dnsmasq re-read the
/// DHCP hosts file (start-up + one per SIGHUP) so far.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    daemon: Usage,
    dnsmasq: Usage,
    dnsmasq_pid: u32,
    rereads: usize,
    /// Size of the daemon's state.json, rewritten at every guest event.
    state_bytes: u64,
    at: Instant,
}

/// Counts dnsmasq's `read .../dhcp-hosts.d/...` log lines as the log
/// grows. The daemon rotates the log by copying it to `.log.1` and
/// truncating it: a log shorter than what was counted has been rotated,
/// and its lines from there on are at the end of `.log.1`. (Two rotations
/// between two counts would lose lines: 8 MiB of log.)
#[derive(Default)]
struct LogReads {
    offset: u64,
    count: usize,
}

impl LogReads {
    fn update(&mut self, net_dir: &Path) -> usize {
        let log = net_dir.join("dnsmasq.log");
        let len = std::fs::metadata(&log).map_or(0, |m| m.len());
        if len < self.offset {
            self.count += reads_in(&net_dir.join("dnsmasq.log.1"), self.offset).0;
            self.offset = 0;
        }
        let (reads, end) = reads_in(&log, self.offset);
        self.count += reads;
        self.offset = end;
        self.count
    }
}

/// The `read .../dhcp-hosts.d/` lines among the complete lines of `path`
/// from byte `from` on, and the offset after the last of those lines: a
/// line dnsmasq is still writing is counted next time, and only once.
fn reads_in(path: &Path, from: u64) -> (usize, u64) {
    let Ok(bytes) = std::fs::read(path) else {
        return (0, from);
    };
    let start = usize::try_from(from).map_or(bytes.len(), |f| f.min(bytes.len()));
    let tail = &bytes[start..];
    let complete = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let reads = reservation_reads(&String::from_utf8_lossy(&tail[..complete]));
    (reads, (start + complete) as u64)
}

/// The processes measured.
struct Target {
    daemon: u32,
    net_dir: PathBuf,
    state_file: PathBuf,
    log_reads: std::cell::RefCell<LogReads>,
}

impl Target {
    fn snapshot(&self) -> Snapshot {
        let dnsmasq_pid = dnsmasq_pid(&self.net_dir).unwrap_or(0);
        Snapshot {
            daemon: usage(self.daemon),
            dnsmasq: usage(dnsmasq_pid),
            dnsmasq_pid,
            rereads: self.log_reads.borrow_mut().update(&self.net_dir),
            state_bytes: std::fs::metadata(&self.state_file).map_or(0, |m| m.len()),
            at: Instant::now(),
        }
    }
}

/// One row of the scale table: connecting up to `guests`, then idling.
struct Row {
    guests: usize,
    /// Guests connected in this step.
    added: usize,
    connect_wall: Duration,
    /// Right after connecting.
    after: Snapshot,
    /// (daemon, dnsmasq) CPU while connecting, ms.
    connect_cpu_ms: (u64, u64),
    /// dnsmasq's reads of reservation files while connecting (one per new
    /// file through inotify; every file at a SIGHUP).
    sighups: usize,
    /// (daemon, dnsmasq) CPU over [`IDLE`] with `guests` connected, ms.
    idle_cpu_ms: (u64, u64),
    dnsmasq_restarted: bool,
    /// state.json after the idle period (the daemon saves it after
    /// updating the hosts files).
    state_bytes: u64,
}

/// Runs `connect` (bringing the guest count from `from` to `guests`),
/// samples, idles for [`IDLE`] and samples again.
fn measure_step(target: &Target, from: usize, guests: usize, connect: impl FnOnce()) -> Row {
    let before = target.snapshot();
    connect();
    let after = target.snapshot();
    std::thread::sleep(IDLE);
    let idle = target.snapshot();
    Row {
        guests,
        added: guests - from,
        connect_wall: after.at - before.at,
        after,
        connect_cpu_ms: cpu_ms(&before, &after),
        // dnsmasq handles each SIGHUP a little after the daemon wrote the
        // file: count until the end of the idle period.
        sighups: idle.rereads.saturating_sub(before.rereads),
        idle_cpu_ms: cpu_ms(&after, &idle),
        dnsmasq_restarted: before.dnsmasq_pid != idle.dnsmasq_pid,
        state_bytes: idle.state_bytes,
    }
}

fn cpu_ms(from: &Snapshot, to: &Snapshot) -> (u64, u64) {
    (
        ticks_ms(to.daemon.cpu_ticks.saturating_sub(from.daemon.cpu_ticks)),
        ticks_ms(to.dnsmasq.cpu_ticks.saturating_sub(from.dnsmasq.cpu_ticks)),
    )
}

const SIGHUPS: u64 = 40;

/// dnsmasq's mean CPU per SIGHUP, in ms: [`SIGHUPS`] of them 150 ms apart.
fn sighup_cost(target: &Target) -> f64 {
    let before = target.snapshot();
    for _ in 0..SIGHUPS {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(before.dnsmasq_pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    let after = target.snapshot();
    let (_, dnsmasq_ms) = cpu_ms(&before, &after);
    dnsmasq_ms as f64 / SIGHUPS as f64
}

// ----- results ----------------------------------------------------------------

struct Teardown {
    guests: usize,
    /// Until every worker had exited and been reaped.
    reaped: Duration,
    wall: Duration,
    before: Snapshot,
    after: Snapshot,
    /// Guests `qnetctl guests` still lists afterwards.
    listed: usize,
}

fn print_results(rows: &[Row], latencies: &[Duration], teardown: &Teardown, sighup: f64) {
    println!();
    println!("### QMP connect → reservation in dhcp-hosts (one guest at a time)");
    println!();
    println!("| guests already connected | samples | median | p10 | p90 | max |");
    println!("|---|---|---|---|---|---|");
    let n = latencies.len();
    let mut starts: Vec<usize> = vec![0, BUCKET, 500, n.saturating_sub(BUCKET)];
    starts.retain(|&s| s < n);
    starts.sort_unstable();
    starts.dedup();
    for start in starts {
        let end = (start + BUCKET).min(n);
        let mut bucket = latencies[start..end].to_vec();
        bucket.sort();
        println!(
            "| {}–{} | {} | {} | {} | {} | {} |",
            start,
            end - 1,
            bucket.len(),
            ms(percentile(&bucket, 50)),
            ms(percentile(&bucket, 10)),
            ms(percentile(&bucket, 90)),
            ms(bucket[bucket.len() - 1]),
        );
    }
    let mut all = latencies.to_vec();
    all.sort();
    if !all.is_empty() {
        println!(
            "| all ({n}) | {n} | {} | {} | {} | {} |",
            ms(percentile(&all, 50)),
            ms(percentile(&all, 10)),
            ms(percentile(&all, 90)),
            ms(all[n - 1]),
        );
    }

    println!();
    println!("### Daemon and dnsmasq with N guests connected");
    println!();
    println!(
        "| guests | daemon RSS | daemon fds | daemon threads | connecting: wall | daemon CPU (per guest) | dnsmasq CPU (per guest) | dnsmasq hosts-file reads | idle {}s: daemon CPU | idle: dnsmasq CPU | dnsmasq RSS | state.json |",
        IDLE.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let per = |total: u64| {
            if row.added == 0 {
                "—".to_string()
            } else {
                format!("{total} ms ({:.2} ms)", total as f64 / row.added as f64)
            }
        };
        println!(
            "| {} (+{}) | {:.1} MiB | {} | {} | {:.2} s | {} | {} | {} | {} ms | {} ms | {:.1} MiB{} | {:.1} KiB |",
            row.guests,
            row.added,
            row.after.daemon.rss_kib as f64 / 1024.0,
            row.after.daemon.fds,
            row.after.daemon.threads,
            row.connect_wall.as_secs_f64(),
            per(row.connect_cpu_ms.0),
            per(row.connect_cpu_ms.1),
            row.sighups,
            row.idle_cpu_ms.0,
            row.idle_cpu_ms.1,
            row.after.dnsmasq.rss_kib as f64 / 1024.0,
            if row.dnsmasq_restarted {
                " (dnsmasq restarted!)"
            } else {
                ""
            },
            row.state_bytes as f64 / 1024.0,
        );
    }

    let reservations = rows.last().map_or(0, |r| r.guests);
    println!();
    println!(
        "dnsmasq CPU per SIGHUP with {reservations} reservations (mean of {SIGHUPS}, nothing else changing): {sighup:.1} ms"
    );

    let t = teardown;
    let (daemon_ms, dnsmasq_ms) = cpu_ms(&t.before, &t.after);
    println!();
    println!("### All {} guests exit at once", t.guests);
    println!();
    println!(
        "| all workers exited and reaped | until dns-hosts.d is empty | daemon CPU | dnsmasq CPU | dnsmasq hosts-file reads | daemon RSS after | guests still listed |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {:.2} s | {:.2} s | {daemon_ms} ms | {dnsmasq_ms} ms | {} | {:.1} MiB | {} |",
        t.reaped.as_secs_f64(),
        t.wall.as_secs_f64(),
        t.after.rereads.saturating_sub(t.before.rereads),
        t.after.daemon.rss_kib as f64 / 1024.0,
        t.listed,
    );
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[(sorted.len() - 1) * pct / 100]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
