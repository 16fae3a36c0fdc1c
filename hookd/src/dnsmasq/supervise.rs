//! The supervisor: runs one dnsmasq as our child (in a session of its
//! own), restarts it with backoff when it exits, reports its status, and
//! replaces one a previous daemon left running.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

use super::*;
use crate::logrelay::LogRelay;
use crate::procfs::{self, is_alive};

/// Everything the supervisor needs, owned.
pub(super) struct Supervised {
    pub(super) network: String,
    pub(super) program: PathBuf,
    pub(super) config: PathBuf,
    pub(super) pid_file: PathBuf,
    pub(super) log_file: PathBuf,
}

/// What the supervisor reports.
#[derive(Debug, Clone, Default)]
pub(super) struct Status {
    pub(super) pid: Option<u32>,
    /// The running dnsmasq has written its pid file: it is listening and
    /// handles SIGHUP.
    pub(super) ready: bool,
    /// How the last run ended, for error messages.
    pub(super) last_exit: Option<String>,
    /// Runs in a row that ended before [`STABLE_AFTER`].
    pub(super) quick_exits: u32,
    /// The supervisor has ended (stopped or detached).
    pub(super) finished: bool,
}

/// One run of dnsmasq.
#[derive(Clone, Copy)]
struct Run {
    pid: Option<u32>,
    started: Instant,
}

/// Why the supervisor stopped waiting.
enum Event {
    Exited(io::Result<ExitStatus>),
    Stop,
    Detach,
}

pub(super) async fn supervise(
    s: Supervised,
    status: watch::Sender<Status>,
    mut stop: watch::Receiver<bool>,
) {
    replace_stale(&s).await;
    let mut delay = MIN_BACKOFF;
    loop {
        if *stop.borrow() {
            finish(&status);
            return;
        }
        let started = Instant::now();
        let Some(outcome) = run_once(&s, started, &status, &mut stop).await else {
            return;
        };
        let quick = started.elapsed() < STABLE_AFTER;
        if !quick {
            delay = MIN_BACKOFF;
        }
        report_exit(&s, outcome, quick, delay, &status);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    finish(&status);
                    return;
                }
            }
        }
        delay = (delay * 2).min(MAX_BACKOFF);
    }
}

/// The supervisor has ended: no dnsmasq of its own any more.
fn finish(status: &watch::Sender<Status>) {
    status.send_modify(|st| {
        st.pid = None;
        st.ready = false;
        st.finished = true;
    })
}

/// Starts dnsmasq once and waits for it. `Some(why)`: it exited, or could
/// not start, and is to be started again; `None`: supervision has ended
/// (stopped or detached), and `status` says so.
async fn run_once(
    s: &Supervised,
    started: Instant,
    status: &watch::Sender<Status>,
    stop: &mut watch::Receiver<bool>,
) -> Option<String> {
    let mut child = match start(s) {
        Ok(child) => child,
        Err(e) => return Some(format!("cannot start {}: {e}", s.program.display())),
    };
    let pid = child.id();
    tracing::info!(network = %s.network, pid, "dnsmasq started");
    status.send_modify(|st| {
        st.pid = pid;
        st.ready = false;
    });
    let run = Run { pid, started };
    match watch_child(s, &mut child, run, status, stop).await {
        Event::Exited(result) => {
            status.send_modify(|st| {
                st.pid = None;
                st.ready = false;
            });
            Some(match result {
                Ok(code) => format!("{code}"),
                Err(e) => format!("cannot wait for it: {e}"),
            })
        }
        Event::Stop => {
            terminate(&s.network, child, pid).await;
            finish(status);
            None
        }
        Event::Detach => {
            // Handle dropped: leave dnsmasq running, unsupervised.
            tracing::info!(network = %s.network, pid, "no longer supervising dnsmasq");
            finish(status);
            None
        }
    }
}

/// Says why dnsmasq exited (with its last log line) and counts quick exits.
fn report_exit(
    s: &Supervised,
    outcome: String,
    quick: bool,
    delay: Duration,
    status: &watch::Sender<Status>,
) {
    let detail = match last_log_line(&s.log_file) {
        Some(line) => format!("{outcome}; last log line: {line}"),
        None => outcome,
    };
    tracing::warn!(
        network = %s.network,
        "dnsmasq exited unexpectedly ({detail}); restarting in {delay:?}"
    );
    status.send_modify(|st| {
        st.last_exit = Some(detail);
        st.quick_exits = if quick { st.quick_exits + 1 } else { 0 };
    });
}

/// Waits for the child to exit or for a stop request; meanwhile marks it
/// ready once it has written its pid file, and keeps the log small.
async fn watch_child(
    s: &Supervised,
    child: &mut tokio::process::Child,
    run: Run,
    status: &watch::Sender<Status>,
    stop: &mut watch::Receiver<bool>,
) -> Event {
    let pid = run.pid;
    let mut ready = false;
    let mut last_log_check = Instant::now();
    let mut relay = LogRelay::new(&s.log_file);
    loop {
        let tick = if ready { LOG_RELAY_EVERY } else { READY_POLL };
        tokio::select! {
            result = child.wait() => return Event::Exited(result),
            changed = stop.changed() => match changed {
                Err(_) => return Event::Detach,
                Ok(()) if *stop.borrow() => return Event::Stop,
                Ok(()) => {}
            },
            _ = tokio::time::sleep(tick) => {
                if !ready && pid.is_some() && read_pid_file(&s.pid_file) == pid {
                    ready = true;
                    status.send_modify(|st| st.ready = true);
                    tracing::debug!(network = %s.network, ?pid, "dnsmasq is ready");
                }
                for line in relay.new_lines() {
                    tracing::info!(network = %s.network, "dnsmasq: {line}");
                }
                if ready && run.started.elapsed() >= STABLE_AFTER {
                    // Running steadily again: no longer degraded.
                    status.send_if_modified(|st| std::mem::take(&mut st.quick_exits) > 0);
                }
                if last_log_check.elapsed() >= LOG_CHECK_EVERY {
                    last_log_check = Instant::now();
                    rotate_log(&s.network, &s.log_file);
                }
            }
        }
    }
}

fn start(s: &Supervised) -> io::Result<tokio::process::Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&s.log_file)?;
    let mut cmd = tokio::process::Command::new(&s.program);
    cmd.arg(format!("--conf-file={}", s.config.display()))
        .arg("--keep-in-foreground")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(false);
    // SAFETY: setsid() is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    cmd.spawn()
}

/// SIGTERM, wait up to [`TERM_TIMEOUT`], then SIGKILL.
async fn terminate(network: &str, mut child: tokio::process::Child, pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
    match tokio::time::timeout(TERM_TIMEOUT, child.wait()).await {
        Ok(Ok(st)) => tracing::info!(network, ?pid, "dnsmasq stopped ({st})"),
        Ok(Err(e)) => tracing::warn!(network, ?pid, "waiting for dnsmasq: {e}"),
        Err(_) => {
            tracing::warn!(network, ?pid, "dnsmasq ignored SIGTERM: killing it");
            let _ = child.kill().await;
        }
    }
}

fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Terminates a dnsmasq left by a previous daemon for this network: the
/// pid file's process, if it is a live dnsmasq started with our config.
async fn replace_stale(s: &Supervised) {
    stop_stale(&s.network, &s.pid_file, &s.config).await;
}

/// Stops the dnsmasq `pid_file` names if it runs `config` (one a previous
/// daemon started).
pub(super) async fn stop_stale(network: &str, pid_file: &Path, config: &Path) {
    let Some(pid) = read_pid_file(pid_file) else {
        return;
    };
    if !runs_our_config(pid, config) {
        return;
    }
    tracing::info!(network, pid, "stopping the dnsmasq left by a previous run");
    let target = Pid::from_raw(pid as i32);
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        if kill(target, signal).is_err() {
            return;
        }
        let deadline = Instant::now() + TERM_TIMEOUT;
        while Instant::now() < deadline {
            if !is_alive(pid) {
                return;
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }
    tracing::warn!(network, pid, "the old dnsmasq does not die");
}

/// Whether `pid` is a dnsmasq whose command line has `--conf-file=CONFIG`.
fn runs_our_config(pid: u32, config: &Path) -> bool {
    let args = procfs::cmdline(pid);
    let is_dnsmasq = args
        .first()
        .is_some_and(|argv0| argv0.rsplit(|b| *b == b'/').next() == Some(b"dnsmasq"));
    let wanted = format!("--conf-file={}", config.display());
    is_dnsmasq && args[1..].iter().any(|a| a == wanted.as_bytes())
}

/// The last non-empty line of the log, for exit messages.
fn last_log_line(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// Copies a log over 4 MiB to `.1` and truncates it in place (dnsmasq
/// appends through its open descriptor, so nothing needs reopening).
fn rotate_log(network: &str, path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.len() <= LOG_MAX_BYTES {
        return;
    }
    let old = path.with_extension("log.1");
    let result = std::fs::copy(path, &old)
        .and_then(|_| OpenOptions::new().write(true).open(path)?.set_len(0));
    match result {
        Ok(()) => tracing::debug!(network, "rotated {}", path.display()),
        Err(e) => tracing::warn!(network, "cannot rotate {}: {e}", path.display()),
    }
}
