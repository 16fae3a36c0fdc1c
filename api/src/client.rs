//! A blocking client of the control socket, for `qnetctl` and the libvirt
//! hook: neither needs an async runtime for one request.

use std::io::{BufRead, BufReader, ErrorKind as IoKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::reply::{ApiError, Reply, Response};
use crate::wire::Request;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error(
        "qnet-hookd is not running (nothing listens on {}): start it with `systemctl start qnet-hookd` (or run `qnet-hookd`)",
        socket.display()
    )]
    NotRunning { socket: PathBuf },
    #[error("cannot use {}: permission denied: root or a member of group `qnet` may talk to qnet-hookd", socket.display())]
    PermissionDenied { socket: PathBuf },
    #[error(
        "qnet-hookd did not answer within {} s (socket {}): it may be overloaded or stuck; see its log (journalctl -u qnet-hookd)",
        after.as_secs(),
        socket.display()
    )]
    Timeout { socket: PathBuf, after: Duration },
    #[error("talking to qnet-hookd on {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("qnet-hookd sent a reply this client does not understand: {0}")]
    BadReply(String),
    /// The daemon refused or failed the request; its kind and message say
    /// why.
    #[error("{0}")]
    Refused(ApiError),
}

/// Sends one request and waits (at most `timeout` for each step) for the
/// reply.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let failed = |source: std::io::Error| match source.kind() {
        IoKind::WouldBlock | IoKind::TimedOut => ClientError::Timeout {
            socket: socket.to_path_buf(),
            after: timeout,
        },
        _ => ClientError::Io {
            socket: socket.to_path_buf(),
            source,
        },
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        IoKind::NotFound | IoKind::ConnectionRefused => ClientError::NotRunning {
            socket: socket.to_path_buf(),
        },
        IoKind::PermissionDenied => ClientError::PermissionDenied {
            socket: socket.to_path_buf(),
        },
        _ => failed(e),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(failed)?;
    stream.set_write_timeout(Some(timeout)).map_err(failed)?;
    let mut line = serde_json::to_string(request).expect("requests always serialise");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(failed)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(failed)?;
    if reply.is_empty() {
        return Err(ClientError::BadReply(
            "the daemon closed the connection without a reply".into(),
        ));
    }
    match serde_json::from_str::<Response>(&reply) {
        Ok(Response::Ok(reply)) => Ok(reply),
        Ok(Response::Error(error)) => Err(ClientError::Refused(error)),
        Err(e) => Err(ClientError::BadReply(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_daemon_is_a_timeout_that_says_so() {
        let dir = std::env::temp_dir().join(format!("qnet-api-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = request(&path, &Request::Status, Duration::from_millis(200)).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ClientError::Timeout { .. }), "{text}");
        assert!(text.contains("did not answer within 0 s"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
