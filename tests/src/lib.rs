//! Test kit shared by qnet's integration tests, end-to-end tests and
//! benchmarks: network namespaces, a sandbox with its own `/etc/qemu`, a
//! fake QEMU that runs helpers, and the tiny guest.
//!
//! Prerequisites are checked loudly: a test that lacks root, a tool or a
//! kernel feature panics with what to install. It never skips.

pub mod dnsmasq;
pub mod fake_guest;
pub mod fake_qemu;
pub mod guest;
pub mod helper_bench;
pub mod helper_cli;
pub mod hookd;
pub mod http;
pub mod install;
pub mod mountns;
pub mod netns;
pub mod peers;
pub mod process;
pub mod procfs;
pub mod sandbox;

use std::path::PathBuf;

/// Panics unless running as root: these tests create namespaces and
/// devices.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "qnet's integration tests need root (they create network namespaces); run them as root"
    );
}

/// Panics unless `program` is on PATH (or an absolute path that exists),
/// naming the Debian package that provides it.
pub fn require_tool(program: &str, package: &str) -> PathBuf {
    let found = if program.contains('/') {
        Some(PathBuf::from(program)).filter(|p| p.exists())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.exists())
        })
    };
    found.unwrap_or_else(|| panic!("`{program}` not found: install the Debian package `{package}`"))
}

/// Panics unless running as root and every program in `programs` is
/// installed, naming the Debian package of a missing one.
pub fn require_programs(programs: &[&str]) {
    require_root();
    for program in programs {
        require_tool(program, package_of(program));
    }
}

/// The Debian package that provides `program`, for the "install it" hint.
fn package_of(program: &str) -> &'static str {
    match program {
        "ip" | "bridge" => "iproute2",
        "nft" => "nftables",
        "dnsmasq" => "dnsmasq-base",
        "busybox" => "busybox-static",
        "sysctl" | "pgrep" => "procps",
        "qemu-system-x86_64" => "qemu-system-x86",
        "iptables" | "ip6tables" => "iptables",
        "setcap" | "getcap" => "libcap2-bin",
        "virsh" => "libvirt-clients",
        "libvirtd" => "libvirt-daemon",
        _ => "(see README for the package list)",
    }
}

/// A temporary directory `PREFIX…` (removed on drop) with permissions
/// `mode`: for files a test shares with the user it runs a program as.
pub fn tempdir_with_mode(prefix: &str, mode: u32) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}

/// Polls `check` every 20 ms until it is true; panics with `what` if it is
/// still false after `timeout` (a generous failure bound, never a timing
/// assertion).
pub fn wait_until(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// All a finished command said: its stdout, then its stderr.
pub fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` (`what` names it in a failure) and returns all it said;
/// panics with that unless it succeeded.
pub fn run_ok(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = said(&out);
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// The directory cargo puts this build's binaries in (target/debug or
/// target/release), derived from the running test executable.
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Set to a prefix (`/usr`) in the environment of a program the tests run
/// (the demo), to make it run qnet's installed binaries instead of the
/// build's: [`workspace_binary`] then gives `PREFIX/bin/` for the daemon
/// and qnetctl and `PREFIX/libexec/` for the helpers and the libvirt hook,
/// the Debian package's layout.
pub const INSTALLED_PREFIX_ENV: &str = "QNET_TEST_INSTALLED_PREFIX";

/// Path of one of the workspace's binaries, built by `cargo test --workspace`
/// (or its installed copy, see [`INSTALLED_PREFIX_ENV`]).
pub fn workspace_binary(name: &str) -> PathBuf {
    if let Some(path) = installed_binary(name) {
        return path;
    }
    let path = target_profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` so every binary is built",
        path.display()
    );
    path
}

/// The installed copy of `name` when [`INSTALLED_PREFIX_ENV`] is set and
/// qnet installs such a binary.
fn installed_binary(name: &str) -> Option<PathBuf> {
    let prefix = std::env::var_os(INSTALLED_PREFIX_ENV).filter(|p| !p.is_empty())?;
    let dir = match name {
        "qnet-hookd" | "qnetctl" => "bin",
        "qnet-bridge-helper" | "qnet-macvtap-helper" | "qnet-libvirt-hook" => "libexec",
        _ => return None,
    };
    let path = std::path::Path::new(&prefix).join(dir).join(name);
    assert!(path.exists(), "{} is not installed", path.display());
    Some(path)
}

/// Takes the machine-wide lock `path` (flock; released when the file is
/// dropped), waiting for it: for tests that change files of the host
/// other test processes change too.
pub fn lock_file(path: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
    file
}

/// Checks that `binary --help` and `--version` exit 0 on stdout, that the
/// help names the program and says something, and that the version line
/// is `NAME VERSION`. Each binary crate runs this from an integration test
/// of its own, which also makes `cargo test --workspace` build every
/// binary before the namespaced tests exec them.
pub fn check_help_and_version(binary: &std::path::Path, name: &str, version: &str) {
    use std::process::Command;
    let help = Command::new(binary).arg("--help").output().unwrap();
    assert!(help.status.success(), "{name} --help: {}", help.status);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains(name),
        "{name} --help does not name itself:\n{text}"
    );
    assert!(
        text.lines().count() > 5,
        "{name} --help says too little:\n{text}"
    );

    let out = Command::new(binary).arg("--version").output().unwrap();
    assert!(out.status.success(), "{name} --version: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("{name} {version}")),
        "{name} --version: {text}"
    );
}
