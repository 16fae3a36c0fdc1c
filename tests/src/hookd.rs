//! Running `qnet-hookd` inside a test namespace, and talking to it with
//! the real `qnetctl`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::NetNs;
use crate::workspace_binary;

/// A qnet-hookd process with its own config, run and state directories.
/// Dropping it kills the daemon (the namespace's own drop kills dnsmasq).
pub struct Hookd {
    netns_name: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Hookd {
    /// Starts the daemon in `netns` with `config` as hookd.toml (`None`:
    /// no config file, so the default network) and waits until it answers.
    pub fn start(netns: &NetNs, config: Option<&str>) -> Hookd {
        let mut hookd = Hookd::prepare(netns, config);
        hookd.spawn();
        hookd
    }

    /// Like [`Hookd::start`], but does not start the daemon: a test starts
    /// [`Hookd::command`] its own way and hands the process to
    /// [`Hookd::adopt`].
    pub fn prepare(netns: &NetNs, config: Option<&str>) -> Hookd {
        let dir = tempfile::Builder::new()
            .prefix("qnet-test-hookd-")
            .tempdir()
            .unwrap();
        if let Some(text) = config {
            std::fs::write(dir.path().join("hookd.toml"), text).unwrap();
        }
        Hookd {
            netns_name: netns.name().to_string(),
            dir,
            child: None,
        }
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
            .open(self.dir().join("hookd.log"))
            .unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.dir().join("qmp.sock")
    }

    pub fn ctl_socket(&self) -> PathBuf {
        self.dir().join("ctl.sock")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir().join("run")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("hookd.log")).unwrap_or_default()
    }

    /// The command line of the daemon (for tests of bad configs too).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns_name])
            .arg(workspace_binary("qnet-hookd"))
            .arg("--config")
            .arg(self.dir().join("hookd.toml"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--state-dir")
            .arg(self.dir().join("state"))
            .arg("--ctl-socket")
            .arg(self.ctl_socket())
            .arg("--qmp-socket")
            .arg(self.qmp_socket())
            .arg("--log")
            .arg("debug");
        cmd
    }

    /// (Re)starts the daemon and waits until `status` answers.
    pub fn spawn(&mut self) {
        let log = self.log_file();
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start qnet-hookd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.qnetctl(&["status"]).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("qnet-hookd exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "qnet-hookd did not answer:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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

    /// Runs `qnetctl --json ARGS` and returns the parsed reply, or the
    /// error line qnetctl printed.
    pub fn qnetctl(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(workspace_binary("qnetctl"))
            .arg("--socket")
            .arg(self.ctl_socket())
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

/// The QEMU arguments that make QEMU dial the daemon as a QMP client.
pub fn qmp_client_args(socket: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=qnet,path={},reconnect=1", socket.display()),
        "-mon".into(),
        "chardev=qnet,mode=control".into(),
    ]
}
