//! A blocking client of the control socket, for `qnetctl` and the libvirt
//! hook (neither needs an async runtime for one request).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::api::{Reply, Request, Response};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "qnet-hookd is not running (nothing listens on {}): start it with `qnet-hookd` (or `systemctl start qnet-hookd`)",
        socket.display()
    )]
    NotRunning { socket: PathBuf },
    #[error("cannot use {}: permission denied: root or a member of group `qnet` may talk to qnet-hookd", socket.display())]
    PermissionDenied { socket: PathBuf },
    #[error("talking to qnet-hookd on {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("qnet-hookd sent a reply this client does not understand: {0}")]
    BadReply(String),
    /// The daemon refused or failed the request; its message says why.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and waits (at most `timeout` for each step) for the
/// reply.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let io = |source: std::io::Error| ClientError::Io {
        socket: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning {
                socket: socket.to_path_buf(),
            }
        }
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            socket: socket.to_path_buf(),
        },
        _ => io(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(request).expect("requests always serialise");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    if reply.is_empty() {
        return Err(ClientError::BadReply(
            "the daemon closed the connection without a reply".into(),
        ));
    }
    match serde_json::from_str::<Response>(&reply) {
        Ok(Response::Ok(reply)) => Ok(reply),
        Ok(Response::Error(message)) => Err(ClientError::Refused(message)),
        Err(e) => Err(ClientError::BadReply(e.to_string())),
    }
}
