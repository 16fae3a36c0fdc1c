//! Adding and removing port-forward map elements over nfnetlink, without
//! running `nft`.
//!
//! A forward change is one element of one map of our table. Asking `nft`
//! to make it costs a process start (~2 ms here: nft links libnftables,
//! libxtables, libjansson, libgmp) plus a cache fill, for a kernel change
//! that takes ~0.1 ms. This module sends the same transaction nft would —
//! one nfnetlink batch of `NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM`
//! messages — from the daemon itself. The table and its maps are still
//! created by `nft -f` ([`crate::nft::apply_with_forwards`]); this module
//! only touches elements of the four forward maps of `inet qnet`.
//!
//! No crate does this for us: rustables (GPL-3) encodes set keys but not
//! map data; nftnl binds the C libnftnl. The wire format is small and
//! fixed (see `linux/netfilter/nf_tables.h`):
//!
//! ```text
//! NFNL_MSG_BATCH_BEGIN                      res_id = NFNL_SUBSYS_NFTABLES
//! NFT_MSG_NEWSETELEM (family inet)          one per map touched
//!   NFTA_SET_ELEM_LIST_TABLE   "qnet"
//!   NFTA_SET_ELEM_LIST_SET     "fwd4"
//!   NFTA_SET_ELEM_LIST_ELEMENTS
//!     NFTA_LIST_ELEM
//!       NFTA_SET_ELEM_KEY  { NFTA_DATA_VALUE key bytes }
//!       NFTA_SET_ELEM_DATA { NFTA_DATA_VALUE value bytes }   (add only)
//! NFNL_MSG_BATCH_END
//! ```
//!
//! A concatenated key or value is its fields in order, each padded with
//! zeros to a multiple of 4 bytes (one nftables register per 4 bytes);
//! addresses and ports in network byte order: `10.99.0.1 . tcp . 8080` is
//! `0a 63 00 01 | 06 00 00 00 | 1f 90 00 00`.
//!
//! The socket stays open for the next change (see [`SOCKETS`]).
//! The kernel runs the batch as one transaction: all of it or nothing.
//! Every message asks for an acknowledgement, and the kernel answers each
//! (success or error) after the whole batch, so we read exactly one answer
//! per message — the first error, if any, is the result.

use std::io;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use crate::api::Proto;
use crate::nft::{ForwardRule, TABLE_NAME};

// linux/netfilter/nfnetlink.h, nf_tables.h, netfilter.h, netlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_HDRLEN: usize = 16;

/// Elements per message: the list is one netlink attribute, whose length
/// is 16 bits; an IPv6 element takes 72 bytes, so 512 of them fit with room.
const ELEMENTS_PER_MESSAGE: usize = 512;

/// How long we wait for the kernel's answers. It answers in well under a
/// millisecond unless another process holds the nftables commit lock for
/// long; we would rather report that than hang the daemon.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a batch does with its elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `add element`: key and value; an element that is there with the
    /// same value is a no-op, with another value the batch fails with
    /// `EEXIST`.
    Add,
    /// `delete element`: by key; an absent key fails the batch with
    /// `ENOENT`.
    Delete,
}

/// The kernel refused a batch, or we could not talk to it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KernelError(#[from] pub io::Error);

impl KernelError {
    pub fn errno(&self) -> Option<i32> {
        self.0.raw_os_error()
    }
}

/// Runs one transaction: for each `(change, rules)` in order, that change
/// for those rules' elements. `[(Add, r), (Delete, r)]` is nft's
/// "add element …; delete element …" in one batch.
pub fn run(steps: &[(Change, &[ForwardRule])]) -> Result<(), KernelError> {
    let namespace = current_netns()?;
    let mut sockets = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
    let index = match sockets.iter().position(|s| s.namespace == namespace) {
        Some(index) => index,
        None => {
            sockets.push(NftSocket::open(namespace)?);
            sockets.len() - 1
        }
    };
    let result = sockets[index].transact(steps);
    if result.is_err() {
        // Start afresh next time: no answer of this batch can be mistaken
        // for one of the next.
        sockets.swap_remove(index);
    }
    result
}

/// One open nfnetlink socket per network namespace we changed elements in
/// (the daemon: one). Kept open because closing a socket that deleted set
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

    fn transact(&mut self, steps: &[(Change, &[ForwardRule])]) -> Result<(), KernelError> {
        let batch = encode_batch(steps, self.next_seq);
        let first = self.next_seq;
        self.next_seq = batch.next_seq;
        if batch.acks == 0 {
            return Ok(());
        }
        // The kernel takes a batch in one datagram, which must fit the
        // send buffer (default ~200 KiB; 10,000 elements are ~450 KiB). We
        // are root (nftables needs CAP_NET_ADMIN anyway): force it.
        if batch.bytes.len() > 64 * 1024 {
            setsockopt(&self.socket, sockopt::SndBufForce, &(batch.bytes.len() * 2))
                .map_err(io::Error::from)?;
        }
        let sent = self.socket.send(&batch.bytes, 0)?;
        if sent != batch.bytes.len() {
            return Err(io::Error::other("nfnetlink: batch sent only in part").into());
        }
        read_answers(&self.socket, batch.acks, first)
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

/// Encodes `steps` as one nfnetlink batch; sequence numbers start at
/// `first_seq` (the batch begin message), one per message.
pub fn encode_batch(steps: &[(Change, &[ForwardRule])], first_seq: u32) -> Batch {
    let mut bytes = Vec::new();
    let mut seq = first_seq;
    let mut acks = 0;
    message(
        &mut bytes,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        |_| {},
    );
    for (change, rules) in steps {
        // One message per map and per ELEMENTS_PER_MESSAGE elements.
        for map in ["fwd4", "fwd4_any", "fwd6", "fwd6_any"] {
            let in_map: Vec<&ForwardRule> = rules.iter().filter(|r| r.map() == map).collect();
            for in_map in in_map.chunks(ELEMENTS_PER_MESSAGE) {
                seq = seq.wrapping_add(1);
                acks += 1;
                let (kind, flags) = match change {
                    Change::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
                    Change::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
                };
                let kind = (NFNL_SUBSYS_NFTABLES << 8) | kind;
                message(&mut bytes, kind, flags, seq, NFPROTO_INET, |m| {
                    attr_str(m, NFTA_SET_ELEM_LIST_TABLE, TABLE_NAME);
                    attr_str(m, NFTA_SET_ELEM_LIST_SET, map);
                    nested(m, NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
                        for rule in in_map {
                            nested(m, NFTA_LIST_ELEM, |m| {
                                nested(m, NFTA_SET_ELEM_KEY, |m| {
                                    attr(m, NFTA_DATA_VALUE, &key_bytes(rule))
                                });
                                if *change == Change::Add {
                                    nested(m, NFTA_SET_ELEM_DATA, |m| {
                                        attr(m, NFTA_DATA_VALUE, &value_bytes(rule))
                                    });
                                }
                            });
                        }
                    });
                });
            }
        }
    }
    seq = seq.wrapping_add(1);
    message(
        &mut bytes,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        |_| {},
    );
    Batch {
        bytes,
        acks,
        next_seq: seq.wrapping_add(1),
    }
}

/// The element key: `[host address .] proto . host port`, registers padded.
pub fn key_bytes(rule: &ForwardRule) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    if let Some(addr) = rule.host_addr {
        push_addr(&mut key, addr);
    }
    let proto = match rule.proto {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    };
    push_register(&mut key, &[proto]);
    push_register(&mut key, &rule.host_port.to_be_bytes());
    key
}

/// The element value: `guest address . guest port`, registers padded.
pub fn value_bytes(rule: &ForwardRule) -> Vec<u8> {
    let mut value = Vec::with_capacity(20);
    push_addr(&mut value, rule.guest_addr);
    push_register(&mut value, &rule.guest_port.to_be_bytes());
    value
}

fn push_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// `field` padded with zeros to a whole number of 4-byte registers.
fn push_register(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(field);
    out.resize(out.len() + padding(field.len()), 0);
}

fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Appends one netlink message: header, `nfgenmsg`, then what `body` writes.
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
                                                // nfgenmsg: family, version 0, res_id (big endian): the batch messages
                                                // name the subsystem there.
    let res_id = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
        NFNL_SUBSYS_NFTABLES
    } else {
        0
    };
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    body(out);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = (4 + payload.len()) as u16;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + padding(payload.len()), 0);
}

/// A NUL-terminated string attribute (the kernel's NLA_STRING policy for
/// table and set names accepts it and nft sends it so).
fn attr_str(out: &mut Vec<u8>, kind: u16, value: &str) {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    attr(out, kind, &bytes);
}

fn nested(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    body(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Reads answers to the batch that began with sequence `begin` until
/// `expected` acknowledgements (or errors) arrived; the first error is
/// the batch's result. An error for the batch header itself (the kernel
/// could not queue the answers) ends it at once. Answers to other
/// sequence numbers (none should come) are ignored.
fn read_answers(socket: &Socket, expected: usize, begin: u32) -> Result<(), KernelError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut answered = 0;
    let mut first_error: Option<i32> = None;
    while answered < expected {
        let len = loop {
            match socket.recv(&mut &mut buf[..], 0) {
                Ok(len) => break len,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nfnetlink: no answer from the kernel (is another process holding the nftables lock?)",
                    )
                    .into())
                }
                Err(e) => return Err(e.into()),
            }
        };
        for answer in answers(&buf[..len]) {
            let Answer {
                error,
                batch_wide,
                seq,
            } = answer?;
            if seq.wrapping_sub(begin) > expected as u32 {
                continue;
            }
            answered += 1;
            if error != 0 && first_error.is_none() {
                first_error = Some(error);
            }
            if batch_wide {
                answered = expected;
            }
        }
    }
    match first_error {
        Some(errno) => Err(io::Error::from_raw_os_error(errno).into()),
        None => Ok(()),
    }
}

struct Answer {
    /// 0 for an acknowledgement, else a positive errno.
    error: i32,
    /// The answer is about the batch header (sequence of the begin message).
    batch_wide: bool,
    /// The sequence number of the message answered.
    seq: u32,
}

/// The `NLMSG_ERROR` messages in one datagram.
fn answers(datagram: &[u8]) -> impl Iterator<Item = io::Result<Answer>> + '_ {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        if len < NLMSG_HDRLEN || len > rest.len() {
            rest = &[];
            return Some(Err(io::Error::other("nfnetlink: malformed answer")));
        }
        let (msg, next) = rest.split_at(len.min(rest.len()));
        rest = &next[padding(len).min(next.len())..];
        if kind != NLMSG_ERROR || msg.len() < NLMSG_HDRLEN + 4 + NLMSG_HDRLEN {
            return Some(Err(io::Error::other(format!(
                "nfnetlink: unexpected answer of type {kind}"
            ))));
        }
        let errno = i32::from_ne_bytes(msg[16..20].try_into().unwrap());
        let failed_kind = u16::from_ne_bytes(msg[24..26].try_into().unwrap());
        let seq = u32::from_ne_bytes(msg[28..32].try_into().unwrap());
        Some(Ok(Answer {
            error: -errno,
            batch_wide: failed_kind == NFNL_MSG_BATCH_BEGIN,
            seq,
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::tests::rule;

    #[test]
    fn keys_and_values_are_padded_registers_in_network_order() {
        let r = rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.10", 80);
        assert_eq!(key_bytes(&r), [10, 99, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(value_bytes(&r), [10, 42, 0, 10, 0, 80, 0, 0]);
        let any = rule(Proto::Udp, None, 53, "fd42::10", 5353);
        assert_eq!(key_bytes(&any), [17, 0, 0, 0, 0, 53, 0, 0]);
        let value = value_bytes(&any);
        assert_eq!(value.len(), 20);
        assert_eq!(&value[16..], [0x14, 0xe9, 0, 0]);
        let v6 = rule(Proto::Tcp, Some("fd00::1"), 1, "fd42::10", 1);
        assert_eq!(key_bytes(&v6).len(), 24);
    }

    #[test]
    fn a_batch_has_one_message_per_map_and_change_between_begin_and_end() {
        let a = rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.10", 80);
        let b = rule(Proto::Udp, Some("10.99.0.1"), 53, "10.42.0.10", 53);
        let c = rule(Proto::Tcp, None, 22, "10.42.0.10", 22);
        let rules = [a, b, c];
        let batch = encode_batch(&[(Change::Add, &rules), (Change::Delete, &rules)], 7);
        // fwd4 and fwd4_any, for add and for delete.
        assert_eq!(batch.acks, 4);
        let mut kinds = Vec::new();
        let mut seqs = Vec::new();
        let mut rest = &batch.bytes[..];
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0, "messages stay aligned");
            kinds.push(u16::from_ne_bytes(rest[4..6].try_into().unwrap()));
            seqs.push(u32::from_ne_bytes(rest[8..12].try_into().unwrap()));
            rest = &rest[len..];
        }
        let new = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;
        let del = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM;
        assert_eq!(
            kinds,
            [NFNL_MSG_BATCH_BEGIN, new, new, del, del, NFNL_MSG_BATCH_END]
        );
        assert_eq!(seqs, [7, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn big_lists_are_split_so_every_attribute_length_fits_16_bits() {
        let rules: Vec<ForwardRule> = (1..=2000)
            .map(|p| rule(Proto::Tcp, Some("fd00::1"), p, "fd42::10", p))
            .collect();
        let batch = encode_batch(&[(Change::Add, &rules)], 1);
        assert_eq!(batch.acks, 4); // 512 + 512 + 512 + 464
        let mut rest = &batch.bytes[..];
        while !rest.is_empty() {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            assert!(len < 65536, "message of {len} bytes");
            rest = &rest[len..];
        }
    }

    #[test]
    fn nothing_to_do_is_an_empty_batch() {
        assert_eq!(encode_batch(&[(Change::Add, &[])], 1).acks, 0);
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let short = [0u8; 8];
        assert_eq!(answers(&short).count(), 0);
        let mut bad = vec![0u8; 20];
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(answers(&bad).next().unwrap().is_err());
        let mut not_error = vec![0u8; 36];
        not_error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        not_error[4..6].copy_from_slice(&3u16.to_ne_bytes());
        assert!(answers(&not_error).next().unwrap().is_err());
    }
}
