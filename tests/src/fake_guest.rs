//! A fake guest: a process that holds a TAP on a network's bridge and
//! speaks QMP to qnet-hookd's `qmp.sock` as QEMU 7.2 does (greeting,
//! `query-name`, `query-rx-filter` for one virtio-net NIC, HMP `info
//! network`), far cheaper than booting QEMU when a test needs hundreds of
//! guests. It can change its NIC's MAC as a guest would (the
//! `NIC_RX_FILTER_CHANGED` event, then the new `main-mac`). The process is
//! `qnet-fake-guest` (`tests/src/bin/fake_guest.rs`); the benches use
//! [`play_qemu`] in workers of their own.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::netns::NetNs;
use crate::workspace_binary;

/// QEMU 7.2's greeting.
pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

/// What a fake QEMU says about itself; the MAC may change while it runs.
pub struct Identity {
    pub name: String,
    pub bridge: String,
    pub mac: Mutex<String>,
}

/// Sends one QMP line (CRLF, as QEMU does) on a shared writer.
pub fn send(writer: &Mutex<UnixStream>, line: &str) -> bool {
    let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
    w.write_all(format!("{line}\r\n").as_bytes())
        .and_then(|()| w.flush())
        .is_ok()
}

/// Answers like QEMU 7.2 on `stream` until the daemon hangs up. Writes go
/// through `writer` (a clone of `stream`) so events can be sent from
/// another thread.
pub fn play_qemu(stream: UnixStream, writer: &Mutex<UnixStream>, guest: &Identity) {
    if !send(writer, GREETING) {
        return;
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            return;
        };
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let command = message["execute"].as_str().unwrap_or_default();
        let reply = match answer(command, &message, guest) {
            Ok(value) => json!({"return": value, "id": id}),
            Err(desc) => json!({"error": {"class": "CommandNotFound", "desc": desc}, "id": id}),
        };
        if !send(writer, &reply.to_string()) {
            return;
        }
    }
}

fn answer(command: &str, message: &Value, guest: &Identity) -> Result<Value, String> {
    let mac = guest.mac.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(match command {
        "qmp_capabilities" => json!({}),
        "query-name" => json!({"name": guest.name}),
        "query-uuid" => json!({"UUID": "00000000-0000-0000-0000-000000000000"}),
        "query-status" => json!({"status": "running", "singlestep": false, "running": true}),
        "query-rx-filter" => {
            // QEMU 7.2, virtio-net without VLAN filtering: all 4096 VLANs.
            let vlans: Vec<u32> = (0..4096).rev().collect();
            json!([{
                "promiscuous": false, "name": "net0", "main-mac": mac, "unicast": "normal",
                "vlan": "all", "vlan-table": vlans, "unicast-table": [], "multicast": "normal",
                "multicast-overflow": false, "unicast-overflow": false,
                "multicast-table": ["01:00:5e:00:00:01", "33:33:00:00:00:01"],
                "broadcast-allowed": false
            }])
        }
        "human-monitor-command" if message["arguments"]["command-line"] == "info network" => {
            json!(format!(
                "net0: index=0,type=nic,model=virtio-net-pci,macaddr={mac}\r\n \\ n0: \
                 index=0,type=tap,helper=/usr/lib/qemu/qemu-bridge-helper,br={}\r\n",
                guest.bridge
            ))
        }
        other => return Err(format!("The command {other} has not been found")),
    })
}

/// The event QEMU sends when the guest changes a NIC's MAC.
pub const RX_FILTER_CHANGED: &str = r#"{"event": "NIC_RX_FILTER_CHANGED", "data": {"name": "net0", "path": "/machine/peripheral-anon/device[0]/virtio-backend"}, "timestamp": {"seconds": 0, "microseconds": 0}}"#;

/// A running `qnet-fake-guest`; killed (SIGKILL) and reaped on drop.
pub struct FakeGuest {
    child: Child,
    stdin: Option<ChildStdin>,
    pub pid: u32,
    pub mac: String,
    pub tap: String,
}

impl FakeGuest {
    /// Starts a fake guest in `netns` with a TAP on `bridge`, connected to
    /// the daemon's `qmp_socket`, and waits until it has connected.
    /// `name`: `-name`; `@N` makes it N bytes long.
    pub fn spawn(netns: &NetNs, qmp_socket: &Path, bridge: &str, mac: &str, name: &str) -> Self {
        let ns = std::fs::File::open(netns.path()).expect("open the namespace");
        let mut cmd = Command::new(workspace_binary("qnet-fake-guest"));
        cmd.arg("guest")
            .arg(qmp_socket)
            .args([bridge, mac, name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        in_netns_until_parent_dies(&mut cmd, &ns);
        let mut child = cmd.spawn().expect("spawn qnet-fake-guest");
        drop(ns);
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let Some(tap) = line.trim().strip_prefix("connected ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qnet-fake-guest did not connect: {line:?}");
        };
        FakeGuest {
            pid: child.id(),
            stdin: child.stdin.take(),
            child,
            mac: mac.to_string(),
            tap: tap.to_string(),
        }
    }

    /// The guest changes its NIC's MAC (QEMU then sends
    /// `NIC_RX_FILTER_CHANGED`).
    pub fn set_mac(&mut self, mac: &str) {
        let stdin = self.stdin.as_mut().expect("guest stdin");
        writeln!(stdin, "mac {mac}").expect("tell the fake guest");
        stdin.flush().unwrap();
        self.mac = mac.to_string();
    }

    /// kill -9 and reap: the guest's QEMU exits.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FakeGuest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process that opens `connections` QMP connections to `qmp_socket`
/// and greets on each like QEMU, holding them all, as `uid:gid` (a local
/// user attacking the daemon). Killed and reaped on drop.
pub struct Flood {
    child: Child,
    /// Connections the peer got (the daemon may close some at once).
    pub opened: usize,
}

impl Flood {
    pub fn start(qmp_socket: &Path, connections: usize, uid: u32, gid: u32) -> Flood {
        let mut child = Command::new(workspace_binary("qnet-fake-guest"))
            .arg("flood")
            .arg(qmp_socket)
            .arg(connections.to_string())
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn qnet-fake-guest flood");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let opened = line
            .trim()
            .strip_prefix("opened ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("flood: {line:?}"));
        Flood { child, opened }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes `cmd` start inside the network namespace `ns` and die with the
/// process that spawned it (SIGKILL), so a fake guest never outlives the
/// test or bench that made it, whatever happens to that.
pub fn in_netns_until_parent_dies(cmd: &mut Command, ns: &std::fs::File) {
    let ns_fd = ns.as_raw_fd();
    // SAFETY: only async-signal-safe system calls between fork and exec;
    // `ns` stays open until `spawn` returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A new TAP (with a vnet header, as QEMU opens it) enslaved to `bridge`
/// and up: the host side of a fake guest's NIC, gone when dropped.
pub fn tap_on_bridge(bridge: &str) -> qnet_hostnet::tap::Tap {
    use qnet_hostnet::link::{LinkSocket, PortChange};
    let tap = qnet_hostnet::tap::Tap::create_new(true).expect("create a TAP");
    let mut links = LinkSocket::new().expect("netlink");
    let port = links
        .link_by_name(tap.name())
        .expect("look up the TAP")
        .expect("the TAP exists");
    let master = links
        .link_by_name(bridge)
        .expect("look up the bridge")
        .expect("the bridge exists");
    links
        .configure_port(
            port.index,
            PortChange {
                master: Some(master.index),
                up: true,
                // As the bridge helper does.
                no_ipv6_addresses: true,
                ..PortChange::default()
            },
        )
        .expect("enslave the TAP");
    tap
}

/// A shareable writer for [`play_qemu`].
pub fn writer_of(stream: &UnixStream) -> Arc<Mutex<UnixStream>> {
    Arc::new(Mutex::new(
        stream.try_clone().expect("clone the QMP stream"),
    ))
}
