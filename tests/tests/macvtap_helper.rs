//! qnet-macvtap-helper against the real kernel, run as QEMU runs it, as
//! root. Each test has its own network namespace with a veth pair whose
//! `qv0` end is the lower device, and its own `/etc/qemu` (see `sandbox`).
//!
//! Tests that run the helper with `run_helper` act as QEMU themselves, so
//! the reaper they leave waits for the test process; the namespace's
//! clean-up kills it. Tests about the reaper use `qnet-fake-qemu`, a
//! separate process they can `kill -9`.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use qnet_hostnet::tap::tap_info;
use qnet_tests::fake_qemu::{helper_socketpair, run_helper, run_with_socket, wait_until, HeldFd};
use qnet_tests::guest::random_mac;
use qnet_tests::helper_cli;
use qnet_tests::netns::NetNs;
use qnet_tests::procfs::ProcStatus;
use qnet_tests::sandbox::{sandboxed, HelperSandbox};
use qnet_tests::workspace_binary;

const LOWER: &str = "qv0";
const LOWER_MTU: &str = "1400";
/// Failure bound for the reaper's clean-up (it normally takes milliseconds).
const REAPER_BOUND: Duration = Duration::from_secs(10);

/// A namespace with veth pair qv0/qv1 (MTU 1400, so copying it is
/// visible, both up) and a config dir holding `acl` as macvtap.conf.
struct Setup(HelperSandbox);

impl std::ops::Deref for Setup {
    type Target = HelperSandbox;
    fn deref(&self) -> &HelperSandbox {
        &self.0
    }
}

impl Setup {
    fn new(tag: &str, acl: &str) -> Setup {
        let netns = NetNs::new(tag);
        netns.ip(&["link", "add", LOWER, "type", "veth", "peer", "name", "qv1"]);
        for dev in [LOWER, "qv1"] {
            netns.ip(&["link", "set", dev, "mtu", LOWER_MTU, "up"]);
        }
        Setup(HelperSandbox::new(
            netns,
            "qnet-macvtap-helper",
            "macvtap.conf",
            acl,
        ))
    }

    /// [`HelperSandbox::refused`], also checking that the lower device's
    /// MAC is unchanged.
    fn refused(&self, args: &[&str], lower: &str) -> String {
        let mac_before = self.mac_of(LOWER);
        let message = self.0.refused(args, lower);
        assert_eq!(self.mac_of(LOWER), mac_before, "lower MAC changed");
        message
    }

    /// `qnet-fake-qemu HELPER ARGS --br=LOWER`, in the sandbox.
    fn fake_qemu(&self, args: &[&str], lower: &str) -> Result<HeldFd, String> {
        let mut cmd = sandboxed(
            workspace_binary("qnet-fake-qemu"),
            &self.netns,
            &self.config,
            None,
        );
        cmd.arg(workspace_binary("qnet-macvtap-helper"))
            .args(args)
            .arg(format!("--br={lower}"));
        HeldFd::start(cmd)
    }

    /// `ip -d -o link show dev NAME`.
    fn link(&self, name: &str) -> String {
        self.netns.ip(&["-d", "-o", "link", "show", "dev", name])
    }

    /// Uses up a random number (at least `above`) of this namespace's
    /// ifindexes and returns the one the helper's macvtap will get next,
    /// beyond what other tests reach.
    fn next_ifindex_beyond(&self, above: u32) -> String {
        let pairs = above + u32::from(qnet_tests::guest::random_bytes::<1>()[0] % 100);
        self.netns.use_up_ifindexes(pairs);
        // lo is 1, qv0/qv1 are 2 and 3.
        (4 + 2 * pairs).to_string()
    }

    /// Runs the helper, whose macvtap must get ifindex `index` and whose
    /// `/dev/tap<index>` is somebody else's, and checks that it sent a
    /// vnet_hdr tap fd opened through a private node; returns that fd's
    /// device number.
    fn helper_with_private_node(&self, index: &str) -> u64 {
        let mut cmd = self.helper();
        cmd.args(["--debug", &format!("--mac={}", random_mac())]);
        let outcome = run_helper(cmd, Some(LOWER));
        let log = outcome.stderr.clone();
        let fd = outcome.expect_fd();
        let name = assert_tap_with_vnet_hdr(&fd);
        let line = self.link(&name);
        assert!(
            line.starts_with(&format!("{index}: ")),
            "the test expected ifindex {index}: {line}"
        );
        assert!(log.contains("making a private node"), "{log}");
        std::fs::File::from(fd).metadata().unwrap().rdev()
    }

    /// A fake QEMU with a guest NIC of a random MAC on [`LOWER`], in
    /// `mode` (the helper's default without), and its macvtap's name.
    fn guest(&self, mode: Option<&str>) -> (HeldFd, String) {
        let mac = format!("--mac={}", random_mac());
        let mode = mode.map(|m| format!("--mode={m}"));
        let args: Vec<&str> = mode
            .iter()
            .map(String::as_str)
            .chain([mac.as_str()])
            .collect();
        let qemu = self.fake_qemu(&args, LOWER).expect("helper");
        let name = qemu.ifname.clone();
        (qemu, name)
    }

    /// Runs the helper with `args` on [`LOWER`]: it must send a macvtap
    /// queue with IFF_VNET_HDR. That fd and the macvtap's name.
    fn tap(&self, args: &[&str]) -> (std::os::fd::OwnedFd, String) {
        let fd = self.run(args, LOWER).expect_fd();
        let name = assert_tap_with_vnet_hdr(&fd);
        (fd, name)
    }

    /// Waits for the reaper to delete macvtap `name` once QEMU is gone.
    fn assert_removed(&self, name: &str) {
        assert!(
            wait_until(REAPER_BOUND, || !self
                .macvtaps()
                .contains(&name.to_string())),
            "{name} still exists {REAPER_BOUND:?} after QEMU was killed"
        );
    }

    fn mac_of(&self, name: &str) -> String {
        mac_in(&self.link(name))
    }

    fn macvtaps(&self) -> Vec<String> {
        self.netns.links_named("qmvtap")
    }
}

/// Waits for the process `pid` (a reaper) to exit.
fn assert_exits(pid: u32) {
    let proc = format!("/proc/{pid}");
    assert!(
        wait_until(REAPER_BOUND, || !std::path::Path::new(&proc).exists()),
        "the reaper did not exit"
    );
}

/// The `link/ether` address of an `ip -o link` line.
fn mac_in(line: &str) -> String {
    line.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no link/ether in {line}"))
        .to_string()
}

fn is_up(line: &str) -> bool {
    let flags = line.split('<').nth(1).unwrap().split('>').next().unwrap();
    flags.split(',').any(|f| f == "UP")
}

/// Checks that `fd` is a macvtap queue with IFF_VNET_HDR; returns its name.
fn assert_tap_with_vnet_hdr(fd: &std::os::fd::OwnedFd) -> String {
    let name = qnet_tests::fake_qemu::assert_vnet_hdr_tap(fd);
    assert!(name.starts_with("qmvtap"), "{name}");
    name
}

#[test]
fn each_mode_creates_the_right_macvtap() {
    let setup = Setup::new("mvt-modes", "allow qv0\n");
    for mode in ["bridge", "vepa", "private"] {
        let mac = random_mac();
        let (fd, name) = setup.tap(&[&format!("--mode={mode}"), &format!("--mac={mac}")]);
        let line = setup.link(&name);
        assert!(line.contains(&format!("{name}@{LOWER}:")), "{line}");
        assert!(line.contains(&format!("macvtap mode {mode} ")), "{line}");
        assert_eq!(mac_in(&line), mac, "{line}");
        assert!(
            line.contains(&format!("mtu {LOWER_MTU} ")),
            "MTU not copied: {line}"
        );
        assert!(is_up(&line), "not up: {line}");
        let marker = format!("alias qnet-macvtap uid=0 pid={} start=", std::process::id());
        assert!(line.contains(&format!(" lower={LOWER} ")), "{line}");
        assert!(line.contains(&marker), "{line}");
        assert!(line.contains(&format!("mode={mode} mac={mac}")), "{line}");
        // Unlike a TAP, a macvtap outlives its fd: the reaper removes it
        // once QEMU (here: this test process) exits.
        drop(fd);
        assert!(setup.macvtaps().contains(&name));
    }
    assert_eq!(setup.macvtaps().len(), 3);
}

#[test]
fn default_mode_is_bridge() {
    let setup = Setup::new("mvt-default", "allow qv0\n");
    let (_fd, name) = setup.tap(&[&format!("--mac={}", random_mac())]);
    assert!(setup.link(&name).contains("macvtap mode bridge "));
}

#[test]
fn without_use_vnet_there_is_no_vnet_hdr() {
    let setup = Setup::new("mvt-novnet", "allow qv0\n");
    let (ours, theirs) = helper_socketpair();
    let mut cmd = setup.helper();
    cmd.arg(format!("--mac={}", random_mac()))
        .arg(format!("--fd={}", theirs.as_raw_fd()))
        .arg("--br=qv0");
    let fd = run_with_socket(cmd, ours, theirs).expect_fd();
    let (_, flags) = tap_info(fd.as_fd()).unwrap();
    assert_eq!(flags & libc::IFF_VNET_HDR, 0, "vnet_hdr without --use-vnet");
}

#[test]
fn qemu_sh_c_form_with_extra_arguments_works_and_names_qemu_not_the_shell() {
    // QEMU runs `/bin/sh -c "HELPER ARGS --use-vnet --fd=N"` when the helper
    // string has a space (and leaves --br out when the string has one).
    // The helper's parent is then the shell; the marker must name QEMU
    // (here: this process, which made the socketpair).
    let setup = Setup::new("mvt-shc", "allow qv0\n");
    let (ours, theirs) = helper_socketpair();
    let mac = random_mac();
    let script = format!(
        "{} --mode=private --mac={mac} --br=qv0 --use-vnet --fd={}",
        workspace_binary("qnet-macvtap-helper").display(),
        theirs.as_raw_fd()
    );
    let mut cmd = sandboxed("/bin/sh", &setup.netns, &setup.config, None);
    cmd.arg("-c").arg(script);
    let fd = run_with_socket(cmd, ours, theirs).expect_fd();
    let name = assert_tap_with_vnet_hdr(&fd);
    let line = setup.link(&name);
    assert!(line.contains("macvtap mode private "), "{line}");
    assert!(
        line.contains(&format!("qnet-macvtap uid=0 pid={} ", std::process::id())),
        "{line}"
    );
}

#[test]
fn passthru_puts_the_guest_mac_on_the_lower_device_and_the_reaper_restores_it() {
    let setup = Setup::new("mvt-pt", "allow qv0\n");
    let original = setup.mac_of(LOWER);
    let mac = random_mac();
    let qemu = setup
        .fake_qemu(&["--mode=passthrough", &format!("--mac={mac}")], LOWER)
        .expect("helper");
    assert!(qemu.flags & libc::IFF_VNET_HDR != 0, "{:#x}", qemu.flags);
    let line = setup.link(&qemu.ifname);
    assert!(line.contains("macvtap mode passthru "), "{line}");
    assert_eq!(
        setup.mac_of(LOWER),
        mac,
        "guest MAC not on the lower device"
    );
    assert_eq!(mac_in(&line), mac, "the macvtap follows its lower device");
    assert!(
        line.contains(&format!("alias qnet-macvtap uid=0 pid={} start=", qemu.pid)),
        "{line}"
    );
    assert!(line.contains(&format!("restore-mac={original}")), "{line}");

    let name = qemu.ifname.clone();
    qemu.kill();
    setup.assert_removed(&name);
    assert!(
        wait_until(REAPER_BOUND, || setup.mac_of(LOWER) == original),
        "lower MAC not restored: {}",
        setup.mac_of(LOWER)
    );
}

#[test]
fn passthru_without_mac_leaves_the_lower_mac_alone() {
    let setup = Setup::new("mvt-pt-nomac", "allow qv0\n");
    let original = setup.mac_of(LOWER);
    let (_fd, name) = setup.tap(&["--mode=passthru"]);
    let line = setup.link(&name);
    assert!(line.contains("macvtap mode passthru "), "{line}");
    assert_eq!(setup.mac_of(LOWER), original);
    assert_eq!(mac_in(&line), original);
    assert!(!line.contains("restore-mac="), "{line}");
}

#[test]
fn a_second_guest_cannot_take_a_lower_device_held_in_passthru() {
    let setup = Setup::new("mvt-pt-two", "allow qv0\n");
    let mac = random_mac();
    let first = setup
        .fake_qemu(&["--mode=passthru", &format!("--mac={mac}")], LOWER)
        .expect("first passthru guest");
    for args in [
        vec![
            "--mode=passthru".to_string(),
            format!("--mac={}", random_mac()),
        ],
        vec!["--mode=passthru".to_string()],
        vec![
            "--mode=bridge".to_string(),
            format!("--mac={}", random_mac()),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let message = setup.refused(&args, LOWER);
        assert!(
            message.contains(&format!(
                "lower device `qv0` is held in passthru mode by macvtap {} (the guest of QEMU pid {}, uid 0)",
                first.ifname, first.pid
            )),
            "{args:?}: {message}"
        );
    }
    // The first guest's device and MAC are untouched.
    assert_eq!(setup.mac_of(LOWER), mac);
    assert_eq!(setup.macvtaps(), vec![first.ifname.clone()]);
}

#[test]
fn passthru_on_a_shared_lower_device_is_refused() {
    let setup = Setup::new("mvt-pt-shared", "allow qv0\n");
    let (_fd, name) = setup.tap(&[&format!("--mac={}", random_mac())]);
    let message = setup.refused(
        &["--mode=passthru", &format!("--mac={}", random_mac())],
        LOWER,
    );
    assert!(
        message.contains("passthru mode needs `qv0` for itself")
            && message.contains(&format!("macvtap {name}")),
        "{message}"
    );
}

#[test]
fn reaper_removes_the_macvtap_when_qemu_is_killed() {
    let setup = Setup::new("mvt-reap", "allow qv0\n");
    let (qemu, name) = setup.guest(Some("bridge"));
    assert!(setup.macvtaps().contains(&name));
    // The helper has exited (fake QEMU waited for it); the device is held
    // by the fake QEMU's fd and watched by the reaper.
    let reaper = reaper_of(&setup.netns).expect("a reaper runs");
    assert_ne!(
        parent_of(reaper),
        qemu.pid,
        "the reaper must not be QEMU's child"
    );
    qemu.kill();
    setup.assert_removed(&name);
    assert_exits(reaper);
}

#[test]
fn reaper_through_sh_c_watches_qemu_not_the_shell() {
    let setup = Setup::new("mvt-reap-sh", "allow qv0\n");
    let mut cmd = sandboxed(
        workspace_binary("qnet-fake-qemu"),
        &setup.netns,
        &setup.config,
        None,
    );
    cmd.arg("--sh")
        .arg(workspace_binary("qnet-macvtap-helper"))
        .arg("--mode=vepa")
        .arg(format!("--mac={}", random_mac()))
        .arg("--br=qv0");
    let qemu = HeldFd::start(cmd).expect("helper via /bin/sh -c");
    let name = qemu.ifname.clone();
    // The shell is long gone; the device must still be there.
    std::thread::sleep(Duration::from_millis(300));
    let line = setup.link(&name);
    assert!(
        line.contains(&format!("qnet-macvtap uid=0 pid={} ", qemu.pid)),
        "{line}"
    );
    qemu.kill();
    setup.assert_removed(&name);
}

#[test]
fn reaper_leaves_a_replaced_device_alone() {
    // Someone deletes the helper's device and makes another one with the
    // same name and even the same ifindex (but without our marker): when
    // QEMU exits, the reaper must not delete it.
    let setup = Setup::new("mvt-reap-other", "allow qv0\n");
    let (qemu, name) = setup.guest(None);
    let index = setup.link(&name).split(':').next().unwrap().to_string();
    let reaper = reaper_of(&setup.netns).expect("a reaper runs");
    setup.netns.ip(&["link", "del", &name]);
    setup.netns.ip(&[
        "link", "add", "link", LOWER, "name", &name, "index", &index, "type", "macvtap",
    ]);
    qemu.kill();
    assert_exits(reaper);
    assert!(
        setup.link(&name).starts_with(&format!("{index}: ")),
        "the reaper deleted a device it did not create"
    );
}

#[test]
fn reaper_leaves_a_lower_mac_changed_since_alone() {
    let setup = Setup::new("mvt-reap-mac", "allow qv0\n");
    let (qemu, name) = setup.guest(Some("passthru"));
    let admin_mac = random_mac();
    setup
        .netns
        .ip(&["link", "set", LOWER, "address", &admin_mac]);
    qemu.kill();
    setup.assert_removed(&name);
    assert!(
        wait_until(REAPER_BOUND, || reaper_of(&setup.netns).is_none()),
        "the reaper did not exit"
    );
    assert_eq!(
        setup.mac_of(LOWER),
        admin_mac,
        "a MAC set by someone else must stay"
    );
}

#[test]
fn reaper_holds_only_what_it_needs() {
    let setup = Setup::new("mvt-reap-fds", "allow qv0\n");
    let (_qemu, _) = setup.guest(None);
    let reaper = reaper_of(&setup.netns).expect("a reaper runs");
    let status = ProcStatus::of(reaper);
    let field = |key: &str| status.field(key).unwrap_or_default().to_string();
    assert_eq!(field("CapEff:"), "0000000000001000", "{status}");
    assert_eq!(field("CapPrm:"), "0000000000001000", "{status}");
    // Once it has the helper's go-ahead it closes the socket to the
    // helper, keeping only the pidfd and its netlink socket.
    let mut fds = Vec::new();
    let settled = wait_until(REAPER_BOUND, || {
        fds = open_fds(reaper);
        fds.len() == 5
    });
    assert!(settled, "stdio, pidfd and netlink socket only: {fds:?}");
    for (fd, target) in &fds[..3] {
        assert!(
            *fd <= 2 && target == "/dev/null",
            "stdio must be /dev/null: {fds:?}"
        );
    }
    let rest: Vec<&str> = fds[3..].iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        rest.iter().any(|t| t.contains("pidfd")) && rest.iter().any(|t| t.starts_with("socket:")),
        "{fds:?}"
    );
}

/// The open descriptors of `pid` and what they point to, sorted.
fn open_fds(pid: u32) -> Vec<(i32, String)> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        fds.push((
            entry.file_name().to_string_lossy().parse::<i32>().unwrap(),
            target.to_string_lossy().into_owned(),
        ));
    }
    fds.sort();
    fds
}

#[test]
fn reaper_does_not_keep_the_callers_stderr_open() {
    // run_helper reads the helper's stderr to end-of-file before it
    // returns: if the reaper kept stderr, that would block until QEMU (this
    // test process) exits, i.e. forever.
    let setup = Setup::new("mvt-stderr", "allow qv0\n");
    let mut cmd = setup.helper();
    cmd.arg(format!("--mac={}", random_mac())).arg("--debug");
    let (done, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(run_helper(cmd, Some(LOWER)));
    });
    let outcome = outcome
        .recv_timeout(Duration::from_secs(60))
        .expect("reading the helper's stderr to EOF blocked: the reaper keeps it open");
    assert!(outcome.stderr.contains("fd sent"), "{}", outcome.stderr);
    outcome.expect_fd();
}

#[test]
fn a_node_of_another_namespace_is_never_opened() {
    // /dev/tap<ifindex> is global but ifindexes are per namespace. The
    // test moves its namespace's ifindex cursor far beyond what other tests
    // use, so that it knows the ifindex N the helper's macvtap will get, and
    // gives a decoy macvtap in a second namespace ifindex N: the decoy owns
    // /dev/tapN, and the helper must make a private node instead.
    let setup = Setup::new("mvt-node", "allow qv0\n");
    let index = setup.next_ifindex_beyond(100);
    let decoy_ns = NetNs::new("mvt-decoy");
    decoy_ns.ip(&["link", "add", "dv0", "type", "veth", "peer", "name", "dv1"]);
    decoy_ns.ip(&[
        "link", "add", "link", "dv0", "name", "decoy", "index", &index, "type", "macvtap",
    ]);
    let node = format!("/dev/tap{index}");
    let decoy_rdev = std::fs::metadata(&node)
        .unwrap_or_else(|e| panic!("{node} of the decoy: {e}"))
        .rdev();

    let rdev = setup.helper_with_private_node(&index);
    assert_ne!(rdev, decoy_rdev, "opened the other namespace's device");
    assert_eq!(
        std::fs::metadata(&node).unwrap().rdev(),
        decoy_rdev,
        "the decoy's node was touched"
    );
    let base = std::fs::metadata("/dev/qnet-macvtap").unwrap();
    assert_eq!((base.uid(), base.mode() & 0o7777), (0, 0o700));
}

#[test]
fn a_stale_node_of_a_vanished_device_is_never_opened() {
    // The race CI once hit: /dev/tapN left by another namespace's macvtap
    // that is being deleted points at a minor no device has any more, and
    // opening it fails with ENODEV. The helper must treat such a node as
    // somebody else's (look before opening) and make a private node, not
    // fail. The stale node is made here with mknod: the macvtap major and
    // a minor far above what the tests' macvtaps get.
    let setup = Setup::new("mvt-stale", "allow qv0\n");
    let index = setup.next_ifindex_beyond(200);
    let major = qnet_hostnet::devnode::char_major("macvtap").expect("macvtap in /proc/devices");
    let minor = 60_000 + u32::from(qnet_tests::guest::random_bytes::<1>()[0]);
    let node = StaleNode::make(&format!("/dev/tap{index}"), libc::makedev(major, minor));

    let rdev = setup.helper_with_private_node(&index);
    assert_ne!(rdev, node.rdev, "got the stale node's device");
    assert_eq!(libc::major(rdev), major, "not a macvtap device");
}

/// A device node in /dev, removed again even when the test fails.
struct StaleNode {
    path: String,
    rdev: u64,
}

impl StaleNode {
    fn make(path: &str, rdev: libc::dev_t) -> StaleNode {
        use nix::sys::stat::{mknod, Mode, SFlag};
        mknod(path, SFlag::S_IFCHR, Mode::S_IRUSR | Mode::S_IWUSR, rdev)
            .unwrap_or_else(|errno| panic!("mknod {path}: {errno}"));
        StaleNode {
            path: path.to_string(),
            rdev,
        }
    }
}

impl Drop for StaleNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn missing_mac_is_refused_with_the_reason() {
    let setup = Setup::new("mvt-nomac", "allow qv0\n");
    for mode in ["bridge", "vepa", "private"] {
        let message = setup.refused(&[&format!("--mode={mode}")], LOWER);
        assert!(
            message.contains(&format!("--mac is required in {mode} mode"))
                && message.contains("drops every frame"),
            "{message}"
        );
    }
}

#[test]
fn bad_macs_are_usage_errors() {
    let setup = Setup::new("mvt-badmac", "allow qv0\n");
    for (mac, says) in [
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("00:00:00:00:00:00", "all-zero"),
        ("52:54:00:12:34", "not a MAC address"),
    ] {
        let message = setup.refused(&[&format!("--mac={mac}")], LOWER);
        assert!(message.contains(says), "{mac}: {message}");
        assert!(message.contains("usage:"), "{mac}: {message}");
    }
    let message = setup.refused(&["--mode=source", "--mac=52:54:00:00:00:01"], LOWER);
    assert!(message.contains("--mode"), "{message}");
}

#[test]
fn missing_lower_device_is_refused_with_a_hint() {
    let setup = Setup::new("mvt-nolower", "allow all\n");
    let message = setup.refused(&[&format!("--mac={}", random_mac())], "eth9");
    assert!(
        message.contains("lower device `eth9` does not exist"),
        "{message}"
    );
}

#[test]
fn a_macvtap_is_not_a_lower_device() {
    let setup = Setup::new("mvt-stack", "allow all\n");
    setup.netns.ip(&[
        "link", "add", "link", LOWER, "name", "mv9", "type", "macvtap",
    ]);
    let message = setup.refused(&[&format!("--mac={}", random_mac())], "mv9");
    assert!(message.contains("itself a macvtap device"), "{message}");
}

#[test]
fn acl_refusals() {
    let setup = Setup::new("mvt-acl", "deny qv0\nallow all\n");
    let message = setup.refused(&[&format!("--mac={}", random_mac())], LOWER);
    assert!(
        message.contains("lower device `qv0` is denied by /etc/qemu/macvtap.conf:1"),
        "{message}"
    );

    setup.config.write("macvtap.conf", "allow qv1\n");
    let message = setup.refused(&[&format!("--mac={}", random_mac())], LOWER);
    assert!(
        message.contains("`allow qv0`") && message.contains("/etc/qemu/macvtap.conf"),
        "{message}"
    );

    // bridge.conf does not apply to the macvtap helper.
    setup.config.write("bridge.conf", "allow all\n");
    std::fs::remove_file(setup.config.path().join("macvtap.conf")).unwrap();
    let message = setup.refused(&[&format!("--mac={}", random_mac())], LOWER);
    assert!(
        message.contains("/etc/qemu/macvtap.conf does not exist") && message.contains("allow"),
        "{message}"
    );

    setup.config.write("macvtap.conf", "allow qv0\nallow\n");
    let message = setup.refused(&[&format!("--mac={}", random_mac())], LOWER);
    assert!(message.contains("/etc/qemu/macvtap.conf:2"), "{message}");
}

#[test]
fn over_long_lower_names_are_refused() {
    let setup = Setup::new("mvt-long", "allow all\n");
    let message = setup.refused(&[&format!("--mac={}", random_mac())], "qv0xxxxxxxxxxxxx");
    assert!(message.contains("qv0xxxxxxxxxxxxx"), "{message}");
}

#[test]
fn a_failure_after_creation_leaves_nothing_behind() {
    // QEMU's end of the socket is closed before the helper runs (QEMU
    // died): the helper notices only after it made the device, and must
    // remove it again.
    let setup = Setup::new("mvt-undo", "allow qv0\n");
    let before = setup.netns.link_names();
    let (ours, theirs) = helper_socketpair();
    drop(ours);
    let fd = theirs.as_raw_fd();
    let mut cmd = setup.helper();
    cmd.arg(format!("--mac={}", random_mac())).args([
        "--use-vnet",
        &format!("--fd={fd}"),
        "--br=qv0",
    ]);
    qnet_tests::fake_qemu::inherit_fd(&mut cmd, fd);
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    drop(theirs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("exited before its NIC was ready"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(setup.netns.link_names(), before, "device left behind");
    // Nor does a reaper linger.
    assert!(
        wait_until(REAPER_BOUND, || reaper_of(&setup.netns).is_none()),
        "a reaper outlived a failed helper"
    );
}

#[test]
fn bad_arguments_are_a_usage_error() {
    let setup = Setup::new("mvt-argv", "allow all\n");
    helper_cli::bad_arguments_are_a_usage_error(|| setup.helper(), &setup.netns, "qv0");
}

#[test]
fn help_and_version_print_and_touch_nothing() {
    let setup = Setup::new("mvt-help", "allow all\n");
    helper_cli::help_and_version_print_and_touch_nothing(
        || setup.helper(),
        &setup.netns,
        &[
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "MODES",
            "ACL FILES",
            "PRIVILEGES",
            "EXIT STATUS",
            "macvtap.conf",
            "--mode",
            "--mac",
            "--use-vnet",
            "--br",
            "--fd",
        ],
    );
}

/// The pid of the reaper running in `netns`, if any.
fn reaper_of(netns: &NetNs) -> Option<u32> {
    let pids = qnet_tests::netns::run("ip", &["netns", "pids", netns.name()]).ok()?;
    pids.split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "qmvtap-reaper")
        })
}

fn parent_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap()
}
