//! Synchronous rtnetlink link operations: look links up, create macvtaps and
//! bridges, configure TAP ports, delete links.
//!
//! This is a deliberately small, blocking client (no tokio, no rtnetlink
//! crate): it is linked into setuid helpers, where every dependency is attack
//! surface and where each guest NIC costs a process start. One request is in
//! flight at a time; every request asks for an acknowledgement, so each
//! request is exactly one round trip to the kernel (an operation is one
//! request, but for a port without IPv6 addresses: see [`PortChange`]) and
//! every failure comes back as an errno.
//!
//! Links are addressed by ifindex rather than by name wherever possible:
//! names can be renamed or reused between two calls, an ifindex is not reused
//! while the device exists.

use std::fmt;
use std::io;

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    Parseable, ParseableParametrized, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN,
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoMacVtap, LinkAttribute,
    LinkExtentMask, LinkFlags, LinkHeader, LinkInfo, LinkMessage, MacVlanMode,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;

mod decode;
mod error;
use decode::*;
use error::Failure;
pub use error::LinkError;

/// Size of the kernel's interface name buffer, including the trailing NUL.
pub const IFNAMSIZ: usize = 16;

/// `RTM_NEWLINK`: the only message type the kernel answers link requests with.
const RTM_NEWLINK: u16 = 16;
/// Length of `struct ifinfomsg`, which precedes the attributes of a link
/// message.
const IFINFOMSG_LEN: usize = 16;
/// Length of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;

// Link attributes (`IFLA_*`, linux/if_link.h) that [`Link`] is built from.
// Everything else in a reply is skipped without being decoded.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_IFALIAS: u16 = 20;
/// Nested list of properties; holds the alternative names.
const IFLA_PROP_LIST: u16 = 52;
const IFLA_ALT_IFNAME: u16 = 53;
// Nested in IFLA_LINKINFO.
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
/// Extended-ack attribute carrying the kernel's human-readable error text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Whether the kernel would accept `name` as an interface name.
///
/// Mirrors the kernel's `dev_valid_name()`: non-empty, shorter than
/// [`IFNAMSIZ`] (which counts the NUL), not `.` or `..`, and no `/`, `:` or
/// whitespace. "Whitespace" is the kernel's `isspace()`, which also matches
/// vertical tab and byte 0xA0 (so some non-ASCII UTF-8 names are rejected).
/// A NUL byte is rejected as well: the kernel would silently cut the name
/// there and act on a different device than the one asked for.
pub fn valid_ifname(name: &str) -> bool {
    let forbidden = |b: &u8| {
        matches!(
            b,
            b'/' | b':' | b'\0' | b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0
        )
    };
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.as_bytes().iter().any(forbidden)
}

/// What the kernel reports about one network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// Hardware address, if the device has a 6-byte (Ethernet) one.
    pub mac: Option<[u8; 6]>,
    /// `IFLA_INFO_KIND`, e.g. "bridge", "macvtap", "veth", "tun"; `None` for
    /// devices without a link type (physical NICs, loopback).
    pub kind: Option<String>,
    /// Ifindex of the bridge (or other master) this device is enslaved to.
    pub master: Option<u32>,
    /// Administratively up (`IFF_UP`), regardless of carrier.
    pub up: bool,
    pub alias: Option<String>,
    /// Alternative names (`ip link property add dev X altname Y`; systemd
    /// gives NICs names such as `enp0s31f6`). The kernel resolves a lookup
    /// by name through these too, so an ACL must be checked against all of
    /// them, not just the string the caller passed.
    pub altnames: Vec<String>,
    /// Mode of a macvtap device; `None` for other kinds and for modes this
    /// module does not create (e.g. "source").
    pub macvtap_mode: Option<MacvtapMode>,
}

impl Link {
    /// The primary name, then every alternative name.
    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        std::iter::once(self.name.as_str()).chain(self.altnames.iter().map(String::as_str))
    }
}

/// How a macvtap forwards traffic between itself, its siblings and its
/// lower device (`MACVLAN_MODE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MacvtapMode {
    /// Siblings on the same lower device talk to each other directly.
    Bridge,
    /// All traffic goes out through the lower device, even between siblings
    /// (needs a reflective-relay capable switch).
    Vepa,
    /// Like VEPA, but siblings can never reach each other.
    Private,
    /// The macvtap takes over the lower device; only one per lower device.
    /// The kernel then gives the macvtap the lower device's MAC address,
    /// ignoring the one requested at creation.
    Passthru,
}

impl MacvtapMode {
    /// The name `ip link` uses for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Vepa => "vepa",
            Self::Private => "private",
            Self::Passthru => "passthru",
        }
    }

    fn to_kernel(self) -> MacVlanMode {
        match self {
            Self::Bridge => MacVlanMode::Bridge,
            Self::Vepa => MacVlanMode::Vepa,
            Self::Private => MacVlanMode::Private,
            Self::Passthru => MacVlanMode::Passthrough,
        }
    }

    fn from_kernel(mode: MacVlanMode) -> Option<Self> {
        match mode {
            MacVlanMode::Bridge => Some(Self::Bridge),
            MacVlanMode::Vepa => Some(Self::Vepa),
            MacVlanMode::Private => Some(Self::Private),
            MacVlanMode::Passthrough => Some(Self::Passthru),
            _ => None,
        }
    }
}

impl fmt::Display for MacvtapMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings applied to a guest port (TAP) by [`LinkSocket::configure_port`]:
/// one request, after a first one for `no_ipv6_addresses`. `None` fields
/// are left untouched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortChange {
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// Ifindex of the bridge to enslave the port to.
    pub master: Option<u32>,
    /// Bring the port up. `false` leaves the administrative state as it is
    /// (it does not take the port down).
    pub up: bool,
    /// Give the port no IPv6 addresses (`addr_gen_mode none`), in a request
    /// of its own before the rest: the kernel applies `IFLA_AF_SPEC` after
    /// bringing a link up, by when the link-local address exists.
    ///
    /// A bridge port's own addresses carry no traffic (the bridge holds the
    /// host's), yet with one each port sends duplicate address detection,
    /// MLD and router solicitations into its guest, and every daemon that
    /// follows addresses does work for it: dnsmasq with `bind-dynamic`
    /// reads every address on the host again for each new one, so with a
    /// thousand guests a thousand link-local addresses each time.
    pub no_ipv6_addresses: bool,
}

/// A blocking `NETLINK_ROUTE` socket for link operations.
pub struct LinkSocket {
    socket: Socket,
    /// Sequence number of the last request; replies are matched against it.
    seq: u32,
    /// Receive buffer, reused across requests and grown on demand.
    buf: Vec<u8>,
}

impl LinkSocket {
    /// Opens a socket in the calling thread's network namespace.
    ///
    /// The socket is connected to the kernel, so the kernel drops datagrams
    /// that other processes address to our port: nobody can forge an
    /// acknowledgement to a setuid caller.
    pub fn new() -> Result<Self, LinkError> {
        let action = || "opening the rtnetlink socket".to_owned();
        let io = |e| Failure::Io(e).during(action);
        let socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        // Both are optional comforts: the kernel's explanation of an error,
        // and not having the whole request echoed back in every error.
        if let Err(e) = socket.set_ext_ack(true) {
            tracing::debug!("NETLINK_EXT_ACK unavailable: {e}");
        }
        if let Err(e) = socket.set_cap_ack(true) {
            tracing::debug!("NETLINK_CAP_ACK unavailable: {e}");
        }
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(8192),
        })
    }

    /// Looks a link up by name; `Ok(None)` if there is no such device.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, LinkError> {
        check_name(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        self.get_link(msg)
            .map_err(|f| f.during(|| format!("looking up link {name:?}")))
    }

    /// Looks a link up by ifindex; `Ok(None)` if there is no such device.
    pub fn link_by_index(&mut self, index: u32) -> Result<Option<Link>, LinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(msg)
            .map_err(|f| f.during(|| format!("looking up ifindex {index}")))
    }

    /// Every link of the current network namespace (an RTM_GETLINK dump).
    pub fn links(&mut self) -> Result<Vec<Link>, LinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        self.transact(RouteNetlinkMessage::GetLink(msg), NLM_F_DUMP)
            .map_err(|f| f.during(|| "listing links".to_owned()))
    }

    /// Applies MTU, MAC, master and up state to a port in a single request.
    ///
    /// The kernel applies them in the order MAC, MTU, up, master. It does not
    /// roll back: if a later step fails, earlier ones stay applied.
    pub fn configure_port(&mut self, index: u32, change: PortChange) -> Result<(), LinkError> {
        if change.no_ipv6_addresses {
            self.no_ipv6_addresses(index)?;
        }
        let mut attributes = Vec::new();
        if let Some(mac) = change.mac {
            attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(mtu) = change.mtu {
            attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(master) = change.master {
            attributes.push(LinkAttribute::Controller(master));
        }
        self.set_link(index, attributes, change.up)
            .map_err(|f| f.during(|| format!("configuring port ifindex {index}")))
    }

    /// Stops the kernel from giving link `index` IPv6 addresses when it next
    /// comes up (`ip link set ... addrgenmode none`).
    ///
    /// A kernel or link without IPv6 (`EAFNOSUPPORT`) gives none anyway,
    /// and one that cannot turn them off (`EOPNOTSUPP`, `EINVAL`) leaves a
    /// port that works all the same: both are success, since the
    /// addresses only cost other daemons work. Anything else (the device
    /// is gone, no permission) is an error, as it would be for the next
    /// request.
    pub fn no_ipv6_addresses(&mut self, index: u32) -> Result<(), LinkError> {
        let spec = AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)]);
        match self.set_link(index, vec![LinkAttribute::AfSpecUnspec(vec![spec])], false) {
            Err(Failure::Kernel {
                errno: Errno::EAFNOSUPPORT | Errno::EOPNOTSUPP | Errno::EINVAL,
                ..
            }) => Ok(()),
            result => result
                .map_err(|f| f.during(|| format!("turning off IPv6 addresses on ifindex {index}"))),
        }
    }

    /// Sets a link's hardware address.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), LinkError> {
        self.set_link(index, vec![LinkAttribute::Address(mac.to_vec())], false)
            .map_err(|f| f.during(|| format!("setting the MAC address of ifindex {index}")))
    }

    /// Sets a link's alias (`ip link set ... alias`); an empty alias removes
    /// it.
    pub fn set_alias(&mut self, index: u32, alias: &str) -> Result<(), LinkError> {
        self.set_link(index, vec![LinkAttribute::IfAlias(alias.to_owned())], false)
            .map_err(|f| f.during(|| format!("setting the alias of ifindex {index}")))
    }

    /// Brings a link administratively up.
    pub fn set_up(&mut self, index: u32) -> Result<(), LinkError> {
        self.set_link(index, Vec::new(), true)
            .map_err(|f| f.during(|| format!("bringing up ifindex {index}")))
    }

    /// Creates a macvtap device `name` on top of ifindex `lower`.
    ///
    /// Fails with [`LinkError::Exists`] if `name` is taken. In
    /// [`MacvtapMode::Passthru`] the kernel ignores `mac` and copies the
    /// lower device's address instead.
    pub fn create_macvtap(
        &mut self,
        name: &str,
        lower: u32,
        mac: [u8; 6],
        mode: MacvtapMode,
        mtu: Option<u32>,
    ) -> Result<(), LinkError> {
        check_new_name(name)?;
        let mut attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::Link(lower),
            LinkAttribute::Address(mac.to_vec()),
        ];
        if let Some(mtu) = mtu {
            attributes.push(LinkAttribute::Mtu(mtu));
        }
        attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::MacVtap),
            LinkInfo::Data(InfoData::MacVtap(vec![InfoMacVtap::Mode(mode.to_kernel())])),
        ]));
        self.create_link(attributes).map_err(|f| {
            f.during(|| format!("creating macvtap {name:?} (mode {mode}) on ifindex {lower}"))
        })
    }

    /// Creates a bridge `name`, with the given MAC address or a random one.
    ///
    /// Fails with [`LinkError::Exists`] if `name` is taken.
    pub fn create_bridge(&mut self, name: &str, mac: Option<[u8; 6]>) -> Result<(), LinkError> {
        check_new_name(name)?;
        let mut attributes = vec![LinkAttribute::IfName(name.to_owned())];
        if let Some(mac) = mac {
            attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Bridge,
        )]));
        self.create_link(attributes)
            .map_err(|f| f.during(|| format!("creating bridge {name:?}")))
    }

    /// Deletes a link.
    pub fn delete(&mut self, index: u32) -> Result<(), LinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.transact(RouteNetlinkMessage::DelLink(msg), 0)
            .map(drop)
            .map_err(|f| f.during(|| format!("deleting ifindex {index}")))
    }

    /// RTM_GETLINK for one device; ENODEV means "no such device", not an
    /// error.
    fn get_link(&mut self, mut msg: LinkMessage) -> Result<Option<Link>, Failure> {
        // Statistics are most of a link reply and we never read them.
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        match self.transact(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(links) => match <[Link; 1]>::try_from(links) {
                Ok([link]) => Ok(Some(link)),
                Err(links) => Err(Failure::Protocol(format!(
                    "expected one link in the reply, got {}",
                    links.len()
                ))),
            },
            Err(Failure::Kernel {
                errno: Errno::ENODEV,
                ..
            }) => Ok(None),
            Err(f) => Err(f),
        }
    }

    /// RTM_SETLINK on an existing device; `up` sets IFF_UP.
    fn set_link(
        &mut self,
        index: u32,
        attributes: Vec<LinkAttribute>,
        up: bool,
    ) -> Result<(), Failure> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        if up {
            msg.header.flags = LinkFlags::Up;
            msg.header.change_mask = LinkFlags::Up;
        }
        msg.attributes = attributes;
        self.transact(RouteNetlinkMessage::SetLink(msg), 0)
            .map(drop)
    }

    /// RTM_NEWLINK that must create a new device: with NLM_F_EXCL an
    /// existing device of the same name is EEXIST instead of being modified.
    fn create_link(&mut self, attributes: Vec<LinkAttribute>) -> Result<(), Failure> {
        let mut msg = LinkMessage::default();
        msg.attributes = attributes;
        self.transact(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
    }

    /// Sends one request with NLM_F_ACK and reads until the kernel's
    /// acknowledgement (or error) for it, returning the links it sent before.
    fn transact(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<Link>, Failure> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags, seq)?;
        let mut links = Vec::new();
        loop {
            self.recv_datagram()?;
            if let Some(outcome) = read_replies(&self.buf, seq, &mut links)? {
                return outcome.map(|()| links);
            }
        }
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Result<(), Failure> {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        // Fills in length and message type; serialize() relies on both.
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        let sent = retry_eintr(|| self.socket.send(&bytes, 0))?;
        if sent != bytes.len() {
            return Err(Failure::Protocol(format!(
                "short send: {sent} of {} bytes",
                bytes.len()
            )));
        }
        Ok(())
    }

    /// Reads the next datagram from the kernel into `self.buf`, whole.
    ///
    /// Peeks at its size first, so a large reply is never truncated.
    fn recv_datagram(&mut self) -> Result<(), Failure> {
        loop {
            self.buf.clear();
            let (size, _) = retry_eintr(|| {
                self.socket
                    .recv_from(&mut self.buf, libc::MSG_PEEK | libc::MSG_TRUNC)
            })?;
            self.buf.clear();
            self.buf.reserve(size);
            let (read, from) = retry_eintr(|| self.socket.recv_from(&mut self.buf, 0))?;
            if read != self.buf.len() {
                return Err(Failure::Protocol(format!(
                    "datagram of {read} bytes did not fit in {} bytes",
                    self.buf.len()
                )));
            }
            // The socket is connected to the kernel, so this should not
            // happen; drop anything that is not from the kernel regardless.
            if from.port_number() == 0 {
                return Ok(());
            }
            tracing::debug!(
                port = from.port_number(),
                "dropping netlink datagram not sent by the kernel"
            );
        }
    }
}

impl fmt::Debug for LinkSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSocket")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

fn retry_eintr<T>(mut op: impl FnMut() -> io::Result<T>) -> Result<T, Failure> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result.map_err(Failure::Io),
        }
    }
}

fn check_name(name: &str) -> Result<(), LinkError> {
    if valid_ifname(name) {
        Ok(())
    } else {
        Err(LinkError::InvalidName(name.to_owned()))
    }
}

/// Like [`check_name`], for names of devices to create. Also refuses `%`:
/// the kernel treats such a name as a template ("mvt%d") and would create a
/// device under a different name than the caller asked for.
fn check_new_name(name: &str) -> Result<(), LinkError> {
    check_name(name)?;
    if name.contains('%') {
        return Err(LinkError::InvalidName(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules_match_the_kernel() {
        for ok in ["eth0", "br-lan", "a", "fifteen-chars-x", "tap.1", "ä"] {
            assert!(valid_ifname(ok), "{ok:?} should be valid");
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-chars-xx",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\x0bb",
            "a\0b",
            "à", // UTF-8 C3 A0: the kernel's isspace() matches 0xA0
        ] {
            assert!(!valid_ifname(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn new_names_must_not_be_templates() {
        assert!(matches!(
            check_new_name("mvt%d"),
            Err(LinkError::InvalidName(_))
        ));
        assert!(check_new_name("mvt0").is_ok());
    }

    /// Builds a netlink message as the kernel would send it.
    fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    fn error_body(code: i32, tlvs: &[u8]) -> Vec<u8> {
        let mut body = code.to_ne_bytes().to_vec();
        body.extend_from_slice(&message(RTM_NEWLINK, 0, 7, &[])[..NLMSG_HDRLEN]);
        body.extend_from_slice(tlvs);
        body
    }

    #[test]
    fn ack_finishes_the_request() {
        let mut links = Vec::new();
        let datagram = message(NLMSG_ERROR, 0, 7, &error_body(0, &[]));
        let outcome = read_replies(&datagram, 7, &mut links).unwrap();
        assert!(matches!(outcome, Some(Ok(()))));
    }

    #[test]
    fn stale_replies_are_skipped() {
        let mut links = Vec::new();
        let datagram = message(NLMSG_ERROR, 0, 6, &error_body(-17, &[]));
        assert!(read_replies(&datagram, 7, &mut links).unwrap().is_none());
    }

    #[test]
    fn kernel_error_carries_errno_and_extack_text() {
        let mut links = Vec::new();
        let tlvs = nla(NLMSGERR_ATTR_MSG, b"MTU too big\0");
        let datagram = message(
            NLMSG_ERROR,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            7,
            &error_body(-22, &tlvs),
        );
        let outcome = read_replies(&datagram, 7, &mut links).unwrap();
        let Some(Err(Failure::Kernel { errno, message })) = outcome else {
            panic!("expected a kernel error, got {outcome:?}");
        };
        assert_eq!(errno, Errno::EINVAL);
        assert_eq!(message.as_deref(), Some("MTU too big"));
    }

    #[test]
    fn eexist_is_its_own_variant() {
        let failure = Failure::Kernel {
            errno: Errno::EEXIST,
            message: None,
        };
        let error = failure.during(|| "creating".into());
        assert!(matches!(error, LinkError::Exists { .. }));
        assert_eq!(error.errno(), Some(Errno::EEXIST));
    }

    #[test]
    fn link_reply_is_parsed() {
        let mut payload = vec![0u8; IFINFOMSG_LEN];
        payload[4..8].copy_from_slice(&42u32.to_ne_bytes());
        payload[8..12].copy_from_slice(&1u32.to_ne_bytes()); // IFF_UP
        payload.extend(nla(IFLA_IFNAME, b"mvt0\0"));
        payload.extend(nla(IFLA_MTU, &1400u32.to_ne_bytes()));
        payload.extend(nla(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]));
        payload.extend(nla(99, b"something new and strange"));
        let mode = nla(1, &4u32.to_ne_bytes()); // IFLA_MACVLAN_MODE bridge
        let info = [
            nla(IFLA_INFO_KIND, b"macvtap\0"),
            nla(IFLA_INFO_DATA, &mode),
        ]
        .concat();
        payload.extend(nla(IFLA_LINKINFO, &info));
        let props = [
            nla(IFLA_ALT_IFNAME, b"alt0\0"),
            nla(IFLA_ALT_IFNAME, b"enx020000000001\0"),
        ]
        .concat();
        payload.extend(nla(IFLA_PROP_LIST, &props));
        let link = parse_link(&payload).unwrap();
        assert_eq!(
            link,
            Link {
                index: 42,
                name: "mvt0".into(),
                mtu: 1400,
                mac: Some([2, 0, 0, 0, 0, 1]),
                kind: Some("macvtap".into()),
                master: None,
                up: true,
                alias: None,
                altnames: vec!["alt0".into(), "enx020000000001".into()],
                macvtap_mode: Some(MacvtapMode::Bridge),
            }
        );
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let mut links = Vec::new();
        // Truncated header, length field pointing past the end, length
        // shorter than a header, error body without a code.
        let mut too_long = message(NLMSG_DONE, 0, 7, &[0; 4]);
        too_long[0] = 200;
        let mut too_short = message(NLMSG_DONE, 0, 7, &[0; 4]);
        too_short[0] = 4;
        for datagram in [
            vec![1, 2, 3],
            too_long,
            too_short,
            message(NLMSG_ERROR, 0, 7, &[0; 2]),
            message(RTM_NEWLINK, 0, 7, &[0; 3]),
            message(RTM_NEWLINK, 0, 7, &[0; IFINFOMSG_LEN]), // no name
            message(
                RTM_NEWLINK,
                0,
                7,
                &[[0; IFINFOMSG_LEN].as_slice(), &[200, 0, 3, 0]].concat(),
            ),
            message(NLMSG_ERROR, 0, 7, &i32::MIN.to_ne_bytes()),
        ] {
            assert!(
                read_replies(&datagram, 7, &mut links).is_err(),
                "{datagram:?} should be rejected"
            );
        }
        // A truncated extended ack just loses the message.
        let datagram = message(NLMSG_ERROR, NLM_F_ACK_TLVS, 7, &(-1i32).to_ne_bytes());
        assert!(matches!(
            read_replies(&datagram, 7, &mut links),
            Ok(Some(Err(Failure::Kernel { message: None, .. })))
        ));
    }
}
