//! Set elements of nf_tables over nfnetlink: the one place the firewall
//! talks netlink, without running `nft`.
//!
//! A forward change is one element of one map of our table. Asking `nft`
//! to make it costs a process start (~2 ms here: nft links libnftables,
//! libxtables, libjansson, libgmp) plus a cache fill, for a kernel change
//! that takes ~0.1 ms. This module sends the same transaction nft would
//! from the daemon itself, and reads a set's elements back. Messages are
//! built and parsed by `netlink-packet-netfilter` (nf_tables) and
//! `netlink-packet-core` (the netlink header, acks, errors, dumps): no
//! constant is declared here. What goes on the wire:
//!
//! ```text
//! NFNL_MSG_BATCH_BEGIN                      res_id = NFNL_SUBSYS_NFTABLES
//! NFT_MSG_NEWSETELEM (family inet)          one per set and run of changes
//!   NFTA_SET_ELEM_LIST_TABLE   "qnet"
//!   NFTA_SET_ELEM_LIST_SET     "fwd4"
//!   NFTA_SET_ELEM_LIST_ELEMENTS
//!     NFTA_LIST_ELEM
//!       NFTA_SET_ELEM_KEY  { NFTA_DATA_VALUE key bytes }
//!       NFTA_SET_ELEM_DATA { NFTA_DATA_VALUE value bytes }   (add only)
//! NFNL_MSG_BATCH_END
//! ```
//!
//! This module knows sets and bytes, not forwards: the caller gives keys
//! and values already encoded (see [`super::element`]).

use std::io;
use std::sync::Mutex;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLMSG_ALIGNTO, NLM_F_ACK,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
    SetElementMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    NetfilterSubsystem,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

/// Elements per message: the list is one netlink attribute, whose length
/// is 16 bits; an IPv6 element takes 72 bytes, so 512 of them fit with room.
const ELEMENTS_PER_MESSAGE: usize = 512;

/// How long we wait for the kernel's answers. It answers in well under a
/// millisecond unless another process holds the nftables commit lock for
/// long; we would rather report that than hang the daemon.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a dump that a concurrent change interrupted is started again.
const DUMP_ATTEMPTS: usize = 3;

/// A map element as the kernel stores it: (key, value).
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// What a change does to its element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `add element`: key and value; an element that is there with the
    /// same value is a no-op, with another value the batch fails with
    /// `EEXIST`.
    Add,
    /// `delete element`: by key; an absent key fails the batch with
    /// `ENOENT`.
    Delete,
}

/// One change to one element of set `set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElementChange<'a> {
    pub op: Op,
    pub set: &'a str,
    pub key: Vec<u8>,
    /// The mapped value (ignored by [`Op::Delete`]).
    pub value: Vec<u8>,
}

/// Runs `changes` to sets of `table inet <table>` as ONE transaction.
///
/// Sends: one batch, one message per run of changes with the same op and
/// set (and per [`ELEMENTS_PER_MESSAGE`]), each asking for an ack.
/// Expects: one answer per message, after the kernel ran the whole batch.
/// Errors: the first error the kernel answered (`EEXIST`: a key is there
/// with another value; `ENOENT`: the table or set is missing, or a deleted
/// key is absent; `EPERM`: no `CAP_NET_ADMIN`), and then nothing changed;
/// `TimedOut` when no answer came within [`ANSWER_TIMEOUT`], or an error of
/// the socket, and then the outcome is unknown.
pub fn transact(table: &str, changes: &[ElementChange<'_>]) -> io::Result<()> {
    with_socket(|socket| {
        let batch = encode_batch(table, changes, socket.next_seq);
        let begin = socket.next_seq;
        socket.next_seq = batch.next_seq;
        if batch.acks == 0 {
            return Ok(Ok(()));
        }
        socket.send(&batch.bytes)?;
        read_acks(&socket.socket, batch.acks, begin)
    })
}

/// The elements of set `set` of `table inet <table>`, as (key, value).
///
/// Sends: one `NFT_MSG_GETSETELEM` dump request.
/// Expects: `NFT_MSG_NEWSETELEM` messages with the elements, then
/// `NLMSG_DONE`; started again (up to [`DUMP_ATTEMPTS`]) when the kernel
/// flags the dump as interrupted by a concurrent change.
/// Errors: `ENOENT` when the table or set does not exist; `TimedOut`; a
/// malformed answer.
pub fn dump_set(table: &str, set: &str) -> io::Result<Vec<KeyValue>> {
    with_socket(|socket| {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = socket.next_seq;
            socket.next_seq = seq.wrapping_add(1);
            let request = nft_message(
                NfTablesMessage::GetSetElement(set_elements(table, set, Vec::new())),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
            );
            socket.send(&serialize(&[request]))?;
            match read_dump(&socket.socket, seq)? {
                Ok(Some(elements)) => return Ok(Ok(elements)),
                Ok(None) => continue,
                Err(refused) => return Ok(Err(refused)),
            }
        }
        Ok(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "nfnetlink: the set kept changing while it was read",
        )))
    })
}

/// One open nfnetlink socket per network namespace we talked to (the
/// daemon: one). Kept open because closing a socket that deleted set
/// elements makes the kernel wait, holding the nftables commit lock, for
/// the RCU grace period that frees them (~10-15 ms here); left open, the
/// kernel frees them in the background.
static SOCKETS: Mutex<Vec<NftSocket>> = Mutex::new(Vec::new());

struct NftSocket {
    /// (device, inode) of the network namespace the socket lives in.
    namespace: (u64, u64),
    socket: Socket,
    next_seq: u32,
}

/// Runs `f` with this thread's namespace's socket, opened if need be.
/// `f` answers `Err` when the exchange broke (no answer, a socket error, a
/// malformed answer): then the socket is closed, so that no late answer to
/// it can be mistaken for one of the next exchange. `Ok(Err(_))` is the
/// kernel's complete answer refusing a request: the socket stays open
/// (closing one that deleted elements would make the kernel wait for them
/// to be freed, holding the commit lock; see [`SOCKETS`]).
fn with_socket<T>(f: impl FnOnce(&mut NftSocket) -> io::Result<io::Result<T>>) -> io::Result<T> {
    let namespace = current_netns()?;
    let mut sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    let index = match sockets.iter().position(|s| s.namespace == namespace) {
        Some(index) => index,
        None => {
            sockets.push(NftSocket::open(namespace)?);
            sockets.len() - 1
        }
    };
    f(&mut sockets[index]).unwrap_or_else(|broken| {
        sockets.swap_remove(index);
        Err(broken)
    })
}

impl NftSocket {
    fn open(namespace: (u64, u64)) -> io::Result<NftSocket> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        // Connected to the kernel: nobody else can send us datagrams.
        socket.connect(&SocketAddr::new(0, 0))?;
        let timeout = TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0);
        setsockopt(&socket, sockopt::ReceiveTimeout, &timeout)?;
        // Errors echo only the failed message's header, not all of it.
        socket.set_cap_ack(true)?;
        Ok(NftSocket {
            namespace,
            socket,
            next_seq: 1,
        })
    }

    /// Sends `bytes` as one datagram: the kernel takes a batch only whole.
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // It must fit the send buffer (default ~200 KiB; 10,000 elements
        // are ~450 KiB). We are root (nftables needs CAP_NET_ADMIN
        // anyway): force it.
        if bytes.len() > 64 * 1024 {
            setsockopt(&self.socket, sockopt::SndBufForce, &(bytes.len() * 2))?;
        }
        let sent = self.socket.send(bytes, 0)?;
        if sent != bytes.len() {
            return Err(io::Error::other("nfnetlink: batch sent only in part"));
        }
        Ok(())
    }
}

/// (device, inode) of the calling thread's network namespace.
fn current_netns() -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/thread-self/ns/net")?;
    Ok((meta.dev(), meta.ino()))
}

/// An encoded batch and how many answers it asks for.
pub struct Batch {
    pub bytes: Vec<u8>,
    pub acks: usize,
    /// The sequence number after the batch's last message.
    pub next_seq: u32,
}

/// Encodes `changes` as one batch; sequence numbers start at `first_seq`
/// (the batch begin message), one per message. Nothing to change is a
/// batch of no messages (`acks` 0), not to be sent.
pub fn encode_batch(table: &str, changes: &[ElementChange<'_>], first_seq: u32) -> Batch {
    let mut seq = first_seq;
    let mut messages = vec![control_message(ControlMessage::BatchBegin, seq)];
    let runs = changes.chunk_by(|a, b| a.op == b.op && a.set == b.set);
    for run in runs.flat_map(|run| run.chunks(ELEMENTS_PER_MESSAGE)) {
        seq = seq.wrapping_add(1);
        let (op, set) = (run[0].op, run[0].set);
        let elements = run.iter().map(element).collect();
        let list = set_elements(table, set, elements);
        messages.push(match op {
            Op::Add => nft_message(
                NfTablesMessage::NewSetElement(list),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                seq,
            ),
            Op::Delete => nft_message(
                NfTablesMessage::DeleteSetElement(list),
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
            ),
        });
    }
    let acks = messages.len() - 1;
    seq = seq.wrapping_add(1);
    messages.push(control_message(ControlMessage::BatchEnd, seq));
    Batch {
        bytes: if acks == 0 {
            Vec::new()
        } else {
            serialize(&messages)
        },
        acks,
        next_seq: seq.wrapping_add(1),
    }
}

/// `NFTA_LIST_ELEM { KEY { VALUE key } [DATA { VALUE value }] }`.
fn element(change: &ElementChange<'_>) -> ListAttribute<SetElementAttribute> {
    let mut attributes = vec![SetElementAttribute::Key(DataAttribute::Value(
        change.key.clone(),
    ))];
    if change.op == Op::Add {
        attributes.push(SetElementAttribute::Data(DataAttribute::Value(
            change.value.clone(),
        )));
    }
    ListAttribute::Element(attributes)
}

fn set_elements(
    table: &str,
    set: &str,
    elements: Vec<ListAttribute<SetElementAttribute>>,
) -> SetElementMessage {
    let mut attributes = vec![
        SetElementList::Table(table.to_owned()),
        SetElementList::Set(set.to_owned()),
    ];
    if !elements.is_empty() {
        attributes.push(SetElementList::Elements(elements));
    }
    SetElementMessage { attributes }
}

/// An nf_tables message of family inet.
fn nft_message(inner: NfTablesMessage, flags: u16, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let header = NetfilterHeader::new(NetfilterProtoFamily::Inet, 0, 0);
    netlink_message(NetfilterMessage::new(header, inner), flags, seq)
}

/// A batch begin or end: its `res_id` names the subsystem the batch is for.
fn control_message(inner: ControlMessage, seq: u32) -> NetlinkMessage<NetfilterMessage> {
    let res_id = u8::from(NetfilterSubsystem::NfTables).into();
    let header = NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, res_id);
    netlink_message(NetfilterMessage::new(header, inner), NLM_F_REQUEST, seq)
}

fn netlink_message(
    message: NetfilterMessage,
    flags: u16,
    seq: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    message.finalize();
    message
}

fn serialize(messages: &[NetlinkMessage<NetfilterMessage>]) -> Vec<u8> {
    let mut bytes = vec![0; messages.iter().map(|m| m.buffer_len()).sum()];
    let mut at = 0;
    for message in messages {
        message.serialize(&mut bytes[at..]);
        at += message.buffer_len();
    }
    bytes
}

/// Reads the answers to the batch that began with sequence `begin` until
/// `expected` acks (or errors) arrived; the first error the kernel
/// answered is the batch's result (the inner one: the exchange is
/// complete); the outer error is a broken exchange. An error for the batch begin message itself (the kernel could
/// not take the batch) ends it at once. Answers to other sequence numbers
/// (none should come) are ignored.
fn read_acks(socket: &Socket, expected: usize, begin: u32) -> io::Result<io::Result<()>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut answered = 0;
    let mut first_error: Option<i32> = None;
    while answered < expected {
        let len = receive(socket, &mut buf)?;
        for message in messages(&buf[..len]) {
            let message = message?;
            let seq = message.header.sequence_number;
            if seq.wrapping_sub(begin) > expected as u32 {
                continue;
            }
            let NetlinkPayload::Error(ack) = message.payload else {
                return Err(unexpected(&message));
            };
            answered += 1;
            if let Some(code) = ack.code {
                first_error.get_or_insert(-code.get());
            }
            if seq == begin {
                answered = expected;
            }
        }
    }
    Ok(match first_error {
        Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        None => Ok(()),
    })
}

/// Reads a dump answering sequence `seq`: its elements, or `None` when the
/// kernel flagged it as interrupted (inconsistent); the inner error is the
/// kernel's refusal, the outer one a broken exchange.
fn read_dump(socket: &Socket, seq: u32) -> io::Result<io::Result<Option<Vec<KeyValue>>>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut elements = Vec::new();
    let mut interrupted = false;
    loop {
        let len = receive(socket, &mut buf)?;
        for message in messages(&buf[..len]) {
            let message = message?;
            if message.header.sequence_number != seq {
                continue;
            }
            interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(Ok((!interrupted).then_some(elements))),
                NetlinkPayload::Error(e) => {
                    let errno = e.code.map_or(libc::EPROTO, |c| -c.get());
                    return Ok(Err(io::Error::from_raw_os_error(errno)));
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewSetElement(list)),
                    ..
                }) => elements.extend(key_values(list)),
                _ => return Err(unexpected(&message)),
            }
        }
    }
}

/// The (key, value) of every element of a set element list; elements
/// without both are not of a map and are left out.
fn key_values(list: SetElementMessage) -> impl Iterator<Item = KeyValue> {
    let elements = list.attributes.into_iter().flat_map(|a| match a {
        SetElementList::Elements(elements) => elements,
        _ => Vec::new(),
    });
    elements.filter_map(|element| {
        let ListAttribute::Element(attributes) = element else {
            return None;
        };
        let (mut key, mut value) = (None, None);
        for attribute in attributes {
            match attribute {
                SetElementAttribute::Key(DataAttribute::Value(bytes)) => key = Some(bytes),
                SetElementAttribute::Data(DataAttribute::Value(bytes)) => value = Some(bytes),
                _ => {}
            }
        }
        Some((key?, value?))
    })
}

/// One datagram from the kernel, waiting at most [`ANSWER_TIMEOUT`].
fn receive(socket: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match socket.recv(&mut &mut buf[..], 0) {
            Ok(len) => return Ok(len),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nfnetlink: no answer from the kernel (is another process holding the nftables lock?)",
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// The netlink messages in one datagram; a malformed one ends it.
fn messages(
    datagram: &[u8],
) -> impl Iterator<Item = io::Result<NetlinkMessage<NetfilterMessage>>> + '_ {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let parsed = NetlinkBuffer::new_checked(rest)
            .map(|b| b.length() as usize)
            .and_then(|len| {
                let message = NetlinkMessage::deserialize(&rest[..len])?;
                rest = &rest[len
                    .next_multiple_of(usize::from(NLMSG_ALIGNTO))
                    .min(rest.len())..];
                Ok(message)
            });
        Some(parsed.map_err(|e| {
            rest = &[];
            io::Error::other(format!("nfnetlink: malformed answer: {e}"))
        }))
    })
}

fn unexpected(message: &NetlinkMessage<NetfilterMessage>) -> io::Error {
    io::Error::other(format!(
        "nfnetlink: unexpected answer of type {}",
        message.header.message_type
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(op: Op, set: &'static str, port: u8) -> ElementChange<'static> {
        ElementChange {
            op,
            set,
            key: vec![6, 0, 0, 0, 0, port, 0, 0],
            value: vec![10, 42, 0, 10, 0, 80, 0, 0],
        }
    }

    /// (type, sequence) of every message in `bytes`, checking alignment.
    fn kinds_and_seqs(bytes: &[u8]) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let buf = NetlinkBuffer::new_checked(rest).unwrap();
            let len = buf.length() as usize;
            assert_eq!(len % 4, 0, "messages stay aligned");
            assert!(len < 65536, "message of {len} bytes");
            out.push((buf.message_type(), buf.sequence_number()));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn a_batch_has_one_message_per_set_and_op_between_begin_and_end() {
        let changes = [
            change(Op::Add, "fwd4", 1),
            change(Op::Add, "fwd4", 2),
            change(Op::Add, "fwd4_any", 3),
            change(Op::Delete, "fwd4", 1),
            change(Op::Delete, "fwd4", 2),
            change(Op::Delete, "fwd4_any", 3),
        ];
        let batch = encode_batch("qnet", &changes, 7);
        assert_eq!(batch.acks, 4);
        assert_eq!(batch.next_seq, 13);
        let (begin, end) = (0x10, 0x11);
        let (new, del) = ((10 << 8) | 12, (10 << 8) | 14);
        assert_eq!(
            kinds_and_seqs(&batch.bytes),
            [
                (begin, 7),
                (new, 8),
                (new, 9),
                (del, 10),
                (del, 11),
                (end, 12)
            ]
        );
        // The messages read back as what we meant.
        let first_new = &batch.bytes[20..];
        let message = NetlinkMessage::<NetfilterMessage>::deserialize(
            &first_new[..NetlinkBuffer::new_checked(first_new).unwrap().length() as usize],
        )
        .unwrap();
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::NfTables(NfTablesMessage::NewSetElement(list)),
            ..
        }) = message.payload
        else {
            panic!("not a NEWSETELEM: {message:?}");
        };
        let read: Vec<_> = key_values(list).collect();
        assert_eq!(
            read,
            [1, 2].map(|p| (change(Op::Add, "", p).key, change(Op::Add, "", p).value))
        );
    }

    #[test]
    fn big_lists_are_split_so_every_attribute_length_fits_16_bits() {
        let changes: Vec<ElementChange> = (0..2000)
            .map(|i| ElementChange {
                op: Op::Add,
                set: "fwd6",
                key: vec![i as u8; 24],
                value: vec![0; 20],
            })
            .collect();
        let batch = encode_batch("qnet", &changes, 1);
        assert_eq!(batch.acks, 4); // 512 + 512 + 512 + 464
        assert_eq!(kinds_and_seqs(&batch.bytes).len(), 6);
    }

    #[test]
    fn nothing_to_do_is_an_empty_batch() {
        let batch = encode_batch("qnet", &[], 1);
        assert_eq!((batch.acks, batch.bytes.len()), (0, 0));
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let short = [0u8; 8];
        assert!(messages(&short).next().unwrap().is_err());
        let mut bad = vec![0u8; 20];
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(messages(&bad).next().unwrap().is_err());
        let mut garbage = vec![0u8; 36];
        garbage[0..4].copy_from_slice(&36u32.to_ne_bytes());
        garbage[4..6].copy_from_slice(&((10u16 << 8) | 12).to_ne_bytes());
        garbage[16..20].copy_from_slice(&[1, 0, 0, 0]);
        garbage[20..24].copy_from_slice(&[200, 0, 1, 0]);
        let parsed: Vec<_> = messages(&garbage).collect();
        assert_eq!(parsed.len(), 1);
        assert!(parsed[0].is_err(), "{parsed:?}");
    }
}
