//! Running `qnet-hookd` inside a test namespace, and talking to it with
//! the real `qnetctl`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::guest::{check_prerequisites, log_dir, random_token, GuestSpec, RunningGuest};
use crate::mountns::MountNs;
use crate::netns::NetNs;
use crate::process::{spawn_logged, wait_serving};
use crate::sandbox::{sandboxed, ConfigDir};
use crate::workspace_binary;

/// One NAT network, `lab` on bridge `qnlab`, 10.77.0.0/24: the config of
/// most daemon tests.
pub const LAB: &str = r#"
[[network]]
name = "lab"
bridge = "qnlab"
subnet = "10.77.0.0/24"
"#;

/// One `[[network]]` table of hookd.toml: `name` on `bridge`, then each of
/// `settings` (`key = value`, TOML as it is) on a line of its own. Tests
/// build their configs from it and say only what their network adds.
pub fn network(name: &str, bridge: &str, settings: &[&str]) -> String {
    let mut table = format!("\n[[network]]\nname = \"{name}\"\nbridge = \"{bridge}\"\n");
    for setting in settings {
        table.push_str(setting);
        table.push('\n');
    }
    table
}

/// A qnet-hookd process with its own config, run and state directories.
/// Dropping it kills the daemon (the namespace's own drop kills dnsmasq)
/// and removes them.
pub struct Hookd {
    netns_name: String,
    dir: tempfile::TempDir,
    /// `--run-dir`, apart from `dir`: see [`run_tempdir`]. It lives as
    /// long as this, so a restarted daemon finds its guests' records.
    run: tempfile::TempDir,
    child: Option<Child>,
    launch: Launched,
}

/// How to start the daemon besides its config: for tests of hostile and
/// unlucky conditions.
#[derive(Default)]
pub struct Launch<'a> {
    /// Run it in this mount namespace (and its network namespace).
    pub mount_ns: Option<&'a MountNs>,
    /// Mount a tmpfs of this size (e.g. `"16k"`) on its state directory,
    /// in `mount_ns`: a small disk that fills up.
    pub state_tmpfs: Option<&'a str>,
    /// `RLIMIT_NOFILE` (soft and hard) of the daemon.
    pub nofile: Option<u64>,
    /// Extra environment variables, e.g. `DBUS_SYSTEM_BUS_ADDRESS` of a
    /// private bus.
    pub env: &'a [(&'a str, &'a str)],
}

/// What of [`Launch`] is kept for restarts.
#[derive(Default, Clone)]
struct Launched {
    mount_ns_pid: Option<u32>,
    nofile: Option<u64>,
    env: Vec<(String, String)>,
}

impl Hookd {
    /// Starts the daemon in `netns` with `config` as hookd.toml (`None`:
    /// no config file, so the default network) and waits until it answers.
    pub fn start(netns: &NetNs, config: Option<&str>) -> Hookd {
        Hookd::start_with(netns, config, Launch::default())
    }

    /// A new namespace (`tag`, see [`NetNs::new`]) with the daemon started
    /// in it: the opening of most daemon tests. Bind both (`let (ns,
    /// hookd)`): the daemon is dropped before its namespace.
    pub fn start_in_new_netns(tag: &str, config: Option<&str>) -> (NetNs, Hookd) {
        let ns = NetNs::new(tag);
        let hookd = Hookd::start(&ns, config);
        (ns, hookd)
    }

    /// The opening of a test with real guests in `hk`: checks what they
    /// need, starts the daemon there with `config`, and returns it with a
    /// sandbox config for QEMU whose bridge.conf allows `bridges`.
    pub fn start_for_guests(hk: &NetNs, config: &str, bridges: &[&str]) -> (Hookd, ConfigDir) {
        check_prerequisites().unwrap_or_else(|e| panic!("{e}"));
        let sandbox = ConfigDir::new();
        let allow: String = bridges.iter().map(|b| format!("allow {b}\n")).collect();
        sandbox.write("bridge.conf", &allow);
        (Hookd::start(hk, Some(config)), sandbox)
    }

    /// [`Hookd::start`] with extra environment variables (kept for
    /// restarts).
    pub fn start_with_env(netns: &NetNs, config: Option<&str>, env: &[(&str, &str)]) -> Hookd {
        Hookd::start_with(
            netns,
            config,
            Launch {
                env,
                ..Launch::default()
            },
        )
    }

    /// [`Hookd::start`], launched as `launch` says.
    pub fn start_with(netns: &NetNs, config: Option<&str>, launch: Launch) -> Hookd {
        let mut hookd = Hookd::prepare(netns, config, launch);
        hookd.spawn();
        hookd
    }

    /// Like [`Hookd::start_with`], but does not start the daemon: a test
    /// starts [`Hookd::command`] its own way and hands the process to
    /// [`Hookd::adopt`].
    pub fn prepare(netns: &NetNs, config: Option<&str>, launch: Launch) -> Hookd {
        let dir = tempfile::Builder::new()
            .prefix("qnet-test-hookd-")
            .tempdir()
            .unwrap();
        if let Some(text) = config {
            std::fs::write(dir.path().join("hookd.toml"), text).unwrap();
        }
        if let (Some(ns), Some(size)) = (launch.mount_ns, launch.state_tmpfs) {
            ns.mount_tmpfs(&dir.path().join("state"), size);
        }
        Hookd {
            netns_name: netns.name().to_string(),
            run: run_tempdir(dir.path()),
            dir,
            child: None,
            launch: Launched {
                mount_ns_pid: launch.mount_ns.map(MountNs::pid),
                nofile: launch.nofile,
                env: launch
                    .env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        }
    }

    /// The extra environment of the next (re)start, replacing the one
    /// given at launch.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.launch.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Replaces the daemon's hookd.toml (for the next start or reload).
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.dir().join("hookd.toml"), text).unwrap();
    }

    /// Makes `child` (the daemon's own process) this daemon: dropping
    /// kills it.
    pub fn adopt(&mut self, child: Child) {
        self.child = Some(child);
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The daemon's stdout and stderr, appended to the log.
    pub fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap()
    }

    fn log_path(&self) -> PathBuf {
        self.dir().join("hookd.log")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.dir().join(QMP_SOCKET)
    }

    pub fn ctl_socket(&self) -> PathBuf {
        self.dir().join(CTL_SOCKET)
    }

    /// Sends `bytes` to the control socket as they are, ends the request
    /// (shutdown of the write side) and returns the reply line; empty when
    /// the daemon closed the connection without one. Errors writing are
    /// ignored: the daemon may close before it has read everything.
    pub fn ctl_raw(&self, bytes: &[u8]) -> String {
        let mut stream = std::os::unix::net::UnixStream::connect(self.ctl_socket())
            .expect("connect to ctl.sock");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let _ = stream.write_all(bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut reply = String::new();
        let _ = std::io::BufReader::new(stream).read_line(&mut reply);
        reply
    }

    /// `--run-dir`: not inside [`Hookd::dir`] (see [`run_tempdir`]).
    pub fn run_dir(&self) -> PathBuf {
        self.run.path().to_path_buf()
    }

    /// What dnsmasq of `network` is told of reservations: the lines of
    /// every file in `RUN/NET/dhcp-hosts.d` (`MAC,IP[,NAME]`), sorted.
    pub fn dhcp_hosts(&self, network: &str) -> String {
        self.hosts_dir(network, "dhcp-hosts.d")
    }

    /// What dnsmasq of `network` is told of names: the lines of every file
    /// in `RUN/NET/dns-hosts.d` (`IP NAME.DOMAIN NAME`), sorted.
    pub fn dns_hosts(&self, network: &str) -> String {
        self.hosts_dir(network, "dns-hosts.d")
    }

    fn hosts_dir(&self, network: &str, dir: &str) -> String {
        let dir = self.run_dir().join(network).join(dir);
        let mut lines: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|text| text.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The command line of the daemon (for tests of bad configs too).
    pub fn command(&self) -> Command {
        let mut cmd = match self.launch.mount_ns_pid {
            Some(pid) => {
                let mut cmd = Command::new("nsenter");
                cmd.args(["--target", &pid.to_string(), "--mount", "--net", "--"]);
                cmd
            }
            None => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.netns_name]);
                cmd
            }
        };
        if let Some(limit) = self.launch.nofile {
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.arg(workspace_binary("qnet-hookd"))
            .args(path_args(self.dir(), &self.run_dir()))
            .arg("--log")
            .arg("debug")
            .envs(self.launch.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// (Re)starts the daemon and waits until `status` answers.
    pub fn spawn(&mut self) {
        self.spawn_nowait();
        let (ctl, log) = (self.ctl_socket(), self.log_path());
        let child = self.child.as_mut().unwrap();
        let (timeout, every) = (Duration::from_secs(30), Duration::from_millis(50));
        wait_serving("qnet-hookd", child, &log, timeout, every, || {
            qnetctl_at(&ctl, &["status"]).is_ok()
        });
    }

    /// The daemon's pid while it runs (`ip netns exec` and `nsenter` exec
    /// it, so it is the child's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the daemon without waiting for it to answer.
    pub fn spawn_nowait(&mut self) {
        let child = spawn_logged(&mut self.command(), &self.log_path(), "qnet-hookd");
        self.child = Some(child);
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `ip netns exec` execs the daemon, so this is the daemon itself.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// Starts the test image as guest `name` (`spec`) on `bridge` through
    /// the bridge helper, in `ns` with `config`, dialing this daemon's QMP
    /// socket, with `more` QEMU arguments. Its serial log is in the test
    /// logs of `ns`.
    pub fn spawn_guest(
        &self,
        ns: &NetNs,
        config: &ConfigDir,
        name: &str,
        spec: &GuestSpec,
        bridge: &str,
        more: &[&str],
    ) -> RunningGuest {
        let serial = log_dir(ns.name()).join(format!("{name}-{}.log", random_token()));
        let helper = workspace_binary("qnet-bridge-helper");
        let netdev = format!("bridge,id=n0,br={bridge},helper={}", helper.display());
        let mut qemu = sandboxed("qemu-system-x86_64", ns, config, None);
        qemu.args(spec.qemu_args(&netdev, &serial))
            .args(["-name", name])
            .args(qmp_client_args(&self.qmp_socket()))
            .args(more);
        RunningGuest::spawn(qemu, &serial).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `qnetctl --json ARGS` and returns the parsed reply, or the
    /// error line qnetctl printed.
    pub fn qnetctl(&self, args: &[&str]) -> Result<Value, String> {
        qnetctl_at(&self.ctl_socket(), args)
    }

    /// Runs `qnetctl ARGS`, which the daemon must refuse with an error
    /// saying each of `says`; returns the error.
    pub fn refused(&self, args: &[&str], says: &[&str]) -> String {
        let err = match self.qnetctl(args) {
            Ok(reply) => panic!("qnetctl {args:?} succeeded: {reply}"),
            Err(err) => err,
        };
        for part in says {
            assert!(err.contains(part), "qnetctl {args:?}: {err}");
        }
        err
    }

    /// Polls `check` with the daemon's replies until it is true.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Hookd) -> bool) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- hookd log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The running guests `qnetctl guests` lists.
    pub fn guests(&self) -> Vec<Value> {
        match self.qnetctl(&["guests"]) {
            Ok(reply) => reply["guests"].as_array().cloned().unwrap_or_default(),
            Err(e) => panic!("qnetctl guests: {e}"),
        }
    }

    /// The reservations of `network` as the state directory holds them
    /// (MAC → address), read from its journal `state/reservations/NET.jsonl`
    /// without the daemon: the last line of each MAC says what it holds.
    /// For tests of "persist, then publish". A line that does not parse
    /// (a torn last line) is skipped.
    pub fn saved_reservations(&self, network: &str) -> BTreeMap<String, String> {
        let path = self
            .dir()
            .join("state/reservations")
            .join(format!("{network}.jsonl"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut saved = BTreeMap::new();
        for entry in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let mac = entry["mac"].as_str().unwrap_or_default().to_string();
            match entry["reservation"]["ip"].as_str() {
                Some(ip) if entry["op"] == "set" => saved.insert(mac, ip.to_string()),
                _ => saved.remove(&mac),
            };
        }
        saved
    }

    /// The address reserved for `mac` on `network`, if any.
    pub fn reservation(&self, network: &str, mac: &str) -> Option<String> {
        let reply = self.qnetctl(&["reserve", "list", network]).unwrap();
        reply["reservations"]
            .as_array()?
            .iter()
            .find(|r| r["mac"] == mac)
            .and_then(|r| r["ip"].as_str().map(str::to_string))
    }
}

impl Drop for Hookd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `qnetctl --socket CTL --json ARGS` and returns the parsed reply,
/// or the error line qnetctl printed.
fn qnetctl_at(ctl: &Path, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(workspace_binary("qnetctl"))
        .arg("--socket")
        .arg(ctl)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bad JSON from qnetctl: {e}"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Runs `qnetctl --socket CTL ARGS`, which must fail (exit status 1), and
/// returns what it said on stderr.
pub fn qnetctl_error(ctl: &Path, args: &[&str]) -> String {
    let out = Command::new(workspace_binary("qnetctl"))
        .arg("--socket")
        .arg(ctl)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "qnetctl {args:?}: {stderr}");
    stderr
}

/// How many objects of the JSON array `list` (a reply's) have `key` equal
/// to `value`; panics if `list` is no array.
pub fn count_where(list: &Value, key: &str, value: &str) -> usize {
    let list = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"));
    list.iter().filter(|item| item[key] == value).count()
}

/// The QEMU arguments that make QEMU dial the daemon as a QMP client.
pub fn qmp_client_args(socket: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=qnet,path={},reconnect=1", socket.display()),
        "-mon".into(),
        "chardev=qnet,mode=control".into(),
    ]
}

/// The daemon's sockets, in a test's directory.
const CTL_SOCKET: &str = "ctl.sock";
const QMP_SOCKET: &str = "qmp.sock";

/// The daemon's paths for a test whose files are in `dir` (hookd.toml,
/// `state/`, the two sockets) and whose run directory is `run`.
fn path_args(dir: &Path, run: &Path) -> [std::ffi::OsString; 10] {
    [
        "--config".into(),
        dir.join("hookd.toml").into(),
        "--run-dir".into(),
        run.into(),
        "--state-dir".into(),
        dir.join("state").into(),
        "--ctl-socket".into(),
        dir.join(CTL_SOCKET).into(),
        "--qmp-socket".into(),
        dir.join(QMP_SOCKET).into(),
    ]
}

/// Runs `qnet-hookd` once in `netns` with `config` as its hookd.toml (and
/// every directory in a temporary one) and returns how it ended: for
/// configs it must refuse, where it exits before serving anything.
pub fn run_with_config(netns: &NetNs, config: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let run = run_tempdir(dir.path());
    std::fs::write(dir.path().join("hookd.toml"), config).unwrap();
    Command::new("ip")
        .args(["netns", "exec", netns.name()])
        .arg(workspace_binary("qnet-hookd"))
        .args(path_args(dir.path(), run.path()))
        .output()
        .unwrap()
}

/// A new run directory for the daemon, removed on drop: on tmpfs
/// (`/dev/shm`), as an install's `/run/qnet` is, since what the daemon
/// writes there unsynced (dnsmasq's hosts files, guests' records) costs
/// what tmpfs costs on a host, and the benches measure what an install
/// does. In `beside` (on TMPDIR's file system) where there is no
/// `/dev/shm`. Mode 0700 as a tempdir's: dnsmasq keeps root unless a test
/// opens it (`chmod 755`), as it did inside the 0700 `beside`.
fn run_tempdir(beside: &Path) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    tempfile::Builder::new()
        .prefix("qnet-test-run-")
        .tempdir_in(if shm.is_dir() { shm } else { beside })
        .unwrap()
}
