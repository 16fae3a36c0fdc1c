//! Decoding the kernel's replies: acks with their extended error message,
//! and RTM_NEWLINK dumps into [`Link`]s. Bounds-checked throughout: a
//! reply is never trusted to be well formed.

use super::*;

/// Processes the netlink messages in one datagram that answer request `seq`,
/// appending links to `links`. Returns `Some` once the request is finished:
/// `Some(Ok(()))` on an acknowledgement or end of dump, `Some(Err(..))` when
/// the kernel reports an error. Messages for other sequence numbers (stale
/// replies) are skipped.
pub(super) fn read_replies(
    mut datagram: &[u8],
    seq: u32,
    links: &mut Vec<Link>,
) -> Result<Option<Result<(), Failure>>, Failure> {
    while !datagram.is_empty() {
        // new_checked guarantees 16 <= length <= datagram.len().
        let message = NetlinkBuffer::new_checked(datagram)?;
        let next = align4(message.length() as usize).min(datagram.len());
        let payload = message.payload();
        let (kind, flags, message_seq) = (
            message.message_type(),
            message.flags(),
            message.sequence_number(),
        );
        datagram = &datagram[next..];
        if message_seq != seq {
            tracing::debug!(message_seq, seq, kind, "skipping stale netlink message");
            continue;
        }
        match kind {
            NLMSG_ERROR => return Ok(Some(read_ack(flags, payload)?)),
            NLMSG_DONE => return Ok(Some(Ok(()))),
            NLMSG_NOOP => {}
            NLMSG_OVERRUN => return Err(Failure::Protocol("kernel reported overrun".into())),
            RTM_NEWLINK => links.push(parse_link(payload)?),
            other => {
                return Err(Failure::Protocol(format!(
                    "unexpected message type {other}"
                )))
            }
        }
    }
    Ok(None)
}

pub(super) fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

/// Decodes the body of an NLMSG_ERROR: code 0 is the acknowledgement,
/// a negative code is `-errno`.
pub(super) fn read_ack(flags: u16, body: &[u8]) -> Result<Result<(), Failure>, Failure> {
    let error = ErrorBuffer::new_checked(body)?;
    let Some(code) = error.code() else {
        return Ok(Ok(()));
    };
    let errno = match code.get().checked_neg() {
        Some(errno) if errno > 0 => Errno::from_raw(errno),
        _ => return Err(Failure::Protocol(format!("invalid error code {code}"))),
    };
    let message = extack_message(flags, error.payload());
    Ok(Err(Failure::Kernel { errno, message }))
}

/// The kernel's error text from an extended ack, if it sent one.
///
/// `rest` is what follows the error code: the echoed request header, the
/// request's payload unless the ack was capped, then the TLVs.
pub(super) fn extack_message(flags: u16, rest: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let length = rest.get(..4)?.try_into().ok().map(u32::from_ne_bytes)?;
        align4(usize::try_from(length).ok()?)
    };
    NlasIterator::new(rest.get(echoed..)?)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .and_then(|nla| netlink_packet_core::parse_string(nla.value()).ok())
        .filter(|text| !text.is_empty())
}

/// Builds a [`Link`] from an RTM_NEWLINK payload.
///
/// Only the attributes `Link` needs are decoded; the rest (statistics,
/// per-family and per-kind data, ...) is skipped unparsed, so a reply the
/// parser library does not fully understand still yields a `Link`.
pub(super) fn parse_link(payload: &[u8]) -> Result<Link, Failure> {
    let header = LinkHeader::parse(payload)?;
    let mut name = None;
    let mut mtu = None;
    let mut link = Link {
        index: header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        kind: None,
        master: None,
        up: header.flags.contains(LinkFlags::Up),
        alias: None,
        altnames: Vec::new(),
        macvtap_mode: None,
    };
    let attributes = payload.get(IFINFOMSG_LEN..).unwrap_or_default();
    for nla in NlasIterator::new(attributes) {
        let nla = nla?;
        match nla.kind() {
            IFLA_ADDRESS | IFLA_IFNAME | IFLA_MTU | IFLA_MASTER | IFLA_IFALIAS => {}
            IFLA_LINKINFO => {
                parse_link_info(nla.value(), &mut link)?;
                continue;
            }
            IFLA_PROP_LIST => {
                link.altnames = parse_altnames(nla.value())?;
                continue;
            }
            _ => continue,
        }
        match LinkAttribute::parse_with_param(&nla, header.interface_family)? {
            LinkAttribute::IfName(n) => name = Some(n),
            LinkAttribute::Mtu(m) => mtu = Some(m),
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a).ok(),
            LinkAttribute::Controller(m) => link.master = Some(m).filter(|&m| m != 0),
            LinkAttribute::IfAlias(a) => link.alias = Some(a).filter(|a| !a.is_empty()),
            _ => {}
        }
    }
    link.name = name.ok_or_else(|| Failure::Protocol("link without IFLA_IFNAME".into()))?;
    link.mtu = mtu.ok_or_else(|| Failure::Protocol("link without IFLA_MTU".into()))?;
    Ok(link)
}

/// The `IFLA_ALT_IFNAME` strings nested in IFLA_PROP_LIST.
pub(super) fn parse_altnames(value: &[u8]) -> Result<Vec<String>, Failure> {
    let mut names = Vec::new();
    for nla in NlasIterator::new(value) {
        let nla = nla?;
        if nla.kind() == IFLA_ALT_IFNAME {
            names.push(netlink_packet_core::parse_string(nla.value())?);
        }
    }
    Ok(names)
}

/// Reads the kind, and for macvtaps the mode, from IFLA_LINKINFO.
///
/// Per-kind data of other kinds (e.g. the dozens of bridge options) is not
/// decoded.
pub(super) fn parse_link_info(value: &[u8], link: &mut Link) -> Result<(), Failure> {
    for nla in NlasIterator::new(value) {
        let nla = nla?;
        match nla.kind() {
            IFLA_INFO_KIND => link.kind = Some(InfoKind::parse(&nla)?.to_string()),
            IFLA_INFO_DATA if link.kind.as_deref() == Some("macvtap") => {
                link.macvtap_mode = parse_macvtap_mode(nla.value())?;
            }
            _ => {}
        }
    }
    Ok(())
}

pub(super) fn parse_macvtap_mode(data: &[u8]) -> Result<Option<MacvtapMode>, Failure> {
    for nla in NlasIterator::new(data) {
        if let InfoMacVtap::Mode(mode) = InfoMacVtap::parse(&nla?)? {
            return Ok(MacvtapMode::from_kernel(mode));
        }
    }
    Ok(None)
}
