//! qnet-bridge-helper as an ordinary user runs it: installed with file
//! capability `cap_net_admin+ep`, or setuid root. The user is a throwaway
//! uid/gid that no account on the machine uses.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use qnet_hostnet::tap::tap_info;
use qnet_tests::fake_qemu::run_helper;
use qnet_tests::install::{Install, Installed, INSTALLS};
use qnet_tests::netns::{run, NetNs};
use qnet_tests::require_tool;
use qnet_tests::sandbox::{sandboxed, unused_user, ConfigDir, RunAs};

fn path_str(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// Namespace with bridges qbr0..qbr3, an installed helper and a user.
struct Setup {
    netns: NetNs,
    config: ConfigDir,
    installed: Installed,
    user: RunAs,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let netns = NetNs::new(tag);
        for bridge in ["qbr0", "qbr1", "qbr2", "qbr3"] {
            netns.add_bridge(bridge, None);
        }
        let user = unused_user();
        let config = ConfigDir::new();
        config.write(
            "bridge.conf",
            "allow qbr0\ndeny qbr3\ninclude /etc/qemu/root-only.conf\ninclude /etc/qemu/user.conf\n",
        );
        // Readable by root only: the user's helper must skip it.
        config.write_owned("root-only.conf", "allow qbr1\n", 0, 0, 0o600);
        // The per-user file pattern: root:<user's group> 0640.
        config.write_owned("user.conf", "allow qbr2\n", 0, user.gid, 0o640);
        Setup {
            netns,
            config,
            installed: Installed::new(
                "qnet-bridge-helper",
                &[
                    ("caps", 0o755, Some("cap_net_admin+ep")),
                    ("setuid", 0o4755, None),
                    ("plain", 0o755, None),
                ],
            ),
            user,
        }
    }

    fn helper(&self, program: &Path) -> Command {
        let mut cmd = sandboxed(program, &self.netns, &self.config, Some(self.user));
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    }
}

#[test]
fn allowed_bridge_works_for_an_ordinary_user() {
    let setup = Setup::new("unpriv-ok");
    for install in INSTALLS {
        let fd = run_helper(setup.helper(&setup.installed.path(install)), Some("qbr0")).expect_fd();
        let (name, flags) = tap_info(fd.as_fd()).unwrap();
        assert!(flags & libc::IFF_VNET_HDR != 0, "{install:?}");
        let line = setup.netns.ip(&["-o", "link", "show", "dev", &name]);
        assert!(line.contains("master qbr0"), "{install:?}: {line}");
    }
}

#[test]
fn privileges_are_dropped_to_net_admin_and_the_caller() {
    let setup = Setup::new("unpriv-creds");
    for install in INSTALLS {
        let mut cmd = setup.helper(&setup.installed.path(install));
        cmd.arg("--debug");
        let outcome = run_helper(cmd, Some("qbr0"));
        let log = outcome.stderr.clone();
        outcome.expect_fd();
        let uid = setup.user.uid;
        let gid = setup.user.gid;
        assert!(
            log.contains(&format!("Uid: {uid} {uid} {uid} {uid}")),
            "{install:?}: {log}"
        );
        assert!(
            log.contains(&format!("Gid: {gid} {gid} {gid} {gid}")),
            "{install:?}: {log}"
        );
        // CAP_NET_ADMIN is bit 12.
        assert!(
            log.contains("CapEff: 0000000000001000"),
            "{install:?}: {log}"
        );
        assert!(
            log.contains("CapPrm: 0000000000001000"),
            "{install:?}: {log}"
        );
        assert!(
            log.contains("CapInh: 0000000000000000"),
            "{install:?}: {log}"
        );
        assert!(
            log.contains("CapAmb: 0000000000000000"),
            "{install:?}: {log}"
        );
        assert!(log.contains("NoNewPrivs: 1"), "{install:?}: {log}");
        if matches!(install, Install::Setuid) {
            assert!(
                log.contains("CapBnd: 0000000000000000"),
                "{install:?}: {log}"
            );
        }
    }
}

#[test]
fn denied_bridge_is_refused() {
    let setup = Setup::new("unpriv-deny");
    for install in INSTALLS {
        let message =
            run_helper(setup.helper(&setup.installed.path(install)), Some("qbr3")).expect_refusal();
        assert!(
            message.contains("denied by /etc/qemu/bridge.conf:2"),
            "{install:?}: {message}"
        );
    }
}

#[test]
fn includes_are_read_as_the_calling_user() {
    let setup = Setup::new("unpriv-incl");
    for install in INSTALLS {
        // root-only.conf allows qbr1, but the user cannot read it.
        let message =
            run_helper(setup.helper(&setup.installed.path(install)), Some("qbr1")).expect_refusal();
        assert!(message.contains("not allowed"), "{install:?}: {message}");
        assert!(
            message.contains("root-only.conf") && message.contains("permission denied"),
            "the refusal should mention the skipped include: {message}"
        );
        // user.conf is readable through the user's group.
        run_helper(setup.helper(&setup.installed.path(install)), Some("qbr2")).expect_fd();
    }
}

#[test]
fn an_uninstalled_copy_says_how_to_install_it() {
    let setup = Setup::new("unpriv-plain");
    let before = setup.netns.link_names();
    let message =
        run_helper(setup.helper(&setup.installed.copy("plain")), Some("qbr0")).expect_refusal();
    assert!(message.contains("CAP_NET_ADMIN"), "{message}");
    assert!(message.contains("setcap cap_net_admin+ep"), "{message}");
    assert_eq!(setup.netns.link_names(), before);
}

#[test]
fn odd_environment_changes_nothing() {
    let setup = Setup::new("unpriv-env");
    // A config dir the user controls, offered through the environment.
    let evil = tempfile::Builder::new()
        .prefix("qnet-test-evil-")
        .tempdir()
        .unwrap();
    std::fs::write(evil.path().join("bridge.conf"), "allow all\n").unwrap();
    std::fs::set_permissions(evil.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for install in INSTALLS {
        let mut cmd = setup.helper(&setup.installed.path(install));
        cmd.env("QNET_CONFIG_DIR", evil.path())
            .env("CONFIG_QEMU_CONFDIR", evil.path())
            .env("RUST_LOG", "trace")
            .env("RUST_BACKTRACE", "full")
            .env("QNET_LOG", "trace")
            .env("LD_LIBRARY_PATH", evil.path())
            .env("TMPDIR", evil.path());
        let message = run_helper(cmd, Some("qbr3")).expect_refusal();
        assert!(
            message.contains("denied by /etc/qemu/bridge.conf:2"),
            "{install:?}: {message}"
        );
    }
}

#[test]
fn ld_preload_is_ignored() {
    let setup = Setup::new("unpriv-preload");
    let cc = require_tool("cc", "gcc");
    let work = tempfile::Builder::new()
        .prefix("qnet-test-preload-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
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
        .helper(Path::new("/bin/true"))
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
        let mut cmd = setup.helper(&setup.installed.path(install));
        cmd.env("LD_PRELOAD", &library);
        run_helper(cmd, Some("qbr0")).expect_fd();
        assert!(
            !marker.exists(),
            "{install:?}: LD_PRELOAD ran inside the helper"
        );
    }
}
