//! One supervised dnsmasq per network: DHCP with sticky reservations, DNS
//! for the guests' names, router advertisements when the network has IPv6.
//!
//! Files, for network `NET`:
//!
//! | file | what |
//! | --- | --- |
//! | `RUN/NET/dnsmasq.conf` | the only config dnsmasq reads (`--conf-file=`) |
//! | `RUN/NET/dhcp-hosts.d/MAC` | one reservation each, `MAC,IP[,NAME]` |
//! | `RUN/NET/dns-hosts.d/NAME` | one name each, `IP NAME.DOMAIN NAME` |
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
//! rename), so dnsmasq never reads half a file. None is fsynced: they are
//! all derived from the daemon's state, and a start reads the hosts files
//! back and rewrites every one that is missing or differs, so one a power
//! cut lost or left empty is made again before anything is published.
//! dnsmasq reads a new hosts file by itself; a changed or removed one
//! takes a SIGHUP, apart from names with dnsmasq 2.89 and later (see
//! `hosts` and `version`).

mod conf;
mod hosts;
mod supervise;
mod version;

pub use conf::render_config;
use hosts::Hosts;
pub use hosts::{DhcpHost, DnsHost, HostUpdate};
use supervise::{stop_stale, supervise, Status, Supervised};

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::config::{Addressing, NetworkConfig};
use crate::fsutil::write_atomic_unsynced;
use crate::programs::find_program;

/// First restart delay; doubled after every quick exit up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A dnsmasq that ran this long before exiting restarts after [`MIN_BACKOFF`].
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long [`DnsmasqHandle::set_hosts`] waits for a (re)starting dnsmasq
/// before giving up on the SIGHUP (the files are in place either way).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// After this many quick exits in a row (runs shorter than
/// [`STABLE_AFTER`]) the network is reported degraded.
pub const DEGRADED_AFTER: u32 = 2;
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
    pub fn dhcp_hosts_dir(&self, net: &str) -> PathBuf {
        self.net_dir(net).join("dhcp-hosts.d")
    }
    pub fn dns_hosts_dir(&self, net: &str) -> PathBuf {
        self.net_dir(net).join("dns-hosts.d")
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
    /// What the hosts directories hold, as last written.
    hosts: Mutex<Published>,
    /// Whether this dnsmasq follows changed and removed name files by
    /// itself (2.89 and later), so that only reservations take a SIGHUP.
    names_follow_files: bool,
}

/// Writes `net`'s files (`own`: its addressing) and starts its dnsmasq
/// under supervision. Must be called within a tokio runtime; returns at
/// once (see [`DnsmasqHandle::wait_ready`]).
///
/// A dnsmasq left by a previous daemon (its pid file names a live process
/// whose command line has our `--conf-file=`) is terminated first; its
/// leases are in the lease file, which the new one reads. Existing hosts
/// files are kept until the next [`DnsmasqHandle::set_hosts`], so guests
/// keep their reservations across the restart.
pub fn spawn(
    net: &NetworkConfig,
    own: &Addressing,
    paths: &Paths,
) -> Result<DnsmasqHandle, DnsmasqError> {
    let name = net.name.as_str();
    let dir = paths.net_dir(name);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    // dnsmasq re-reads the hosts files as its unprivileged user on SIGHUP.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("setting the mode of {}", dir.display())))?;
    std::fs::create_dir_all(&paths.state_dir)
        .map_err(io_err(format!("creating {}", paths.state_dir.display())))?;

    let run_as_root = !conf::traversable_by_others(&dir);
    if run_as_root {
        tracing::info!(
            network = name,
            "{} is not reachable by unprivileged users: dnsmasq keeps running as root",
            dir.display()
        );
    }
    let config = paths.config_file(name);
    write_atomic_unsynced(
        &config,
        conf::render_config(net, own, paths, run_as_root).as_bytes(),
        0o644,
    )
    .map_err(io_err(format!("writing {}", config.display())))?;

    let domain = own.domain.to_string();
    let hosts = read_hosts(paths, name, &domain)?;

    let (status_tx, status) = watch::channel(Status::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let program = find_program("dnsmasq");
    let names_follow_files = version::names_follow_files(&program);
    let supervised = Supervised {
        network: name.to_owned(),
        program,
        config,
        pid_file: paths.pid_file(name),
        log_file: paths.log_file(name),
    };
    let task = tokio::spawn(supervise(supervised, status_tx, stop_rx));
    Ok(DnsmasqHandle {
        network: name.to_owned(),
        domain,
        paths: paths.clone(),
        status,
        stop_tx,
        task,
        hosts: Mutex::new(Published {
            hosts,
            synced: false,
        }),
        names_follow_files,
    })
}

/// The hosts files of `net`, as [`DnsmasqHandle`] last wrote them.
#[derive(Debug)]
struct Published {
    hosts: Hosts,
    /// Whether `hosts` is what the state said at the last call: false
    /// until the first [`DnsmasqHandle::set_hosts`] (the files are a
    /// previous daemon's) and after a write failed.
    synced: bool,
}

/// Both hosts directories of `net`, read back (see [`read_hosts_dir`]).
fn read_hosts(paths: &Paths, net: &str, domain: &str) -> Result<Hosts, DnsmasqError> {
    Ok(Hosts {
        dhcp: read_hosts_dir(&paths.dhcp_hosts_dir(net), hosts::parse_dhcp)?,
        dns: read_hosts_dir(&paths.dns_hosts_dir(net), |file, text| {
            hosts::parse_dns(domain, file, text)
        })?,
    })
}

/// Makes `dir` (mode 0755: dnsmasq re-reads it as its unprivileged user)
/// and reads back the hosts files a previous daemon left in it, which the
/// new dnsmasq reads too. Any other file goes: temp files (`.`-prefixed)
/// of a write a crash interrupted, and files that do not read back as what
/// this daemon writes (cut short by a power cut, edited by hand). Whatever
/// the state still holds of them is written again by the first
/// [`DnsmasqHandle::set_hosts`].
fn read_hosts_dir<K: Ord, V>(
    dir: &Path,
    parse: impl Fn(&str, &str) -> Option<(K, V)>,
) -> Result<BTreeMap<K, V>, DnsmasqError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("setting the mode of {}", dir.display())))?;
    let mut files = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(io_err(format!("reading {}", dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let read = name
            .to_str()
            .filter(|n| !n.starts_with('.'))
            .and_then(|name| {
                let text = std::fs::read_to_string(entry.path()).ok()?;
                parse(name, &text)
            });
        match read {
            Some((key, value)) => {
                files.insert(key, value);
            }
            None => {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(files)
}

fn apply(dir: &Path, change: &hosts::Change) -> Result<(), DnsmasqError> {
    for (name, text) in &change.write {
        let path = dir.join(name);
        write_atomic_unsynced(&path, text.as_bytes(), 0o644)
            .map_err(io_err(format!("writing {}", path.display())))?;
    }
    for name in &change.remove {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", path.display()))(e)),
        }
    }
    Ok(())
}

impl DnsmasqHandle {
    /// The pid of the running dnsmasq, if one is running.
    pub fn pid(&self) -> Option<u32> {
        self.status.borrow().pid
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    /// Whether this dnsmasq follows changed and removed name files without
    /// a SIGHUP (2.89 and later; see `version`).
    pub fn names_follow_files(&self) -> bool {
        self.names_follow_files
    }

    /// Why the network's DHCP and DNS do not work although it is up:
    /// dnsmasq keeps exiting (a read-only lease file, a port taken), or
    /// `None` while it runs.
    pub fn degraded(&self) -> Option<String> {
        let s = self.status.borrow();
        (s.quick_exits >= DEGRADED_AFTER).then(|| {
            format!(
                "dnsmasq exited {} times in a row{}; see the daemon's log",
                s.quick_exits,
                s.last_exit
                    .as_deref()
                    .map(|e| format!(" (last: {e})"))
                    .unwrap_or_default()
            )
        })
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

    /// Replaces the reservations and names: writes the hosts files that
    /// are new or changed and removes those that went. A running dnsmasq
    /// reads new files by itself; a changed or removed one takes a SIGHUP
    /// (no restart), apart from a name file with dnsmasq 2.89 and later.
    /// A dnsmasq that is just starting gets its SIGHUP once
    /// it is ready (waiting at most [`READY_TIMEOUT`]); one that is not
    /// running (restart backoff) reads the files when it starts.
    pub async fn set_hosts(
        &self,
        dhcp: Vec<DhcpHost>,
        dns: Vec<DnsHost>,
    ) -> Result<(), DnsmasqError> {
        let mut published = self.hosts.lock().await;
        let new = Hosts::new(dhcp, dns);
        let changes = hosts::diff(&self.domain, &published.hosts, &new);
        self.write(&mut published, &changes)?;
        *published = Published {
            hosts: new,
            synced: true,
        };
        self.signal(&changes).await;
        Ok(())
    }

    /// [`Self::set_hosts`] after only the MACs of `updates` changed in the
    /// state: their files and their names' files are looked at, not every
    /// host's. Until the hosts follow the state (before the first
    /// `set_hosts`, after a failed write) it calls `set_hosts` with what
    /// `everything` gives instead.
    pub async fn update_hosts(
        &self,
        updates: &[HostUpdate],
        everything: impl FnOnce() -> (Vec<DhcpHost>, Vec<DnsHost>),
    ) -> Result<(), DnsmasqError> {
        let mut published = self.hosts.lock().await;
        if !published.synced {
            drop(published);
            let (dhcp, dns) = everything();
            return self.set_hosts(dhcp, dns).await;
        }
        let changes = hosts::update(&self.domain, &mut published.hosts, updates);
        self.write(&mut published, &changes)?;
        self.signal(&changes).await;
        Ok(())
    }

    /// Checks, in debug builds (every test), that the hosts as last
    /// written are those of the whole state: that no change of the state
    /// went unnoticed by [`Self::update_hosts`].
    #[cfg(debug_assertions)]
    pub async fn assert_hosts_are(&self, dhcp: Vec<DhcpHost>, dns: Vec<DnsHost>) {
        let published = self.hosts.lock().await;
        if published.synced {
            assert_eq!(
                published.hosts,
                Hosts::new(dhcp, dns),
                "hosts of {}",
                self.network
            );
        }
    }

    /// Writes `changes`. When a write fails, what the files hold is no
    /// longer known: it is read back, and the next call compares the whole
    /// state with it.
    fn write(
        &self,
        published: &mut Published,
        changes: &[hosts::Change; 2],
    ) -> Result<(), DnsmasqError> {
        let dirs = [
            self.paths.dhcp_hosts_dir(&self.network),
            self.paths.dns_hosts_dir(&self.network),
        ];
        let written = dirs
            .iter()
            .zip(changes)
            .try_for_each(|(dir, change)| apply(dir, change));
        if let Err(e) = written {
            published.synced = false;
            published.hosts = read_hosts(&self.paths, &self.network, &self.domain)?;
            return Err(e);
        }
        Ok(())
    }

    /// Has dnsmasq read what `changes` wrote: by itself for new files (and
    /// for names, from 2.89), with a SIGHUP for the rest (see
    /// [`Self::set_hosts`]).
    async fn signal(&self, changes: &[hosts::Change; 2]) {
        let changed = changes.iter().any(|c| !c.is_empty());
        let reload = hosts::needs_sighup(changes, self.names_follow_files);
        let running_and_ready = {
            let s = self.status.borrow();
            s.pid.is_some() && s.ready
        };
        if !changed || (running_and_ready && !reload) {
            return;
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
    }

    /// Stops dnsmasq (SIGTERM, then SIGKILL after 5 s), waits for it, and
    /// removes `RUN/<net>`. The lease file is kept.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(network = %self.network, "dnsmasq supervisor failed: {e}");
        }
        remove_run_dir(&self.network, &self.paths);
    }
}

/// Cleans up after a network that is no longer configured: stops the
/// dnsmasq a previous daemon left running for it (see [`spawn`]) and
/// removes `RUN/<net>`. The lease file is kept.
pub async fn remove_stale(network: &str, paths: &Paths) {
    stop_stale(
        network,
        &paths.pid_file(network),
        &paths.config_file(network),
    )
    .await;
    remove_run_dir(network, paths);
}

fn remove_run_dir(network: &str, paths: &Paths) {
    let dir = paths.net_dir(network);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(network, "cannot remove {}: {e}", dir.display()),
    }
}
