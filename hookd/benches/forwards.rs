//! Port forwards: nftables maps (ours, `qnet_hookd::firewall`) against what hook
//! scripts do, one iptables DNAT rule per forward.
//!
//! Run as root: `cargo bench -p qnet-hookd --bench forwards [add|conn]`
//! (both by default). Everything happens in network namespaces this
//! program creates (`qnet-test-fwb*-<pid>-<n>`) and deletes, also on panic.
//!
//! 1. **Adding forward #1, #1,000 and #10,000.** Ours: the map holds k-1
//!    forwards (filled with one bulk `add_elements` transaction), then the
//!    time of `Firewall::add_elements(&[rule k])` — one nfnetlink batch of one
//!    `NFT_MSG_NEWSETELEM`, sent by the daemon's code itself — is taken;
//!    the element is removed again (`remove_elements`, timed separately)
//!    and the sample repeated. For comparison the same transaction is also
//!    run as an `nft -f` process. Anchor: the chain
//!    `QNETBENCH` (jumped to from `PREROUTING`) holds k-1 DNAT rules
//!    (filled with one `iptables-restore`), then the time of one
//!    `iptables -w -t nat -A QNETBENCH -p tcp -d ADDR --dport P -j DNAT
//!    --to-destination G:P` process is taken, the rule deleted again
//!    (untimed, `-D QNETBENCH k`), repeated. Anchors: `iptables` (the
//!    nf_tables backend, Debian 12's default) and `iptables-legacy`. All
//!    processes are spawned from a thread inside the namespace (no `ip
//!    netns exec`), samples alternate between the candidates.
//! 2. **New TCP connections per second through one forwarded port** while
//!    1, 1,000 and 10,000 forwards are installed. Per candidate: a host
//!    namespace (bridge `qnbench` 10.42.0.1/24 by `network::bring_up`,
//!    uplink 10.99.0.1), a guest namespace behind the bridge (10.42.0.10,
//!    a server on port 80 that accepts, writes one byte and closes) and an
//!    outside namespace (10.99.0.2) whose client connects to
//!    10.99.0.1:8080, reads the byte and closes with `SO_LINGER` 0 (a RST:
//!    no TIME_WAIT), one connection after the other. Ours: the measured
//!    forward is one element of `fwd4` among N; anchors: N DNAT rules in
//!    `QNETBENCH` with the measured port's rule last. Each measurement is
//!    200 warm-up connections, then 5,000 timed; 5 rounds per N, the
//!    candidates' order rotating each round; the median is reported.

// hookd's test helpers (namespaces, networks, runtimes), shared with the
// integration tests.
#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{block_on, NetNs};
use qnet_hookd::api::{Mode, Proto};
use qnet_hookd::config::NetworkConfig;
use qnet_hookd::firewall::{self, Firewall, ForwardElement};
use qnet_hookd::network::bring_up;

static FW: Firewall = Firewall::new();

const POINTS: [usize; 3] = [1, 1_000, 10_000];
const ADD_SAMPLES: usize = 25;
const WARMUP_CONNS: usize = 200;
const CONNS: usize = 5_000;
const CONN_ROUNDS: usize = 5;
const UPLINK: &str = "10.99.0.1";
const GUEST: &str = "10.42.0.10";
const MEASURED_PORT: u16 = 8080;
const FIRST_FILLER_PORT: u16 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Candidate {
    Ours,
    Iptables {
        program: &'static str,
        restore: &'static str,
    },
}

const CANDIDATES: [Candidate; 3] = [
    Candidate::Ours,
    Candidate::Iptables {
        program: "iptables",
        restore: "iptables-restore",
    },
    Candidate::Iptables {
        program: "iptables-legacy",
        restore: "iptables-legacy-restore",
    },
];

impl Candidate {
    fn label(self) -> String {
        match self {
            Candidate::Ours => "ours: nft map element (`add_elements`, nfnetlink)".into(),
            Candidate::Iptables {
                program: "iptables",
                ..
            } => "anchor: `iptables` (nf_tables backend) rule per forward".into(),
            Candidate::Iptables { program, .. } => format!("anchor: `{program}` rule per forward"),
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Candidate::Ours => "nft",
            Candidate::Iptables {
                program: "iptables",
                ..
            } => "ipt",
            Candidate::Iptables { .. } => "iptl",
        }
    }
}

fn network() -> NetworkConfig {
    common::network("bench", "qnbench", Mode::Nat, "10.42.0.0/24")
}

/// Forward number `i` (0-based) of the filler: uplink:P → guest:P.
fn filler(i: usize) -> ForwardElement {
    let port = FIRST_FILLER_PORT + u16::try_from(i).expect("at most 45,000 fillers");
    ForwardElement {
        proto: Proto::Tcp,
        host_addr: Some(UPLINK.parse().unwrap()),
        host_port: port,
        guest_addr: GUEST.parse().unwrap(),
        guest_port: port,
    }
}

fn measured() -> ForwardElement {
    ForwardElement {
        host_port: MEASURED_PORT,
        guest_port: 80,
        ..filler(0)
    }
}

/// `-p tcp -d ADDR --dport P -j DNAT --to-destination G:P` for `rule`.
fn iptables_rule(rule: &ForwardElement) -> String {
    format!(
        "-p tcp -d {} --dport {} -j DNAT --to-destination {}:{}",
        rule.host_addr.unwrap(),
        rule.host_port,
        rule.guest_addr,
        rule.guest_port
    )
}

/// Runs `program args` (from the calling thread, so in its namespace),
/// panicking on failure; returns how long it took.
fn timed(program: &str, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|child| child.wait_with_output())
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

/// The chain `QNETBENCH` (jumped to from PREROUTING) holding exactly
/// `rules`, in order: one restore process, reading them from a file.
fn iptables_fill(restore: &str, rules: impl Iterator<Item = ForwardElement>) {
    let mut text = String::from("*nat\n:QNETBENCH - [0:0]\n");
    for rule in rules {
        text.push_str("-A QNETBENCH ");
        text.push_str(&iptables_rule(&rule));
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    let file = tempfile::NamedTempFile::new().expect("temporary file");
    std::fs::write(file.path(), text).unwrap();
    let path = file.path().to_str().expect("a UTF-8 temporary path");
    timed(restore, &["-w", "--noflush", path]);
}

fn iptables_init(program: &str) {
    timed(program, &["-w", "-t", "nat", "-N", "QNETBENCH"]);
    timed(
        program,
        &["-w", "-t", "nat", "-A", "PREROUTING", "-j", "QNETBENCH"],
    );
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    qnet_tests::require_root();
    for (tool, package) in [
        ("nft", "nftables"),
        ("iptables", "iptables"),
        ("iptables-restore", "iptables"),
        ("iptables-legacy", "iptables"),
        ("iptables-legacy-restore", "iptables"),
    ] {
        qnet_tests::require_tool(tool, package);
    }
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |what: &str| which.is_empty() || which.iter().any(|w| w == what);
    let version = Command::new("iptables").arg("-V").output().unwrap();
    println!(
        "{}; {}",
        String::from_utf8_lossy(&version.stdout).trim(),
        String::from_utf8_lossy(&Command::new("nft").arg("-v").output().unwrap().stdout).trim()
    );
    if wants("add") {
        bench_add();
    }
    if wants("conn") {
        bench_conn();
    }
}

// --- 1. adding one forward -------------------------------------------------

fn bench_add() {
    let net = network();
    let namespaces: Vec<(Candidate, NetNs)> = CANDIDATES
        .iter()
        .map(|&c| (c, NetNs::new(&format!("fwba-{}", c.tag()))))
        .collect();
    for (candidate, ns) in &namespaces {
        ns.run_in(|| match *candidate {
            Candidate::Ours => {
                block_on(FW.apply_ruleset(std::slice::from_ref(&net), &[])).expect("apply")
            }
            Candidate::Iptables { program, .. } => iptables_init(program),
        });
    }

    println!();
    println!(
        "Adding forward #k: median of {ADD_SAMPLES} single adds (each removed again, untimed), candidates alternating"
    );
    println!();
    println!("| forward # | ours: `add_elements` (1 element, nfnetlink) | (the same add as an `nft -f` process) | (ours: `remove_elements`, 1 element) | anchor: `iptables -A` (nf_tables) | anchor: `iptables-legacy -A` | anchor ÷ ours (`iptables`) | anchor ÷ ours (`iptables-legacy`) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut filled = 0;
    for k in POINTS {
        // Fill to k-1 forwards.
        for (candidate, ns) in &namespaces {
            ns.run_in(|| match *candidate {
                Candidate::Ours => {
                    let more: Vec<ForwardElement> = (filled..k - 1).map(filler).collect();
                    let report = block_on(FW.add_elements(&more)).expect("bulk add");
                    assert!(report.is_complete(), "{:?}", report.refused);
                }
                Candidate::Iptables { restore, .. } => {
                    iptables_fill(restore, (0..k - 1).map(filler))
                }
            });
        }
        filled = k - 1;
        // Let deferred kernel work of the fill (hash table resizes, freeing
        // the replaced ruleset) finish before timing.
        thread::sleep(Duration::from_secs(2));
        let rule = filler(k - 1);
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); namespaces.len()];
        let mut removals: Vec<Duration> = Vec::new();
        for round in 0..ADD_SAMPLES {
            for i in 0..namespaces.len() {
                let index = (i + round) % namespaces.len();
                let (candidate, ns) = &namespaces[index];
                let took = ns.run_in(|| match *candidate {
                    Candidate::Ours => block_on(async {
                        let start = Instant::now();
                        FW.add_elements(&[rule]).await.expect("add");
                        let took = start.elapsed();
                        let start = Instant::now();
                        FW.remove_elements(&[rule]).await.expect("remove");
                        removals.push(start.elapsed());
                        took
                    }),
                    Candidate::Iptables { program, .. } => {
                        let spec = iptables_rule(&rule);
                        let mut args = vec!["-w", "-t", "nat", "-A", "QNETBENCH"];
                        args.extend(spec.split(' '));
                        let took = timed(program, &args);
                        let position = k.to_string();
                        timed(program, &["-w", "-t", "nat", "-D", "QNETBENCH", &position]);
                        took
                    }
                });
                samples[index].push(took);
            }
        }
        // The same one-element transaction through `nft -f` (how qnet did
        // it before it spoke nfnetlink itself): the cost of a process.
        let script = firewall::add_forwards_script(&[rule]);
        let mut by_nft: Vec<Duration> = (0..ADD_SAMPLES)
            .map(|_| {
                namespaces[0].1.run_in(|| {
                    // The library's own `nft -f -` (script on stdin), timed
                    // inside the runtime.
                    let took = block_on(async {
                        let start = Instant::now();
                        firewall::run_script("adding one forward", &script)
                            .await
                            .expect("nft -f");
                        start.elapsed()
                    });
                    block_on(FW.remove_elements(&[rule])).expect("remove");
                    took
                })
            })
            .collect();
        let medians: Vec<Duration> = samples.iter_mut().map(|s| median(s)).collect();
        println!(
            "| {k} | {} | {} | {} | {} | {} | {:.1}× | {:.1}× |",
            ms(medians[0]),
            ms(median(&mut by_nft)),
            ms(median(&mut removals)),
            ms(medians[1]),
            ms(medians[2]),
            medians[1].as_secs_f64() / medians[0].as_secs_f64(),
            medians[2].as_secs_f64() / medians[0].as_secs_f64(),
        );
    }
    // Sanity: the map and the chains hold what we think.
    for (candidate, ns) in &namespaces {
        let count = match candidate {
            Candidate::Ours => ns
                .exec("nft", &["list", "map", "inet", "qnet", "fwd4"])
                .unwrap()
                .matches(" : 10.42.0.10 . ")
                .count(),
            Candidate::Iptables { program, .. } => ns
                .exec(program, &["-w", "-t", "nat", "-S", "QNETBENCH"])
                .unwrap()
                .matches("DNAT")
                .count(),
        };
        assert_eq!(count, POINTS[2] - 1, "{}", candidate.label());
    }
}

// --- 2. connections per second ---------------------------------------------

struct Site {
    candidate: Candidate,
    _host: NetNs,
    host_path: String,
    outside: NetNs,
    _guest: NetNs,
    stop: Arc<AtomicBool>,
    server: Option<thread::JoinHandle<()>>,
    installed: usize,
}

impl Site {
    fn new(candidate: Candidate) -> Site {
        let tag = candidate.tag();
        let host = NetNs::new(&format!("fwbc-{tag}-h"));
        let outside = NetNs::new(&format!("fwbc-{tag}-o"));
        let guest = NetNs::new(&format!("fwbc-{tag}-g"));
        host.add_veth_to(
            "up0",
            Some("10.99.0.1/24"),
            &outside,
            "eth0",
            Some("10.99.0.2/24"),
        );
        let net = network();
        host.run_in(|| block_on(bring_up(&net))).expect("bring_up");
        host.add_veth_to("gport", None, &guest, "eth0", Some("10.42.0.10/24"));
        host.ip(&["link", "set", "gport", "master", "qnbench"]);
        guest.ip(&["route", "add", "default", "via", "10.42.0.1"]);
        host.run_in(|| match candidate {
            Candidate::Ours => {
                block_on(FW.apply_ruleset(&[network()], &[measured()])).expect("apply")
            }
            Candidate::Iptables { program, restore } => {
                iptables_init(program);
                iptables_fill(restore, std::iter::once(measured()));
            }
        });

        let listener = guest.run_in(|| TcpListener::bind("0.0.0.0:80").expect("bind"));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(mut stream) = stream {
                        let _ = stream.write_all(b"x");
                    }
                }
            })
        };
        let host_path = host.path();
        Site {
            candidate,
            _host: host,
            host_path,
            outside,
            _guest: guest,
            stop,
            server: Some(server),
            installed: 1,
        }
    }

    /// Installs `n` forwards in all: the measured one (last, for the
    /// anchors) and `n - 1` others.
    fn set_forwards(&mut self, n: usize) {
        let installed = self.installed;
        let candidate = self.candidate;
        in_netns(&self.host_path, || match candidate {
            Candidate::Ours => {
                let more: Vec<ForwardElement> = (installed - 1..n - 1).map(filler).collect();
                let report = block_on(FW.add_elements(&more)).expect("bulk add");
                assert!(report.is_complete(), "{:?}", report.refused);
            }
            Candidate::Iptables { restore, .. } => iptables_fill(
                restore,
                (0..n - 1).map(filler).chain(std::iter::once(measured())),
            ),
        });
        self.installed = n;
        // Check: the measured forward is last in the anchors' chain.
        if let Candidate::Iptables { program, .. } = candidate {
            let listing = in_netns(&self.host_path, || {
                let out = Command::new(program)
                    .args(["-w", "-t", "nat", "-S", "QNETBENCH"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            });
            let rules: Vec<&str> = listing.lines().filter(|l| l.contains("DNAT")).collect();
            assert_eq!(rules.len(), n);
            assert!(rules[n - 1].contains("--dport 8080"), "{}", rules[n - 1]);
        }
    }

    /// `count` connections one after the other; connections per second.
    fn connect_many(&self, count: usize) -> f64 {
        let to: SocketAddr = format!("{UPLINK}:{MEASURED_PORT}").parse().unwrap();
        self.outside.run_in(|| {
            let start = Instant::now();
            for _ in 0..count {
                let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                    .expect("connect through the forward");
                let mut byte = [0; 1];
                stream.read_exact(&mut byte).expect("the server's byte");
                // Close with a RST: no TIME_WAIT to exhaust ports with.
                nix::sys::socket::setsockopt(
                    &stream,
                    nix::sys::socket::sockopt::Linger,
                    &libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                )
                .unwrap();
            }
            count as f64 / start.elapsed().as_secs_f64()
        })
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the server's accept() so it sees the flag.
        let to: SocketAddr = format!("{UPLINK}:{MEASURED_PORT}").parse().unwrap();
        let _ = self
            .outside
            .run_in(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)));
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// Runs `f` on a thread inside the namespace at `path`.
fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(path).expect("open netns");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
    })
}

fn bench_conn() {
    let mut sites: Vec<Site> = CANDIDATES.iter().map(|&c| Site::new(c)).collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); sites.len()];
    println!();
    println!(
        "New TCP connections per second through one forwarded port: {CONNS} sequential connections after {WARMUP_CONNS} warm-up, {CONN_ROUNDS} rounds (order rotating), median"
    );
    println!();
    println!("| forwards installed | ours: nft maps | anchor: `iptables` (nf_tables), rule last | anchor: `iptables-legacy`, rule last |");
    println!("|---|---|---|---|");
    let mut at_one: Vec<f64> = Vec::new();
    for n in POINTS {
        for site in &mut sites {
            site.set_forwards(n);
        }
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); sites.len()];
        for round in 0..CONN_ROUNDS {
            for i in 0..sites.len() {
                let index = (i + round) % sites.len();
                let site = &sites[index];
                site.connect_many(WARMUP_CONNS);
                samples[index].push(site.connect_many(CONNS));
            }
        }
        let medians: Vec<f64> = samples
            .iter_mut()
            .map(|s| {
                s.sort_by(f64::total_cmp);
                s[s.len() / 2]
            })
            .collect();
        if at_one.is_empty() {
            at_one = medians.clone();
        }
        let cell = |i: usize| {
            format!(
                "{:.0} conn/s [{:.0}–{:.0}], {:.2}× of 1 forward",
                medians[i],
                samples[i][0],
                samples[i][samples[i].len() - 1],
                medians[i] / at_one[i]
            )
        };
        println!("| {n} | {} | {} | {} |", cell(0), cell(1), cell(2));
        for (i, m) in medians.iter().enumerate() {
            rates[i].push(*m);
        }
    }
    println!();
    println!(
        "Median [min–max of the rounds]. At 10,000 forwards ours runs at {:.2}× its rate with 1 forward; the nf_tables anchor at {:.2}×, the legacy anchor at {:.2}×.",
        rates[0][2] / rates[0][0],
        rates[1][2] / rates[1][0],
        rates[2][2] / rates[2][0]
    );
}
