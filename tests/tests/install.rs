//! `make install` / `make uninstall` into a DESTDIR as a non-root packager
//! would run them, the systemd units as installed (systemd-analyze
//! verify), and the Debian package: built with `make deb`, installed with
//! dpkg into a throw-away root (dpkg's DPKG_ROOT mode: the maintainer
//! scripts run without chroot and honour it), checked, purged. Both reuse
//! the binaries `cargo test --workspace` built, so they cost seconds.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qnet_tests::{require_root, require_tool, target_profile_dir};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `make ARGS` in the workspace with the already built binaries.
fn make(args: &[&str], dist: &Path, as_nobody: bool) -> String {
    let bin = target_profile_dir();
    let mut cmd = if as_nobody {
        let mut c = Command::new(require_tool("setpriv", "util-linux"));
        // nobody, allowed only to read everywhere (a CI checkout may sit
        // in root's home): chown, setcap and chmod u+s on files it does
        // not own would all fail, as they would for a packager.
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "make",
        ]);
        c
    } else {
        Command::new("make")
    };
    let out = cmd
        .current_dir(workspace_root())
        .args(["--no-print-directory", "BUILD="])
        .arg(format!("BIN_SRC={}", bin.display()))
        .arg(format!("HELPER_SRC={}", bin.display()))
        .arg(format!("XTASK={}", bin.join("xtask").display()))
        .arg(format!("DIST={}", dist.display()))
        .args(args)
        .output()
        .expect("make (apt-get install make)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "make {args:?} failed:\n{text}");
    text
}

/// Every file (not directory) under `root`, relative.
fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn make_install_into_destdir_as_non_root_then_uninstall_leaves_only_the_config() {
    require_root();
    let dest = tempfile::Builder::new()
        .prefix("qnet-test-install-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dest.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = dest.path().join("stage");
    let destdir = format!("DESTDIR={}", d.display());
    let said = make(&["install", &destdir], &dest.path().join("dist"), true);
    assert!(
        said.contains("not root: helpers installed without privileges"),
        "{said}"
    );
    let installed = files(&d);
    for want in [
        "usr/local/bin/qnet-hookd",
        "usr/local/bin/qnetctl",
        "usr/local/libexec/qnet-bridge-helper",
        "usr/local/libexec/qnet-macvtap-helper",
        "usr/local/libexec/qnet-libvirt-hook",
        "usr/local/lib/systemd/system/qnet-hookd.service",
        "usr/local/lib/systemd/system/qnet-hookd.socket",
        "usr/local/lib/systemd/system/qnet-hookd-qmp.socket",
        "usr/local/lib/tmpfiles.d/qnet.conf",
        "usr/local/lib/sysusers.d/qnet.conf",
        "etc/qnet/hookd.toml",
        "usr/local/share/man/man1/qnetctl.1",
        "usr/local/share/man/man5/qnet-hookd.toml.5",
        "usr/local/share/man/man8/qnet-hookd.8",
        "usr/local/share/man/man8/qnet-bridge-helper.8",
        "usr/local/share/man/man8/qnet-macvtap-helper.8",
        "usr/local/share/man/man8/qnet-libvirt-hook.8",
        "usr/local/share/bash-completion/completions/qnetctl",
        "usr/local/share/zsh/vendor-completions/_qnetctl",
        "usr/local/share/fish/vendor_completions.d/qnetctl.fish",
    ] {
        assert!(
            installed.iter().any(|f| f == want),
            "{want} not installed: {installed:#?}"
        );
    }
    // As non-root: no setuid bit, nothing owned by anyone but the packager.
    assert_eq!(mode(&d.join("usr/local/libexec/qnet-bridge-helper")), 0o755);
    let unit =
        std::fs::read_to_string(d.join("usr/local/lib/systemd/system/qnet-hookd.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/qnet-hookd\n"),
        "{unit}"
    );

    // An existing config is never replaced.
    std::fs::write(d.join("etc/qnet/hookd.toml"), "# mine\n").unwrap();
    make(&["install", &destdir], &dest.path().join("dist"), true);
    assert_eq!(
        std::fs::read_to_string(d.join("etc/qnet/hookd.toml")).unwrap(),
        "# mine\n"
    );

    // Only the admin's config stays.
    make(&["uninstall", &destdir], &dest.path().join("dist"), true);
    assert_eq!(files(&d), vec!["etc/qnet/hookd.toml".to_string()]);
}

#[test]
fn the_installed_units_pass_systemd_analyze_verify() {
    require_root();
    let analyze = require_tool("systemd-analyze", "systemd");
    let dest = tempfile::Builder::new()
        .prefix("qnet-test-units-")
        .tempdir()
        .unwrap();
    // PREFIX=/usr so that ExecStart names the real path inside the root.
    let destdir = format!("DESTDIR={}", dest.path().display());
    make(
        &["install", &destdir, "PREFIX=/usr", "HELPER_MODE=none"],
        &dest.path().join("dist"),
        false,
    );
    // The units they depend on (sysinit.target, ...) come from the host.
    let host_units = dest.path().join("lib/systemd");
    std::fs::create_dir_all(&host_units).unwrap();
    let copied = Command::new("cp")
        .args(["-r", "/lib/systemd/system"])
        .arg(&host_units)
        .status()
        .unwrap();
    assert!(copied.success());
    let units = dest.path().join("usr/lib/systemd/system");
    let out = Command::new(analyze)
        .arg(format!("--root={}", dest.path().display()))
        .arg("--man=no")
        .arg("verify")
        .arg(units.join("qnet-hookd.service"))
        .arg(units.join("qnet-hookd.socket"))
        .arg(units.join("qnet-hookd-qmp.socket"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
}

/// `dpkg --root=ROOT ARGS` with the maintainer scripts run without chroot
/// (they honour DPKG_ROOT); the root holds no other package, so the
/// dependencies are not checked.
fn dpkg(root: &Path, args: &[&str]) -> String {
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args)
        .output()
        .expect("dpkg");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dpkg {args:?} failed:\n{text}");
    text
}

#[test]
fn the_debian_package_installs_grants_the_helpers_their_capabilities_and_purges_clean() {
    require_root();
    let getcap = require_tool("getcap", "libcap2-bin");
    let work = tempfile::Builder::new()
        .prefix("qnet-test-deb-")
        .tempdir()
        .unwrap();
    // Unstripped debug binaries: compressing them would cost minutes.
    make(
        &["deb", "DEB_COMPRESS=none"],
        &work.path().join("dist"),
        false,
    );
    let version = env!("CARGO_PKG_VERSION");
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let deb = workspace_root().join(format!("target/debian/qnet_{version}_{}.deb", arch.trim()));
    assert!(deb.exists(), "{} not built", deb.display());

    // A throw-away root: an empty dpkg database, the group files groupadd
    // edits, and libvirt's config directory (so the hook gets linked).
    let root = work.path().join("root");
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc/libvirt"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (file, text) in [
        ("var/lib/dpkg/status", ""),
        ("var/lib/dpkg/available", ""),
        ("etc/group", "root:x:0:\n"),
        ("etc/gshadow", "root:*::\n"),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
    ] {
        std::fs::write(root.join(file), text).unwrap();
    }
    let before = files(&root);
    dpkg(&root, &["-i", deb.to_str().unwrap()]);

    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("qnet:x:")), "{group}");
    let caps = |name: &str| {
        let out = Command::new(&getcap)
            .arg(root.join("usr/libexec").join(name))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        caps("qnet-bridge-helper").contains("cap_net_admin=ep"),
        "{}",
        caps("qnet-bridge-helper")
    );
    assert!(
        caps("qnet-macvtap-helper")
            .contains("cap_chown,cap_dac_override,cap_net_admin,cap_mknod=ep"),
        "{}",
        caps("qnet-macvtap-helper")
    );
    for helper in ["qnet-bridge-helper", "qnet-macvtap-helper"] {
        assert_eq!(
            mode(&root.join("usr/libexec").join(helper)),
            0o755,
            "{helper}: file caps, not setuid"
        );
    }
    assert_eq!(
        std::fs::read_link(root.join("etc/libvirt/hooks/qemu.d/qnet")).unwrap(),
        Path::new("/usr/libexec/qnet-libvirt-hook")
    );
    let installed = files(&root);
    for want in [
        "usr/bin/qnet-hookd",
        "usr/bin/qnetctl",
        "lib/systemd/system/qnet-hookd.service",
        "lib/systemd/system/qnet-hookd.socket",
        "lib/systemd/system/qnet-hookd-qmp.socket",
        "usr/lib/tmpfiles.d/qnet.conf",
        "usr/lib/sysusers.d/qnet.conf",
        "usr/share/man/man8/qnet-hookd.8",
        "usr/share/man/man5/qnet-hookd.toml.5",
        "usr/share/bash-completion/completions/qnetctl",
        "etc/qnet/hookd.toml",
    ] {
        assert!(installed.iter().any(|f| f == want), "{want} not installed");
    }
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/qnet-hookd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/qnet-hookd\n"));
    let conffiles = std::fs::read_to_string(root.join("var/lib/dpkg/info/qnet.conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/qnet/hookd.toml");

    // State the daemon would have written; purge removes it too.
    std::fs::create_dir_all(root.join("var/lib/qnet/forwards")).unwrap();
    std::fs::write(root.join("var/lib/qnet/state.json"), "{}").unwrap();
    dpkg(&root, &["--purge", "qnet"]);
    let left: Vec<String> = files(&root)
        .into_iter()
        .filter(|f| !f.starts_with("var/lib/dpkg/") && !f.ends_with('-'))
        .filter(|f| !before.contains(f))
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!root.join("var/lib/qnet").exists() && !root.join("etc/qnet").exists());
    assert!(!root.join("etc/libvirt/hooks/qemu.d/qnet").exists());
}
