//! Following QEMUs: the QMP socket's accept loop, one task per QEMU that
//! reads its events and sends them on as [`Input`]s, and process watchers.
//!
//! Each follower does its own QMP round trips and `/proc` walks, so a slow
//! or hostile QEMU never stalls the reconciler or another guest.
//!
//! `qmp.sock` is open to every local user (QEMUs run as whoever starts
//! them), so what one peer can make the daemon hold is bounded here, at
//! the edge ([`Sessions`]): per peer process, per peer uid (root's own
//! QEMUs excepted) and in total, the total leaving a reserve of file
//! descriptors for the control socket, dnsmasq and state saves. A refused
//! connection is closed at once and logged once per uid.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qnet_api::{Reply, Response};
use tokio::io::unix::AsyncFd;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::discover::{self, GuestPort};
use crate::error;
use crate::procfs::{self, Process};
use crate::qmp::{self, QmpEvent, QmpEvents, QmpSession};
use crate::ratelimit::RateLimit;
use crate::reconciler::input::{ConnId, GuestUp, Input, Peer};
use crate::warn_limited;

/// Descriptors kept free of QMP sessions for everything else the daemon
/// opens: control connections, dnsmasq's pipes, state files, nft.
pub const RESERVED_FDS: u64 = 128;
/// Descriptors one session holds: its socket, a pidfd, and one more
/// while `/proc/PID/fd` is read.
const FDS_PER_SESSION: u64 = 3;
/// Connections of one process at once: its session and one replacing it.
const PER_PID: usize = 2;

/// Hostile or broken QMP peers are logged at most this often.
static PEER_WARNINGS: RateLimit = RateLimit::new(20, Duration::from_secs(60));

/// How the daemon reached a QEMU.
#[derive(Debug)]
pub enum Origin {
    /// QEMU dialed the daemon's QMP socket.
    Client(UnixStream),
    /// The daemon dials QEMU's QMP server socket.
    Server(PathBuf),
}

/// A control request to answer once the QEMU it names is followed
/// (`qnetctl attach`).
pub struct Attach {
    pub peer: Peer,
    pub reply: oneshot::Sender<Response>,
}

/// How many QMP sessions peers may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub total: usize,
    pub per_uid: usize,
}

impl SessionLimits {
    /// Limits for a daemon that may open `nofile` descriptors: the total
    /// leaves [`RESERVED_FDS`]; one non-root uid gets at most `per_uid`
    /// and never more than a quarter of the total.
    pub fn for_fd_limit(nofile: u64, per_uid: usize) -> SessionLimits {
        let total = usize::try_from(nofile.saturating_sub(RESERVED_FDS) / FDS_PER_SESSION)
            .unwrap_or(usize::MAX)
            .max(1);
        SessionLimits {
            total,
            per_uid: per_uid.min(total / 4).max(1),
        }
    }
}

/// Who holds QMP sessions now.
#[derive(Debug)]
pub struct Sessions {
    inner: Mutex<Counts>,
}

#[derive(Debug)]
struct Counts {
    /// The limits, changed by a reload ([`Sessions::set_per_uid`]).
    limits: SessionLimits,
    total: usize,
    by_uid: HashMap<u32, usize>,
    by_pid: HashMap<u32, usize>,
    /// Uids told about their limit since they last had no session.
    warned: HashSet<u32>,
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Slot {
    sessions: Arc<Sessions>,
    uid: u32,
    pid: u32,
}

impl Sessions {
    pub fn new(limits: SessionLimits) -> Arc<Sessions> {
        Arc::new(Sessions {
            inner: Mutex::new(Counts {
                limits,
                total: 0,
                by_uid: HashMap::new(),
                by_pid: HashMap::new(),
                warned: HashSet::new(),
            }),
        })
    }

    /// A reloaded `qmp-sessions-per-user`: new connections are admitted
    /// under it; sessions already held are kept.
    pub fn set_per_uid(&self, per_uid: usize) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.limits = SessionLimits {
            per_uid: per_uid.min(c.limits.total / 4).max(1),
            ..c.limits
        };
    }

    /// A place for a connection of `pid` running as `uid`, or why not
    /// (`Some` the first time a uid is refused since it last had none).
    pub fn admit(self: &Arc<Self>, uid: u32, pid: u32) -> Result<Slot, Option<String>> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let limits = c.limits;
        let why = if c.total >= limits.total {
            Some(format!(
                "the daemon holds its maximum of {} QMP sessions",
                limits.total
            ))
        } else if uid != 0 && c.by_uid.get(&uid).copied().unwrap_or(0) >= limits.per_uid {
            Some(format!(
                "uid {uid} holds its maximum of {} QMP sessions (hookd.toml [limits] qmp-sessions-per-user)",
                limits.per_uid
            ))
        } else if c.by_pid.get(&pid).copied().unwrap_or(0) >= PER_PID {
            Some(format!("pid {pid} already holds {PER_PID} QMP connections"))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(c.warned.insert(uid).then_some(why));
        }
        c.total += 1;
        *c.by_uid.entry(uid).or_default() += 1;
        *c.by_pid.entry(pid).or_default() += 1;
        Ok(Slot {
            sessions: self.clone(),
            uid,
            pid,
        })
    }

    #[cfg(test)]
    fn count(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self
            .sessions
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if decrement(&mut c.by_uid, self.uid) {
            c.warned.remove(&self.uid);
        }
        decrement(&mut c.by_pid, self.pid);
    }
}

/// Decrements `key`'s count, removing it at zero; whether it reached zero.
fn decrement(counts: &mut HashMap<u32, usize>, key: u32) -> bool {
    match counts.get_mut(&key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        _ => {
            counts.remove(&key);
            true
        }
    }
}

/// Accepts QEMUs on `qmp.sock` and follows each admitted one.
pub async fn accept_qmp(
    listener: UnixListener,
    inputs: mpsc::UnboundedSender<Input>,
    sessions: Arc<Sessions>,
) {
    // Connection ids for client-mode guests count down from the top so they
    // never meet the reconciler's own counter.
    let mut conn: ConnId = u64::MAX;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn_limited!(PEER_WARNINGS, "accepting a QMP connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
        match sessions.admit(cred.uid(), pid) {
            Ok(slot) => {
                conn -= 1;
                tokio::spawn(follow_guest(
                    Origin::Client(stream),
                    conn,
                    inputs.clone(),
                    None,
                    Some(slot),
                ));
            }
            Err(first) => {
                if let Some(why) = first {
                    tracing::warn!(uid = cred.uid(), pid, "refusing QMP connections: {why}");
                }
            }
        }
    }
}

/// Follows one QEMU: handshake and queries, then forwards its events and
/// reports its end (QMP EOF, process exit, SHUTDOWN when QEMU will exit,
/// or the reconciler dropping the session). `attach` carries the control
/// request to answer (server mode); `slot` the place it was admitted to.
pub async fn follow_guest(
    origin: Origin,
    conn: ConnId,
    inputs: mpsc::UnboundedSender<Input>,
    attach: Option<Attach>,
    slot: Option<Slot>,
) {
    let (stream, qmp_server) = match origin {
        Origin::Client(stream) => (Ok(stream), None),
        Origin::Server(path) => (
            Box::pin(qmp::dial(&path)).await.map_err(|e| e.to_string()),
            Some(path),
        ),
    };
    let fail = |attach: Option<Attach>, message: String| {
        warn_limited!(PEER_WARNINGS, "QMP: {message}");
        if let Some(attach) = attach {
            let _ = attach.reply.send(Response::Error(error::failed(message)));
        }
    };
    let stream = match stream {
        Ok(stream) => stream,
        Err(e) => return fail(attach, e),
    };
    // Events are hints (a lagged follower re-reads the NICs): the
    // session's short default queue is enough.
    // The handshake and the queries are the follower's largest futures
    // but run once: boxed, they are freed when done, where inline they
    // would size the task every followed guest keeps for its whole life.
    let (session, identity, mut events) = match Box::pin(QmpSession::start(stream)).await {
        Ok(started) => started,
        Err(e) => return fail(attach, format!("QMP handshake: {e}")),
    };
    if let Some(a) = &attach {
        if !a.peer.is_root() && a.peer.uid != identity.uid {
            let message = "that QEMU does not run under your uid: only root may attach it";
            let _ = attach.map(|a| a.reply.send(Response::Error(error::denied(message))));
            return;
        }
    }
    let pid = identity.pid;
    // The devices come from the kernel, the rest from QEMU: asked at the
    // same time, the kernel's answer costs the connect nothing while QEMU
    // replies.
    let (info, ports) = tokio::join!(Box::pin(session.query_info()), Box::pin(ports_of(pid)));
    let info = match info {
        Ok(info) => info,
        Err(e) => return fail(attach, format!("pid {pid}: QMP queries: {e}")),
    };
    // Read once, for the exit watch and the reconciler's record alike;
    // `None`: the peer has already exited.
    let process = Process::of(pid);
    let name = info.name.clone();
    let (keepalive, dropped) = oneshot::channel();
    let _ = inputs.send(Input::GuestUp(Box::new(GuestUp {
        conn,
        identity,
        process,
        info,
        ports,
        qmp_server,
        qmp: session.clone(),
        keepalive,
    })));
    if let Some(attach) = attach {
        let _ = attach.reply.send(Response::Ok(Reply::Done {
            message: format!(
                "following QEMU pid {pid}{}",
                name.map(|n| format!(" ({n})")).unwrap_or_default()
            ),
        }));
    }
    let why = follow_events(&session, &mut events, conn, pid, process, &inputs, dropped).await;
    let _ = inputs.send(Input::GuestGone { conn, why });
    drop(slot);
}

/// Forwards one session's events until it ends; returns why it ended.
async fn follow_events(
    session: &QmpSession,
    events: &mut QmpEvents,
    conn: ConnId,
    pid: u32,
    process: Option<Process>,
    inputs: &mpsc::UnboundedSender<Input>,
    mut dropped: oneshot::Receiver<()>,
) -> String {
    let no_shutdown = procfs::has_arg(pid, "-no-shutdown");
    // A peer already gone (no start time) has exited: resolve at once.
    let exited = async move {
        if let Some(process) = process {
            process_exit(process).await;
        }
    };
    tokio::pin!(exited);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                None => return "QMP connection closed".into(),
                Some(QmpEvent::Closed { error }) => {
                    return match error {
                        Some(e) => format!("QMP connection closed: {e}"),
                        None => "QMP connection closed".into(),
                    };
                }
                Some(QmpEvent::Shutdown { guest, reason }) if !no_shutdown => {
                    return format!("SHUTDOWN (guest: {guest}, reason: {})", reason.unwrap_or_default());
                }
                Some(QmpEvent::NicRxFilterChanged { .. })
                | Some(QmpEvent::DeviceDeleted { .. })
                // Boxed like the handshake (see `follow_guest`).
                | Some(QmpEvent::Lagged(_)) => match Box::pin(session.query_nics()).await {
                    Ok(nics) => {
                        let ports = Box::pin(ports_of(pid)).await;
                        let _ = inputs.send(Input::GuestNics { conn, nics, ports });
                    }
                    Err(e) => tracing::warn!(pid, "query-rx-filter: {e}"),
                },
                Some(other) => tracing::debug!(pid, event = ?other, "QMP event"),
            },
            _ = &mut exited => return "QEMU exited".into(),
            _ = &mut dropped => return "replaced by a newer session".into(),
        }
    }
}

/// Guests whose devices are resolved at once. Each resolution opens an
/// rtnetlink connection (a task and its receive buffers, tens of KiB) for
/// a few milliseconds: a burst of a thousand QEMUs connecting at once held
/// hundreds of them at the same time, most of the daemon's peak memory
/// (`hookd_scale rounds`, heaptrack). The work is the kernel's alone (a
/// `/proc` walk, link lookups), so no peer can keep a place for long.
static RESOLVING: Semaphore = Semaphore::const_new(4);

async fn ports_of(pid: u32) -> Vec<GuestPort> {
    // Never closed, so `acquire` cannot fail.
    let _place = RESOLVING.acquire().await.ok();
    discover::guest_ports(pid).await.unwrap_or_else(|e| {
        tracing::warn!(pid, "finding the guest's devices: {e}");
        Vec::new()
    })
}

/// How often `/proc` is read for a process no pidfd can watch.
const EXIT_POLL: Duration = Duration::from_secs(1);

/// Resolves once `process` has exited (as a zombie too; see
/// [`procfs::is_running`]), at once if it already has.
///
/// A pidfd wakes it when the process exits. The pidfd is opened before
/// the check, so that it names the process checked and not one that got
/// the pid later. Where none can be had (the daemon is out of fds), `/proc`
/// is read every [`EXIT_POLL`] instead: an exit must never go unnoticed,
/// or a guest stays listed, with its names and forwards, for good.
pub async fn process_exit(process: Process) {
    let pidfd = qnet_hostnet::reaper::pidfd_open(process.pid)
        .ok()
        .and_then(|fd| {
            // SAFETY: the OwnedFd is moved into the AsyncFd and stays open,
            // the same descriptor, for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
        });
    if !process.is_running() {
        return;
    }
    match pidfd {
        // A pidfd becomes readable when the process exits.
        Some(pidfd) => drop(pidfd.readable().await),
        None => {
            while process.is_running() {
                tokio::time::sleep(EXIT_POLL).await;
            }
        }
    }
}

/// A guest recorded before a restart (or registered by the libvirt hook):
/// report its exit.
pub fn watch_exit(process: Process, inputs: mpsc::UnboundedSender<Input>) {
    tokio::spawn(async move {
        process_exit(process).await;
        let _ = inputs.send(Input::StaleGuestExited { pid: process.pid });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    #[tokio::test]
    async fn a_process_that_is_gone_has_exited() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let process = Process::of(pid).unwrap_or(Process { pid, start_time: 0 });
        child.wait().unwrap();
        timeout(Duration::from_secs(5), process_exit(process))
            .await
            .expect("a reaped process is gone");
        // A live one is not.
        let me = std::process::id();
        let mine = Process::of(me).unwrap();
        assert!(timeout(Duration::from_millis(600), process_exit(mine))
            .await
            .is_err());
    }

    /// Reproducer of a guest that stayed listed: its QEMU had exited but
    /// was not reaped yet when the daemon looked, and a zombie passed for
    /// running.
    #[tokio::test]
    async fn an_exited_process_not_yet_reaped_has_exited() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let process = Process::of(pid).expect("just started");
        timeout(Duration::from_secs(5), process_exit(process))
            .await
            .expect("a zombie is gone");
        assert!(!process.is_running(), "a zombie is not running");
        assert!(
            procfs::start_time(pid).is_some(),
            "still a zombie (not reaped)"
        );
        child.wait().unwrap();
    }

    #[test]
    fn limits_leave_a_reserve_and_bound_each_user() {
        let limits = SessionLimits::for_fd_limit(1024, 64);
        assert_eq!(limits.total, (1024 - 128) / 3);
        assert_eq!(limits.per_uid, 64);
        let tight = SessionLimits::for_fd_limit(200, 64);
        assert_eq!((tight.total, tight.per_uid), (24, 6));
        assert_eq!(SessionLimits::for_fd_limit(10, 64).total, 1);
    }

    #[test]
    fn sessions_are_capped_per_pid_uid_and_total_and_freed_on_drop() {
        let sessions = Sessions::new(SessionLimits {
            total: 5,
            per_uid: 3,
        });
        let a = sessions.admit(1000, 10).unwrap();
        let b = sessions.admit(1000, 10).unwrap();
        let refused = sessions.admit(1000, 10).unwrap_err();
        assert!(
            refused.unwrap().contains("pid 10"),
            "per pid, reported the first time"
        );
        let c = sessions.admit(1000, 11).unwrap();
        assert_eq!(
            sessions.admit(1000, 12).unwrap_err(),
            None,
            "per uid, then quiet"
        );
        let root: Vec<Slot> = (0..2).map(|i| sessions.admit(0, 20 + i).unwrap()).collect();
        assert!(sessions.admit(0, 30).is_err(), "total");
        assert_eq!(sessions.count(), 5);
        drop((a, b, c));
        drop(root);
        assert_eq!(sessions.count(), 0);
        assert!(sessions.admit(1000, 12).is_ok(), "free again");
    }
}
