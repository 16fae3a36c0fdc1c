//! `make install` / `make uninstall` into a DESTDIR as a non-root packager
//! would run them, the systemd units as installed (systemd-analyze
//! verify), and the Debian package: built once with `make deb`, checked by
//! lintian, installed with dpkg into a throw-away root (dpkg's DPKG_ROOT
//! mode: the maintainer scripts run without chroot and honour it) and on
//! this very host (`dpkg -i`, the demo against the installed binaries,
//! `dpkg --purge`), checked, purged. All reuse the binaries `cargo test
//! --workspace` built, so they cost seconds.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use qnet_tests::netns::NetNs;
use qnet_tests::{
    require_root, require_tool, run_ok, said, target_profile_dir, tempdir_with_mode,
    workspace_binary,
};

/// The real install changes the host's /lib/systemd/system, which the
/// units test copies: tests that read or change the host's own files take
/// this first.
static HOST: Mutex<()> = Mutex::new(());

fn host() -> MutexGuard<'static, ()> {
    HOST.lock().unwrap_or_else(|e| e.into_inner())
}

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
    cmd.current_dir(workspace_root())
        .args(["--no-print-directory", "BUILD="])
        .arg(format!("BIN_SRC={}", bin.display()))
        .arg(format!("HELPER_SRC={}", bin.display()))
        .arg(format!("XTASK={}", bin.join("xtask").display()))
        .arg(format!("DIST={}", dist.display()))
        .args(args);
    run_ok(&mut cmd, &format!("make {args:?}"))
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
    let dest = tempdir_with_mode("qnet-test-install-", 0o777);
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
    let _host = host();
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
    let said = said(&out);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
}

/// `dpkg --root=ROOT ARGS` with the maintainer scripts run without chroot
/// (they honour DPKG_ROOT); the root holds no other package, so the
/// dependencies are not checked.
fn dpkg(root: &Path, args: &[&str]) -> String {
    let mut dpkg = Command::new("dpkg");
    dpkg.arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ])
        .args(args);
    run_ok(&mut dpkg, &format!("dpkg {args:?}"))
}

/// target/debian/qnet_VERSION_ARCH.deb, built by `make deb` once for
/// every test of this binary.
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        // gzip: a fraction of xz's time (and lintian wants compression).
        make(
            &["deb", "DEB_COMPRESS=gzip"],
            &workspace_root().join("target/debian/dist"),
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
        let deb =
            workspace_root().join(format!("target/debian/qnet_{version}_{}.deb", arch.trim()));
        assert!(deb.exists(), "{} not built", deb.display());
        deb
    })
}

#[test]
fn the_debian_package_installs_grants_the_helpers_their_capabilities_and_purges_clean() {
    require_root();
    let work = tempfile::Builder::new()
        .prefix("qnet-test-deb-")
        .tempdir()
        .unwrap();
    let deb = deb();

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
    check_package_files(&root);
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

/// What the package puts under `root` (`/` or a DPKG_ROOT) once
/// configured: its files, the helpers with exactly their file
/// capabilities and no setuid bit, the libvirt hook linked when
/// `ROOT/etc/libvirt` exists.
fn check_package_files(root: &Path) {
    for want in [
        "usr/bin/qnet-hookd",
        "usr/bin/qnetctl",
        "usr/libexec/qnet-libvirt-hook",
        "lib/systemd/system/qnet-hookd.service",
        "lib/systemd/system/qnet-hookd.socket",
        "lib/systemd/system/qnet-hookd-qmp.socket",
        "usr/lib/tmpfiles.d/qnet.conf",
        "usr/lib/sysusers.d/qnet.conf",
        "usr/share/man/man1/qnetctl.1.gz",
        "usr/share/man/man8/qnet-hookd.8.gz",
        "usr/share/man/man5/qnet-hookd.toml.5.gz",
        "usr/share/bash-completion/completions/qnetctl",
        "usr/share/doc/qnet/copyright",
        "etc/qnet/hookd.toml",
    ] {
        let path = root.join(want);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{want}: {e}"));
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{want}: owner");
        let program = want.starts_with("usr/bin/") || want.starts_with("usr/libexec/");
        let wanted_mode = if program { 0o755 } else { 0o644 };
        assert_eq!(mode(&path), wanted_mode, "{want}: mode");
    }
    let getcap = require_tool("getcap", "libcap2-bin");
    for (helper, caps) in [
        ("qnet-bridge-helper", "cap_net_admin=ep"),
        (
            "qnet-macvtap-helper",
            "cap_chown,cap_dac_override,cap_net_admin,cap_mknod=ep",
        ),
    ] {
        let path = root.join("usr/libexec").join(helper);
        let out = Command::new(&getcap).arg(&path).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(caps), "{helper}: getcap says {said:?}");
        assert_eq!(mode(&path), 0o755, "{helper}: file caps, not setuid");
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), 0, "{helper}");
    }
    if root.join("etc/libvirt").is_dir() {
        assert_eq!(
            std::fs::read_link(root.join("etc/libvirt/hooks/qemu.d/qnet")).unwrap(),
            Path::new("/usr/libexec/qnet-libvirt-hook")
        );
    }
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/qnet-hookd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/qnet-hookd\n"), "{unit}");
}

#[test]
fn lintian_finds_no_errors_in_the_debian_package() {
    require_root();
    let lintian = require_tool("lintian", "lintian");
    let out = Command::new(lintian)
        .args(["--allow-root", "--tag-display-limit", "0"])
        .arg(deb())
        .output()
        .unwrap();
    let said = said(&out);
    let errors: Vec<&str> = said.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(
        errors.is_empty(),
        "lintian errors:\n{}\n\nall it said:\n{said}",
        errors.join("\n")
    );
    assert!(
        out.status.success(),
        "lintian failed ({}):\n{said}",
        out.status
    );
}

/// Where the package's units are enabled (deb-systemd-helper's links,
/// made without a running systemd too).
const ENABLED: [(&str, &str); 3] = [
    (
        "/etc/systemd/system/sockets.target.wants/qnet-hookd.socket",
        "/lib/systemd/system/qnet-hookd.socket",
    ),
    (
        "/etc/systemd/system/sockets.target.wants/qnet-hookd-qmp.socket",
        "/lib/systemd/system/qnet-hookd-qmp.socket",
    ),
    (
        "/etc/systemd/system/multi-user.target.wants/qnet-hookd.service",
        "/lib/systemd/system/qnet-hookd.service",
    ),
];

/// The directories the postinst makes for the libvirt hook's link (when
/// libvirt is installed), and the postrm removes again when empty.
const LIBVIRT_HOOK_DIRS: [&str; 2] = ["/etc/libvirt/hooks", "/etc/libvirt/hooks/qemu.d"];

/// Every path of this host whose name says qnet, in the directories the
/// package, its maintainer scripts and deb-systemd-helper write to.
fn qnet_paths_on_host() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs: Vec<PathBuf> = [
        "/usr/bin",
        "/usr/libexec",
        "/usr/lib/systemd/system",
        "/usr/lib/tmpfiles.d",
        "/usr/lib/sysusers.d",
        "/usr/share/man/man1",
        "/usr/share/man/man5",
        "/usr/share/man/man8",
        "/usr/share/bash-completion/completions",
        "/usr/share/zsh/vendor-completions",
        "/usr/share/fish/vendor_completions.d",
        "/usr/share/doc",
        "/usr/share/lintian/overrides",
        "/etc/systemd/system",
        "/var/lib/systemd/deb-systemd-helper-enabled",
        "/etc/libvirt/hooks",
        "/etc",
        "/var/lib",
        "/run",
    ]
    .map(PathBuf::from)
    .to_vec();
    let shallow = ["/etc", "/var/lib", "/run", "/usr/share/doc"].map(Path::new);
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains("qnet"))
            {
                found.push(path);
            } else if path.is_dir() && !path.is_symlink() && !shallow.contains(&dir.as_path()) {
                dirs.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `dpkg ARGS` on this host, inside `ns` (so whatever the maintainer
/// scripts do to the network happens there), waiting out another dpkg
/// or apt that holds dpkg's lock.
fn host_dpkg(ns: &NetNs, args: &[&str]) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", ns.name(), "dpkg"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("dpkg");
        let text = said(&out);
        if out.status.success() {
            return Ok(text);
        }
        if !text.contains("lock") || Instant::now() > deadline {
            return Err(format!("dpkg {args:?} failed ({}):\n{text}", out.status));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// qnet installed on this host by the test: purged however the test ends,
/// and group qnet removed again if the test made it (the package keeps
/// it, as Debian keeps system groups).
struct HostInstall<'a> {
    ns: &'a NetNs,
    group_was_there: bool,
}

impl Drop for HostInstall<'_> {
    fn drop(&mut self) {
        if let Err(e) = host_dpkg(self.ns, &["--purge", "qnet"]) {
            eprintln!("purging qnet after the test: {e}");
        }
        if !self.group_was_there {
            let _ = Command::new("groupdel").arg("qnet").status();
        }
    }
}

fn group_exists(name: &str) -> bool {
    nix::unistd::Group::from_name(name).ok().flatten().is_some()
}

/// The test installs and purges the package for real: a qnet already on
/// this host (a package, or a daemon's config or state) would be removed
/// with it, so the test refuses instead.
fn refuse_if_qnet_is_here() {
    let status = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", "qnet"])
        .output()
        .expect("dpkg-query");
    let status = String::from_utf8_lossy(&status.stdout).trim().to_string();
    let present: Vec<&str> = [
        "/etc/qnet",
        "/var/lib/qnet",
        "/run/qnet",
        "/usr/bin/qnet-hookd",
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect();
    assert!(
        (status.is_empty() || status.starts_with("un")) && present.is_empty(),
        "qnet is already on this host (dpkg status {status:?}, {present:?}): this test installs \
         the package with dpkg and purges it, which would remove that one and its state; \
         remove it first (dpkg --purge qnet), or run the tests with \
         `--skip the_debian_package_installs_on_this_host`"
    );
}

#[test]
fn the_debian_package_installs_on_this_host_runs_the_demo_and_purges_clean() {
    require_root();
    let _host = host();
    // The postinst links libvirt's hook, which the libvirt tests replace.
    let _libvirt = qnet_tests::lock_file("/run/lock/qnet-test-libvirtd.lock");
    refuse_if_qnet_is_here();
    let deb = deb();
    let before = qnet_paths_on_host();
    let libvirt_dirs = || LIBVIRT_HOOK_DIRS.map(|d| Path::new(d).exists());
    let libvirt_before = libvirt_dirs();
    let ns = NetNs::new("dpkg");
    let _installed = HostInstall {
        ns: &ns,
        group_was_there: group_exists("qnet"),
    };
    host_dpkg(&ns, &["-i", deb.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));

    // Files, owners, modes, file capabilities; the group; the run and
    // state directories (tmpfiles.d); the units enabled, not started (no
    // systemd here).
    check_package_files(Path::new("/"));
    assert!(group_exists("qnet"), "postinst made group qnet");
    for dir in ["/run/qnet", "/var/lib/qnet"] {
        assert!(Path::new(dir).is_dir(), "{dir}");
        assert_eq!(mode(Path::new(dir)), 0o755, "{dir}");
    }
    for (link, unit) in ENABLED {
        let target = std::fs::read_link(link).unwrap_or_else(|e| panic!("{link}: {e}"));
        assert_eq!(target, Path::new(unit), "{link}");
    }
    let verify = host_dpkg(&ns, &["--verify", "qnet"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(verify.trim().is_empty(), "dpkg --verify: {verify}");

    // The demo, with the installed daemon, qnetctl and bridge helper.
    let demo = Command::new(workspace_binary("qnet-demo"))
        .env(qnet_tests::INSTALLED_PREFIX_ENV, "/usr")
        .output()
        .unwrap();
    assert!(demo.status.success(), "demo failed:\n{}", said(&demo));
    let said = String::from_utf8_lossy(&demo.stdout);
    for used in [
        "/usr/bin/qnet-hookd up with its default network",
        "helper=/usr/libexec/qnet-bridge-helper",
        "Done:",
    ] {
        assert!(said.contains(used), "{used:?} not in:\n{said}");
    }

    // Purged: nothing of qnet is left but group qnet (kept by design).
    host_dpkg(&ns, &["--purge", "qnet"]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(qnet_paths_on_host(), before, "left after purge");
    // Made for the link, gone with it (an empty one that was there before
    // goes too, as dpkg removes a package's empty directories).
    for (dir, (before, after)) in LIBVIRT_HOOK_DIRS
        .iter()
        .zip(libvirt_before.iter().zip(libvirt_dirs()))
    {
        assert!(*before || !after, "{dir} left after purge");
    }
    for (link, _) in ENABLED {
        assert!(std::fs::symlink_metadata(link).is_err(), "{link} left");
    }
    let status = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", "qnet"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&status.stdout).starts_with("ii"),
        "still installed"
    );
    assert!(group_exists("qnet"), "group qnet stays after purge");
}
