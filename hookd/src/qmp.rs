//! QMP sessions with QEMU, in either direction.
//!
//! QEMU can dial the daemon (`-chardev socket,id=qnet,path=...,reconnect=1
//! -mon chardev=qnet,mode=control`: the daemon listens and hands each
//! accepted stream to [`QmpSession::start`]) or listen itself (`-qmp
//! unix:PATH,server=on,wait=off`: the daemon connects with [`dial`]). Either
//! way QEMU speaks first, so both directions look the same once connected,
//! and `SO_PEERCRED` on the stream names the QEMU process ([`GuestIdentity`]).
//!
//! # Wire handling
//!
//! QMP is newline-delimited JSON (QEMU ends lines with `\r\n`). The qapi
//! crate's typed event stream is *not* used: its `Event` enum is closed
//! (QEMU 9.1 schema), and one event it does not know ends its stream for
//! good, while QEMU 10.x keeps adding events. Instead a reader task
//!
//! * reads one line at a time with a hard cap ([`SessionOptions::max_line`],
//!   4 MiB by default: a real `query-rx-filter` reply is ~25 KB per virtio
//!   NIC because of its 4096-entry `vlan-table`), so a peer that never sends
//!   a newline costs at most that much memory and then ends the session;
//! * decodes each line as an untyped [`serde_json::Value`];
//! * routes replies to the waiting command by `"id"` (replies with an id
//!   nobody waits for, e.g. after a command timed out, are logged and
//!   dropped);
//! * turns events into [`QmpEvent`]; unknown event names become
//!   [`QmpEvent::Other`] and never end the session;
//! * ends the session on EOF, on an I/O error and on anything that is not
//!   QMP (invalid JSON, a non-object, a second greeting, an oversized line).
//!
//! Typed commands still come from qapi ([`QmpSession::execute`] takes any
//! [`qapi::Command`] and decodes the reply into its `Ok` type); the queries
//! behind [`GuestInfo`] decode just the fields they need, as plain strings,
//! so that a run state or rx-filter mode added by a newer QEMU does not make
//! them fail.
//!
//! # Event delivery
//!
//! The reader never waits for the consumer: replies only arrive while it
//! reads, so a consumer that waits for a command reply before draining
//! events would otherwise deadlock. Events go to a caller-supplied bounded
//! channel with `try_send`; when it is full, events are dropped and counted,
//! and a single [`QmpEvent::Lagged`] with the count is delivered as soon
//! as there is room again. Events are hints: a consumer that sees `Lagged`
//! should re-read the state it cares about ([`QmpSession::query_status`],
//! [`QmpSession::query_nics`]). Memory per session is therefore bounded by
//! the channel capacity the caller chose (64 or more is plenty: QEMU emits
//! a handful of events per state change).
//!
//! The session's end is always reported: the last item is
//! [`QmpEvent::Closed`] (this one is sent with a blocking `send`, since
//! the reader has nothing else left to do), after which the reader drops its
//! `Sender`, so a receiver that was given the only sender then sees `None`.
//! A consumer may rely on either.
//!
//! # Timeouts
//!
//! Every wait on the peer is bounded by [`SessionOptions::timeout`] (5 s by
//! default): the greeting, the `qmp_capabilities` reply, each command's
//! reply and each write. A command that times out fails with
//! [`QmpError::Timeout`] but leaves the session usable (its late reply is
//! dropped); a write that times out or fails tears the session down, since
//! the stream may then hold half a command.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use qnet_api::Mac;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{timeout, timeout_at, Instant};

/// Default bound on every wait for the peer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on the length of one QMP message (one line).
pub const DEFAULT_MAX_LINE: usize = 4 << 20;

/// Tunables of a session; [`Default`] gives [`DEFAULT_TIMEOUT`] and
/// [`DEFAULT_MAX_LINE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Bound on the greeting, each command's reply and each write.
    pub timeout: Duration,
    /// Longest accepted line in bytes, excluding the newline.
    pub max_line: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            max_line: DEFAULT_MAX_LINE,
        }
    }
}

/// Who is at the other end of the socket, from `SO_PEERCRED`: the process
/// that connected (client mode) or that created the listening socket
/// (server mode). Either way, the QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestIdentity {
    pub pid: u32,
    pub uid: u32,
}

/// The `{"QMP": {...}}` greeting QEMU opens every session with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// `(major, minor, micro)`; zeros if the greeting did not say.
    pub version: (u64, u64, u64),
    /// Distribution build string, e.g. `"Debian 1:7.2+dfsg-7+deb12u18"`.
    pub package: String,
    /// Capabilities offered, e.g. `["oob"]`; none are enabled by us.
    pub capabilities: Vec<String>,
}

/// What [`QmpSession::query_info`] learns about a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// `-name`, if given.
    pub name: Option<String>,
    /// `-uuid`, if given (QEMU reports the nil UUID when it was not; that
    /// is mapped to `None`).
    pub uuid: Option<String>,
    /// QEMU's run state, e.g. `"prelaunch"`, `"running"`, `"paused"`,
    /// `"shutdown"`, `"guest-panicked"`.
    pub status: String,
    pub running: bool,
    /// The guest's NICs, see [`QmpSession::query_nics`].
    pub nics: Vec<NicInfo>,
}

/// Run state from `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStatus {
    pub status: String,
    pub running: bool,
}

/// One guest NIC as QEMU sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NicInfo {
    /// QEMU's net client name: the `-device` id if it had one, otherwise
    /// generated, e.g. `"virtio-net-pci.0"`.
    pub name: String,
    /// The guest's MAC address.
    pub mac: Mac,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    /// QEMU is shutting down (or, with `-no-shutdown`, has stopped the
    /// guest and stays alive). `guest` says whether the guest asked for it;
    /// `reason` is QEMU's `ShutdownCause`, e.g. `"guest-shutdown"`,
    /// `"host-qmp-quit"`, `"host-signal"`, `"guest-panic"`.
    Shutdown {
        guest: bool,
        reason: Option<String>,
    },
    /// `system_powerdown` was requested (ACPI power button).
    Powerdown,
    Reset,
    Stop,
    Resume,
    /// The guest changed a NIC's receive filter, typically its MAC:
    /// re-read it with [`QmpSession::query_nics`].
    NicRxFilterChanged {
        name: Option<String>,
        path: String,
    },
    DeviceDeleted {
        device: Option<String>,
        path: String,
    },
    /// Any other event, by name.
    Other(String),
    /// Not from QEMU: this many events were dropped because the events
    /// channel was full; re-read whatever state matters.
    Lagged(u64),
    /// Not from QEMU: the session ended, always the last item. `error` is
    /// `None` for a clean end (the peer closed the connection between
    /// messages, or we closed the session), otherwise why (the
    /// [`QmpError`], rendered).
    Closed {
        error: Option<String>,
    },
}

/// A failed QMP operation. `peer` describes the socket, e.g.
/// `QMP peer pid 4242 on /run/qnet/qmp.sock`.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("connecting to QMP socket {}: timed out after {after:?}", path.display())]
    ConnectTimeout { path: PathBuf, after: Duration },

    #[error("{peer}: reading SO_PEERCRED: {detail}")]
    PeerCred { peer: String, detail: String },

    #[error("{peer}: timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        peer: String,
        waiting_for: String,
        after: Duration,
    },

    #[error("{peer}: {action}: {source}")]
    Io {
        peer: String,
        action: String,
        #[source]
        source: io::Error,
    },

    #[error("{peer}: connection closed {during}")]
    Eof { peer: String, during: String },

    #[error("{peer}: message longer than {limit} bytes")]
    LineTooLong { peer: String, limit: usize },

    #[error("{peer}: protocol error: {detail}")]
    Protocol { peer: String, detail: String },

    /// QEMU answered the command with an error. `class` is kept as a string
    /// (e.g. `"GenericError"`, `"CommandNotFound"`, `"DeviceNotFound"`):
    /// newer QEMUs may add classes.
    #[error("{peer}: {command} failed: {class}: {desc}")]
    Command {
        peer: String,
        command: String,
        class: String,
        desc: String,
    },

    #[error("{peer}: unexpected reply to {command}: {detail}")]
    Decode {
        peer: String,
        command: String,
        detail: String,
    },

    /// We ended the session because writing to the peer failed.
    #[error("{peer}: session aborted: {reason}")]
    Aborted { peer: String, reason: String },

    /// The session is over; `reason` says why it ended.
    #[error("{peer}: session closed ({reason}) before {command} was answered")]
    Closed {
        peer: String,
        command: String,
        reason: String,
    },
}

/// Connects to a QEMU listening on `path` (`-qmp unix:PATH,server=on`),
/// within [`DEFAULT_TIMEOUT`].
///
/// QEMU serves one QMP client per socket at a time: while another client is
/// connected, the connection is accepted by the kernel but the greeting
/// never comes, so [`QmpSession::start`] then fails with a timeout.
pub async fn dial(path: &Path) -> Result<UnixStream, QmpError> {
    dial_timeout(path, DEFAULT_TIMEOUT).await
}

/// [`dial`] with an explicit timeout.
pub async fn dial_timeout(path: &Path, after: Duration) -> Result<UnixStream, QmpError> {
    match timeout(after, UnixStream::connect(path)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(QmpError::Connect {
            path: path.to_owned(),
            source,
        }),
        Err(_) => Err(QmpError::ConnectTimeout {
            path: path.to_owned(),
            after,
        }),
    }
}

/// A live QMP session: a cheap-to-clone handle for sending commands.
///
/// The connection stays open while any clone is alive and the peer does not
/// close it; dropping the last clone (or [`QmpSession::close`]) ends it.
#[derive(Clone)]
pub struct QmpSession {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Complete lines for the writer task. Writes happen there so that a
    /// caller that gives up on `execute` can never leave half a command in
    /// the stream.
    outgoing: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    identity: GuestIdentity,
    greeting: Greeting,
    options: SessionOptions,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: nobody can send commands any more.
        self.shared.stop.send_replace(true);
    }
}

/// State shared by the handles and the reader and writer tasks.
struct Shared {
    peer: String,
    state: Mutex<State>,
    /// Set to end the session: the reader and the writer stop.
    stop: watch::Sender<bool>,
}

/// Close reason of a session ended by [`QmpSession::close`] or by dropping
/// its last handle.
const CLOSED_BY_US: &str = "closed by us";
/// Close reason of a session the peer ended.
const PEER_CLOSED: &str = "the peer closed the connection";

#[derive(Default)]
struct State {
    /// Commands waiting for their reply, by id.
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// Why the session ended, once it has.
    closed: Option<String>,
}

type Reply = Result<Value, ReplyError>;

struct ReplyError {
    class: String,
    desc: String,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover regardless.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the session closed (the first reason wins) and fails every
    /// waiting command. Returns the reason that stuck.
    fn close(&self, reason: String) -> String {
        let mut state = self.state();
        let reason = state.closed.get_or_insert(reason).clone();
        // Dropping the senders wakes the waiters, which read `closed`.
        state.pending.clear();
        reason
    }

    fn closed_reason(&self) -> Option<String> {
        self.state().closed.clone()
    }

    /// Ends the session from our side: the reader stops and reports why.
    fn abort(&self, reason: String) {
        self.close(reason);
        self.stop.send_replace(true);
    }
}

/// Removes a command's pending entry when its caller stops waiting.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.state().pending.remove(&self.id);
    }
}

impl QmpSession {
    /// Reads the greeting, spawns the reader task and negotiates
    /// capabilities (none are enabled), with [`SessionOptions::default`].
    ///
    /// `events` receives every event of the session and finally
    /// [`QmpEvent::Closed`]; give the session the only `Sender` if the
    /// receiver should also see `None` at the end.
    pub async fn start(
        stream: UnixStream,
        events: mpsc::Sender<QmpEvent>,
    ) -> Result<(QmpSession, GuestIdentity), QmpError> {
        Self::start_with(stream, events, SessionOptions::default()).await
    }

    /// [`QmpSession::start`] with explicit options.
    pub async fn start_with(
        stream: UnixStream,
        events: mpsc::Sender<QmpEvent>,
        options: SessionOptions,
    ) -> Result<(QmpSession, GuestIdentity), QmpError> {
        let (identity, peer) = identify(&stream)?;
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);

        let greeting = timeout(
            options.timeout,
            read_greeting(&mut reader, &peer, options.max_line),
        )
        .await
        .map_err(|_| QmpError::Timeout {
            peer: peer.clone(),
            waiting_for: "the QMP greeting".into(),
            after: options.timeout,
        })??;
        tracing::debug!(
            "{peer}: QEMU {}.{}.{} ({}), capabilities {:?}",
            greeting.version.0,
            greeting.version.1,
            greeting.version.2,
            greeting.package,
            greeting.capabilities
        );

        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            peer,
            state: Mutex::new(State::default()),
            stop,
        });
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(
            write_half,
            outgoing_rx,
            shared.clone(),
            options.timeout,
        ));
        tokio::spawn(read_loop(
            reader,
            shared.clone(),
            events,
            stop_rx,
            options.max_line,
        ));

        let session = QmpSession {
            inner: Arc::new(Inner {
                shared,
                outgoing,
                next_id: AtomicU64::new(0),
                identity,
                greeting,
                options,
            }),
        };
        session
            .execute(qapi::qmp::qmp_capabilities { enable: None })
            .await?;
        Ok((session, identity))
    }

    /// The QEMU process at the other end.
    pub fn identity(&self) -> GuestIdentity {
        self.inner.identity
    }

    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// Description of the peer used in errors and logs.
    pub fn peer(&self) -> &str {
        &self.inner.shared.peer
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed_reason().is_some()
    }

    /// Ends the session now, for every clone of this handle. Waiting
    /// commands fail with [`QmpError::Closed`].
    pub fn close(&self) {
        self.inner.shared.abort(CLOSED_BY_US.into());
    }

    /// Runs a typed qapi command and decodes its reply.
    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok, QmpError> {
        let arguments = serde_json::to_value(&command).map_err(|e| QmpError::Protocol {
            peer: self.peer().to_owned(),
            detail: format!("cannot encode {}: {e}", C::NAME),
        })?;
        let arguments = match arguments {
            Value::Null => None,
            other => Some(other),
        };
        let reply = self.execute_raw(C::NAME, arguments).await?;
        self.decode(C::NAME, reply)
    }

    /// Runs a command by name with untyped arguments; returns the untyped
    /// `"return"` value.
    pub async fn execute_raw(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let inner = &*self.inner;
        let shared = &*inner.shared;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = Map::new();
        message.insert("execute".into(), command.into());
        if let Some(arguments) = arguments {
            message.insert("arguments".into(), arguments);
        }
        message.insert("id".into(), id.into());
        let mut line = Value::Object(message).to_string().into_bytes();
        line.push(b'\n');

        let closed = |reason: String| QmpError::Closed {
            peer: shared.peer.clone(),
            command: command.to_owned(),
            reason,
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut state = shared.state();
            if let Some(reason) = &state.closed {
                return Err(closed(reason.clone()));
            }
            state.pending.insert(id, reply_tx);
        }
        let _pending = PendingGuard { shared, id };
        if inner.outgoing.send(line).is_err() {
            let reason = shared
                .closed_reason()
                .unwrap_or_else(|| "writer gone".into());
            return Err(closed(reason));
        }

        let deadline = Instant::now() + inner.options.timeout;
        match timeout_at(deadline, reply_rx).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(ReplyError { class, desc }))) => Err(QmpError::Command {
                peer: shared.peer.clone(),
                command: command.to_owned(),
                class,
                desc,
            }),
            Ok(Err(_)) => {
                let reason = shared
                    .closed_reason()
                    .unwrap_or_else(|| "reader gone".into());
                Err(closed(reason))
            }
            Err(_) => Err(QmpError::Timeout {
                peer: shared.peer.clone(),
                waiting_for: format!("the reply to {command}"),
                after: inner.options.timeout,
            }),
        }
    }

    /// `query-name`, `query-uuid`, `query-status` and the NICs
    /// ([`QmpSession::query_nics`]), pipelined.
    pub async fn query_info(&self) -> Result<GuestInfo, QmpError> {
        let (name, uuid, status, nics) = tokio::try_join!(
            self.execute(qapi::qmp::query_name {}),
            self.execute(qapi::qmp::query_uuid {}),
            self.query_status(),
            self.query_nics(),
        )?;
        let uuid = Some(uuid.UUID).filter(|u| !is_nil_uuid(u));
        Ok(GuestInfo {
            name: name.name,
            uuid,
            status: status.status,
            running: status.running,
            nics,
        })
    }

    /// `query-status`, decoded leniently (the run state as a string).
    pub async fn query_status(&self) -> Result<GuestStatus, QmpError> {
        #[derive(Deserialize)]
        struct Status {
            status: String,
            running: bool,
        }
        let reply = self.execute_raw("query-status", None).await?;
        let Status { status, running } = self.decode("query-status", reply)?;
        Ok(GuestStatus { status, running })
    }

    /// `query-rx-filter`: each NIC's name and current `main-mac`, which
    /// follows MAC changes made by the guest.
    ///
    /// Only NIC models that implement rx-filter reporting are listed, which
    /// in QEMU (7.2 through 10.x) means virtio-net only: e1000, e1000e,
    /// rtl8139 etc. are silently left out. See [`QmpSession::query_nics`].
    pub async fn query_rx_filter(&self) -> Result<Vec<NicInfo>, QmpError> {
        #[derive(Deserialize)]
        struct Filter {
            name: String,
            #[serde(rename = "main-mac")]
            main_mac: String,
        }
        const COMMAND: &str = "query-rx-filter";
        let reply = self.execute_raw(COMMAND, None).await?;
        let filters: Vec<Filter> = self.decode(COMMAND, reply)?;
        filters
            .into_iter()
            .map(|f| match f.main_mac.parse::<Mac>().ok() {
                Some(mac) => Ok(NicInfo { name: f.name, mac }),
                None => Err(QmpError::Decode {
                    peer: self.peer().to_owned(),
                    command: COMMAND.into(),
                    detail: format!("NIC {:?} has an invalid main-mac {:?}", f.name, f.main_mac),
                }),
            })
            .collect()
    }

    /// All NICs of the guest, in QEMU's order.
    ///
    /// [`query_rx_filter`](Self::query_rx_filter) only knows virtio-net, so
    /// the NIC list also comes from HMP `info network` (one line per NIC
    /// queue: `NAME: index=0,type=nic,model=e1000,macaddr=52:54:00:..`), a
    /// format unchanged for over a decade. A NIC both know takes its MAC
    /// from rx-filter. If HMP fails, the rx-filter list is returned alone.
    pub async fn query_nics(&self) -> Result<Vec<NicInfo>, QmpError> {
        let hmp = async {
            let arguments = serde_json::json!({ "command-line": "info network" });
            let reply = self
                .execute_raw("human-monitor-command", Some(arguments))
                .await?;
            match reply {
                Value::String(text) => Ok(parse_info_network(&text)),
                other => Err(QmpError::Decode {
                    peer: self.peer().to_owned(),
                    command: "human-monitor-command".into(),
                    detail: format!("expected a string, got {}", preview_value(&other)),
                }),
            }
        };
        let (filters, hmp) = tokio::join!(self.query_rx_filter(), hmp);
        let filters = filters?;
        let listed = match hmp {
            Ok(listed) => listed,
            Err(e @ (QmpError::Command { .. } | QmpError::Decode { .. })) => {
                tracing::debug!("info network unavailable, NICs from rx-filter only: {e}");
                return Ok(filters);
            }
            Err(e) => return Err(e),
        };
        let mut nics: Vec<NicInfo> = listed
            .into_iter()
            .map(|nic| match filters.iter().find(|f| f.name == nic.name) {
                Some(filter) => filter.clone(),
                None => nic,
            })
            .collect();
        for filter in filters {
            if !nics.iter().any(|n| n.name == filter.name) {
                nics.push(filter);
            }
        }
        Ok(nics)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        reply: Value,
    ) -> Result<T, QmpError> {
        serde_json::from_value(reply).map_err(|e| QmpError::Decode {
            peer: self.peer().to_owned(),
            command: command.to_owned(),
            detail: e.to_string(),
        })
    }
}

impl std::fmt::Debug for QmpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpSession")
            .field("peer", &self.inner.shared.peer)
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

/// SO_PEERCRED and a description of the socket for messages.
fn identify(stream: &UnixStream) -> Result<(GuestIdentity, String), QmpError> {
    // Accepted streams know the listening path locally, dialed ones know
    // it as the peer's address.
    let path = [stream.peer_addr(), stream.local_addr()]
        .into_iter()
        .filter_map(Result::ok)
        .find_map(|a| a.as_pathname().map(Path::to_owned));
    let on = path
        .map(|p| format!(" on {}", p.display()))
        .unwrap_or_default();
    let cred = stream.peer_cred().map_err(|e| QmpError::PeerCred {
        peer: format!("QMP peer{on}"),
        detail: e.to_string(),
    })?;
    let pid = cred
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid != 0)
        .ok_or_else(|| QmpError::PeerCred {
            peer: format!("QMP peer{on}"),
            detail: "the kernel reported no peer pid".into(),
        })?;
    let identity = GuestIdentity {
        pid,
        uid: cred.uid(),
    };
    Ok((identity, format!("QMP peer pid {pid}{on}")))
}

/// Outcome of reading one line.
enum Line {
    /// `buf` holds a complete line, newline included.
    Complete,
    /// Clean end of stream between lines.
    Eof,
}

/// Reads one `\n`-terminated line into `buf` (cleared first), never
/// buffering more than `max + 1` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    peer: &str,
) -> Result<Line, QmpError> {
    buf.clear();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let read = match (&mut *reader).take(limit).read_until(b'\n', buf).await {
        Ok(read) => read,
        // QEMU often exits with a byte of ours unread (it reads commands
        // byte by byte and leaves the newline after `quit`), which the
        // kernel reports as a reset rather than EOF. It is EOF all the same.
        Err(e) if is_hangup(&e) => buf.len(),
        Err(source) => {
            return Err(QmpError::Io {
                peer: peer.to_owned(),
                action: "reading".into(),
                source,
            })
        }
    };
    if read == 0 {
        Ok(Line::Eof)
    } else if buf.last() == Some(&b'\n') {
        Ok(Line::Complete)
    } else if buf.len() > max {
        Err(QmpError::LineTooLong {
            peer: peer.to_owned(),
            limit: max,
        })
    } else {
        Err(QmpError::Eof {
            peer: peer.to_owned(),
            during: format!("in the middle of a message ({} bytes)", buf.len()),
        })
    }
}

/// Reads the next non-blank line and parses it as JSON; `None` on a clean
/// EOF.
async fn read_message<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    peer: &str,
) -> Result<Option<Value>, QmpError> {
    loop {
        if let Line::Eof = read_line(reader, buf, max, peer).await? {
            return Ok(None);
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(buf)
            .map(Some)
            .map_err(|e| QmpError::Protocol {
                peer: peer.to_owned(),
                detail: format!("invalid JSON ({e}): {}", preview_bytes(buf)),
            });
    }
}

async fn read_greeting<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    peer: &str,
    max: usize,
) -> Result<Greeting, QmpError> {
    let mut buf = Vec::new();
    let protocol = |detail: String| QmpError::Protocol {
        peer: peer.to_owned(),
        detail,
    };
    let Some(message) = read_message(reader, &mut buf, max, peer).await? else {
        return Err(QmpError::Eof {
            peer: peer.to_owned(),
            during: "before the QMP greeting".into(),
        });
    };
    let qmp = match &message {
        Value::Object(map) => match map.get("QMP") {
            Some(Value::Object(qmp)) => qmp,
            _ if map.contains_key("event") => {
                return Err(protocol(format!(
                    "expected the QMP greeting, got event {}",
                    preview_value(&map["event"])
                )))
            }
            _ => {
                return Err(protocol(format!(
                    "expected the QMP greeting, got {}",
                    preview_value(&message)
                )))
            }
        },
        _ => {
            return Err(protocol(format!(
                "expected the QMP greeting, got {}",
                preview_value(&message)
            )))
        }
    };
    let number = |key: &str| {
        qmp.get("version")
            .and_then(|v| v.get("qemu"))
            .and_then(|q| q.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(Greeting {
        version: (number("major"), number("minor"), number("micro")),
        package: qmp
            .get("version")
            .and_then(|v| v.get("package"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        capabilities: qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|caps| {
                caps.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Writes queued command lines until the session ends.
async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
    after: Duration,
) {
    let mut stop = shared.stop.subscribe();
    loop {
        let line = tokio::select! {
            line = lines.recv() => line,
            _ = stop.wait_for(|&stop| stop) => None,
        };
        let Some(line) = line else { break };
        let failure = match timeout(after, writer.write_all(&line)).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) if is_hangup(&e) => {
                // The peer is gone (or at least stopped reading for good):
                // no more commands, but leave the reader running until it
                // sees the end, so that the session ends the same way as
                // when the reader notices first.
                tracing::debug!("{}: writing a command: {e}", shared.peer);
                shared.close(PEER_CLOSED.into());
                break;
            }
            Ok(Err(e)) => format!("writing a command failed: {e}"),
            Err(_) => format!("writing a command timed out after {after:?}"),
        };
        tracing::debug!("{}: {failure}", shared.peer);
        shared.abort(failure);
        break;
    }
    // Dropping the write half shuts the write direction down.
}

/// Delivers events without ever waiting for the consumer.
struct EventSink {
    tx: mpsc::Sender<QmpEvent>,
    /// Events dropped since the last successful delivery.
    lagged: u64,
}

impl EventSink {
    fn deliver(&mut self, event: QmpEvent, peer: &str) {
        if self.lagged > 0 {
            match self.tx.try_send(QmpEvent::Lagged(self.lagged)) {
                Ok(()) => self.lagged = 0,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.lagged += 1;
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        match self.tx.try_send(event) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(event)) => {
                tracing::warn!("{peer}: events channel full, dropping {event:?} and any that follow until it drains");
                self.lagged = 1;
            }
        }
    }

    /// Final delivery; may wait, since nothing else is left to do.
    async fn finish(self, outcome: Option<QmpError>) {
        if self.lagged > 0 {
            let _ = self.tx.send(QmpEvent::Lagged(self.lagged)).await;
        }
        let error = outcome.map(|e| e.to_string());
        let _ = self.tx.send(QmpEvent::Closed { error }).await;
    }
}

/// Line buffer capacity a QMP reader keeps between messages.
const KEEP_LINE_BUFFER: usize = 4096;

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    shared: Arc<Shared>,
    events: mpsc::Sender<QmpEvent>,
    mut stop: watch::Receiver<bool>,
    max_line: usize,
) {
    let mut sink = EventSink {
        tx: events,
        lagged: 0,
    };
    let mut buf = Vec::new();
    let peer = shared.peer.as_str();
    let outcome = loop {
        let message = tokio::select! {
            biased;
            _ = stop.wait_for(|&stop| stop) => break Ok(false),
            message = read_message(&mut reader, &mut buf, max_line, peer) => message,
        };
        match message {
            Ok(Some(message)) => {
                if let Err(e) = handle_message(message, &shared, &mut sink) {
                    break Err(e);
                }
                // A Vec keeps the capacity of the longest line it held;
                // `query-rx-filter` answers are ~20 KiB, events ~200 bytes.
                // Idle guests would otherwise each keep ~20 KiB.
                if buf.capacity() > KEEP_LINE_BUFFER {
                    buf = Vec::new();
                }
            }
            Ok(None) => break Ok(true),
            Err(e) => break Err(e),
        }
    };
    // Release the socket's read side (and its buffer) before reporting.
    drop(reader);
    drop(buf);
    let report = match outcome {
        Ok(true) => {
            shared.close(PEER_CLOSED.into());
            None
        }
        Ok(false) => {
            // Stopped on our side: by `close`, by dropping the last handle
            // (both clean) or by a failed write (recorded by `abort`).
            let reason = shared.close(CLOSED_BY_US.into());
            (reason != CLOSED_BY_US && reason != PEER_CLOSED).then(|| QmpError::Aborted {
                peer: shared.peer.clone(),
                reason,
            })
        }
        Err(e) => {
            tracing::debug!("{e}");
            shared.close(e.to_string());
            Some(e)
        }
    };
    // Stops the writer too (the peer is gone or broken).
    shared.stop.send_replace(true);
    sink.finish(report).await;
}

/// Handles one decoded message; an error ends the session.
fn handle_message(message: Value, shared: &Shared, sink: &mut EventSink) -> Result<(), QmpError> {
    let peer = shared.peer.as_str();
    let protocol = |detail: String| QmpError::Protocol {
        peer: peer.to_owned(),
        detail,
    };
    let Value::Object(mut map) = message else {
        return Err(protocol(format!(
            "expected a JSON object, got {}",
            preview_value(&message)
        )));
    };
    if let Some(name) = map.get("event") {
        let Some(name) = name.as_str() else {
            return Err(protocol(format!(
                "event name is not a string: {}",
                preview_value(name)
            )));
        };
        let event = parse_event(name, map.get("data"));
        tracing::debug!("{peer}: event {event:?}");
        sink.deliver(event, peer);
        return Ok(());
    }
    let reply = if let Some(value) = map.remove("return") {
        Ok(value)
    } else if let Some(error) = map.get("error") {
        let field = |key: &str| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("(missing)")
                .to_owned()
        };
        Err(ReplyError {
            class: field("class"),
            desc: field("desc"),
        })
    } else if map.contains_key("QMP") {
        return Err(protocol("unexpected second greeting".into()));
    } else {
        let keys: Vec<&str> = map.keys().map(String::as_str).take(8).collect();
        return Err(protocol(format!(
            "message is neither a reply nor an event (keys {keys:?})"
        )));
    };
    let id = map.get("id");
    let waiter = id
        .and_then(Value::as_u64)
        .and_then(|id| shared.state().pending.remove(&id));
    match waiter {
        // The waiter may have just given up; nothing to do then.
        Some(waiter) => drop(waiter.send(reply)),
        None => tracing::debug!(
            "{peer}: dropping a reply nobody waits for (id {})",
            id.map_or_else(|| "missing".into(), preview_value)
        ),
    }
    Ok(())
}

/// Errors that mean the peer closed its end of the connection.
fn is_hangup(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

fn parse_event(name: &str, data: Option<&Value>) -> QmpEvent {
    let string = |key: &str| {
        data.and_then(|d| d.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match name {
        "SHUTDOWN" => QmpEvent::Shutdown {
            guest: data
                .and_then(|d| d.get("guest"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            reason: string("reason"),
        },
        "POWERDOWN" => QmpEvent::Powerdown,
        "RESET" => QmpEvent::Reset,
        "STOP" => QmpEvent::Stop,
        "RESUME" => QmpEvent::Resume,
        "NIC_RX_FILTER_CHANGED" => QmpEvent::NicRxFilterChanged {
            name: string("name"),
            path: string("path").unwrap_or_default(),
        },
        "DEVICE_DELETED" => QmpEvent::DeviceDeleted {
            device: string("device"),
            path: string("path").unwrap_or_default(),
        },
        other => QmpEvent::Other(other.to_owned()),
    }
}

/// Parses HMP `info network` output; keeps NICs (`type=nic`) once each
/// (multiqueue NICs have a line per queue). Lines it does not understand
/// are skipped.
fn parse_info_network(text: &str) -> Vec<NicInfo> {
    let mut nics: Vec<NicInfo> = Vec::new();
    for line in text.lines() {
        // Peers and hub ports are indented and prefixed with "\ ".
        let line = line.trim().trim_start_matches('\\').trim();
        let Some((name, rest)) = line.split_once(": ") else {
            continue;
        };
        let fields: Vec<(&str, &str)> = rest
            .split(',')
            .filter_map(|field| field.split_once('='))
            .collect();
        let field = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        if field("type") != Some("nic") || name.is_empty() || name.contains(char::is_whitespace) {
            continue;
        }
        let Some(mac) = field("macaddr").and_then(|m| m.parse::<Mac>().ok()) else {
            continue;
        };
        if !nics.iter().any(|n| n.name == name) {
            nics.push(NicInfo {
                name: name.to_owned(),
                mac,
            });
        }
    }
    nics
}

fn is_nil_uuid(uuid: &str) -> bool {
    uuid.bytes().all(|b| b == b'0' || b == b'-')
}

const PREVIEW: usize = 80;

fn preview_bytes(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(PREVIEW)]);
    let more = if bytes.len() > PREVIEW { "..." } else { "" };
    format!("{:?}{more}", text.trim_end())
}

fn preview_value(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(PREVIEW) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_network() {
        // QEMU 7.2, with an rtl8139 from -nic, a multiqueue NIC and a hub.
        let text = "rtl8139.0: index=0,type=nic,model=rtl8139,macaddr=52:54:00:00:00:09\r\n \\ #net000: index=0,type=user,net=10.0.2.0,restrict=off\r\n\
            nic1: index=0,type=nic,model=e1000,macaddr=52:54:00:AB:CD:EF\r\n \\ n1: index=0,type=user,net=10.0.2.0,restrict=off\r\n\
            mq: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:01\r\nmq: index=1,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:01\r\n\
            hub 0\r\n \\ hub0port1: index=0,type=hubport,\r\n \\ net0: index=0,type=nic,model=e1000,macaddr=52:54:00:00:00:02\r\n\
            bad: index=0,type=nic,model=x,macaddr=zz\r\n";
        let nics = parse_info_network(text);
        let macs: Vec<String> = nics.iter().map(|n| n.mac.to_string()).collect();
        let names: Vec<(&str, &str)> = nics
            .iter()
            .zip(&macs)
            .map(|(n, mac)| (n.name.as_str(), mac.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("rtl8139.0", "52:54:00:00:00:09"),
                ("nic1", "52:54:00:ab:cd:ef"),
                ("mq", "52:54:00:00:00:01"),
                ("net0", "52:54:00:00:00:02"),
            ]
        );
    }

    #[test]
    fn events() {
        let data = serde_json::json!({"guest": true, "reason": "guest-shutdown"});
        assert_eq!(
            parse_event("SHUTDOWN", Some(&data)),
            QmpEvent::Shutdown {
                guest: true,
                reason: Some("guest-shutdown".into())
            }
        );
        assert_eq!(
            parse_event("SHUTDOWN", Some(&Value::Null)),
            QmpEvent::Shutdown {
                guest: false,
                reason: None
            }
        );
        assert_eq!(
            parse_event("FOO_BAR_FROM_QEMU_10", None),
            QmpEvent::Other("FOO_BAR_FROM_QEMU_10".into())
        );
    }

    #[test]
    fn nil_uuid() {
        assert!(is_nil_uuid("00000000-0000-0000-0000-000000000000"));
        assert!(!is_nil_uuid("6f1c1d3e-8a50-4d5b-9d0c-2b7cbb1e0a11"));
    }
}
