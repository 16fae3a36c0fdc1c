//! qnet-bridge-helper as an ordinary user runs it: installed with file
//! capability `cap_net_admin+ep`, or setuid root. The user is a throwaway
//! uid/gid that no account on the machine uses.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use qnet_hostnet::tap::tap_info;
use qnet_tests::fake_qemu::{run_helper, run_helper_with_closed_stderr, wait_until};
use qnet_tests::install::{assert_runs_as, AsUser, Install, Installed, INSTALLS};
use qnet_tests::netns::{run, NetNs};
use qnet_tests::sandbox::{sandboxed, RunAs};
use qnet_tests::{require_tool, tempdir_with_mode, workspace_binary};

fn path_str(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// Namespace with bridges qbr0..qbr3, an installed helper and a user.
fn setup(tag: &str) -> AsUser {
    let netns = NetNs::new(tag);
    for bridge in ["qbr0", "qbr1", "qbr2", "qbr3"] {
        netns.add_bridge(bridge, None);
    }
    let installed = Installed::new(
        "qnet-bridge-helper",
        &[
            ("caps", 0o755, Some("cap_net_admin+ep")),
            ("setuid", 0o4755, None),
            ("plain", 0o755, None),
        ],
    );
    let setup = AsUser::new(netns, installed);
    setup.config.write(
        "bridge.conf",
        "allow qbr0\ndeny qbr3\ninclude /etc/qemu/root-only.conf\ninclude /etc/qemu/user.conf\n",
    );
    // Readable by root only: the user's helper must skip it.
    setup
        .config
        .write_owned("root-only.conf", "allow qbr1\n", 0, 0, 0o600);
    // The per-user file pattern: root:<user's group> 0640.
    setup
        .config
        .write_owned("user.conf", "allow qbr2\n", 0, setup.user.gid, 0o640);
    setup
}

#[test]
fn allowed_bridge_works_for_an_ordinary_user() {
    let setup = setup("unpriv-ok");
    for install in INSTALLS {
        let fd = run_helper(setup.helper(install), Some("qbr0")).expect_fd();
        let (name, flags) = tap_info(fd.as_fd()).unwrap();
        assert!(flags & libc::IFF_VNET_HDR != 0, "{install:?}");
        let line = setup.netns.ip(&["-o", "link", "show", "dev", &name]);
        assert!(line.contains("master qbr0"), "{install:?}: {line}");
    }
}

#[test]
fn privileges_are_dropped_to_net_admin_and_the_caller() {
    let setup = setup("unpriv-creds");
    for install in INSTALLS {
        let (_, log) = setup.debug_run(install, "qbr0");
        // CAP_NET_ADMIN is bit 12.
        assert_runs_as(&log, setup.user, install, "0000000000001000", true);
    }
}

#[test]
fn denied_bridge_is_refused() {
    setup("unpriv-deny").refused_by_every_install("qbr3", "denied by /etc/qemu/bridge.conf:2");
}

#[test]
fn includes_are_read_as_the_calling_user() {
    let setup = setup("unpriv-incl");
    for install in INSTALLS {
        // root-only.conf allows qbr1, but the user cannot read it.
        let message = setup.refused(install, "qbr1", "not allowed");
        assert!(
            message.contains("root-only.conf") && message.contains("permission denied"),
            "the refusal should mention the skipped include: {message}"
        );
        // user.conf is readable through the user's group.
        run_helper(setup.helper(install), Some("qbr2")).expect_fd();
    }
}

#[test]
fn an_uninstalled_copy_says_how_to_install_it() {
    setup("unpriv-plain").plain_copy_refused("qbr0", "setcap cap_net_admin+ep");
}

#[test]
fn odd_environment_changes_nothing() {
    let setup = setup("unpriv-env");
    // A config dir the user controls, offered through the environment.
    let evil = tempfile::Builder::new()
        .prefix("qnet-test-evil-")
        .tempdir()
        .unwrap();
    std::fs::write(evil.path().join("bridge.conf"), "allow all\n").unwrap();
    std::fs::set_permissions(evil.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for install in INSTALLS {
        let mut cmd = setup.helper(install);
        cmd.env("QNET_CONFIG_DIR", evil.path())
            .env("CONFIG_QEMU_CONFDIR", evil.path())
            .env("RUST_LOG", "trace")
            .env("RUST_BACKTRACE", "full")
            .env("QNET_LOG", "trace")
            .env("LD_LIBRARY_PATH", evil.path())
            .env("TMPDIR", evil.path());
        setup.refused_by(cmd, install, "qbr3", "denied by /etc/qemu/bridge.conf:2");
    }
}

#[test]
fn ld_preload_is_ignored() {
    let setup = setup("unpriv-preload");
    let cc = require_tool("cc", "gcc");
    let work = tempdir_with_mode("qnet-test-preload-", 0o1777);
    let marker = work.path().join("preloaded");
    let source = work.path().join("evil.c");
    let library = work.path().join("evil.so");
    std::fs::write(
        &source,
        format!(
            "#include <fcntl.h>\n__attribute__((constructor)) static void evil(void) {{ open(\"{}\", O_CREAT | O_WRONLY, 0666); }}\n",
            marker.display()
        ),
    )
    .unwrap();
    run(
        cc.to_str().unwrap(),
        &[
            "-shared",
            "-fPIC",
            "-o",
            &path_str(&library),
            &path_str(&source),
        ],
    )
    .unwrap();
    std::fs::set_permissions(&library, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Control: the library does run in an ordinary program of the user's,
    // so its absence below means the helper refused it.
    let status = setup
        .command(Path::new("/bin/true"))
        .env("LD_PRELOAD", &library)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        marker.exists(),
        "control run did not load the preload library"
    );
    std::fs::remove_file(&marker).unwrap();

    for install in INSTALLS {
        let mut cmd = setup.helper(install);
        cmd.env("LD_PRELOAD", &library);
        run_helper(cmd, Some("qbr0")).expect_fd();
        assert!(
            !marker.exists(),
            "{install:?}: LD_PRELOAD ran inside the helper"
        );
    }
}

/// Issue 11, finding 1: the kernel also finds a device by an alternative
/// name, so a `deny` must hold under every name of the device.
#[test]
fn a_denied_bridge_is_refused_under_an_altname_too() {
    let setup = setup("unpriv-alt");
    setup.deny_under_an_altname("bridge.conf", "qbr3");
    setup.netns.add_altname("qbr0", "labalt");
    for install in INSTALLS {
        let denied = "bridge `prodalt` is denied by /etc/qemu/bridge.conf:2 (`deny qbr3`)";
        setup.refused(install, "prodalt", denied);
        let ports = setup.netns.ip(&["-o", "link", "show", "master", "qbr3"]);
        assert!(ports.trim().is_empty(), "{install:?}: {ports}");
        // An allowed bridge may still be named by its altname.
        let fd = run_helper(setup.helper(install), Some("labalt")).expect_fd();
        let (name, _) = tap_info(fd.as_fd()).unwrap();
        let line = setup.netns.ip(&["-o", "link", "show", "dev", &name]);
        assert!(line.contains("master qbr0"), "{install:?}: {line}");
    }
}

/// Issue 11, finding 2: the holder of the fd may persist the TAP, but
/// nobody else can attach to it, and it is deleted when QEMU exits.
#[test]
fn a_persisted_tap_is_the_callers_only_and_dies_with_qemu() {
    let setup = setup("unpriv-persist");
    let other = RunAs {
        uid: setup.user.uid + 1,
        gid: setup.user.gid + 1,
    };
    for install in INSTALLS {
        let qemu = setup
            .guest(&["--persist"], install, "qbr0")
            .expect("helper");
        let name = qemu.ifname.clone();
        let line = setup.netns.ip(&["-d", "-o", "link", "show", "dev", &name]);
        let uid = setup.user.uid;
        assert!(line.contains("persist on"), "{install:?}: {line}");
        assert!(
            line.contains(&format!("user {uid} ")),
            "{install:?}: {line}"
        );
        assert!(
            line.contains(&format!("alias qnet-tap uid={uid} pid={} start=", qemu.pid)),
            "{install:?}: {line}"
        );
        let mut attach = sandboxed(
            workspace_binary("qnet-fake-qemu"),
            &setup.netns,
            &setup.config,
            Some(other),
        );
        let out = attach.arg("--attach").arg(&name).output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.trim(),
            "attach=1",
            "{install:?}: another user got EPERM? {out}"
        );
        qemu.kill();
        assert!(
            wait_until(Duration::from_secs(10), || !setup
                .netns
                .link_names()
                .contains(&name)),
            "{install:?}: persisted {name} outlived QEMU"
        );
    }
}

/// Issue 11, finding 7: an include of `/proc/self/maps` must not show the
/// helper's memory map, and a closed stderr must not make it panic.
#[test]
fn errors_do_not_echo_file_content_and_a_closed_stderr_is_no_crash() {
    let setup = setup("unpriv-maps");
    setup
        .config
        .write("bridge.conf", "allow qbr0\ninclude /proc/self/maps\n");
    for install in INSTALLS {
        let message = setup.refused(install, "qbr0", "/proc/self/maps:1: unknown keyword:");
        for leak in ["r-xp", "r--p", "rw-p", "[heap]", "[stack]"] {
            assert!(!message.contains(leak), "{install:?}: {message}");
        }
        assert!(
            !message
                .split(|c: char| !c.is_ascii_hexdigit() && c != '-')
                .any(|word| {
                    word.split_once('-')
                        .is_some_and(|(a, b)| a.len() >= 8 && b.len() >= 8)
                }),
            "{install:?}: an address range leaked: {message}"
        );
    }
    setup.config.write("bridge.conf", "allow qbr0\ndeny qbr3\n");
    for install in INSTALLS {
        for (bridge, code) in [("qbr0", 0), ("qbr3", 1)] {
            let mut cmd = setup.helper(install);
            cmd.arg("--debug");
            let outcome = run_helper_with_closed_stderr(cmd, bridge);
            assert_eq!(
                outcome.status.code(),
                Some(code),
                "{install:?} --br={bridge}: {}",
                outcome.status
            );
            assert_eq!(outcome.fd.is_some(), code == 0, "{install:?} --br={bridge}");
        }
    }
}

/// Issue 11, finding 6 (documented in SECURITY.md): the holder of a TAP fd
/// can change the TAP's MAC (`SIOCSIFHWADDR` needs no capability on the
/// fd), and a bridge without a fixed MAC takes the lowest port MAC; a
/// bridge given a MAC (as hookd's are) keeps it.
#[test]
fn a_tap_holder_moves_only_a_bridge_without_a_fixed_mac() {
    let setup = setup("unpriv-brmac");
    setup
        .netns
        .ip(&["link", "set", "qbr1", "address", "02:00:00:00:00:10"]);
    setup
        .config
        .write("bridge.conf", "allow qbr0\nallow qbr1\n");
    let mac_of = |dev: &str| {
        setup
            .netns
            .exec("cat", &[&format!("/sys/class/net/{dev}/address")])
            .unwrap()
            .trim()
            .to_string()
    };
    let low = [0x02, 0, 0, 0, 0, 0x01];
    let mut held = Vec::new();
    for bridge in ["qbr0", "qbr1"] {
        let fd = run_helper(
            setup.command(&setup.installed.path(Install::FileCaps)),
            Some(bridge),
        )
        .expect_fd();
        set_mac_through_fd(&fd, low);
        held.push(fd);
    }
    assert_eq!(
        mac_of("qbr0"),
        "02:00:00:00:00:01",
        "the free bridge follows its port"
    );
    assert_eq!(
        mac_of("qbr1"),
        "02:00:00:00:00:10",
        "a fixed bridge MAC must stay"
    );
}

fn set_mac_through_fd(fd: &std::os::fd::OwnedFd, mac: [u8; 6]) {
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain data; SIOCSIFHWADDR reads ifr_hwaddr.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: writing the sockaddr member of the union.
    unsafe {
        ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (dst, src) in ifr.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
    }
    // SAFETY: the tun fd ioctl reads the ifreq.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFHWADDR, &mut ifr) };
    assert_eq!(rc, 0, "SIOCSIFHWADDR: {}", std::io::Error::last_os_error());
}
