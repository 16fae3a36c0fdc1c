//! A buffered reader over a session's socket that holds a buffer only
//! while it has unread bytes.
//!
//! Why not tokio's `BufReader`: it keeps its buffer for the life of the
//! session, and a followed QEMU sits idle between rare events, so with a
//! thousand guests a thousand buffers would hold nothing. This one waits
//! for the socket to become readable with no buffer at all, then reads
//! into a buffer on the stack and keeps only the bytes read (an event is
//! ~200 bytes), until they are consumed.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;

/// Most bytes taken from the socket at once: 20 syscalls for a
/// `query-rx-filter` reply of ~20 KB would be fine too, but more than
/// this is never held unread.
const CHUNK: usize = 4096;

pub(super) struct LazyBufReader {
    inner: OwnedReadHalf,
    /// Bytes read and not yet consumed, from `pos`; empty, with no
    /// capacity, once they all are.
    buf: Vec<u8>,
    pos: usize,
}

impl LazyBufReader {
    pub(super) fn new(inner: OwnedReadHalf) -> LazyBufReader {
        LazyBufReader {
            inner,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl AsyncBufRead for LazyBufReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos >= this.buf.len() {
            let stream: &UnixStream = this.inner.as_ref();
            let mut chunk = [0u8; CHUNK];
            let read = loop {
                ready!(stream.poll_read_ready(cx))?;
                match stream.try_read(&mut chunk) {
                    Ok(read) => break read,
                    // A spurious wake-up: readiness is cleared, wait again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            this.buf = chunk[..read].to_vec();
            this.pos = 0;
        }
        Poll::Ready(Ok(&this.buf[this.pos..]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = this.pos.saturating_add(amt).min(this.buf.len());
        if this.pos == this.buf.len() {
            this.buf = Vec::new();
            this.pos = 0;
        }
    }
}

impl AsyncRead for LazyBufReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let available = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = available.len().min(out.remaining());
        out.put_slice(&available[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}
