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
    env: Vec<(String, String)>,
}

impl Hookd {
    /// Starts the daemon in `netns` with `config` as hookd.toml (`None`:
    /// no config file, so the default network) and waits until it answers.
    pub fn start(netns: &NetNs, config: Option<&str>) -> Hookd {
        Hookd::start_with_env(netns, config, &[])
    }

    /// [`Hookd::start`] with extra environment variables (kept for
    /// restarts), e.g. `DBUS_SYSTEM_BUS_ADDRESS` of a private bus.
    pub fn start_with_env(netns: &NetNs, config: Option<&str>, env: &[(&str, &str)]) -> Hookd {
        let dir = tempfile::Builder::new()
            .prefix("qnet-test-hookd-")
            .tempdir()
            .unwrap();
        if let Some(text) = config {
            std::fs::write(dir.path().join("hookd.toml"), text).unwrap();
        }
        let mut hookd = Hookd {
            netns_name: netns.name().to_string(),
            dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        hookd.spawn();
        hookd
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
            .arg("debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// (Re)starts the daemon and waits until `status` answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("hookd.log"))
            .unwrap();
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
