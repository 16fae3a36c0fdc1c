//! Smoke test of the tiny guest and its test kit: inside a namespace of its
//! own, a bridge with dnsmasq on it and a QEMU guest on a tap port. The guest
//! must get exactly its reserved address, answer ping, serve its token, and
//! echo over TCP and UDP.
//!
//! Nothing here touches the host's own network namespace: every link,
//! process and packet lives in the namespace the test creates (and deletes).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use qnet_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use qnet_tests::guest::{
    check_prerequisites, command_in_netns, guest_image, random_bytes, random_mac, random_token,
    GuestSpec, RunningGuest, ECHO_PORT, HTTP_PORT, HTTP_TIMEOUT, LONG, READY_TIMEOUT,
};
use qnet_tests::http::{http_get_in_netns, with_netns};
use qnet_tests::netns::NetNs;

/// A generous failure bound, not an expectation.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `payload` to the guest's TCP echo server, returns what came back.
fn tcp_echo(addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect_timeout(&addr, ECHO_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(ECHO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(payload)
        .map_err(|e| format!("send: {e}"))?;
    let mut echoed = vec![0; payload.len()];
    stream
        .read_exact(&mut echoed)
        .map_err(|e| format!("receive: {e}"))?;
    Ok(echoed)
}

/// Sends `payload` to the guest's UDP echo server, returns the answer. A few
/// tries, as a datagram may be lost.
fn udp_echo(addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("bind: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut last_error = String::new();
    for _ in 0..5 {
        socket
            .send_to(payload, addr)
            .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut buf = [0; 2048];
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == addr => return Ok(buf[..n].to_vec()),
            Ok((_, from)) => last_error = format!("answer from {from}, not {addr}"),
            Err(e) => last_error = format!("receive: {e}"),
        }
    }
    Err(last_error)
}

#[test]
fn guest_gets_reserved_lease_and_serves_ping_http_and_echo() {
    qnet_tests::require_root();
    check_prerequisites().expect("prerequisites");
    let image = guest_image().expect("guest image");

    // Declared first so it is dropped last: processes die before their netns.
    let ns = NetNs::new("guest");
    let logs = qnet_tests::guest::fresh_log_dir(ns.name());

    // A /24 of its own per test (the namespace isolates it anyway).
    let [subnet] = random_bytes::<1>();
    let net = |host: u8| Ipv4Addr::new(10, 77, subnet, host);
    let gateway = net(1);
    ns.ip(&["link", "add", "qbr0", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("{gateway}/24"), "dev", "qbr0"]);
    ns.ip(&["link", "set", "qbr0", "up"]);
    // Pre-created so it can be a bridge port before QEMU attaches to it.
    ns.ip(&["tuntap", "add", "dev", "qtap0", "mode", "tap"]);
    ns.ip(&["link", "set", "qtap0", "master", "qbr0"]);
    ns.ip(&["link", "set", "qtap0", "up"]);

    // The reservation lies outside the dynamic range, so getting it proves
    // dnsmasq matched our MAC rather than handing out the next free address.
    let mac = random_mac();
    let reserved = net(2 + random_bytes::<1>()[0] % 90);
    let token = random_token();
    let dnsmasq_cfg = DnsmasqConfig::new(
        ns.name(),
        "qbr0",
        net(100),
        net(150),
        logs.join("dnsmasq.log"),
    )
    .host(&mac, reserved, Some("guest1"));
    let dnsmasq = Dnsmasq::start(&dnsmasq_cfg).expect("start dnsmasq");

    let serial_log = logs.join("guest-serial.log");
    let spec = GuestSpec::new(&image, &mac, &token);
    let mut qemu = spec.qemu_command(
        "tap,id=n0,ifname=qtap0,script=no,downscript=no",
        &serial_log,
    );
    command_in_netns(&mut qemu, ns.name()).expect("enter netns");
    let started = Instant::now();
    let guest = RunningGuest::spawn(qemu, &serial_log).expect("start QEMU");

    let lease = guest
        .wait_for_lease_info(LONG)
        .unwrap_or_else(|e| panic!("{e}\n--- dnsmasq log ---\n{}", dnsmasq.log()));
    eprintln!("guest lease after {:.1?}: {lease:?}", started.elapsed());
    assert_eq!(
        lease.ip, reserved,
        "the guest must get the address reserved for its MAC"
    );
    assert_eq!(lease.mac, mac);
    assert_eq!(lease.prefix, 24);
    assert_eq!(
        lease.router,
        Some(gateway),
        "dnsmasq offers its own address as router"
    );

    let ready = guest.wait_for_ready(READY_TIMEOUT).expect("guest servers");
    assert!(
        ready.split_whitespace().any(|kv| kv == "udpecho=7"),
        "the guest has no UDP echo (was gcc with a static libc missing when it was built?): {ready}"
    );

    // busybox's ping: prerequisites already require busybox, not iputils.
    // 3 echo requests; one reply is enough.
    ns.exec(
        "busybox",
        &["ping", "-c", "3", "-W", "5", "-q", &reserved.to_string()],
    )
    .unwrap_or_else(|e| panic!("{e}"));

    let body = http_get_in_netns(
        ns.name(),
        SocketAddr::from((reserved, HTTP_PORT)),
        "/",
        HTTP_TIMEOUT,
    )
    .expect("HTTP GET from the guest");
    assert_eq!(body, token, "the page must be this guest's token");
    eprintln!("guest served its token after {:.1?}", started.elapsed());

    let echo_addr = SocketAddr::from((reserved, ECHO_PORT));
    let payload = format!("echo-{token}").into_bytes();
    let echoed = with_netns(ns.name(), move || tcp_echo(echo_addr, &payload)).expect("netns");
    assert_eq!(
        echoed.expect("TCP echo"),
        format!("echo-{token}").into_bytes()
    );
    let payload = format!("datagram-{token}").into_bytes();
    let echoed = with_netns(ns.name(), move || udp_echo(echo_addr, &payload)).expect("netns");
    assert_eq!(
        echoed.expect("UDP echo"),
        format!("datagram-{token}").into_bytes()
    );

    // Explicit order for clarity: QEMU, then dnsmasq, then the namespace.
    drop(guest);
    drop(dnsmasq);
    drop(ns);
}
