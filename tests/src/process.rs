//! The daemons a test runs (qnet-hookd, dockerd, firewalld, libvirtd):
//! started with their output in a log file, waited for until they serve,
//! and stopped by pid.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Starts `cmd`, the daemon `what`, with stdin closed and stdout and
/// stderr appended to the file `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path, what: &str) -> Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"))
}

/// Polls `ready` every `every` until the daemon `what` (`child`, logging
/// to `log`) serves; panics with its log if it exits first or is not
/// ready within `timeout` (a failure bound, not an expectation).
pub fn wait_serving(
    what: &str,
    child: &mut Child,
    log: &Path,
    timeout: Duration,
    every: Duration,
    mut ready: impl FnMut() -> bool,
) {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + timeout;
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited ({status}):\n{}", log());
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not answer within {timeout:?}:\n{}",
            log()
        );
        std::thread::sleep(every);
    }
}

/// SIGTERM, wait up to 20 s, then SIGKILL.
pub fn stop(child: &mut Child) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
