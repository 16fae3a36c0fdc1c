//! One supervised dnsmasq per network: DHCP with sticky reservations, DNS
//! for the guests' names, router advertisements when the network has IPv6.
//!
//! Files, for network `NET`:
//!
//! | file | what |
//! | --- | --- |
//! | `RUN/NET/dnsmasq.conf` | the only config dnsmasq reads (`--conf-file=`) |
//! | `RUN/NET/dhcp-hosts` | reservations, `MAC,IP[,NAME]` (SIGHUP re-reads) |
//! | `RUN/NET/dns-hosts` | names, `IP NAME.DOMAIN NAME` (SIGHUP re-reads) |
//! | `RUN/NET/dnsmasq.pid` | written by dnsmasq once it is listening |
//! | `RUN/NET/dnsmasq.log` | its log (`log-dhcp`) and stderr; rotated at 4 MiB to `.1` |
//! | `STATE/NET.leases` | leases; survives restarts and [`DnsmasqHandle::stop`] |
//!
//! dnsmasq runs with `--keep-in-foreground` as our child, so the supervisor
//! knows its real pid and exit status, but in a session of its own
//! (`setsid`): it does not die with the daemon (SIGTERM, a crash, a
//! terminal's SIGHUP). After a daemon restart, [`spawn`] finds it through
//! the pid file and replaces it (its leases are in the lease file).
//!
//! Every file is written atomically (temp file in the same directory,
//! fsync, rename).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::api::{Mac, Mode};
use crate::config::NetworkConfig;
use crate::fsutil::write_atomic;
use crate::logrelay::LogRelay;
use crate::procfs::{self, is_alive};
use crate::programs::find_program;

/// First restart delay; doubled after every quick exit up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A dnsmasq that ran this long before exiting restarts after [`MIN_BACKOFF`].
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long [`DnsmasqHandle::set_hosts`] waits for a (re)starting dnsmasq
/// before giving up on the SIGHUP (the files are in place either way).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dnsmasq gets to exit after SIGTERM before SIGKILL.
const TERM_TIMEOUT: Duration = Duration::from_secs(5);
const LOG_MAX_BYTES: u64 = 4 << 20;
const LOG_CHECK_EVERY: Duration = Duration::from_secs(30);
/// How often new lines of dnsmasq's log are relayed into the daemon's log.
const LOG_RELAY_EVERY: Duration = Duration::from_secs(1);
const READY_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum DnsmasqError {
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid host entry: {0}")]
    InvalidHost(String),
    /// dnsmasq is not running and ready: stopped, or still failing to
    /// start; `last_exit` says how its last run ended.
    #[error("dnsmasq for network `{network}` is not ready{}", last_exit.as_deref().map(|e| format!(" (last exit: {e})")).unwrap_or_default())]
    NotReady {
        network: String,
        last_exit: Option<String>,
    },
}

fn io_err(action: impl Into<String>) -> impl FnOnce(io::Error) -> DnsmasqError {
    let action = action.into();
    move |source| DnsmasqError::Io { action, source }
}

/// Where the daemon keeps runtime files (`run_dir`, e.g. `/run/qnet`) and
/// state that outlives a reboot of the daemon (`state_dir`, e.g.
/// `/var/lib/qnet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Paths {
    /// `RUN/<net>`: removed by [`DnsmasqHandle::stop`].
    pub fn net_dir(&self, net: &str) -> PathBuf {
        self.run_dir.join(net)
    }
    pub fn config_file(&self, net: &str) -> PathBuf {
        self.net_dir(net).join("dnsmasq.conf")
    }
    pub fn dhcp_hosts_file(&self, net: &str) -> PathBuf {
        self.net_dir(net).join("dhcp-hosts")
    }
    pub fn dns_hosts_file(&self, net: &str) -> PathBuf {
        self.net_dir(net).join("dns-hosts")
    }
    pub fn pid_file(&self, net: &str) -> PathBuf {
        self.net_dir(net).join("dnsmasq.pid")
    }
    pub fn log_file(&self, net: &str) -> PathBuf {
        self.net_dir(net).join("dnsmasq.log")
    }
    /// `STATE/<net>.leases`: kept by [`DnsmasqHandle::stop`].
    pub fn lease_file(&self, net: &str) -> PathBuf {
        self.state_dir.join(format!("{net}.leases"))
    }
}

/// A DHCP reservation: `mac` always gets `ip` (and, with a name, registers
/// it in DNS through DHCP).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DhcpHost {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub name: Option<String>,
}

/// A DNS name on the network: `name.DOMAIN` (and `name`) resolve to `ip`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsHost {
    pub ip: Ipv4Addr,
    pub name: String,
}

/// One DNS label: 1-63 letters, digits, `-`, not starting or ending with
/// `-`. Anything else could break the hosts files' syntax.
fn check_label(name: &str) -> Result<(), DnsmasqError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(DnsmasqError::InvalidHost(format!(
            "`{name}` is not a host name (1-63 of a-z, 0-9, `-`)"
        )))
    }
}

/// `RUN/<net>/dhcp-hosts`: one `MAC,IP[,NAME]` line per reservation,
/// sorted, so that equal sets of reservations give equal files.
pub fn render_dhcp_hosts(hosts: &[DhcpHost]) -> Result<String, DnsmasqError> {
    let mut lines = Vec::new();
    for host in hosts {
        let mac: Mac = host
            .mac
            .parse()
            .map_err(|e: crate::api::Invalid| DnsmasqError::InvalidHost(e.0))?;
        let line = match &host.name {
            Some(name) => {
                check_label(name)?;
                format!("{mac},{},{name}\n", host.ip)
            }
            None => format!("{mac},{}\n", host.ip),
        };
        lines.push(line);
    }
    lines.sort();
    lines.dedup();
    Ok(lines.concat())
}

/// `RUN/<net>/dns-hosts`: one `IP NAME.DOMAIN NAME` line per name, sorted.
pub fn render_dns_hosts(domain: &str, hosts: &[DnsHost]) -> Result<String, DnsmasqError> {
    let mut lines = Vec::new();
    for host in hosts {
        check_label(&host.name)?;
        lines.push(format!("{} {n}.{domain} {n}\n", host.ip, n = host.name));
    }
    lines.sort();
    lines.dedup();
    Ok(lines.concat())
}

/// `RUN/<net>/dnsmasq.conf` for `net`. With `run_as_root`, dnsmasq keeps
/// root instead of switching to its default unprivileged user (needed only
/// when that user could not read the hosts files again on SIGHUP).
pub fn render_config(net: &NetworkConfig, paths: &Paths, run_as_root: bool) -> String {
    let name = &net.name;
    let br = &net.bridge;
    let (start, end) = net.dhcp_range;
    let lease_max = u32::from(end) - u32::from(start) + 1;
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Generated by qnet-hookd for network \"{name}\": rewritten at every start."
    );
    let _ = writeln!(
        c,
        "# dnsmasq reads only this file (--conf-file); /etc/dnsmasq.* are ignored."
    );
    // Listen on our bridge only, bound to its addresses (several dnsmasq,
    // one per network, and any system resolver can then coexist);
    // bind-dynamic follows the bridge's addresses as they come and go.
    let _ = writeln!(c, "interface={br}");
    let _ = writeln!(c, "except-interface=lo");
    let _ = writeln!(c, "bind-dynamic");
    let _ = writeln!(c, "listen-address={}", net.router);
    if let Some(v6) = &net.ipv6 {
        let _ = writeln!(c, "listen-address={}", v6.router);
    }
    let _ = writeln!(c, "no-hosts");
    let _ = writeln!(c, "domain={}", net.domain);
    let _ = writeln!(c, "local=/{}/", net.domain);
    let _ = writeln!(c, "dhcp-range={start},{end},{},12h", net.subnet.netmask());
    let _ = writeln!(c, "dhcp-authoritative");
    let _ = writeln!(c, "dhcp-lease-max={lease_max}");
    if net.mode == Mode::Isolated {
        // No default route via the host: nothing is forwarded anyway.
        let _ = writeln!(c, "dhcp-option=option:router");
    }
    if let Some(v6) = &net.ipv6 {
        let _ = writeln!(c, "enable-ra");
        let _ = writeln!(
            c,
            "dhcp-range={},ra-stateless,{},12h",
            v6.subnet.network(),
            v6.subnet.prefix_len()
        );
        if net.mode == Mode::Isolated {
            // Advertise the prefix, not a default route.
            let _ = writeln!(c, "ra-param={br},60,0");
        }
    }
    let _ = writeln!(
        c,
        "dhcp-hostsfile={}",
        paths.dhcp_hosts_file(name).display()
    );
    let _ = writeln!(c, "addn-hosts={}", paths.dns_hosts_file(name).display());
    let _ = writeln!(c, "dhcp-leasefile={}", paths.lease_file(name).display());
    let _ = writeln!(c, "pid-file={}", paths.pid_file(name).display());
    let _ = writeln!(c, "log-facility={}", paths.log_file(name).display());
    let _ = writeln!(c, "log-dhcp");
    if run_as_root {
        let _ = writeln!(c, "user=root");
    }
    c
}

/// Whether every directory from `/` down to `dir` lets others in, i.e.
/// whether dnsmasq's unprivileged user can reach files in `dir`.
fn traversable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|d| {
        d.as_os_str().is_empty()
            || d.metadata()
                .map(|m| m.permissions().mode() & 0o001 != 0)
                .unwrap_or(false)
    })
}

/// What the supervisor reports.
#[derive(Debug, Clone, Default)]
struct Status {
    pid: Option<u32>,
    /// The running dnsmasq has written its pid file: it is listening and
    /// handles SIGHUP.
    ready: bool,
    /// How the last run ended, for error messages.
    last_exit: Option<String>,
    /// The supervisor has ended (stopped or detached).
    finished: bool,
}

/// A running, supervised dnsmasq. Dropping the handle stops supervising
/// and leaves dnsmasq running (as a daemon crash would): call
/// [`stop`](Self::stop) to end it.
#[derive(Debug)]
pub struct DnsmasqHandle {
    network: String,
    domain: String,
    paths: Paths,
    status: watch::Receiver<Status>,
    stop_tx: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// The hosts files' contents as last written: (dhcp-hosts, dns-hosts).
    hosts: Mutex<(String, String)>,
}

/// Everything the supervisor needs, owned.
struct Supervised {
    network: String,
    program: PathBuf,
    config: PathBuf,
    pid_file: PathBuf,
    log_file: PathBuf,
}

/// Writes `net`'s files and starts its dnsmasq under supervision. Must be
/// called within a tokio runtime; returns at once (see
/// [`DnsmasqHandle::wait_ready`]).
///
/// A dnsmasq left by a previous daemon (its pid file names a live process
/// whose command line has our `--conf-file=`) is terminated first; its
/// leases are in the lease file, which the new one reads. Existing hosts
/// files are kept until the next [`DnsmasqHandle::set_hosts`], so guests
/// keep their reservations across the restart.
pub fn spawn(net: &NetworkConfig, paths: &Paths) -> Result<DnsmasqHandle, DnsmasqError> {
    let name = net.name.as_str();
    let dir = paths.net_dir(name);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    // dnsmasq re-reads the hosts files as its unprivileged user on SIGHUP.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("setting the mode of {}", dir.display())))?;
    std::fs::create_dir_all(&paths.state_dir)
        .map_err(io_err(format!("creating {}", paths.state_dir.display())))?;

    let run_as_root = !traversable_by_others(&dir);
    if run_as_root {
        tracing::info!(
            network = name,
            "{} is not reachable by unprivileged users: dnsmasq keeps running as root",
            dir.display()
        );
    }
    let config = paths.config_file(name);
    write_atomic(
        &config,
        render_config(net, paths, run_as_root).as_bytes(),
        0o644,
    )
    .map_err(io_err(format!("writing {}", config.display())))?;

    let mut hosts = (String::new(), String::new());
    for (path, slot) in [
        (paths.dhcp_hosts_file(name), &mut hosts.0),
        (paths.dns_hosts_file(name), &mut hosts.1),
    ] {
        match std::fs::read_to_string(&path) {
            Ok(text) => *slot = text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&path, b"", 0o644)
                    .map_err(io_err(format!("writing {}", path.display())))?;
            }
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        }
    }

    let (status_tx, status) = watch::channel(Status::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let supervised = Supervised {
        network: name.to_owned(),
        program: find_program("dnsmasq"),
        config,
        pid_file: paths.pid_file(name),
        log_file: paths.log_file(name),
    };
    let task = tokio::spawn(supervise(supervised, status_tx, stop_rx));
    Ok(DnsmasqHandle {
        network: name.to_owned(),
        domain: net.domain.to_string(),
        paths: paths.clone(),
        status,
        stop_tx,
        task,
        hosts: Mutex::new(hosts),
    })
}

impl DnsmasqHandle {
    /// The pid of the running dnsmasq, if one is running.
    pub fn pid(&self) -> Option<u32> {
        self.status.borrow().pid
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    /// Waits until a dnsmasq is running and listening (it has written its
    /// pid file) and returns its pid.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<u32, DnsmasqError> {
        let mut rx = self.status.clone();
        let wait = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if let (true, Some(pid)) = (s.ready, s.pid) {
                        return Some(pid);
                    }
                    if s.finished {
                        return None;
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(pid)) => Ok(pid),
            _ => Err(DnsmasqError::NotReady {
                network: self.network.clone(),
                last_exit: self.status.borrow().last_exit.clone(),
            }),
        }
    }

    /// Replaces the reservations and names: rewrites both hosts files
    /// atomically and sends SIGHUP (dnsmasq re-reads them; no restart).
    /// Does nothing if both are unchanged. A dnsmasq that is just starting
    /// gets its SIGHUP once it is ready (waiting at most [`READY_TIMEOUT`]);
    /// one that is not running (restart backoff) reads the files when it
    /// starts, so this does not wait for it.
    pub async fn set_hosts(
        &self,
        dhcp: Vec<DhcpHost>,
        dns: Vec<DnsHost>,
    ) -> Result<(), DnsmasqError> {
        let new = (
            render_dhcp_hosts(&dhcp)?,
            render_dns_hosts(&self.domain, &dns)?,
        );
        let mut current = self.hosts.lock().await;
        if *current == new {
            return Ok(());
        }
        let dhcp_path = self.paths.dhcp_hosts_file(&self.network);
        let dns_path = self.paths.dns_hosts_file(&self.network);
        // Only the file that changed (each write is a temp file, fsync
        // and rename): a guest starting or stopping usually changes the
        // DNS names only, its reservation being sticky.
        if current.0 != new.0 {
            write_atomic(&dhcp_path, new.0.as_bytes(), 0o644)
                .map_err(io_err(format!("writing {}", dhcp_path.display())))?;
            current.0 = new.0;
        }
        if current.1 != new.1 {
            write_atomic(&dns_path, new.1.as_bytes(), 0o644)
                .map_err(io_err(format!("writing {}", dns_path.display())))?;
            current.1 = new.1;
        }
        // A dnsmasq that is starting (running, pid file not yet written)
        // may have read the old files and cannot take SIGHUP yet: wait for
        // it. One in its restart backoff will read the new files anyway.
        let mut rx = self.status.clone();
        let target = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    match (s.pid, s.ready) {
                        (Some(pid), true) => return Some(pid),
                        (None, _) => return None,
                        (Some(_), false) if s.finished => return None,
                        (Some(_), false) => {}
                    }
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match target {
            Ok(Some(pid)) => {
                // Our child, not yet reaped while the status says ready, so
                // the pid cannot have been reused.
                match kill(Pid::from_raw(pid as i32), Signal::SIGHUP) {
                    Ok(()) => tracing::debug!(network = %self.network, pid, "dnsmasq: SIGHUP"),
                    Err(e) => {
                        tracing::warn!(network = %self.network, pid, "cannot SIGHUP dnsmasq: {e}")
                    }
                }
            }
            Ok(None) => tracing::debug!(
                network = %self.network,
                "dnsmasq not running: it reads the new hosts files when it starts"
            ),
            Err(_) => tracing::warn!(
                network = %self.network,
                "dnsmasq has not become ready within {READY_TIMEOUT:?}: hosts files updated \
                 without SIGHUP"
            ),
        }
        Ok(())
    }

    /// Stops dnsmasq (SIGTERM, then SIGKILL after 5 s), waits for it, and
    /// removes `RUN/<net>`. The lease file is kept.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(network = %self.network, "dnsmasq supervisor failed: {e}");
        }
        let dir = self.paths.net_dir(&self.network);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(network = %self.network, "cannot remove {}: {e}", dir.display())
            }
        }
    }
}

/// Why the supervisor stopped waiting.
enum Event {
    Exited(io::Result<ExitStatus>),
    Stop,
    Detach,
}

async fn supervise(s: Supervised, status: watch::Sender<Status>, mut stop: watch::Receiver<bool>) {
    let finish = |status: &watch::Sender<Status>| {
        status.send_modify(|st| {
            st.pid = None;
            st.ready = false;
            st.finished = true;
        })
    };
    replace_stale(&s).await;
    let mut delay = MIN_BACKOFF;
    loop {
        if *stop.borrow() {
            finish(&status);
            return;
        }
        let started = Instant::now();
        let outcome = match start(&s) {
            Ok(mut child) => {
                let pid = child.id();
                tracing::info!(network = %s.network, pid, "dnsmasq started");
                status.send_modify(|st| {
                    st.pid = pid;
                    st.ready = false;
                });
                let event = watch_child(&s, &mut child, pid, &status, &mut stop).await;
                match event {
                    Event::Exited(result) => {
                        status.send_modify(|st| {
                            st.pid = None;
                            st.ready = false;
                        });
                        match result {
                            Ok(code) => format!("{code}"),
                            Err(e) => format!("cannot wait for it: {e}"),
                        }
                    }
                    Event::Stop => {
                        terminate(&s.network, child, pid).await;
                        finish(&status);
                        return;
                    }
                    Event::Detach => {
                        // Handle dropped: leave dnsmasq running, unsupervised.
                        tracing::info!(network = %s.network, pid, "no longer supervising dnsmasq");
                        finish(&status);
                        return;
                    }
                }
            }
            Err(e) => format!("cannot start {}: {e}", s.program.display()),
        };
        if started.elapsed() >= STABLE_AFTER {
            delay = MIN_BACKOFF;
        }
        let detail = match last_log_line(&s.log_file) {
            Some(line) => format!("{outcome}; last log line: {line}"),
            None => outcome,
        };
        tracing::warn!(
            network = %s.network,
            "dnsmasq exited unexpectedly ({detail}); restarting in {delay:?}"
        );
        status.send_modify(|st| st.last_exit = Some(detail));
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

/// Waits for the child to exit or for a stop request; meanwhile marks it
/// ready once it has written its pid file, and keeps the log small.
async fn watch_child(
    s: &Supervised,
    child: &mut tokio::process::Child,
    pid: Option<u32>,
    status: &watch::Sender<Status>,
    stop: &mut watch::Receiver<bool>,
) -> Event {
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
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
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
    let Some(pid) = read_pid_file(&s.pid_file) else {
        return;
    };
    if !runs_our_config(pid, &s.config) {
        return;
    }
    tracing::info!(network = %s.network, pid, "replacing the dnsmasq left by a previous run");
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
    tracing::warn!(network = %s.network, pid, "the old dnsmasq does not die");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Ipv6Config;

    fn lab() -> NetworkConfig {
        NetworkConfig {
            name: "lab".parse().unwrap(),
            bridge: "qnlab".parse().unwrap(),
            mode: Mode::Nat,
            subnet: "10.42.0.0/24".parse().unwrap(),
            router: Ipv4Addr::new(10, 42, 0, 1),
            dhcp_range: (Ipv4Addr::new(10, 42, 0, 100), Ipv4Addr::new(10, 42, 0, 199)),
            domain: "lab.qnet".parse().unwrap(),
            uplink: None,
            blocked_ports: Vec::new(),
            ipv6: None,
        }
    }

    fn paths() -> Paths {
        Paths {
            run_dir: "/run/qnet".into(),
            state_dir: "/var/lib/qnet".into(),
        }
    }

    #[test]
    fn config_for_a_nat_network() {
        let expected = "\
# Generated by qnet-hookd for network \"lab\": rewritten at every start.
# dnsmasq reads only this file (--conf-file); /etc/dnsmasq.* are ignored.
interface=qnlab
except-interface=lo
bind-dynamic
listen-address=10.42.0.1
no-hosts
domain=lab.qnet
local=/lab.qnet/
dhcp-range=10.42.0.100,10.42.0.199,255.255.255.0,12h
dhcp-authoritative
dhcp-lease-max=100
dhcp-hostsfile=/run/qnet/lab/dhcp-hosts
addn-hosts=/run/qnet/lab/dns-hosts
dhcp-leasefile=/var/lib/qnet/lab.leases
pid-file=/run/qnet/lab/dnsmasq.pid
log-facility=/run/qnet/lab/dnsmasq.log
log-dhcp
";
        assert_eq!(render_config(&lab(), &paths(), false), expected);
        assert!(render_config(&lab(), &paths(), true).ends_with("log-dhcp\nuser=root\n"));
    }

    #[test]
    fn config_with_ipv6_and_isolation() {
        let mut net = lab();
        net.mode = Mode::Isolated;
        net.ipv6 = Some(Ipv6Config {
            subnet: "fd42::/64".parse().unwrap(),
            router: "fd42::1".parse().unwrap(),
        });
        let text = render_config(&net, &paths(), false);
        for line in [
            "listen-address=fd42::1\n",
            "enable-ra\n",
            "dhcp-range=fd42::,ra-stateless,64,12h\n",
            "ra-param=qnlab,60,0\n",
            "dhcp-option=option:router\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
    }

    #[test]
    fn hosts_files_are_sorted_validated_lines() {
        let dhcp = vec![
            DhcpHost {
                mac: "52:54:00:00:00:02".into(),
                ip: Ipv4Addr::new(10, 42, 0, 12),
                name: None,
            },
            DhcpHost {
                mac: "52:54:00:AA:00:01".into(),
                ip: Ipv4Addr::new(10, 42, 0, 11),
                name: Some("web".into()),
            },
        ];
        assert_eq!(
            render_dhcp_hosts(&dhcp).unwrap(),
            "52:54:00:00:00:02,10.42.0.12\n52:54:00:aa:00:01,10.42.0.11,web\n"
        );
        let dns = vec![DnsHost {
            ip: Ipv4Addr::new(10, 42, 0, 11),
            name: "web".into(),
        }];
        assert_eq!(
            render_dns_hosts("lab.qnet", &dns).unwrap(),
            "10.42.0.11 web.lab.qnet web\n"
        );
        let bad_name = DhcpHost {
            name: Some("a,b".into()),
            ..dhcp[0].clone()
        };
        assert!(render_dhcp_hosts(&[bad_name]).is_err());
        let bad_mac = DhcpHost {
            mac: "nope".into(),
            ..dhcp[0].clone()
        };
        assert!(render_dhcp_hosts(&[bad_mac]).is_err());
        let bad_dns = DnsHost {
            ip: Ipv4Addr::new(10, 42, 0, 11),
            name: "x\ny".into(),
        };
        assert!(render_dns_hosts("lab.qnet", &[bad_dns]).is_err());
    }
}
