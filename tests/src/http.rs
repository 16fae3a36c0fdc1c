//! A minimal HTTP client that runs inside a test network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only,
//! so the work happens on a dedicated thread that enters the namespace first
//! and then dies with it: the test's own threads stay where they were.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// One HTTP attempt's budget (connect, send, read), for a fetch that may
/// fail and is tried again.
pub const ONE_TRY: Duration = Duration::from_secs(5);

/// Runs `f` on a new thread inside the network namespace
/// `/run/netns/<netns>` and returns its result.
pub fn with_netns<T, F>(netns: &str, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = Path::new("/run/netns").join(netns);
    let ns = File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let worker = thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns into {}: {e}", path.display()))?;
            drop(ns);
            Ok(f())
        })
        .map_err(|e| format!("spawn thread: {e}"))?;
    worker
        .join()
        .map_err(|_| format!("thread in netns {netns} panicked"))?
}

/// `GET path` with HTTP/1.0 to `addr`, from inside `netns`; returns the
/// body of a 200 answer. Connection failures are retried (every 100 ms)
/// until `timeout`, since a guest's server may start after its lease.
pub fn http_get_in_netns(
    netns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    let path = path.to_string();
    with_netns(netns, move || http_get(addr, &path, timeout))?
}

/// `GET path` with HTTP/1.0 to `addr` from the calling thread's namespace;
/// see [`http_get_in_netns`].
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match attempt(addr, path, deadline) {
            Attempt::Answered(result) => return result,
            Attempt::NoAnswer(e) => e,
        };
        if Instant::now() + Duration::from_millis(100) >= deadline {
            return Err(format!(
                "GET http://{addr}{path}: no answer within {timeout:?}: {last_error}"
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Like [`http_get`], but one attempt and no retry: for "does anything
/// answer there now?" (e.g. a removed port forward must refuse).
pub fn http_get_once(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    match attempt(addr, path, Instant::now() + timeout) {
        Attempt::Answered(result) => result,
        Attempt::NoAnswer(e) => Err(format!("GET http://{addr}{path}: {e}")),
    }
}

enum Attempt {
    /// The server answered: the body of a 200, or why not.
    Answered(Result<String, String>),
    /// No answer (connection refused, timed out, cut): worth retrying.
    NoAnswer(String),
}

fn attempt(addr: SocketAddr, path: &str, deadline: Instant) -> Attempt {
    match try_get(addr, path, deadline) {
        Ok(Response { status: 200, body }) => Attempt::Answered(
            String::from_utf8(body)
                .map_err(|_| format!("GET http://{addr}{path}: body is not UTF-8")),
        ),
        // An answer other than 200 will not change on retry.
        Ok(Response { status, body }) => Attempt::Answered(Err(format!(
            "GET http://{addr}{path}: status {status}: {}",
            String::from_utf8_lossy(&body)
        ))),
        Err(e) => Attempt::NoAnswer(e),
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

/// One attempt: connect, send, read until the server closes.
fn try_get(addr: SocketAddr, path: &str, deadline: Instant) -> Result<Response, String> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10))
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, left()).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("receive: {e}"))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    // "HTTP/1.0 200 OK"
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/"))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    Ok(Response {
        status,
        body: raw[split + 4..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let r = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.len()), (404, 0));
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_response(b"SSH-2.0 x\r\n\r\n").is_err());
    }
}
