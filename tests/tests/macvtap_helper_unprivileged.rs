//! qnet-macvtap-helper as an ordinary user runs it: setuid root, or with
//! file capabilities (`cap_net_admin,cap_dac_override,cap_mknod,cap_chown+ep`;
//! `cap_net_admin+ep` alone is not enough to open the root-only
//! /dev/tapN, and says so). The user is a throwaway uid/gid that no
//! account on the machine uses.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use qnet_hostnet::tap::tap_info;
use qnet_tests::fake_qemu::{inherit_fd, run_helper, wait_until};
use qnet_tests::guest::{random_bytes, random_mac};
use qnet_tests::install::{assert_runs_as, AsUser, Install, Installed, INSTALLS};
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::sandboxed;
use qnet_tests::{tempdir_with_mode, workspace_binary};

const FULL_CAPS: &str = "cap_net_admin,cap_dac_override,cap_mknod,cap_chown+ep";

/// Namespace with veth pair qv0/qv1 and qv2/qv3, an installed helper and
/// a user; macvtap.conf allows qv0 and denies qv2.
fn setup(tag: &str) -> AsUser {
    let netns = NetNs::new(tag);
    for (a, b) in [("qv0", "qv1"), ("qv2", "qv3")] {
        netns.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        netns.ip(&["link", "set", a, "up"]);
    }
    let installed = Installed::new(
        "qnet-macvtap-helper",
        &[
            ("caps", 0o755, Some(FULL_CAPS)),
            ("net-admin-only", 0o755, Some("cap_net_admin+ep")),
            ("setuid", 0o4755, None),
            ("plain", 0o755, None),
        ],
    );
    let setup =
        AsUser::new(netns, installed).with_nic_args(|| vec![format!("--mac={}", random_mac())]);
    setup
        .config
        .write("macvtap.conf", "allow qv0\ndeny qv2\nallow qv2\n");
    setup
}

/// The helper `program` for a guest NIC with `mac`.
fn helper(setup: &AsUser, program: &Path, mac: &str) -> Command {
    let mut cmd = setup.command(program);
    cmd.arg(format!("--mac={mac}"));
    cmd
}

fn macvtaps(setup: &AsUser) -> Vec<String> {
    setup.netns.links_named("qmvtap")
}

#[test]
fn allowed_lower_device_works_for_an_ordinary_user() {
    let setup = setup("mvt-unpriv-ok");
    for install in INSTALLS {
        let mac = random_mac();
        let fd = run_helper(
            helper(&setup, &setup.installed.path(install), &mac),
            Some("qv0"),
        )
        .expect_fd();
        let (name, flags) = tap_info(fd.as_fd()).unwrap();
        assert!(flags & libc::IFF_VNET_HDR != 0, "{install:?}");
        let line = setup.netns.ip(&["-d", "-o", "link", "show", "dev", &name]);
        assert!(
            line.contains("macvtap mode bridge") && line.contains(&mac),
            "{install:?}: {line}"
        );
    }
}

#[test]
fn privileges_are_net_admin_plus_spares_only_until_the_device_is_open() {
    let setup = setup("mvt-unpriv-creds");
    for install in INSTALLS {
        let (_, log) = setup.debug_run(install, "qv0");
        let line_with = |what: &str| {
            log.lines()
                .find(|l| l.contains(what) && l.contains("credentials"))
                .unwrap_or_else(|| panic!("{install:?}: no `{what}` credentials: {log}"))
                .to_string()
        };
        let start = line_with("at start");
        let after = line_with("after opening the device");
        // Never more than CAP_NET_ADMIN (bit 12) effective; the bounding
        // set is checked at start. Spares while reading input: CAP_CHOWN
        // (0), CAP_DAC_OVERRIDE (1), CAP_MKNOD (27), permitted only.
        assert_runs_as(&start, setup.user, install, "0000000008001003", true);
        assert_runs_as(&after, setup.user, install, "0000000000001000", false);
    }
}

#[test]
fn net_admin_alone_is_refused_with_what_to_install() {
    let setup = setup("mvt-unpriv-na");
    let before = setup.netns.link_names();
    let message = run_helper(
        helper(
            &setup,
            &setup.installed.copy("net-admin-only"),
            &random_mac(),
        ),
        Some("qv0"),
    )
    .expect_refusal();
    assert!(message.contains(FULL_CAPS), "{message}");
    assert_eq!(setup.netns.link_names(), before, "device left behind");
}

#[test]
fn an_uninstalled_copy_says_how_to_install_it() {
    setup("mvt-unpriv-plain").plain_copy_refused("qv0", "chmod 4755");
}

#[test]
fn denied_lower_device_is_refused() {
    setup("mvt-unpriv-deny").refused_by_every_install("qv2", "denied by /etc/qemu/macvtap.conf:2");
}

#[test]
fn a_private_node_is_made_when_dev_tap_belongs_to_another_namespace() {
    let setup = setup("mvt-unpriv-node");
    // lo is 1, qv0..qv3 are 2..5; see macvtap_helper.rs for the decoy.
    let pairs = 300 + u32::from(random_bytes::<1>()[0] % 100);
    setup.netns.use_up_ifindexes(pairs);
    let decoy_ns = NetNs::new("mvt-unpriv-decoy");
    decoy_ns.ip(&["link", "add", "dv0", "type", "veth", "peer", "name", "dv1"]);
    for (i, install) in INSTALLS.into_iter().enumerate() {
        let index = (6 + 2 * pairs + i as u32).to_string();
        decoy_ns.ip(&[
            "link",
            "add",
            "link",
            "dv0",
            "name",
            &format!("decoy{i}"),
            "index",
            &index,
            "type",
            "macvtap",
        ]);
        let (fd, log) = setup.debug_run(install, "qv0");
        let (name, _) = tap_info(fd.as_fd()).unwrap();
        let line = setup.netns.ip(&["-o", "link", "show", "dev", &name]);
        assert!(
            line.starts_with(&format!("{index}: ")),
            "{install:?}: expected ifindex {index}: {line}"
        );
        assert!(log.contains("making a private node"), "{install:?}: {log}");
    }
}

#[test]
fn the_reaper_works_for_an_ordinary_user() {
    let setup = setup("mvt-unpriv-reap");
    for install in INSTALLS {
        let qemu = setup.guest(&[], install, "qv0").expect("helper");
        let name = qemu.ifname.clone();
        assert!(macvtaps(&setup).contains(&name));
        qemu.kill();
        assert!(
            wait_until(Duration::from_secs(10), || !macvtaps(&setup)
                .contains(&name)),
            "{install:?}: {name} outlived QEMU"
        );
    }
}

/// Issue 11, finding 1: a `deny` holds under every name of the device.
#[test]
fn a_denied_lower_device_is_refused_under_an_altname_too() {
    let setup = setup("mvt-unpriv-alt");
    setup.deny_under_an_altname("macvtap.conf", "qv2");
    for install in INSTALLS {
        let denied = "lower device `prodalt` is denied by /etc/qemu/macvtap.conf:2 (`deny qv2`)";
        setup.refused(install, "prodalt", denied);
        assert!(macvtaps(&setup).is_empty(), "{install:?}");
    }
}

/// Issue 11, finding 3: the `--fd` socket must lead to the process that
/// started the helper; a socket connected to an unrelated daemon (root's
/// or the caller's own) is refused before any device exists.
#[test]
fn a_socket_of_an_unrelated_process_is_refused() {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let setup = setup("mvt-unpriv-peer");
    let dir = tempdir_with_mode("qnet-test-daemon-", 0o1777);
    for (who, run_as) in [("root", None), ("the caller", Some(setup.user))] {
        let path = dir.path().join(format!("{}.sock", run_as.is_some()));
        let mut daemon = sandboxed(
            workspace_binary("qnet-fake-qemu"),
            &setup.netns,
            &setup.config,
            run_as,
        );
        let mut daemon = daemon
            .arg("--listen")
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(daemon.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        for install in INSTALLS {
            let stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let fd = stream.as_raw_fd();
            let mut cmd = setup.helper(install);
            cmd.arg(format!("--fd={fd}")).arg("--br=qv0");
            inherit_fd(&mut cmd, fd);
            let out = cmd.output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{who} {install:?}: {stderr}");
            assert!(
                stderr.contains("which did not start this helper"),
                "{who} {install:?}: {stderr}"
            );
            assert!(macvtaps(&setup).is_empty(), "{who} {install:?}");
        }
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
}

/// Issue 11, finding 3: one user can hold only so many macvtaps
/// (`macvtap-user-limit`), and is told so in one line.
#[test]
fn a_user_gets_at_most_the_limit_of_macvtaps() {
    let setup = setup("mvt-unpriv-limit");
    setup.config.write("macvtap-user-limit", "2\n");
    let guest = |install: Install| setup.guest(&[], install, "qv0");
    let first = guest(Install::FileCaps).expect("first");
    let _second = guest(Install::Setuid).expect("second");
    for install in INSTALLS {
        let refused = guest(install).err().expect("a third must be refused");
        assert!(
            refused.contains(&format!(
                "uid {} already holds 2 qnet macvtaps and may hold at most 2",
                setup.user.uid
            )),
            "{install:?}: {refused}"
        );
        assert_eq!(macvtaps(&setup).len(), 2, "{install:?}");
    }
    // Once a guest is gone (and its reaper removed its device), there is
    // room again.
    let name = first.ifname.clone();
    first.kill();
    assert!(wait_until(Duration::from_secs(10), || !macvtaps(&setup)
        .contains(&name)));
    guest(Install::FileCaps).expect("room again");
}

/// Whether the helper sent a descriptor on QEMU's end `ours`, without
/// waiting for one.
fn fd_was_sent(ours: &std::os::fd::OwnedFd) -> bool {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    fcntl(ours, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK");
    qnet_hostnet::fdpass::recv_fd(std::os::fd::AsFd::as_fd(ours)).is_ok()
}

/// Issue 11, finding 4: the device never exists without its guard, so
/// killing the helper at any moment leaves nothing behind.
#[test]
fn killing_the_helper_at_any_moment_leaves_no_device() {
    let setup = setup("mvt-unpriv-kill");
    let mut caught = 0;
    for delay_ms in 0..40u64 {
        let install = INSTALLS[delay_ms as usize % 2];
        let (ours, theirs) = qnet_tests::fake_qemu::helper_socketpair();
        let mut cmd = setup.helper(install);
        cmd.arg(format!("--fd={}", std::os::fd::AsRawFd::as_raw_fd(&theirs)))
            .arg("--br=qv0")
            .stderr(std::process::Stdio::null());
        inherit_fd(&mut cmd, std::os::fd::AsRawFd::as_raw_fd(&theirs));
        let mut child = cmd.spawn().unwrap();
        drop(theirs);
        std::thread::sleep(Duration::from_micros(delay_ms * 500));
        let _ = child.kill();
        let status = child.wait().unwrap();
        // Killed after it sent the fd but before it exited, the helper has
        // done its part as much as one that exited 0: its reaper then
        // rightly keeps the device until QEMU (this test) exits.
        let sent = fd_was_sent(&ours);
        drop(ours);
        if status.success() || sent {
            // Finished before the kill: QEMU (this test) holds it; remove
            // it by hand.
            for name in macvtaps(&setup) {
                setup.netns.ip(&["link", "del", &name]);
            }
            continue;
        }
        caught += 1;
        assert!(
            wait_until(Duration::from_secs(10), || macvtaps(&setup).is_empty()),
            "killed after {} us ({install:?}): left {:?}",
            delay_ms * 500,
            macvtaps(&setup)
        );
    }
    assert!(caught > 0, "the helper was never caught running");
}
