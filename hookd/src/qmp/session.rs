//! A live QMP session: the handle that sends commands and waits for their
//! replies, and how a session starts.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::time::{timeout, timeout_at, Instant};

use super::events::QmpEvents;
use super::lazybuf::LazyBufReader;
use super::parse::{is_nil_uuid, parse_info_network, preview_value, MAX_NICS};
use super::reader::{read_greeting, read_loop, write_queued};
use super::shared::{Deliver, PendingGuard, ReplyError, Shared, CLOSED_BY_US};
use super::types::{
    Greeting, GuestIdentity, GuestInfo, GuestStatus, NicInfo, QmpError, SessionOptions,
    DEFAULT_TIMEOUT,
};
use qnet_api::{kept_text, GuestName, GuestUuid, Mac};

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
    next_id: AtomicU64,
    identity: GuestIdentity,
    greeting: Greeting,
    options: SessionOptions,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: nobody can send commands any more.
        self.shared.stop();
    }
}

impl QmpSession {
    /// Reads the greeting, spawns the reader task and negotiates
    /// capabilities (none are enabled), with [`SessionOptions::default`].
    ///
    /// The [`QmpEvents`] returned receive every event of the session and
    /// finally [`QmpEvent::Closed`](super::QmpEvent::Closed), then `None`.
    pub async fn start(
        stream: UnixStream,
    ) -> Result<(QmpSession, GuestIdentity, QmpEvents), QmpError> {
        Self::start_with(stream, SessionOptions::default()).await
    }

    /// [`QmpSession::start`] with explicit options.
    pub async fn start_with(
        stream: UnixStream,
        options: SessionOptions,
    ) -> Result<(QmpSession, GuestIdentity, QmpEvents), QmpError> {
        let (identity, peer) = identify(&stream)?;
        let (read_half, write_half) = stream.into_split();
        // No buffer while idle: a thousand idle guests should not cost a
        // buffer each for nothing.
        let mut reader = LazyBufReader::new(read_half);

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

        let shared = Arc::new(Shared::new(peer, write_half, options.events));
        let events = QmpEvents::new(shared.clone());
        tokio::spawn(read_loop(reader, shared.clone(), options.max_line));

        let session = QmpSession {
            inner: Arc::new(Inner {
                shared,
                next_id: AtomicU64::new(0),
                identity,
                greeting,
                options,
            }),
        };
        session
            .execute(qapi::qmp::qmp_capabilities { enable: None })
            .await?;
        Ok((session, identity, events))
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
    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C::Ok: Send + 'static,
    {
        let arguments = serde_json::to_value(&command).map_err(|e| QmpError::Protocol {
            peer: self.peer().to_owned(),
            detail: format!("cannot encode {}: {e}", C::NAME),
        })?;
        let arguments = match arguments {
            Value::Null => None,
            other => Some(other),
        };
        self.request(C::NAME, arguments).await
    }

    /// Runs a command by name with untyped arguments; returns the untyped
    /// `"return"` value.
    pub async fn execute_raw(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.request(command, arguments).await
    }

    /// Runs a command by name; returns its `"return"` value decoded into
    /// `T`, which may be just the fields the caller needs of it. The
    /// reader decodes the reply as soon as it has read it (see
    /// `shared::Deliver`).
    async fn request<T: DeserializeOwned + Send + 'static>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
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
        let deliver: Deliver = Box::new(move |reply: Result<&RawValue, ReplyError>| {
            let decoded = reply.map(|text| serde_json::from_str::<T>(text.get()));
            // The waiter may have just given up.
            let _ = reply_tx.send(decoded);
        });
        let idle_writer = {
            let mut state = shared.state();
            if let Some(reason) = &state.closed {
                return Err(closed(reason.clone()));
            }
            state.pending.insert(id, deliver);
            // A writer task running now writes this line too (it gives
            // the write half back only under this lock, with the queue
            // empty); otherwise this command starts one.
            state.outgoing.push_back(line);
            state.writer.take()
        };
        let _pending = PendingGuard { shared, id };
        if let Some(writer) = idle_writer {
            let after = inner.options.timeout;
            tokio::spawn(write_queued(writer, inner.shared.clone(), after));
        }

        let deadline = Instant::now() + inner.options.timeout;
        match timeout_at(deadline, reply_rx).await {
            Ok(Ok(Ok(Ok(value)))) => Ok(value),
            Ok(Ok(Ok(Err(e)))) => Err(QmpError::Decode {
                peer: shared.peer.clone(),
                command: command.to_owned(),
                detail: e.to_string(),
            }),
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
        // Everything kept of the peer's strings is made safe here, at the
        // edge: a `-name` of megabytes is cut, control characters go, and a
        // UUID must look like one, before anything holds them.
        let uuid = Some(uuid.UUID)
            .filter(|u| !is_nil_uuid(u))
            .and_then(|u| u.parse::<GuestUuid>().ok());
        Ok(GuestInfo {
            name: name.name.as_deref().map(GuestName::kept),
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
        let Status { status, running } = self.request("query-status", None).await?;
        Ok(GuestStatus {
            status: kept_text(&status),
            running,
        })
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
        // Decoded from the reply's text: the `vlan-table` of 4,096 entries
        // next to each NIC's name and MAC is skipped, never built.
        let filters: Vec<Filter> = self.request(COMMAND, None).await?;
        filters
            .into_iter()
            .take(MAX_NICS)
            .map(|f| match f.main_mac.parse::<Mac>().ok() {
                Some(mac) => Ok(NicInfo {
                    name: kept_text(&f.name),
                    mac,
                }),
                None => Err(QmpError::Decode {
                    peer: self.peer().to_owned(),
                    command: COMMAND.into(),
                    detail: format!(
                        "NIC {:?} has an invalid main-mac {:?}",
                        kept_text(&f.name),
                        kept_text(&f.main_mac)
                    ),
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
        nics.truncate(MAX_NICS);
        Ok(nics)
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
