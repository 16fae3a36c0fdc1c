//! `discover::guest_ports` against real QEMUs holding TAPs and macvtaps in
//! a network namespace of the test's own (never the host's).
//!
//! Needs root, iproute2, /dev/net/tun, macvtap and qemu-system-x86_64;
//! missing any of them fails the test.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::block_on;
use qnet_hookd::api::Mac;
use qnet_hookd::discover::{self, DiscoverError, GuestPort, PortKind};
use qnet_hookd::qmp::{self, NicInfo, QmpSession};
use qnet_hostnet::link::LinkSocket;
use qnet_tests::guest::command_in_netns;
use qnet_tests::netns::NetNs;
use tokio::sync::Mutex;

const BOUND: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(BOUND, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {BOUND:?} waiting for {what}"),
    }
}

/// A QEMU started inside a namespace, killed when dropped.
struct Qemu {
    child: std::process::Child,
    qmp: PathBuf,
    _dir: tempfile::TempDir,
}

/// The two tests with devices run one after the other. QEMU 10's
/// `tap_open` first tries `/dev/tap<ifindex of ifname>` (so that
/// `ifname=` may name a macvtap), and only then `/dev/net/tun`; but
/// devtmpfs is the whole host's while ifindexes are per namespace. With
/// the macvtap test's `qmvt0` (ifindex 4 in its namespace) existing, the
/// TAP test's QEMU opened that `/dev/tap4` as the second queue of its
/// `qtapd1` (ifindex 4 in its own).
/// (tokio's mutex: each test's runtime is its own, and a test that
/// panics holding it does not poison it.)
static ALONE: Mutex<()> = Mutex::const_new(());

impl Qemu {
    /// Starts QEMU in `ns` with `args`; `fds` become QEMU's fds 3, 4, ...
    fn spawn(ns: &NetNs, args: &[&str], fds: &[RawFd]) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("q.sock");
        let fds = fds.to_vec();
        let mut command = qnet_tests::guest::stopped_qemu();
        command
            .args(args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        command_in_netns(&mut command, ns.name()).unwrap();
        // SAFETY: only async-signal-safe libc calls between fork and exec
        // (this hook runs after command_in_netns's setns).
        unsafe {
            command.pre_exec(move || {
                // First out of the way (an fd may already sit on 3 or 4),
                // then into place; dup2 clears close-on-exec.
                let mut moved = [0; 8];
                for (slot, &fd) in moved.iter_mut().zip(&fds) {
                    *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                    if *slot < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (target, &fd) in (3..).zip(&moved[..fds.len()]) {
                    if libc::dup2(fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("qemu-system-x86_64 is required");
        Qemu {
            child,
            qmp,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connects to QMP once QEMU is up (which means its netdevs are open)
    /// and returns the guest's NICs.
    async fn nics(&mut self) -> Vec<NicInfo> {
        let qmp = self.qmp.clone();
        bounded("QEMU's QMP socket", async {
            while !qmp.exists() {
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!("QEMU exited early: {status}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let stream = qmp::dial(&qmp).await.unwrap();
        let (session, identity, _events) = bounded("QMP", QmpSession::start(stream)).await.unwrap();
        assert_eq!(identity.pid, self.pid());
        bounded("query-nics", session.query_nics()).await.unwrap()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn taps_and_their_bridge() {
    let _alone = ALONE.lock().await;
    let ns = NetNs::new("disc");
    ns.ip(&["link", "add", "qbrd0", "type", "bridge"]);
    ns.ip(&["link", "set", "qbrd0", "up"]);
    // A TAP made beforehand and enslaved (how a bridge helper does it) ...
    ns.ip(&["tuntap", "add", "qtapd0", "mode", "tap"]);
    ns.ip(&["link", "set", "qtapd0", "master", "qbrd0"]);
    // ... and a multiqueue one QEMU creates itself, on no bridge.
    let mut qemu = Qemu::spawn(
        &ns,
        &[
            "-netdev",
            "tap,id=n0,ifname=qtapd0,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:00:d1:50",
            "-netdev",
            "tap,id=n1,ifname=qtapd1,script=no,downscript=no,queues=2",
            "-device",
            "virtio-net-pci,netdev=n1,mac=52:54:00:00:d1:51,mq=on",
        ],
        &[],
    );
    let nics = qemu.nics().await;
    let pid = qemu.pid();

    let ports = ns.run_in(move || block_on(discover::guest_ports(pid)).unwrap());
    let links = ns.run_in(move || {
        let mut socket = LinkSocket::new().unwrap();
        let links: Vec<_> = ["qtapd0", "qtapd1", "qbrd0"]
            .iter()
            .map(|name| socket.link_by_name(name).unwrap().expect(name))
            .collect::<Vec<_>>();
        links
    });
    eprintln!("{ports:#?}\n{nics:?}");
    let [tap0, tap1, _bridge] = &links[..] else {
        unreachable!()
    };
    assert_eq!(
        ports,
        [
            GuestPort {
                kind: PortKind::Tap,
                ifname: "qtapd0".parse().unwrap(),
                ifindex: tap0.index,
                mac: tap0.mac.map(Mac::from_octets),
                master: Some("qbrd0".parse().unwrap()),
                lower: None,
                fd: ports[0].fd,
            },
            GuestPort {
                kind: PortKind::Tap,
                ifname: "qtapd1".parse().unwrap(),
                ifindex: tap1.index,
                mac: tap1.mac.map(Mac::from_octets),
                master: None,
                lower: None,
                fd: ports[1].fd,
            },
        ],
        "one port per TAP (the multiqueue one has two fds), in fd order"
    );
    // The multiqueue TAP really is open twice.
    let queues = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter(|entry| {
            let info = std::fs::read_to_string(entry.as_ref().unwrap().path()).unwrap_or_default();
            info.lines().any(|line| line == "iff:\tqtapd1")
        })
        .count();
    assert_eq!(queues, 2);
    // The guest's MACs come from QMP, one NIC per TAP, in the same order.
    let macs: Vec<String> = nics.iter().map(|n| n.mac.to_string()).collect();
    assert_eq!(macs, ["52:54:00:00:d1:50", "52:54:00:00:d1:51"]);
    assert_ne!(ports[0].mac, Some(nics[0].mac));

    // Resolved in our own (the host's) namespace, those TAPs do not exist.
    let elsewhere = discover::guest_ports(pid).await.unwrap();
    assert!(
        !elsewhere.iter().any(|p| p.ifname.starts_with("qtapd")),
        "{elsewhere:?}"
    );
}

/// Opens a macvtap's character device through a private node in a fresh
/// directory, which is then removed (QEMU sees `... (deleted)`), or
/// through `/dev/tap<ifindex>` when `use_dev` and devtmpfs has the right
/// node.
fn open_macvtap(ns: &NetNs, name: &str, index: u32, use_dev: bool) -> (File, String) {
    let sysfs = format!("/sys/class/net/{name}/macvtap/tap{index}/dev");
    let devt = ns.exec_ok(&["cat", &sysfs]);
    let (major, minor) = devt.trim().split_once(':').expect("MAJOR:MINOR");
    let rdev = libc::makedev(major.parse().unwrap(), minor.parse().unwrap());
    let node = format!("/dev/tap{index}");
    if use_dev {
        if let Ok(meta) = std::fs::metadata(&node) {
            if meta.file_type().is_char_device() && meta.rdev() == rdev {
                let file = File::options().read(true).write(true).open(&node).unwrap();
                return (file, node);
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("tap{index}"));
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: plain syscall on a valid C string.
    let made = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o600, rdev) };
    assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    let file = File::options().read(true).write(true).open(&path).unwrap();
    (file, format!("{} (removed)", path.display()))
}

#[tokio::test]
async fn macvtaps_and_their_lower_device() {
    let _alone = ALONE.lock().await;
    let ns = NetNs::new("disc");
    ns.ip(&[
        "link", "add", "qveth0", "type", "veth", "peer", "name", "qveth1",
    ]);
    ns.ip(&["link", "set", "qveth0", "up"]);
    let mut indexes = Vec::new();
    for (name, mac) in [
        ("qmvt0", "52:54:00:00:d1:60"),
        ("qmvt1", "52:54:00:00:d1:61"),
    ] {
        ns.ip(&[
            "link", "add", "link", "qveth0", "name", name, "type", "macvtap", "mode", "bridge",
        ]);
        ns.ip(&["link", "set", name, "address", mac, "up"]);
        let name = name.to_owned();
        let index = ns.run_in(move || {
            LinkSocket::new()
                .unwrap()
                .link_by_name(&name)
                .unwrap()
                .unwrap()
                .index
        });
        indexes.push(index);
    }
    let (first, first_node) = open_macvtap(&ns, "qmvt0", indexes[0], true);
    let (second, second_node) = open_macvtap(&ns, "qmvt1", indexes[1], false);
    eprintln!("opened {first_node} and {second_node}");
    let mut qemu = Qemu::spawn(
        &ns,
        &[
            "-netdev",
            "tap,id=n0,fd=3",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:00:d1:60",
            "-netdev",
            "tap,id=n1,fd=4",
            "-device",
            "virtio-net-pci,netdev=n1,mac=52:54:00:00:d1:61",
        ],
        &[first.as_raw_fd(), second.as_raw_fd()],
    );
    drop((first, second));
    let nics = qemu.nics().await;
    let pid = qemu.pid();

    // The second node is gone; only QEMU's descriptor keeps the device.
    let second_link = std::fs::read_link(format!("/proc/{pid}/fd/4")).unwrap();
    assert!(
        second_link.to_string_lossy().ends_with(" (deleted)"),
        "{second_link:?}"
    );

    let ports = ns.run_in(move || block_on(discover::guest_ports(pid)).unwrap());
    eprintln!("{ports:#?}\n{nics:?}");
    let expected: Vec<GuestPort> = [
        ("qmvt0", 3, "52:54:00:00:d1:60"),
        ("qmvt1", 4, "52:54:00:00:d1:61"),
    ]
    .iter()
    .zip(&indexes)
    .map(|(&(name, fd, mac), &ifindex)| GuestPort {
        kind: PortKind::Macvtap,
        ifname: name.parse().unwrap(),
        ifindex,
        mac: Some(mac.parse().unwrap()),
        master: None,
        lower: Some("qveth0".parse().unwrap()),
        fd,
    })
    .collect();
    assert_eq!(ports, expected);
    // A macvtap's MAC is its guest NIC's MAC: that is how they are matched.
    for port in &ports {
        assert!(
            nics.iter().any(|n| Some(n.mac) == port.mac),
            "no NIC for {port:?} in {nics:?}"
        );
    }
}

#[test]
fn processes_without_ports() {
    // A process with nothing but stdio. (Not ourselves: the macvtap test
    // holds macvtap fds for a moment while it starts QEMU.)
    let mut child = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let ports = block_on(discover::guest_ports(child.id()));
    let _ = child.kill();
    let _ = child.wait();
    assert!(ports.unwrap().is_empty());
    // A pid that cannot exist (pid_max is at most 2^22).
    assert!(matches!(
        block_on(discover::guest_ports(1 << 30)),
        Err(DiscoverError::NoProcess { pid }) if pid == 1 << 30
    ));
}
