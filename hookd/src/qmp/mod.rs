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
//! events would otherwise deadlock. [`QmpSession::start`] returns the
//! session's [`QmpEvents`], whose events wait in a queue in the session's
//! shared state, bounded by [`SessionOptions::events`] (16 by default:
//! QEMU emits a handful of events per state change). When it is full,
//! events are dropped and counted (with one warning per run of drops),
//! and a single [`QmpEvent::Lagged`] with the count is queued as soon as
//! the consumer takes an event and so makes room. Events are hints: a
//! consumer that sees `Lagged` should re-read the state it cares about
//! ([`QmpSession::query_status`], [`QmpSession::query_nics`]). Memory per
//! session is therefore bounded by that capacity, and an empty queue holds
//! none: not a tokio channel, whose blocks of 32 slots every idle guest
//! would hold for its whole life. Dropping the [`QmpEvents`] discards
//! later events.
//!
//! The session's end is always reported: the last item is
//! [`QmpEvent::Closed`] (queued over the bound, after a final `Lagged` if
//! events were still being dropped), after which [`QmpEvents::recv`]
//! returns `None`. A consumer may rely on either.
//!
//! # Timeouts
//!
//! Every wait on the peer is bounded by [`SessionOptions::timeout`] (5 s by
//! default): the greeting, the `qmp_capabilities` reply, each command's
//! reply and each write. A command that times out fails with
//! [`QmpError::Timeout`] but leaves the session usable (its late reply is
//! dropped); a write that times out or fails tears the session down, since
//! the stream may then hold half a command.

mod events;
mod lazybuf;
mod parse;
mod queue;
mod reader;
mod session;
mod shared;
mod types;

pub use events::QmpEvents;
pub use session::{dial, dial_timeout, QmpSession};
pub use types::*;

/// The reading half of a session over bytes in memory, for the fuzz
/// targets (`fuzz/`): not an API.
#[doc(hidden)]
pub mod fuzzing {
    use futures_util::FutureExt;

    use super::parse::Message;
    pub use super::parse::{is_nil_uuid, parse_info_network, preview_bytes, preview_value};
    use super::shared::ReplyError;
    use super::{reader, Greeting, QmpError};

    /// What a session makes of one message after the greeting.
    #[derive(Debug)]
    pub enum Read {
        Event(super::QmpEvent),
        /// A reply (`id`: the command's, if any), or the error a command
        /// would fail with.
        Reply(Option<u64>, Result<serde_json::Value, QmpError>),
    }

    /// Reads `bytes` as a QMP stream with lines of at most `max_line`
    /// bytes: the greeting, then messages until the end or the first
    /// error (which ends a session). Reading from memory never waits.
    pub fn read_stream(
        mut bytes: &[u8],
        max_line: usize,
    ) -> Result<(Greeting, Vec<Read>), QmpError> {
        let peer = "fuzz";
        let greeting = reader::read_greeting(&mut bytes, peer, max_line)
            .now_or_never()
            .expect("reading memory never waits")?;
        let mut buf = Vec::new();
        let mut messages = Vec::new();
        while reader::read_nonblank(&mut bytes, &mut buf, max_line, peer)
            .now_or_never()
            .expect("reading memory never waits")?
        {
            messages.push(match reader::parse_line(&buf, peer)? {
                Message::Event(event) => Read::Event(event),
                Message::Reply { id, reply } => Read::Reply(
                    id,
                    reply
                        .map_err(|ReplyError { class, desc }| QmpError::Command {
                            peer: peer.into(),
                            command: "query-status".into(),
                            class,
                            desc,
                        })
                        .and_then(|text| {
                            serde_json::from_str(text.get()).map_err(|e| QmpError::Decode {
                                peer: peer.into(),
                                command: "query-status".into(),
                                detail: e.to_string(),
                            })
                        }),
                ),
            });
        }
        Ok((greeting, messages))
    }
}
