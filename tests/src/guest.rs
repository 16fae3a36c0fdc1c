//! The tiny test guest: build it, boot it under QEMU, read what it says.
//!
//! The guest (`tests/guest/`, built by `tests/guest/build-guest.sh`) is
//! Debian's cloud kernel plus a busybox initramfs. Its `/init` configures
//! `eth0` by DHCP and then serves, on the leased address:
//! - HTTP on port 80: `/` is the kernel parameter `qnet.token=...` byte for
//!   byte (so a test proves which guest answered);
//! - TCP echo on port 7 and, when the build host had a static C toolchain,
//!   UDP echo on port 7;
//! - ping (answered by the kernel).
//!
//! What it says on its serial console, and how a test reads it: [`console`].

pub mod console;

pub use console::*;
use console::{complete_lines, find_marker, tail};

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The failure bound of a long wait on a real guest: booting under TCG
/// to its lease or its ready line, a daemon following it (a few seconds
/// as a rule; never an expectation).
pub const LONG: Duration = Duration::from_secs(90);
/// Failure bounds for a guest with its lease: until its servers are up
/// (the ready line), and for one HTTP fetch from it.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest's HTTP port (`/` answers the token).
pub const HTTP_PORT: u16 = 80;
/// The guest's TCP and UDP echo port.
pub const ECHO_PORT: u16 = 7;

/// The built guest: a kernel and an initramfs for `qemu -kernel/-initrd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The cargo target directory of this workspace: `$CARGO_TARGET_DIR` if set
/// (relative to the workspace root when relative), else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    // The parent rather than `tests/..`, so that messages read `/x/target`.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace");
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir), // join() keeps an absolute dir as is
        None => workspace.join("target"),
    }
}

/// Builds the guest if needed (`<target>/qnet-guest/`) and returns its paths.
///
/// The build runs once per process; across processes the script itself takes
/// a lock and skips work already done. Takes a few seconds the first time
/// (the kernel package is downloaded with apt), then nothing.
pub fn guest_image() -> Result<GuestImage, String> {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    IMAGE.get_or_init(build_guest_image).clone()
}

fn build_guest_image() -> Result<GuestImage, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build-guest.sh");
    let outdir = target_dir().join("qnet-guest");
    let output = Command::new("bash")
        .arg(&script)
        .arg(&outdir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "building the test guest failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let image = GuestImage {
        kernel: outdir.join("vmlinuz"),
        initrd: outdir.join("initrd.gz"),
    };
    for file in [&image.kernel, &image.initrd] {
        if !file.is_file() {
            return Err(format!(
                "{} succeeded but {} is missing",
                script.display(),
                file.display()
            ));
        }
    }
    Ok(image)
}

/// Checks that the programs the guest tests run are installed, naming the
/// Debian package for each one missing. Tests call it first so that a missing
/// tool fails with a clear message (never a skip).
pub fn check_prerequisites() -> Result<(), String> {
    let needed = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dnsmasq", "dnsmasq-base"),
        ("ip", "iproute2"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("flock", "util-linux"),
    ];
    let missing: Vec<String> = needed
        .iter()
        .filter(|(program, _)| find_program(program).is_none())
        .map(|(program, package)| format!("{program} (apt-get install {package})"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing programs: {}", missing.join(", ")))
    }
}

/// Looks a program up in `$PATH` plus the sbin directories (tests may run
/// with a user's PATH that lacks them, as root still can run those).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A random MAC in QEMU's range, `52:54:00:xx:xx:xx`.
pub fn random_mac() -> String {
    let b = random_bytes::<3>();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// A random token for `qnet.token=`: 32 lowercase hex digits.
pub fn random_token() -> String {
    random_bytes::<16>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `N` bytes from the kernel's random source (no rand crate needed).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

/// Makes `cmd` start inside the network namespace `/run/netns/<netns>`
/// (as created by `ip netns add`), with a `setns` between fork and exec.
///
/// The namespace file is opened now, so a missing namespace is reported here
/// and the child does no allocation before exec.
pub fn command_in_netns(cmd: &mut Command, netns: &str) -> Result<(), String> {
    let path = Path::new("/run/netns").join(netns);
    let ns = File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: the hook only calls setns(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
        });
    }
    Ok(())
}

/// How to boot one guest. Build it with [`GuestSpec::new`], adjust the
/// public fields if needed, then get the QEMU command line.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// MAC of the guest's NIC, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// What the guest serves at `http://<ip>/`; no whitespace or quotes
    /// (it travels on the kernel command line).
    pub token: String,
    /// Guest RAM; 128 MiB is plenty.
    pub memory_mib: u32,
    /// Extra kernel parameters, appended as they are.
    pub extra_append: Vec<String>,
}

impl GuestSpec {
    pub fn new(image: &GuestImage, mac: impl Into<String>, token: impl Into<String>) -> Self {
        GuestSpec {
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            mac: mac.into(),
            token: token.into(),
            memory_mib: 128,
            extra_append: Vec::new(),
        }
    }

    /// The kernel command line.
    pub fn append(&self) -> String {
        let mut append = format!("console=ttyS0 panic=-1 quiet qnet.token={}", self.token);
        for extra in &self.extra_append {
            append.push(' ');
            append.push_str(extra);
        }
        append
    }

    /// The QEMU command booting this guest with one virtio-net NIC on
    /// `netdev` (a `-netdev` value such as
    /// `tap,id=n0,ifname=qtap0,script=no,downscript=no` or
    /// `bridge,id=n0,br=qbr0,helper=/path/to/helper`; its `id=` names the
    /// NIC's backend). The console goes to `serial_log`.
    ///
    /// Always software emulation (`-accel tcg`): KVM is not usable on the
    /// test machines. The caller may add `pre_exec` hooks (for example
    /// [`command_in_netns`]) before handing it to [`RunningGuest::spawn`].
    ///
    /// Panics on a `netdev` without `id=`, or a token or path QEMU cannot
    /// take: those are mistakes in the test, not conditions to handle.
    pub fn qemu_command(&self, netdev: &str, serial_log: &Path) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(self.qemu_args(netdev, serial_log));
        cmd
    }

    /// The arguments of [`GuestSpec::qemu_command`], for a caller that
    /// builds the `Command` itself (for example
    /// `sandboxed("qemu-system-x86_64", ...)`, so that a network helper
    /// QEMU runs starts inside the sandbox). Panics as `qemu_command` does.
    pub fn qemu_args(&self, netdev: &str, serial_log: &Path) -> Vec<OsString> {
        let id = netdev_id(netdev).unwrap_or_else(|| panic!("-netdev {netdev:?} has no id="));
        assert!(
            !self.token.is_empty() && !self.token.contains(|c: char| c.is_whitespace() || c == '"'),
            "token {:?} cannot go on the kernel command line",
            self.token
        );
        // QEMU's option parser splits on commas.
        assert!(
            !serial_log.to_string_lossy().contains(','),
            "comma in {}",
            serial_log.display()
        );

        let strings = |items: &[&str]| items.iter().map(OsString::from).collect::<Vec<_>>();
        let mut args = strings(&["-accel", "tcg", "-m"]);
        args.push(self.memory_mib.to_string().into());
        args.extend(strings(&["-nodefaults", "-display", "none", "-no-reboot"]));
        args.push("-serial".into());
        args.push(format!("file:{}", serial_log.display()).into());
        args.push("-kernel".into());
        args.push(self.kernel.clone().into());
        args.push("-initrd".into());
        args.push(self.initrd.clone().into());
        args.push("-append".into());
        args.push(self.append().into());
        args.push("-netdev".into());
        args.push(netdev.into());
        args.push("-device".into());
        args.push(format!("virtio-net-pci,netdev={id},mac={}", self.mac).into());
        args
    }
}

/// The `id=` of a `-netdev` value: `tap,id=n0,ifname=t0` -> `n0`.
pub fn netdev_id(netdev: &str) -> Option<&str> {
    netdev
        .split(',')
        .find_map(|opt| opt.strip_prefix("id="))
        .filter(|id| !id.is_empty())
}

/// A QEMU process running the guest. Dropping it kills QEMU (SIGKILL) and
/// reaps it, so no QEMU outlives its test, whatever happens in the test.
pub struct RunningGuest {
    child: Mutex<Child>,
    serial_log: PathBuf,
    stderr_log: PathBuf,
}

impl RunningGuest {
    /// Starts `cmd` (from [`GuestSpec::qemu_command`]) whose console goes to
    /// `serial_log`. QEMU's own stdout and stderr go to
    /// `<serial_log>.qemu-stderr`, quoted in errors; stdin is closed.
    pub fn spawn(mut cmd: Command, serial_log: &Path) -> Result<Self, String> {
        // A log left by an earlier run would be read as this guest's output.
        match fs::remove_file(serial_log) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(format!("remove old {}: {e}", serial_log.display()))
            }
            _ => {}
        }
        let stderr_log = PathBuf::from(format!("{}.qemu-stderr", serial_log.display()));
        let stderr = File::create(&stderr_log)
            .map_err(|e| format!("create {}: {e}", stderr_log.display()))?;
        let stdout = stderr.try_clone().map_err(|e| format!("dup: {e}"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => format!(
                    "cannot start {:?}: not found (apt-get install qemu-system-x86)",
                    cmd.get_program()
                ),
                _ => format!("cannot start {:?}: {e}", cmd.get_program()),
            })?;
        Ok(RunningGuest {
            child: Mutex::new(child),
            serial_log: serial_log.to_path_buf(),
            stderr_log,
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// The serial log (the guest's console) so far.
    pub fn serial_output(&self) -> String {
        fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for the guest's DHCP lease and returns its address.
    pub fn wait_for_lease(&self, timeout: Duration) -> Result<Ipv4Addr, String> {
        self.wait_for_lease_info(timeout).map(|lease| lease.ip)
    }

    /// Waits for the guest's DHCP lease and returns all the LEASE line says.
    pub fn wait_for_lease_info(&self, timeout: Duration) -> Result<GuestLease, String> {
        let line = self.wait_for_line(LEASE_MARKER, timeout)?;
        parse_lease_line(&line).map_err(|e| self.failure(&e))
    }

    /// Waits until the guest's servers listen; returns the READY line
    /// (whose `udpecho=` tells whether the guest has UDP echo).
    pub fn wait_for_ready(&self, timeout: Duration) -> Result<String, String> {
        self.wait_for_line(READY_MARKER, timeout)
    }

    /// Waits for the result of `qnet.probe=` (the guest tries for up to
    /// a minute before it reports a failure).
    pub fn wait_for_probe(&self, timeout: Duration) -> Result<ProbeOutcome, String> {
        let line = self.wait_for_line(PROBE_MARKER, timeout)?;
        parse_probe_line(&line).map_err(|e| self.failure(&e))
    }

    /// Waits for the PROBE line of one `qnet.probe=` target (`IP:PORT`).
    pub fn wait_for_probe_to(
        &self,
        target: &str,
        timeout: Duration,
    ) -> Result<ProbeOutcome, String> {
        let wanted = format!("target={target} ");
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.try_wait()?;
            for line in complete_lines(&self.serial_output()) {
                if let Some(found) = find_marker(line, PROBE_MARKER) {
                    if found.contains(&wanted) {
                        return parse_probe_line(found).map_err(|e| self.failure(&e));
                    }
                }
            }
            if exited.is_some() || Instant::now() >= deadline {
                return Err(self.failure(&format!("no PROBE line for {target} within {timeout:?}")));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the result of `qnet.resolve=NAME`: the address the guest's
    /// DNS server gave, or `None` if the name did not resolve.
    pub fn wait_for_resolve(&self, timeout: Duration) -> Result<Option<Ipv4Addr>, String> {
        let line = self.wait_for_line(RESOLVE_MARKER, timeout)?;
        let ip = line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("ip="))
            .ok_or_else(|| self.failure(&format!("bad resolve line: {line:?}")))?;
        Ok(ip.parse().ok())
    }

    /// Waits for a console line holding `marker` (followed by a space or the
    /// end of the line) and returns it from the marker on. Fails at once on a
    /// NOLEASE or ERROR line or when QEMU exits; every error quotes the tail
    /// of the serial log and QEMU's stderr.
    pub fn wait_for_line(&self, marker: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Checked before reading the log, so that a QEMU that printed
            // its last line and then exited is still read in full.
            let exited = self.try_wait()?;
            for line in complete_lines(&self.serial_output()) {
                if let Some(found) = find_marker(line, marker) {
                    return Ok(found.to_string());
                }
                for fatal in [NOLEASE_MARKER, ERROR_MARKER] {
                    if let Some(found) = find_marker(line, fatal) {
                        return Err(
                            self.failure(&format!("waiting for {marker}, the guest said: {found}"))
                        );
                    }
                }
            }
            if let Some(status) = exited {
                return Err(self.failure(&format!("waiting for {marker}: QEMU exited ({status})")));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!("no {marker} line within {timeout:?}")));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// How QEMU ended, once it has (`None` while it runs).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.try_wait().ok().flatten()
    }

    fn try_wait(&self) -> Result<Option<ExitStatus>, String> {
        self.child
            .lock()
            .unwrap()
            .try_wait()
            .map_err(|e| format!("waitpid QEMU: {e}"))
    }

    /// An error message with what is needed to debug it.
    fn failure(&self, what: &str) -> String {
        format!(
            "guest (QEMU pid {}): {what}\n--- last lines of {} ---\n{}\n--- {} ---\n{}",
            self.pid(),
            self.serial_log.display(),
            tail(&self.serial_output(), 40),
            self.stderr_log.display(),
            tail(
                &fs::read_to_string(&self.stderr_log).unwrap_or_default(),
                20
            ),
        )
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `target/qnet-test-logs/NAME`, created if need be: where a test keeps
/// its guests' serial logs (kept after the test, for debugging; `cargo
/// clean` removes them).
pub fn log_dir(name: &str) -> PathBuf {
    let dir = target_dir().join("qnet-test-logs").join(name);
    std::fs::create_dir_all(&dir).expect("create the log dir");
    dir
}

/// [`log_dir`], emptied first.
pub fn fresh_log_dir(name: &str) -> PathBuf {
    let _ = std::fs::remove_dir_all(target_dir().join("qnet-test-logs").join(name));
    log_dir(name)
}

/// The installed `qemu-system-x86_64`'s version (major, minor, micro), as
/// its `--version` line gives it: what its QMP greeting must say.
pub fn qemu_version() -> (u64, u64, u64) {
    let out = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("qemu-system-x86_64 --version");
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text).unwrap_or_else(|| panic!("no version in {text:?}"))
}

/// The version in `QEMU emulator version 10.0.2 (Debian ...)`.
fn parse_qemu_version(text: &str) -> Option<(u64, u64, u64)> {
    let word = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut numbers = word.split('.').map(|n| n.parse::<u64>().ok());
    Some((numbers.next()??, numbers.next()??, numbers.next()??))
}

/// `qemu-system-x86_64` for a guest that never runs (`-S`, TCG, no
/// default devices, no display, 64 MiB), with stdin and stdout closed: a
/// QEMU to speak QMP with and to hold devices. The caller adds its
/// devices and monitors.
pub fn stopped_qemu() -> std::process::Command {
    let mut command = std::process::Command::new("qemu-system-x86_64");
    command
        .args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-m",
            "64",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions() {
        let line = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n";
        assert_eq!(parse_qemu_version(line), Some((10, 0, 2)));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some((7, 2, 19))
        );
        assert_eq!(parse_qemu_version("qemu"), None);
    }

    #[test]
    fn netdev_ids() {
        assert_eq!(netdev_id("tap,id=n0,ifname=t0,script=no"), Some("n0"));
        assert_eq!(netdev_id("bridge,br=qbr0,id=x1"), Some("x1"));
        assert_eq!(netdev_id("user"), None);
        assert_eq!(netdev_id("tap,id="), None);
    }
}
