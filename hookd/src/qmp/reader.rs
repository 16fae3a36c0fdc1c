//! The I/O tasks of a session: bounded line reading, the greeting, the
//! writer (while commands are queued), and the reader that routes replies
//! and queues events.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::time::timeout;

use super::lazybuf::LazyBufReader;
use super::parse::{self, preview_bytes, Message};
use super::shared::{Shared, CLOSED_BY_US, PEER_CLOSED};
use super::types::{Greeting, QmpError};

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

/// Reads the next non-blank line into `buf`; `false` on a clean EOF.
pub(super) async fn read_nonblank<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    peer: &str,
) -> Result<bool, QmpError> {
    loop {
        if let Line::Eof = read_line(reader, buf, max, peer).await? {
            return Ok(false);
        }
        if !buf.iter().all(u8::is_ascii_whitespace) {
            return Ok(true);
        }
    }
}

fn json(line: &[u8], peer: &str) -> Result<Value, QmpError> {
    serde_json::from_slice(line).map_err(|e| QmpError::Protocol {
        peer: peer.to_owned(),
        detail: format!("invalid JSON ({e}): {}", preview_bytes(line)),
    })
}

/// What a line after the greeting is: a plain reply read as text, anything
/// else through its JSON value. Anything that is not QMP ends the session.
pub(super) fn parse_line<'a>(line: &'a [u8], peer: &str) -> Result<Message<'a>, QmpError> {
    match parse::plain_reply(line) {
        Some(reply) => Ok(reply),
        None => parse::message(json(line, peer)?).map_err(|e| QmpError::Protocol {
            peer: peer.to_owned(),
            detail: e.to_string(),
        }),
    }
}

pub(super) async fn read_greeting<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    peer: &str,
    max: usize,
) -> Result<Greeting, QmpError> {
    let mut buf = Vec::new();
    if !read_nonblank(reader, &mut buf, max, peer).await? {
        return Err(QmpError::Eof {
            peer: peer.to_owned(),
            during: "before the QMP greeting".into(),
        });
    }
    parse::greeting(&json(&buf, peer)?).map_err(|e| QmpError::Protocol {
        peer: peer.to_owned(),
        detail: e.to_string(),
    })
}

/// Writes the queued command lines (`State::outgoing`), then gives the
/// write half back to the session's state and ends. A writer task runs
/// only while there is something to write: an idle guest holds none (a
/// task for each of a thousand guests sending a command once in a long
/// while was memory held for nothing). `QmpSession::request` starts it.
pub(super) async fn write_queued(mut writer: OwnedWriteHalf, shared: Arc<Shared>, after: Duration) {
    loop {
        let line = {
            let mut state = shared.state();
            match state.outgoing.pop_front() {
                _ if shared.is_stopped() => None,
                Some(line) => Some(line),
                None => {
                    // Give the handshake's few slots back while idle.
                    state.outgoing = VecDeque::new();
                    // Under the lock: a line queued after this starts a
                    // writer of its own with it.
                    state.writer = Some(writer);
                    return;
                }
            }
        };
        // Stopped: dropping the write half shuts the write direction down.
        let Some(line) = line else { return };
        let failure = match timeout(after, writer.write_all(&line)).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) if is_hangup(&e) => {
                // The peer is gone (or at least stopped reading for good):
                // no more commands, but leave the reader running until it
                // sees the end, so that the session ends the same way as
                // when the reader notices first.
                tracing::debug!("{}: writing a command: {e}", shared.peer);
                shared.close(PEER_CLOSED.into());
                return;
            }
            Ok(Err(e)) => format!("writing a command failed: {e}"),
            Err(_) => format!("writing a command timed out after {after:?}"),
        };
        tracing::debug!("{}: {failure}", shared.peer);
        shared.abort(failure);
        return;
    }
}

/// Reads messages until the session ends: routes replies, queues events
/// (never waiting for their consumer: replies only arrive while this
/// reads), and finally reports the end.
pub(super) async fn read_loop(mut reader: LazyBufReader, shared: Arc<Shared>, max_line: usize) {
    let mut buf = Vec::new();
    let peer = shared.peer.as_str();
    let outcome = loop {
        let line = tokio::select! {
            biased;
            _ = shared.stopped() => break Ok(false),
            line = read_nonblank(&mut reader, &mut buf, max_line, peer) => line,
        };
        match line {
            Ok(true) => {
                if let Err(e) = parse_line(&buf, peer).map(|m| route(m, &shared)) {
                    break Err(e);
                }
                // A Vec keeps the capacity of the longest line it held
                // (`query-rx-filter` answers are ~20 KiB); between messages
                // it holds nothing, so idle guests keep no line buffer. An
                // allocation per message is nothing next to its parsing.
                buf = Vec::new();
            }
            Ok(false) => break Ok(true),
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
    shared.stop();
    shared.finish_events(report.map(|e| e.to_string()));
}

/// Routes one message: an event to the consumer's queue, a reply to the
/// command waiting for it.
fn route(message: Message<'_>, shared: &Shared) {
    let peer = shared.peer.as_str();
    match message {
        Message::Event(event) => {
            tracing::debug!("{peer}: event {event:?}");
            shared.deliver(event);
        }
        Message::Reply { id, reply } => {
            let waiter = id.and_then(|id| shared.state().pending.remove(&id));
            match waiter {
                // Decoded here, from the line buffer (see `Deliver`). The
                // waiter may have just given up; nothing to do then.
                Some(deliver) => match reply {
                    Ok(text) => deliver(Ok(&*text)),
                    Err(e) => deliver(Err(e)),
                },
                None => tracing::debug!(
                    "{peer}: dropping a reply nobody waits for (id {})",
                    id.map_or_else(|| "missing".into(), |id| id.to_string())
                ),
            }
        }
    }
}

/// Errors that mean the peer closed its end of the connection.
pub(super) fn is_hangup(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}
