//! The control socket: one JSON request line in, one JSON response line
//! out, the caller identified by SO_PEERCRED (authorisation happens in the
//! reconciler, which knows whose guests are whose).

use std::ffi::CString;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::api::{Request, Response, MAX_REQUEST_BYTES};
use crate::daemon::{Input, Peer};

/// Group whose members may use the control socket besides root.
pub const CTL_GROUP: &str = "qnet";
/// A client gets this long to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// And the daemon this long to answer (attach dials a QEMU).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve(listener: UnixListener, inputs: mpsc::UnboundedSender<Input>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, inputs.clone()));
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
            pid: cred.pid().unwrap_or(0) as u32,
            uid: cred.uid(),
        },
        Err(e) => {
            tracing::warn!("control socket: SO_PEERCRED: {e}");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(read)).await {
        Err(_) => Response::Error("no request within 5 s".into()),
        Ok(Err(message)) => Response::Error(message),
        Ok(Ok(request)) => {
            tracing::debug!(?request, uid = peer.uid, pid = peer.pid, "control request");
            let (reply, answer) = oneshot::channel();
            if inputs
                .send(Input::Ctl {
                    request,
                    peer,
                    reply,
                })
                .is_err()
            {
                Response::Error("the daemon is shutting down".into())
            } else {
                match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(_)) => Response::Error("the daemon dropped the request".into()),
                    Err(_) => Response::Error("the daemon did not answer within 30 s".into()),
                }
            }
        }
    };
    let mut line = serde_json::to_string(&response).expect("responses always serialise");
    line.push('\n');
    let _ = write.write_all(line.as_bytes()).await;
}

/// Reads one request line of at most [`MAX_REQUEST_BYTES`].
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    if line.trim().is_empty() {
        return Err("empty request: send one JSON object such as {\"op\":\"status\"}".into());
    }
    serde_json::from_str(&line).map_err(|e| format!("bad request: {e}"))
}

/// Gives the socket to group `qnet` when that group exists, so its members
/// may use qnetctl without root.
pub fn set_group(path: &Path) {
    let Ok(Some(group)) = nix::unistd::Group::from_name(CTL_GROUP) else {
        return;
    };
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: chown(2) of a NUL-terminated path; -1 keeps the owner.
    let rc = unsafe { libc::chown(c_path.as_ptr(), u32::MAX, group.gid.as_raw()) };
    if rc != 0 {
        tracing::warn!(
            "giving {} to group {CTL_GROUP}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}
