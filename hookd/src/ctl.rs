//! The control socket: one JSON request line in, one JSON response line
//! out, the caller identified by SO_PEERCRED (authorisation happens in the
//! reconciler, which knows whose guests are whose).
//!
//! Every wait on a client is bounded: a client gets [`READ_TIMEOUT`] to
//! send its request and [`WRITE_TIMEOUT`] to take its reply, and at most
//! [`MAX_CLIENTS`] are served at once, so clients that never read cannot
//! make the daemon hold their replies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qnet_api::{ApiError, ErrorKind, Request, Response, MAX_REQUEST_BYTES};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::reconciler::input::{Input, Peer};

/// Group whose members may use the control socket besides root.
pub const CTL_GROUP: &str = "qnet";
/// A client gets this long to send its request...
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// ...the daemon this long to answer (attach dials a QEMU)...
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// ...and the client this long to take the reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a missing group `qnet` is looked for again.
const GROUP_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Clients served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 64;

pub async fn serve(listener: UnixListener, inputs: mpsc::UnboundedSender<Input>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        // Wait for a free slot before accepting: the backlog holds the rest.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let inputs = inputs.clone();
                tokio::spawn(async move {
                    handle(stream, inputs).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::warn!("control socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, inputs: mpsc::UnboundedSender<Input>) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer {
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
            uid: cred.uid(),
        },
        Err(e) => {
            tracing::warn!("control socket: SO_PEERCRED: {e}");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let error = |kind, message: &str| Response::Error(ApiError::new(kind, message));
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(read)).await {
        Err(_) => error(ErrorKind::Invalid, "no request within 5 s"),
        Ok(Err(refused)) => Response::Error(refused),
        Ok(Ok(request)) => ask(request, peer, &inputs).await,
    };
    let mut line = serde_json::to_string(&response).expect("responses always serialise");
    line.push('\n');
    if tokio::time::timeout(WRITE_TIMEOUT, write.write_all(line.as_bytes()))
        .await
        .is_err()
    {
        tracing::debug!(
            uid = peer.uid,
            pid = peer.pid,
            "control client did not take its reply"
        );
    }
}

/// Hands the request to the reconciler and waits for its answer.
async fn ask(request: Request, peer: Peer, inputs: &mpsc::UnboundedSender<Input>) -> Response {
    tracing::debug!(?request, uid = peer.uid, pid = peer.pid, "control request");
    let (reply, answer) = oneshot::channel();
    // A guest stop waits for QEMU to exit: it takes that much longer.
    let within = REPLY_TIMEOUT + request.answer_takes();
    let unavailable =
        |message: &str| Response::Error(ApiError::new(ErrorKind::Unavailable, message));
    if inputs
        .send(Input::Ctl {
            request,
            peer,
            reply,
        })
        .is_err()
    {
        return unavailable("the daemon is shutting down");
    }
    match tokio::time::timeout(within, answer).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => unavailable("the daemon dropped the request"),
        Err(_) => unavailable(&format!(
            "the daemon did not answer within {} s",
            within.as_secs()
        )),
    }
}

/// Reads one request line of at most [`MAX_REQUEST_BYTES`].
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, ApiError> {
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| ApiError::new(ErrorKind::Invalid, format!("reading the request: {e}")))?;
    Ok(Request::from_line(&line)?)
}

/// Gives the socket to group `qnet`, so its members may use qnetctl
/// without root. A missing group is said once, and applied as soon as it
/// appears (checked every few seconds), without a restart.
pub async fn keep_group(path: PathBuf) {
    if set_group(&path) {
        return;
    }
    tracing::warn!(
        "group `{CTL_GROUP}` does not exist: only root can use {} until it does (create it with `groupadd --system {CTL_GROUP}`; qnet-hookd applies it within {} s)",
        path.display(),
        GROUP_CHECK_EVERY.as_secs()
    );
    loop {
        tokio::time::sleep(GROUP_CHECK_EVERY).await;
        if set_group(&path) {
            tracing::info!(
                "group `{CTL_GROUP}` exists now: its members may use {}",
                path.display()
            );
            return;
        }
    }
}

/// True once the socket belongs to group `qnet` (also run on reload, so a
/// group made again with another gid applies at once).
pub fn set_group(path: &Path) -> bool {
    let Ok(Some(group)) = nix::unistd::Group::from_name(CTL_GROUP) else {
        return false;
    };
    if let Err(e) = nix::unistd::chown(path, None, Some(group.gid)) {
        tracing::warn!("giving {} to group {CTL_GROUP}: {e}", path.display());
    }
    true
}
