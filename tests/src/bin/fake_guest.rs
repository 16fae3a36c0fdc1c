//! `qnet-fake-guest`: a fake QEMU for qnet-hookd's tests (see
//! `qnet_tests::fake_guest`).
//!
//! `qnet-fake-guest guest QMP_SOCKET BRIDGE MAC NAME`: creates a TAP,
//! puts it on BRIDGE, connects to QMP_SOCKET and plays QEMU; prints
//! `connected TAP` once connected. A line `mac NEW` on stdin changes the
//! NIC's MAC and sends `NIC_RX_FILTER_CHANGED`. NAME `@N` is N bytes long.
//!
//! `qnet-fake-guest flood QMP_SOCKET N`: opens N connections and greets on
//! each, prints `opened K` and holds them until killed.

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qnet_tests::fake_guest::{self, Identity, RX_FILTER_CHANGED};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["guest", socket, bridge, mac, name] => guest(Path::new(socket), bridge, mac, name),
        ["flood", socket, n] => flood(Path::new(socket), n.parse().expect("N")),
        _ => {
            eprintln!(
                "usage: qnet-fake-guest guest QMP_SOCKET BRIDGE MAC NAME | flood QMP_SOCKET N"
            );
            std::process::exit(2);
        }
    }
}

fn guest(socket: &Path, bridge: &str, mac: &str, name: &str) -> ! {
    let tap = fake_guest::tap_on_bridge(bridge);
    let name = match name.strip_prefix('@') {
        Some(len) => "g".repeat(len.parse().expect("@LEN")),
        None => name.to_string(),
    };
    let identity = Arc::new(Identity {
        name,
        bridge: bridge.to_string(),
        mac: Mutex::new(mac.to_string()),
    });
    // The connection events go to; replaced at each reconnect.
    let current: Arc<Mutex<Option<Arc<Mutex<UnixStream>>>>> = Arc::default();
    let (events_writer, events_identity) = (current.clone(), identity.clone());
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if let Some(mac) = line.strip_prefix("mac ") {
                *events_identity.mac.lock().unwrap() = mac.trim().to_string();
                if let Some(writer) = events_writer.lock().unwrap().as_ref() {
                    fake_guest::send(writer, RX_FILTER_CHANGED);
                }
            }
        }
    });
    // Like QEMU's `reconnect=1`: dial until the daemon answers, and again
    // whenever it goes away (a restart, a crash). The TAP stays held.
    let mut first = true;
    loop {
        let Ok(stream) = UnixStream::connect(socket) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let writer = fake_guest::writer_of(&stream);
        *current.lock().unwrap() = Some(writer.clone());
        if first {
            println!("connected {}", tap.name());
            std::io::stdout().flush().unwrap();
            first = false;
        }
        fake_guest::play_qemu(stream, &writer, &identity);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn flood(socket: &Path, n: usize) {
    // Each connection plays QEMU in full, so the daemon completes the
    // handshake and would follow every one of them as a guest.
    let mut opened = 0;
    for i in 0..n {
        let Ok(stream) = UnixStream::connect(socket) else {
            break;
        };
        opened += 1;
        let identity = Identity {
            name: format!("flood-{i}"),
            bridge: "none".into(),
            mac: Mutex::new(format!("52:54:00:fe:{:02x}:{:02x}", i / 256 % 256, i % 256)),
        };
        std::thread::spawn(move || {
            let writer = fake_guest::writer_of(&stream);
            fake_guest::play_qemu(stream, &writer, &identity);
        });
    }
    println!("opened {opened}");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::park();
    }
}
