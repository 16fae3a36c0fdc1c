//! The randomised crash test (issue 10): guests come and go and control
//! requests (reservations, forwards) stream in while qnet-hookd is killed
//! with SIGKILL at random points; after every restart the daemon must hold
//! exactly what it acknowledged.
//!
//! Checked after each kill, before the restart: every MAC dnsmasq's hosts
//! file names has its reservation file (persist, then publish). Checked
//! after each restart:
//! - every acknowledged reservation and forward is there, with its address;
//!   nothing refused or removed with an acknowledgement is;
//! - a guest's (sticky) address never changes;
//! - exactly one dnsmasq runs for the network;
//! - the nft forward elements equal the active forwards `forward list`
//!   shows.
//!
//! Seeded and bounded: `QNET_CRASH_SEED` replays a run (the seed is
//! printed), `QNET_CRASH_KILLS` (default 240) and `QNET_CRASH_SECS`
//! (default 100) bound it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use qnet_tests::fake_guest::FakeGuest;
use qnet_tests::hookd::{Hookd, LAB};
use qnet_tests::netns::NetNs;
use qnet_tests::require_root;
use serde_json::Value;

const GUESTS: usize = 6;
/// Keys the control requests pick from: MACs (reservations) and host
/// ports (forwards).
const KEYS: usize = 16;
const SETTLE: Duration = Duration::from_secs(20);

/// xorshift64*: small, seedable, good enough to pick kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ctl_mac(i: usize) -> String {
    format!("52:54:00:c7:00:{i:02x}")
}
fn ctl_ip(i: usize) -> String {
    format!("10.77.0.{}", 100 + i)
}
fn guest_mac(i: usize) -> String {
    format!("52:54:00:c6:00:{i:02x}")
}
fn port(i: usize) -> u16 {
    30000 + i as u16
}

#[derive(Clone, Copy, Debug)]
enum Op {
    ReserveAdd(usize),
    ReserveRm(usize),
    ForwardAdd(usize),
    ForwardRm(usize),
}

impl Op {
    fn random(rng: &mut Rng) -> Op {
        let key = rng.below(KEYS as u64) as usize;
        match rng.below(4) {
            0 => Op::ReserveAdd(key),
            1 => Op::ReserveRm(key),
            2 => Op::ForwardAdd(key),
            _ => Op::ForwardRm(key),
        }
    }

    fn line(self) -> String {
        match self {
            Op::ReserveAdd(k) => format!(
                r#"{{"op":"reserve-add","network":"lab","mac":"{}","ip":"{}"}}"#,
                ctl_mac(k),
                ctl_ip(k)
            ),
            Op::ReserveRm(k) => format!(
                r#"{{"op":"reserve-rm","network":"lab","mac":"{}"}}"#,
                ctl_mac(k)
            ),
            Op::ForwardAdd(k) => format!(
                r#"{{"op":"forward-add","guest":"g{}","proto":"tcp","host_ports":[{p},{p}],"guest_port":80}}"#,
                k % GUESTS,
                p = port(k)
            ),
            Op::ForwardRm(k) => format!(
                r#"{{"op":"forward-rm","proto":"tcp","host_port":{}}}"#,
                port(k)
            ),
        }
    }
}

/// What became of one request.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Never reached the daemon (not running): no effect.
    NotSent,
    Acked,
    Refused,
    /// Sent, but the daemon died before answering: either way is right.
    Unknown,
}

fn send(socket: &std::path::Path, op: Op) -> Outcome {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return Outcome::NotSent;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if stream
        .write_all(format!("{}\n", op.line()).as_bytes())
        .is_err()
    {
        return Outcome::Unknown;
    }
    let mut reply = String::new();
    match BufReader::new(stream).read_line(&mut reply) {
        Ok(n) if n > 0 => match serde_json::from_str::<Value>(&reply) {
            Ok(v) if v.get("ok").is_some() => Outcome::Acked,
            Ok(_) => Outcome::Refused,
            Err(_) => Outcome::Unknown,
        },
        _ => Outcome::Unknown,
    }
}

/// What the daemon must hold: reservations (ctl MAC key → present) and
/// forwards (port key → present); `None`: either is right (a request the
/// daemon died on), settled at the next check.
#[derive(Default)]
struct Model {
    reservations: BTreeMap<usize, Option<bool>>,
    forwards: BTreeMap<usize, Option<bool>>,
}

impl Model {
    fn apply(&mut self, op: Op, outcome: &Outcome) {
        let (map, key, present) = match op {
            Op::ReserveAdd(k) => (&mut self.reservations, k, true),
            Op::ReserveRm(k) => (&mut self.reservations, k, false),
            Op::ForwardAdd(k) => (&mut self.forwards, k, true),
            Op::ForwardRm(k) => (&mut self.forwards, k, false),
        };
        match outcome {
            Outcome::Acked => {
                map.insert(key, Some(present));
            }
            Outcome::Unknown => {
                map.insert(key, None);
            }
            Outcome::NotSent | Outcome::Refused => {}
        }
    }
}

fn nft_forwards(ns: &NetNs) -> BTreeSet<(u16, String)> {
    let text = ns
        .exec("nft", &["list", "map", "inet", "qnet", "fwd4_any"])
        .unwrap_or_default();
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(5)
        .filter(|w| w[0] == "tcp" && w[1] == "." && w[3] == ":")
        .filter_map(|w| Some((w[2].parse().ok()?, w[4].to_string())))
        .collect()
}

fn dnsmasqs_in(ns: &NetNs) -> usize {
    let pids = qnet_tests::netns::run("ip", &["netns", "pids", ns.name()]).unwrap_or_default();
    pids.split_whitespace()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "dnsmasq")
        })
        .count()
}

struct World {
    ns: NetNs,
    hookd: Hookd,
    guests: Vec<Option<FakeGuest>>,
    model: Model,
    /// Guest MAC → the address it had: sticky for ever.
    sticky: BTreeMap<String, String>,
}

impl World {
    fn spawn_guest(&mut self, i: usize) {
        self.guests[i] = None;
        self.guests[i] = Some(FakeGuest::spawn(
            &self.ns,
            &self.hookd.qmp_socket(),
            "qnlab",
            &guest_mac(i),
            &format!("g{i}"),
        ));
    }

    /// Before the restart: dnsmasq was never told of an address that was
    /// not saved (a removal may be saved and not yet published).
    fn check_persisted_before_published(&self, kill: usize) {
        let saved_all = self.hookd.saved_reservations("lab");
        for line in self.hookd.dhcp_hosts("lab").lines() {
            let mut fields = line.split(',');
            let (mac, ip) = (fields.next().unwrap_or_default(), fields.next());
            let saved = saved_all.get(mac);
            let removing = (0..KEYS)
                .any(|k| ctl_mac(k) == mac && self.model.reservations.get(&k) != Some(&Some(true)));
            match saved {
                Some(saved) => assert_eq!(
                    Some(saved.as_str()),
                    ip,
                    "kill {kill}: {mac}'s address in dhcp-hosts differs from the saved one"
                ),
                None => assert!(
                    removing,
                    "kill {kill}: {mac} is in dhcp-hosts but its reservation was never saved"
                ),
            }
        }
    }

    fn check_after_restart(&mut self, round: usize) {
        let hookd = &self.hookd;
        let reservations = hookd.qnetctl(&["reserve", "list", "lab"]).unwrap()["reservations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let reserved: BTreeMap<String, String> = reservations
            .iter()
            .map(|r| {
                (
                    r["mac"].as_str().unwrap().to_string(),
                    r["ip"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for k in 0..KEYS {
            let found = reserved.get(&ctl_mac(k));
            match self.model.reservations.get(&k) {
                None => assert!(
                    found.is_none(),
                    "round {round}: {} reserved, never acknowledged",
                    ctl_mac(k)
                ),
                Some(Some(true)) => assert_eq!(
                    found,
                    Some(&ctl_ip(k)),
                    "round {round}: acknowledged reservation {} lost or moved",
                    ctl_mac(k)
                ),
                Some(Some(false)) => assert!(
                    found.is_none(),
                    "round {round}: removed reservation {} is back",
                    ctl_mac(k)
                ),
                Some(None) => {
                    assert!(found.is_none_or(|ip| *ip == ctl_ip(k)), "round {round}");
                    self.model.reservations.insert(k, Some(found.is_some()));
                }
            }
        }
        for (mac, ip) in &reserved {
            if mac.starts_with("52:54:00:c6:") {
                if let Some(before) = self.sticky.insert(mac.clone(), ip.clone()) {
                    assert_eq!(&before, ip, "round {round}: guest {mac} moved");
                }
            } else {
                assert!(mac.starts_with("52:54:00:c7:"), "unknown {mac} reserved");
            }
        }

        let listed = hookd.qnetctl(&["forward", "list"]).unwrap()["forwards"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ports: BTreeSet<u64> = listed
            .iter()
            .filter_map(|f| f["host_ports"][0].as_u64())
            .collect();
        for k in 0..KEYS {
            let found = ports.contains(&u64::from(port(k)));
            match self.model.forwards.get(&k).copied() {
                Some(Some(want)) => assert_eq!(
                    found,
                    want,
                    "round {round}: acknowledged forward state of port {} lost",
                    port(k)
                ),
                Some(None) => {
                    self.model.forwards.insert(k, Some(found));
                }
                None => assert!(!found, "round {round}: unacknowledged forward {}", port(k)),
            }
        }

        hookd.wait_until("exactly one dnsmasq", SETTLE, |_| {
            dnsmasqs_in(&self.ns) == 1
        });
        // Every guest followed again, then the elements equal the active
        // forwards.
        hookd.wait_until("guests followed", SETTLE, |h| {
            h.guests()
                .iter()
                .filter(|g| g["nics"][0]["ip"].is_string())
                .count()
                == GUESTS
        });
        let active = |h: &Hookd| -> BTreeSet<(u16, String)> {
            h.qnetctl(&["forward", "list"]).unwrap()["forwards"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|f| f.get("inactive").is_none())
                .filter_map(|f| {
                    Some((
                        f["host_ports"][0].as_u64()? as u16,
                        f["guest_addr"].as_str()?.to_string(),
                    ))
                })
                .collect()
        };
        let mut last = (BTreeSet::new(), BTreeSet::new());
        let settled = qnet_tests::fake_qemu::wait_until(SETTLE, || {
            last = (active(hookd), nft_forwards(&self.ns));
            last.0 == last.1
        });
        assert!(
            settled,
            "round {round}: active forwards {:?} but nft holds {:?}",
            last.0, last.1
        );
    }
}

#[test]
fn kill_9_at_random_points_never_loses_or_invents_an_acknowledged_change() {
    require_root();
    let seed = std::env::var("QNET_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let max_kills = env_or("QNET_CRASH_KILLS", 240) as usize;
    let budget = Duration::from_secs(env_or("QNET_CRASH_SECS", 100));
    println!("hookd_crash: QNET_CRASH_SEED={seed}");
    let mut rng = Rng(seed);

    let (ns, hookd) = Hookd::start_in_new_netns("crash", Some(LAB));
    let mut world = World {
        ns,
        hookd,
        guests: (0..GUESTS).map(|_| None).collect(),
        model: Model::default(),
        sticky: BTreeMap::new(),
    };
    for i in 0..GUESTS {
        world.spawn_guest(i);
    }
    world.check_after_restart(0);

    let started = Instant::now();
    let (mut kills, mut rounds, mut acked) = (0usize, 0usize, 0usize);
    while kills < max_kills && started.elapsed() < budget {
        rounds += 1;
        // One to three kills in a burst, each at a random point of a
        // stream of requests and guest churn, then a checked restart.
        for _ in 0..1 + rng.below(3) {
            if world.hookd.pid().is_none() {
                world.hookd.spawn_nowait();
            }
            let socket = world.hookd.ctl_socket();
            let ops: Vec<Op> = (0..8).map(|_| Op::random(&mut rng)).collect();
            let requests = std::thread::spawn(move || {
                ops.into_iter()
                    .map(|op| (op, send(&socket, op)))
                    .collect::<Vec<_>>()
            });
            if rng.below(3) == 0 {
                let i = rng.below(GUESTS as u64) as usize;
                world.spawn_guest(i);
            }
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            world.hookd.kill9();
            kills += 1;
            for (op, outcome) in requests.join().unwrap() {
                acked += usize::from(outcome == Outcome::Acked);
                world.model.apply(op, &outcome);
            }
            world.check_persisted_before_published(kills);
        }
        world.hookd.spawn();
        world.check_after_restart(rounds);
    }
    println!(
        "hookd_crash: {kills} kill points in {rounds} rounds, {acked} acknowledged requests, {:.1} s (seed {seed})",
        started.elapsed().as_secs_f64()
    );
    assert!(kills >= 30, "only {kills} kill points in {budget:?}");
    assert!(acked > 0, "no request was ever acknowledged");
}
