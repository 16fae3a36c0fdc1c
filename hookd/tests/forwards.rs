//! Port forwards (the firewall's maps) against the real kernel, with real TCP and
//! UDP traffic from every direction. Topology, built anew by every test:
//!
//! ```text
//!  outside ns               host ns (our table)                     guest1 ns
//!  eth0 10.99.0.2 ── up0 10.99.0.1  [bridge qnfwd 10.42.0.1] ── gport1 ── eth0 10.42.0.11
//!       fd99::2          fd99::1                  fd42::1                      fd42::11
//!                                                             ── gport2 ── eth0 10.42.0.12
//!                                                                guest2 ns     fd42::12
//! ```
//!
//! Each guest runs servers (TCP 80, 81, 82 and UDP 53, dual-stack) that
//! answer every connection or datagram with `NAME LOCALPORT PEERADDR`: who
//! answered, on which port, and the source address it saw (so masquerade
//! is visible). The outside has no route to the guests' subnet: it only
//! reaches them through forwards.
//!
//! Port ranges: `HOSTPORT-HOSTPORT2:GUESTPORT` means GUESTPORT is the guest
//! port of HOSTPORT and the offsets are kept (`9000-9002:80` is 9000→80,
//! 9001→81, 9002→82); the caller expands it into one rule per port, as
//! [`expand`] does here.

mod common;

use std::future::Future;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::{ip_json, network, own_mut, plug_guest, require, veth, NetNs};
use qnet_hookd::api::{Mode, Proto};
use qnet_hookd::config::{Ipv6Config, NetworkConfig};
use qnet_hookd::firewall::{self, ElementReport, Firewall, FirewallError, ForwardElement};
use qnet_hookd::network::bring_up;

static FW: Firewall = Firewall::new();

/// Generous failure bound for what must succeed.
const OK_WITHIN: Duration = Duration::from_secs(10);
/// How long something that must fail by silence (dropped packets) is given.
const DROPPED_AFTER: Duration = Duration::from_secs(3);

const UPLINK: &str = "10.99.0.1";
const UPLINK6: &str = "fd99::1";

fn net() -> NetworkConfig {
    let mut net = network("fwd", "qnfwd", Mode::Nat, "10.42.0.0/24");
    own_mut(&mut net).ipv6 = Ipv6Config::first_router("fd42::/64".parse().unwrap());
    net
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn rule(
    proto: Proto,
    host: Option<&str>,
    port: u16,
    guest: &str,
    guest_port: u16,
) -> ForwardElement {
    ForwardElement {
        proto,
        host_addr: host.map(ip),
        host_port: port,
        guest_addr: ip(guest),
        guest_port,
    }
}

/// One forward in each of the four maps (by host address and for any,
/// IPv4 and IPv6), TCP and UDP.
fn one_in_each_map() -> Vec<ForwardElement> {
    vec![
        rule(Proto::Tcp, Some(UPLINK), 8080, "10.42.0.11", 80),
        rule(Proto::Udp, None, 5353, "10.42.0.11", 53),
        rule(Proto::Tcp, Some(UPLINK6), 443, "fd42::11", 443),
        rule(Proto::Udp, None, 22, "fd42::12", 22),
    ]
}

/// Runs `change` (`what` names it in a failure), then lists our table:
/// what `change` returned, and the listing after it.
async fn listed_after<T>(
    what: &str,
    change: impl Future<Output = Result<T, FirewallError>>,
) -> (T, String) {
    let result = change.await.expect(what);
    (result, settled_listing().await)
}

/// The table as nft lists it, once two listings 20 ms apart agree. Right
/// after thousands of elements went in, the kernel may still be resizing
/// a map's hash table, and a dump that walks it meanwhile can list an
/// element twice and miss another.
async fn settled_listing() -> String {
    let mut last = FW.listing().await.expect("list");
    for _ in 0..250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = FW.listing().await.expect("list");
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the table's listing did not settle within 5 s");
}

/// `HOST..=HOST_END:GUEST` as one rule per port, offsets kept.
fn expand(
    proto: Proto,
    host: Option<&str>,
    ports: (u16, u16),
    guest: &str,
    guest_port: u16,
) -> Vec<ForwardElement> {
    (ports.0..=ports.1)
        .map(|port| rule(proto, host, port, guest, guest_port + (port - ports.0)))
        .collect()
}

/// Answers on TCP and UDP ports inside a guest namespace until dropped.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn answer(name: &str, local_port: u16, peer: SocketAddr) -> String {
    format!("{name} {local_port} {}\n", peer.ip().to_canonical())
}

/// Dual-stack servers in `ns`: TCP on each of `tcp`, UDP on each of `udp`.
fn serve(ns: &NetNs, name: &'static str, tcp: &[u16], udp: &[u16]) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for &port in tcp {
        let listener = ns.run_in(move || TcpListener::bind(("::", port)).expect("bind tcp"));
        listener.set_nonblocking(true).unwrap();
        let stop = stop.clone();
        threads.push(thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        use std::io::Write;
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(answer(name, port, peer).as_bytes());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    for &port in udp {
        let socket = ns.run_in(move || UdpSocket::bind(("::", port)).expect("bind udp"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = stop.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0; 64];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(answer(name, port, peer).as_bytes(), peer);
                }
            }
        }));
    }
    Servers { stop, threads }
}

/// What a server answered: its name, its port, the source it saw.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    name: String,
    port: u16,
    peer: IpAddr,
}

fn answered(name: &str, port: u16, peer: &str) -> Answer {
    Answer {
        name: name.into(),
        port,
        peer: ip(peer),
    }
}

fn parse_answer(text: &str) -> Answer {
    let fields: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "not an answer: {text:?}");
    Answer {
        name: fields[0].into(),
        port: fields[1].parse().unwrap(),
        peer: ip(fields[2]),
    }
}

/// A TCP connection from `from` to `to`, and what came back.
fn ask_tcp(from: &NetNs, to: &str, timeout: Duration) -> std::io::Result<Answer> {
    let to: SocketAddr = to.parse().expect("socket address");
    from.run_in(move || {
        let mut stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(OK_WITHIN))?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(parse_answer(&text))
    })
}

/// One datagram from a fresh socket (a new conntrack flow) in `from` to
/// `to`, and the reply.
fn ask_udp(from: &NetNs, to: &str, timeout: Duration) -> std::io::Result<Answer> {
    let to: SocketAddr = to.parse().expect("socket address");
    from.run_in(move || {
        let any: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let socket = UdpSocket::bind(any)?;
        socket.connect(to)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send(b"hello")?;
        let mut buf = [0; 128];
        let n = socket.recv(&mut buf)?;
        Ok(parse_answer(&String::from_utf8_lossy(&buf[..n])))
    })
}

#[track_caller]
fn must_answer(result: std::io::Result<Answer>, what: &str) -> Answer {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Asks `case`'s `PROTO TO` (`tcp 10.99.0.1:8080`, the first two words)
/// from `from`; the rest of `case` is for the caller.
fn ask(from: &NetNs, case: &str, timeout: Duration) -> std::io::Result<Answer> {
    let mut words = case.split_whitespace();
    let (proto, to) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    match proto.parse() {
        Ok(Proto::Tcp) => ask_tcp(from, to, timeout),
        Ok(Proto::Udp) => ask_udp(from, to, timeout),
        Err(e) => panic!("{case:?}: {e}"),
    }
}

/// Each of `cases` is a path that must work, `PROTO TO → GUEST:PORT seeing
/// PEER (note)`: asked from `from`, guest GUEST answers on its port PORT,
/// having seen PEER as the peer. Checked in order.
#[track_caller]
fn assert_all_reach(from: &NetNs, cases: &[&str]) {
    for case in cases {
        let words: Vec<&str> = case.split_whitespace().collect();
        let [_, _, "→", guest_port, "seeing", peer, ..] = words[..] else {
            panic!("{case:?} is not `PROTO TO → GUEST:PORT seeing PEER`");
        };
        let (guest, port) = guest_port.split_once(':').expect("GUEST:PORT");
        let got = must_answer(ask(from, case, OK_WITHIN), case);
        assert_eq!(got, answered(guest, port.parse().unwrap(), peer), "{case}");
    }
}

/// Each of `cases` (`PROTO TO (note)`) is refused at once: the host
/// answers itself and has nothing there.
#[track_caller]
fn assert_all_refused(from: &NetNs, cases: &[&str]) {
    for case in cases {
        must_be_refused(ask(from, case, OK_WITHIN), case);
    }
}

#[track_caller]
fn must_be_refused(result: std::io::Result<Answer>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{what}: {e}"),
        Ok(answer) => panic!("{what}: answered {answer:?}"),
    }
}

/// How the host's bridge hands frames to netfilter. With br_netfilter
/// (a module Docker and Kubernetes load; built in on some kernels) and
/// `bridge-nf-call-iptables=1`, the IP hooks — our DNAT included — run
/// while a frame is bridged, so a forward to a guest on the same bridge is
/// bridged rather than routed. Every packet test runs in both modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BridgeNf {
    /// No br_netfilter, or `bridge-nf-call-ip(6)tables=0`: routed.
    Off,
    /// br_netfilter with `bridge-nf-call-ip(6)tables=1`.
    On,
}

/// Whether br_netfilter is in the kernel (loaded or built in): its
/// sysctls then exist in every network namespace.
fn bridge_nf_exists() -> bool {
    std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists()
}

/// Off, and On where the kernel has br_netfilter (without it, On cannot
/// happen on this machine, so there is nothing to test).
fn modes() -> Vec<BridgeNf> {
    if bridge_nf_exists() {
        vec![BridgeNf::Off, BridgeNf::On]
    } else {
        eprintln!("no br_netfilter in this kernel: testing the routed bridge only");
        vec![BridgeNf::Off]
    }
}

struct Lab {
    host: NetNs,
    outside: NetNs,
    guest1: NetNs,
    guest2: NetNs,
    net: NetworkConfig,
    _servers: Vec<Servers>,
}

impl Lab {
    fn new(what: &str, mode: BridgeNf) -> Lab {
        require(&["ip", "nft", "sysctl"]);
        let host = NetNs::new(&format!("{what}-h"));
        let outside = NetNs::new(&format!("{what}-o"));
        let guest1 = NetNs::new(&format!("{what}-g1"));
        let guest2 = NetNs::new(&format!("{what}-g2"));
        common::uplink(&host, &outside);
        let net = net();
        host.block_on(|| bring_up(&net)).expect("bring_up");
        if bridge_nf_exists() {
            let value = if mode == BridgeNf::On { 1 } else { 0 };
            for family in ["iptables", "ip6tables"] {
                host.exec_ok(&[
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.bridge.bridge-nf-call-{family}={value}"),
                ]);
            }
        } else {
            assert_eq!(mode, BridgeNf::Off, "this kernel has no br_netfilter");
        }
        for (n, guest, port) in [(1, &guest1, "gport1"), (2, &guest2, "gport2")] {
            plug_guest(
                &host,
                &net.bridge,
                port,
                guest,
                &format!("52:54:00:00:00:1{n}"),
            );
            guest.ip(&["addr", "add", &format!("10.42.0.1{n}/24"), "dev", "eth0"]);
            guest.ip(&["route", "add", "default", "via", "10.42.0.1"]);
            guest.ip(&[
                "addr",
                "add",
                &format!("fd42::1{n}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            guest.ip(&["-6", "route", "add", "default", "via", "fd42::1"]);
        }
        let servers = vec![
            serve(&guest1, "guest1", &[80, 81, 82], &[53]),
            serve(&guest2, "guest2", &[80, 81, 82], &[53]),
        ];
        Lab {
            host,
            outside,
            guest1,
            guest2,
            net,
            _servers: servers,
        }
    }

    fn apply(&self, forwards: &[ForwardElement]) {
        self.host
            .block_on(|| FW.apply_ruleset(std::slice::from_ref(&self.net), forwards))
            .expect("apply_with_forwards");
    }

    fn add(&self, rules: &[ForwardElement]) -> Result<ElementReport, FirewallError> {
        self.host.block_on(|| FW.add_elements(rules))
    }

    fn remove(&self, rules: &[ForwardElement]) -> Result<ElementReport, FirewallError> {
        self.host.block_on(|| FW.remove_elements(rules))
    }

    fn list(&self) -> String {
        self.host.block_on(|| FW.listing()).expect("list")
    }
}

/// Runs `test` in a lab of its own (namespaces tagged `tag`) with
/// `forwards` applied, for each bridge netfilter mode.
fn in_each_mode(tag: &str, forwards: &[ForwardElement], test: impl Fn(&Lab, BridgeNf)) {
    for mode in modes() {
        eprintln!("bridge netfilter: {mode:?}");
        let lab = Lab::new(tag, mode);
        lab.apply(forwards);
        test(&lab, mode);
    }
}

#[test]
fn outside_reaches_guests_through_the_uplink_by_tcp_udp_and_port_ranges() {
    let mut forwards = vec![
        rule(Proto::Tcp, Some(UPLINK), 8080, "10.42.0.11", 80),
        rule(Proto::Udp, None, 5353, "10.42.0.11", 53),
    ];
    // 9000-9002:80 → guest2 80, 81, 82.
    forwards.extend(expand(Proto::Tcp, None, (9000, 9002), "10.42.0.12", 80));
    in_each_mode("fw-out", &forwards, |lab, _| {
        // The guest sees the outside's own address: no masquerade inbound.
        assert_all_reach(
            &lab.outside,
            &[
                "tcp 10.99.0.1:8080 → guest1:80 seeing 10.99.0.2",
                "udp 10.99.0.1:5353 → guest1:53 seeing 10.99.0.2",
            ],
        );
        for (offset, host_port) in (9000..=9002).enumerate() {
            let got = must_answer(
                ask_tcp(&lab.outside, &format!("10.99.0.1:{host_port}"), OK_WITHIN),
                "range",
            );
            assert_eq!(got, answered("guest2", 80 + offset as u16, "10.99.0.2"));
        }

        // Only what is forwarded: other ports, and the other protocol on a
        // forwarded port, reach the host itself, which has nothing there.
        assert_all_refused(
            &lab.outside,
            &[
                "tcp 10.99.0.1:8081",
                "tcp 10.99.0.1:5353",
                "udp 10.99.0.1:8080",
            ],
        );
        // And the guests stay unreachable directly (NAT network).
        lab.outside
            .ip(&["route", "add", "10.42.0.0/24", "via", UPLINK]);
        assert!(
            ask_tcp(&lab.outside, "10.42.0.11:80", DROPPED_AFTER).is_err(),
            "the outside reached a NAT guest without a forward"
        );
    });
}

#[test]
fn ipv6_forwards_from_the_outside_through_the_uplinks_v6_address() {
    let forwards = [
        rule(Proto::Tcp, Some(UPLINK6), 8080, "fd42::11", 80),
        rule(Proto::Udp, None, 5353, "fd42::12", 53),
        // The same port over IPv4 goes elsewhere: the families are apart.
        rule(Proto::Tcp, Some(UPLINK), 8080, "10.42.0.12", 81),
    ];
    in_each_mode("fw-v6", &forwards, |lab, _| {
        assert_all_reach(
            &lab.outside,
            &[
                "tcp [fd99::1]:8080 → guest1:80 seeing fd99::2",
                "udp [fd99::1]:5353 → guest2:53 seeing fd99::2",
                "tcp 10.99.0.1:8080 → guest2:81 seeing 10.99.0.2",
            ],
        );
        // An "any address" IPv6 forward is not an IPv4 one.
        assert_all_refused(&lab.outside, &["udp 10.99.0.1:5353 (udp4 5353)"]);
    });
}

#[test]
fn the_host_reaches_forwards_on_its_own_addresses_and_on_localhost() {
    let forwards = [
        rule(Proto::Tcp, None, 8080, "10.42.0.11", 80),
        rule(Proto::Tcp, None, 8080, "fd42::11", 80),
        rule(Proto::Udp, None, 5353, "10.42.0.12", 53),
    ];
    in_each_mode("fw-local", &forwards, |lab, _| {
        // To its own uplink address: the source is that address, which the
        // guest can answer through its default route.
        assert_all_reach(
            &lab.host,
            &[
                "tcp 10.99.0.1:8080 → guest1:80 seeing 10.99.0.1 (host → uplink)",
                "tcp [fd99::1]:8080 → guest1:80 seeing fd99::1 (host → uplink v6)",
            ],
        );
        // Any local address, also the router's own on the bridge.
        assert_all_reach(
            &lab.host,
            &["tcp 10.42.0.1:8080 → guest1:80 seeing 10.42.0.1 (host → router)"],
        );

        // 127.0.0.1 needs route_localnet: without it the kernel will not route
        // the DNAT'ed packet (source 127.0.0.1) out of the bridge.
        let localnet = || {
            lab.host
                .run_in(|| std::fs::read_to_string(firewall::ROUTE_LOCALNET).unwrap())
                .trim()
                .to_owned()
        };
        // A new namespace inherits the host's IPv4 settings: start from 0.
        for conf in ["all", "default", "qnfwd"] {
            lab.host.exec_ok(&[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv4.conf.{conf}.route_localnet=0"),
            ]);
        }
        assert_eq!(localnet(), "0");
        assert!(
            ask_tcp(&lab.host, "127.0.0.1:8080", DROPPED_AFTER).is_err(),
            "127.0.0.1 was forwarded without route_localnet"
        );
        lab.host
            .run_in(|| FW.enable_localhost_forwards())
            .expect("enable_localhost_forwards");
        assert_eq!(localnet(), "1");
        lab.host
            .run_in(|| FW.enable_localhost_forwards())
            .expect("enabling twice");
        // Masqueraded to the router address, so the guest can answer.
        assert_all_reach(
            &lab.host,
            &[
                "tcp 127.0.0.1:8080 → guest1:80 seeing 10.42.0.1 (host → 127.0.0.1)",
                "udp 127.0.0.1:5353 → guest2:53 seeing 10.42.0.1 (udp → 127.0.0.1)",
            ],
        );
        // ::1 is never forwarded (Linux cannot): the host answers it itself,
        // and nothing listens there.
        assert_all_refused(&lab.host, &["tcp [::1]:8080 (host → ::1)"]);
    });
}

#[test]
fn guests_reach_forwards_through_the_hosts_address_hairpin_masqueraded() {
    let forwards = [
        rule(Proto::Tcp, Some(UPLINK), 8080, "10.42.0.11", 80),
        rule(Proto::Tcp, Some(UPLINK6), 8080, "fd42::11", 80),
        rule(Proto::Udp, None, 5353, "10.42.0.11", 53),
    ];
    in_each_mode("fw-hair", &forwards, |lab, mode| {
        // guest2 → the host's public address → guest1, on the same bridge:
        // guest1 sees the router (masquerade), so its answer goes back through
        // the host, which undoes both translations.
        assert_all_reach(
            &lab.guest2,
            &[
                "tcp 10.99.0.1:8080 → guest1:80 seeing 10.42.0.1 (hairpin)",
                "tcp [fd99::1]:8080 → guest1:80 seeing fd42::1 (hairpin v6)",
                "udp 10.99.0.1:5353 → guest1:53 seeing 10.42.0.1 (hairpin udp)",
            ],
        );
        // Again, and a service of the host on the same address: an ICMP
        // redirect ("10.99.0.1 is reachable via guest1") must not have sent
        // guest2 around the host.
        assert_all_reach(
            &lab.guest2,
            &["tcp 10.99.0.1:8080 → guest1:80 seeing 10.42.0.1 (again)"],
        );
        let host_service = lab.host.listen("10.99.0.1:7000");
        let seen = common::accept_one(host_service, OK_WITHIN);
        lab.guest2
            .connect("10.99.0.1:7000", OK_WITHIN)
            .expect("guest2 → the host's own service");
        assert_eq!(
            seen.recv_timeout(OK_WITHIN).expect("the host saw it").ip(),
            ip("10.42.0.12")
        );

        // A guest reaching its own forward. Routed, that just works; when
        // the bridge applies the DNAT (br_netfilter), the frame has to go
        // back out of the port it came in by, which a bridge only does for
        // ports in hairpin mode.
        if mode == BridgeNf::On {
            assert!(
                ask_tcp(&lab.guest1, "10.99.0.1:8080", DROPPED_AFTER).is_err(),
                "br_netfilter without hairpin mode: dropped by the bridge"
            );
            lab.host.ip(&[
                "link",
                "set",
                "gport1",
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ]);
        }
        assert_all_reach(
            &lab.guest1,
            &["tcp 10.99.0.1:8080 → guest1:80 seeing 10.42.0.1 (to itself)"],
        );
        // Bound to the uplink address: the router address is not forwarded.
        assert_all_refused(&lab.guest2, &["tcp 10.42.0.1:8080 (router:8080)"]);
        // Guest to guest directly is untouched (bridged, no NAT).
        assert_all_reach(
            &lab.guest2,
            &["tcp 10.42.0.11:80 → guest1:80 seeing 10.42.0.12 (direct)"],
        );
    });
}

/// `report` changed exactly `changed` and refused exactly `refused`, each
/// with `EEXIST` (the host port is another guest's).
#[track_caller]
fn assert_report(report: &ElementReport, changed: &[ForwardElement], refused: &[ForwardElement]) {
    let mut got = report.changed.clone();
    got.sort();
    let mut want = changed.to_vec();
    want.sort();
    assert_eq!(got, want, "changed: {report:?}");
    let got: Vec<ForwardElement> = report.refused.iter().map(|r| r.element).collect();
    assert_eq!(got, refused, "refused: {report:?}");
    for r in &report.refused {
        assert_eq!(r.errno, libc::EEXIST, "{r}");
        assert_eq!(r.kind(), firewall::ErrorKind::KeyTaken, "{r}");
    }
}

#[test]
fn removed_forwards_close_the_port_and_changes_are_idempotent_and_per_element() {
    let lab = Lab::new("fw-rm", BridgeNf::Off);
    let web = rule(Proto::Tcp, Some(UPLINK), 8080, "10.42.0.11", 80);
    let dns = rule(Proto::Udp, None, 5353, "10.42.0.11", 53);
    let other = rule(Proto::Tcp, Some(UPLINK), 8082, "10.42.0.12", 82);
    // Same host address, protocol and port as `web`, another guest.
    let clash = rule(Proto::Tcp, Some(UPLINK), 8080, "10.42.0.12", 80);
    lab.apply(&[]);
    let empty = lab.list();

    assert_report(&lab.add(&[web]).expect("add"), &[web], &[]);
    assert_report(
        &lab.add(&[web])
            .expect("adding the same forward again is a no-op"),
        &[web],
        &[],
    );
    assert_report(&lab.add(&[dns, web]).expect("add"), &[dns, web], &[]);
    let installed = lab.list();
    assert_eq!(
        installed.matches(": 10.42.0.11 . 80").count(),
        1,
        "{installed}"
    );
    assert_all_reach(
        &lab.outside,
        &["tcp 10.99.0.1:8080 → guest1:80 seeing 10.99.0.2 (web)"],
    );
    must_answer(ask_udp(&lab.outside, "10.99.0.1:5353", OK_WITHIN), "dns");

    // A host port forwarded elsewhere already: that element is refused
    // with the kernel's reason, and `other`, in the same call, is
    // installed and works; `web` still goes to guest1.
    let report = lab.add(&[other, clash]).expect("a clash is per element");
    assert_report(&report, &[other], &[clash]);
    assert!(
        report.refused[0]
            .to_string()
            .contains("already forwarded to another guest"),
        "{}",
        report.refused[0]
    );
    assert_all_reach(
        &lab.outside,
        &[
            "tcp 10.99.0.1:8082 → guest2:82 seeing 10.99.0.2 (other)",
            "tcp 10.99.0.1:8080 → guest1:80 seeing 10.99.0.2 (web)",
        ],
    );
    assert_report(&lab.remove(&[other]).expect("remove"), &[other], &[]);
    assert_eq!(lab.list(), installed);
    // Two different guests for one port within one call: refused before nft.
    let err = lab.add(&[web, clash]).expect_err("conflicting rules");
    assert!(matches!(err, FirewallError::InvalidElement(..)), "{err}");
    // Removing with the wrong guest removes nothing: refused, and `dns`
    // in the same call is removed.
    let report = lab.remove(&[clash, dns]).expect("per element");
    assert_report(&report, &[dns], &[clash]);
    assert_all_refused(&lab.outside, &["udp 10.99.0.1:5353 (removed dns)"]);
    assert_all_reach(
        &lab.outside,
        &["tcp 10.99.0.1:8080 → guest1:80 seeing 10.99.0.2 (web)"],
    );

    lab.remove(&[web]).expect("remove");
    assert_all_refused(&lab.outside, &["tcp 10.99.0.1:8080 (removed web)"]);
    // An absent forward does not fail the others in its transaction.
    lab.add(&[dns]).expect("add dns again");
    assert_report(
        &lab.remove(&[web, dns]).expect("remove absent + present"),
        &[web, dns],
        &[],
    );
    assert_all_refused(&lab.outside, &["udp 10.99.0.1:5353 (removed dns)"]);
    lab.remove(&[web, dns]).expect("removing twice is a no-op");
    lab.remove(&[]).expect("removing nothing");
    assert_eq!(
        lab.list(),
        empty,
        "every element is gone, nothing else changed"
    );

    // Re-added, it works again.
    lab.add(&[web]).expect("add again");
    assert_all_reach(
        &lab.outside,
        &["tcp 10.99.0.1:8080 → guest1:80 seeing 10.99.0.2 (web again)"],
    );
    // A table without us: adding fails clearly, as a whole.
    lab.host.block_on(|| FW.teardown()).expect("remove table");
    let err = lab.add(&[web]).expect_err("no table");
    assert_eq!(err.kind(), firewall::ErrorKind::TableMissing, "{err}");
    assert!(
        err.to_string().contains("No such file or directory"),
        "{err}"
    );
}

/// A batch of 1,000 elements where three keys are other guests' already:
/// the other 997 are installed in the kernel, the three are reported with
/// the kernel's reason and left as they were; removal is per element too.
#[test]
fn one_taken_key_does_not_keep_the_rest_of_a_batch_out() {
    require(&["ip", "nft"]);
    let ns = NetNs::new("fw-batch");
    let nets = vec![net()];
    let taken: Vec<ForwardElement> = [20_017, 20_500, 20_999]
        .map(|port| rule(Proto::Tcp, Some(UPLINK), port, "10.42.0.99", 1))
        .to_vec();
    let batch = expand(
        Proto::Tcp,
        Some(UPLINK),
        (20_000, 20_999),
        "10.42.0.12",
        20_000,
    );
    let clashing: Vec<ForwardElement> = batch
        .iter()
        .filter(|e| taken.iter().any(|t| t.host_port == e.host_port))
        .copied()
        .collect();
    let free: Vec<ForwardElement> = batch
        .iter()
        .filter(|e| !clashing.contains(e))
        .copied()
        .collect();
    let (added, installed, removed, left) = ns.block_on(|| async {
        FW.apply_ruleset(&nets, &taken).await.expect("apply");
        let added = FW.add_elements(&batch).await.expect("add");
        let installed = FW.installed_elements().await.expect("read back");
        let removed = FW.remove_elements(&batch).await.expect("remove");
        let left = FW.installed_elements().await.expect("read back");
        (added, installed, removed, left)
    });
    assert_report(&added, &free, &clashing);
    let mut expected: Vec<ForwardElement> = taken.iter().chain(&free).copied().collect();
    expected.sort();
    assert_eq!(installed.into_iter().collect::<Vec<_>>(), expected);
    // Removing the batch removes its 997 and leaves the other guest's.
    assert_report(&removed, &free, &clashing);
    assert_eq!(left.into_iter().collect::<Vec<_>>(), taken);
}

/// What `installed_elements` reads from the kernel is every element of the
/// four maps, however it got there: rendered into the table by `nft -f`,
/// added over nfnetlink, or by hand with `nft add element`. An element no
/// forward of ours encodes (SCTP) is left out; without the table, nothing.
#[test]
fn installed_elements_are_read_back_from_the_kernel_whoever_installed_them() {
    require(&["ip", "nft"]);
    let ns = NetNs::new("fw-read");
    let nets = vec![net()];
    let by_nft = one_in_each_map();
    let by_netlink = vec![
        rule(Proto::Udp, Some(UPLINK), 8080, "10.42.0.12", 81),
        rule(Proto::Tcp, None, 2222, "10.42.0.12", 22),
        rule(Proto::Udp, Some(UPLINK6), 443, "fd42::12", 4443),
        rule(Proto::Tcp, None, 65535, "fd42::11", 1),
    ];
    let by_hand = rule(Proto::Tcp, None, 7000, "fd42::11", 7001);
    let absent = ns.block_on(|| FW.installed_elements()).expect("no table");
    assert!(absent.is_empty(), "{absent:?}");
    ns.block_on(|| FW.apply_ruleset(&nets, &by_nft))
        .expect("apply");
    let report = ns.block_on(|| FW.add_elements(&by_netlink)).expect("add");
    assert!(report.is_complete(), "{report:?}");
    ns.exec_ok(&[
        "nft",
        "add element inet qnet fwd6_any { tcp . 7000 : fd42::11 . 7001 }; \
         add element inet qnet fwd4_any { sctp . 9 : 10.42.0.11 . 9 }",
    ]);
    let installed = ns.block_on(|| FW.installed_elements()).expect("read");
    let mut expected: Vec<ForwardElement> = by_nft.iter().chain(&by_netlink).copied().collect();
    expected.push(by_hand);
    expected.sort();
    assert_eq!(installed.into_iter().collect::<Vec<_>>(), expected);
    // And what is listed agrees: each element once, as nft writes it.
    let listing = ns.block_on(|| FW.listing()).expect("list");
    for element in &expected {
        let text = format!("{} : {}", element.key(), element.value());
        assert_eq!(listing.matches(&text).count(), 1, "{text}:\n{listing}");
    }
}

#[test]
fn reapplying_lists_identically_without_duplicates_and_leaves_a_foreign_table_alone() {
    require(&["ip", "nft"]);
    let ns = NetNs::new("fw-list");
    // A foreign table with a concatenated-value map of its own.
    ns.exec_ok(&[
        "nft",
        "add table ip foreign; add chain ip foreign c; \
         add map ip foreign m { type ipv4_addr : ipv4_addr . inet_service; }; \
         add element ip foreign m { 1.2.3.4 : 5.6.7.8 . 80 }",
    ]);
    let foreign = || ns.exec_ok(&["nft", "list", "table", "ip", "foreign"]);
    let foreign_before = foreign();

    let nets = vec![net()];
    let mut forwards = one_in_each_map();
    forwards.extend(expand(Proto::Tcp, None, (9000, 9099), "10.42.0.12", 9000));
    let (first, after_adds, second, rendered) = ns.block_on(|| async {
        let ((), first) = listed_after("apply", FW.apply_ruleset(&nets, &forwards)).await;
        let (report, after_adds) =
            listed_after("adding them all again", FW.add_elements(&forwards)).await;
        assert!(report.is_complete(), "{report:?}");
        let ((), second) = listed_after("re-apply", FW.apply_ruleset(&nets, &forwards)).await;
        (
            first,
            after_adds,
            second,
            firewall::render_with_forwards(&nets, &forwards),
        )
    });
    assert_eq!(first, second, "re-applying changes nothing");
    assert_eq!(
        first, after_adds,
        "adding installed forwards changes nothing"
    );
    assert_eq!(
        first,
        firewall::normalize(&rendered),
        "nft lists exactly what we rendered"
    );
    for rule in &forwards {
        let element = format!("{} : {}", rule.key(), rule.value());
        assert_eq!(
            first.matches(&element).count(),
            1,
            "{element} once:\n{first}"
        );
    }

    // Invalid forwards are refused before nft runs; the table stays.
    let invalid = [rule(Proto::Tcp, Some(UPLINK), 1, "fd42::11", 1)];
    let err = ns
        .block_on(|| FW.apply_ruleset(&nets, &invalid))
        .expect_err("v4 host address, v6 guest");
    assert!(matches!(err, FirewallError::InvalidElement(..)), "{err}");
    assert_eq!(ns.block_on(|| FW.listing()).unwrap(), first);

    // apply() of the networks alone keeps the maps, empty.
    let ((), bare) = ns.block_on(|| listed_after("apply", FW.apply_ruleset(&nets, &[])));
    assert_eq!(bare, firewall::normalize(&firewall::render(&nets)));
    assert!(bare.contains("\tmap fwd4 {\n"), "{bare}");
    assert!(!bare.contains("elements"), "{bare}");

    let mut tables: Vec<String> = ns
        .exec_ok(&["nft", "list", "tables"])
        .lines()
        .map(String::from)
        .collect();
    tables.sort();
    assert_eq!(tables, ["table inet qnet", "table ip foreign"]);
    ns.block_on(|| FW.teardown()).expect("remove");
    assert_eq!(foreign(), foreign_before, "the foreign table is untouched");
    assert_eq!(
        ns.exec_ok(&["nft", "list", "tables"]).trim(),
        "table ip foreign"
    );
}

/// An IPv4/UDP frame from `src` to `dst` with no UDP checksum.
fn udp_frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut header = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&src);
    header.extend_from_slice(&dst);
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    header[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&4444u16.to_be_bytes());
    frame.extend_from_slice(&dport.to_be_bytes());
    frame.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// Sends `frame` out of `ifname` of `ns` as is (AF_PACKET).
fn send_raw(ns: &NetNs, ifname: &str, frame: Vec<u8>) {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    ns.run_in(move || unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let index = libc::if_nametoindex(ifname.as_ptr());
        assert!(index != 0, "no such interface");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(sent, frame.len() as isize, "sendto: {err}");
    });
}

#[test]
fn localhost_forwards_do_not_open_the_hosts_loopback_to_the_network() {
    require(&["ip", "nft"]);
    let host = NetNs::new("fw-guard-h");
    let outside = NetNs::new("fw-guard-o");
    veth(&host, "up0", &outside, "eth0");
    host.ip(&["addr", "add", "10.99.0.1/24", "dev", "up0"]);
    outside.ip(&["addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    host.run_in(|| FW.enable_localhost_forwards())
        .expect("route_localnet");
    let mac: String = ip_json(&host, &["link", "show", "up0"])[0]["address"]
        .as_str()
        .expect("up0 has a MAC")
        .to_owned();
    let mac: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let mac: [u8; 6] = mac.try_into().unwrap();
    // A service of the host that only listens on loopback.
    let private = host.run_in(|| UdpSocket::bind("127.0.0.1:7777").expect("bind"));
    private.set_read_timeout(Some(DROPPED_AFTER)).unwrap();
    let probe = |payload: &'static [u8]| {
        send_raw(
            &outside,
            "eth0",
            udp_frame(mac, [10, 99, 0, 2], [127, 0, 0, 1], 7777, payload),
        );
        let mut buf = [0; 32];
        private.recv(&mut buf).map(|n| buf[..n].to_vec())
    };

    // With route_localnet and no guard, a neighbour gets in: the probe
    // works (this is what the guard is for).
    assert_eq!(
        probe(b"before").expect("the probe reaches 127.0.0.1"),
        b"before"
    );

    let net = network("guard", "qnguard", Mode::Nat, "10.47.0.0/24");
    host.block_on(|| bring_up(&net)).expect("bring_up");
    let forwards = [rule(Proto::Tcp, None, 8080, "10.47.0.50", 80)];
    host.block_on(|| FW.apply_ruleset(std::slice::from_ref(&net), &forwards))
        .expect("apply");
    let err = probe(b"after").expect_err("our table drops it");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    // Local use of 127.0.0.1 is untouched.
    host.run_in(|| {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.send_to(b"local", "127.0.0.1:7777").unwrap();
    });
    let mut buf = [0; 32];
    let n = private.recv(&mut buf).expect("local traffic still arrives");
    assert_eq!(&buf[..n], b"local");
}

/// The elements the daemon sends over nfnetlink are exactly the ones nft
/// writes from its text syntax: same keys, same values, in all four maps,
/// also for a batch of 12,000 (split into many messages, bigger than the
/// default socket buffer). Removing them leaves the maps empty.
#[test]
fn netlink_elements_equal_nfts_own_in_every_map_also_by_the_ten_thousand() {
    let ns = NetNs::new("fw-nl");
    let nets = vec![net()];
    let mut forwards = one_in_each_map();
    forwards.extend(expand(
        Proto::Tcp,
        Some(UPLINK),
        (20000, 31999),
        "10.42.0.12",
        20000,
    ));
    let (by_nft, by_netlink, emptied, empty) = ns.block_on(|| async {
        let ((), by_nft) = listed_after("apply with nft", FW.apply_ruleset(&nets, &forwards)).await;
        let ((), empty) = listed_after("apply empty", FW.apply_ruleset(&nets, &[])).await;
        let (report, by_netlink) =
            listed_after("add over netlink", FW.add_elements(&forwards)).await;
        assert_eq!(report.changed.len(), forwards.len(), "{:?}", report.refused);
        let (report, emptied) =
            listed_after("remove over netlink", FW.remove_elements(&forwards)).await;
        assert!(report.is_complete(), "{report:?}");
        (by_nft, by_netlink, emptied, empty)
    });
    assert_eq!(by_nft.matches(" : 10.42.0.12 . ").count(), 12_000);
    assert!(by_netlink == by_nft, "nft and netlink elements differ");
    assert_eq!(emptied, empty);
}
