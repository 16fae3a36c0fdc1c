//! The daemon's one netlink layer: rtnetlink on the daemon's async
//! runtime, for links, addresses, routes and counters. (The helpers have
//! their own blocking `qnet_hostnet::link::LinkSocket`: no runtime in a
//! setuid binary. The daemon keeps using it only where it shares code with
//! the helpers: removing an orphaned macvtap goes through the same
//! `qnet_hostnet::macvtap::remove` the reaper uses.)
//!
//! Every function acts on the network namespace the [`Netlink`] was opened
//! in: that of the thread that called [`Netlink::open`]. Each says what it
//! asks the kernel, what it returns, and which errors mean what; a device
//! that does not exist is `Ok(None)`, never an error.

use std::io;

use futures_util::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::Handle;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused a request; `source` carries its errno.
    #[error("{action}: {source}")]
    Refused {
        action: String,
        #[source]
        source: io::Error,
    },
}

impl NetlinkError {
    /// The errno of a refused request.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::Socket(e) | NetlinkError::Refused { source: e, .. } => e.raw_os_error(),
        }
    }

    /// `Refused` with `action`, from rtnetlink's error.
    pub fn refused(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let action = action.into();
        move |e| NetlinkError::Refused {
            action,
            source: to_io(e),
        }
    }
}

/// rtnetlink's errors as `io::Error`s, keeping the kernel's errno.
pub fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// Whether rtnetlink's error is the kernel's `errno`.
pub fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(msg) if msg.raw_code() == -errno)
}

/// What the daemon needs to know about one network device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: bridge, tun, macvtap, veth...; `None` for devices
    /// without one (physical NICs, loopback).
    pub kind: Option<InfoKind>,
    pub mac: Option<Vec<u8>>,
    pub mtu: Option<u32>,
    /// `IFLA_MASTER`: the bridge a port is enslaved to.
    pub master: Option<u32>,
    /// `IFLA_LINK`: a macvtap's (or veth's) lower device, by index in the
    /// namespace `lower_netnsid` names, or in this one when that is `None`.
    pub lower: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the lower device lives in another namespace.
    pub lower_netnsid: Option<i32>,
    pub up: bool,
    /// `IFLA_STATS64`: received and transmitted bytes.
    pub stats: Option<(u64, u64)>,
}

impl Link {
    /// Reads a link message; pure.
    pub fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mac: None,
            mtu: None,
            master: None,
            lower: None,
            lower_netnsid: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            stats: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Address(mac) => link.mac = Some(mac.clone()),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::Controller(index) => link.master = Some(*index),
                LinkAttribute::Link(index) if *index != 0 => link.lower = Some(*index),
                // A valid nsid (>= 0) names a peer namespace.
                LinkAttribute::LinkNetNsId(id) if *id >= 0 => link.lower_netnsid = Some(*id),
                LinkAttribute::Stats64(s) => link.stats = Some((s.rx_bytes, s.tx_bytes)),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub fn is_bridge(&self) -> bool {
        self.kind == Some(InfoKind::Bridge)
    }

    /// `tun`, `macvtap`, `bridge`... as the kernel names the kind.
    pub fn kind_name(&self) -> Option<String> {
        self.kind.as_ref().map(ToString::to_string)
    }

    /// "a veth device", for messages about a device that is not what we
    /// expected.
    pub fn describe_kind(&self) -> String {
        match &self.kind {
            Some(kind) => format!("a {kind} device"),
            None => "a device without a link type (e.g. a physical NIC)".into(),
        }
    }
}

/// An rtnetlink connection of the daemon (cheap to clone).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace and
    /// drives it on the current tokio runtime. Needs a runtime; fails only
    /// if the socket cannot be opened.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The raw handle, for requests this module does not wrap (creating
    /// bridges, addresses).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// RTM_GETLINK by name. `Ok(None)`: no such device (ENODEV), or a name
    /// the kernel could not have (it is never sent).
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        if !qnet_hostnet::link::valid_ifname(name) {
            return Ok(None);
        }
        let request = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        one(request, &format!("looking up device `{name}`")).await
    }

    /// RTM_GETLINK by index. `Ok(None)`: no such device (ENODEV).
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let request = self.handle.link().get().match_index(index).execute();
        one(request, &format!("looking up ifindex {index}")).await
    }

    /// RTM_GETLINK dump: every device of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs = dump(self.handle.link().get().execute(), "listing links").await?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// The name of device `index`, if it exists.
    pub async fn name_of(&self, index: u32) -> Result<Option<String>, NetlinkError> {
        Ok(self.link_by_index(index).await?.map(|l| l.name))
    }
}

/// Every message a dump request (`action`) answers, in the kernel's order.
pub async fn dump<M>(
    mut request: impl futures_util::Stream<Item = Result<M, rtnetlink::Error>> + Unpin,
    action: &str,
) -> Result<Vec<M>, NetlinkError> {
    let mut msgs = Vec::new();
    while let Some(msg) = request
        .try_next()
        .await
        .map_err(NetlinkError::refused(action))?
    {
        msgs.push(msg);
    }
    Ok(msgs)
}

/// The one link a GETLINK request answers, ENODEV meaning none.
async fn one(
    mut request: impl futures_util::Stream<Item = Result<LinkMessage, rtnetlink::Error>> + Unpin,
    action: &str,
) -> Result<Option<Link>, NetlinkError> {
    match request.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
        Ok(None) => Ok(None),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(NetlinkError::refused(action)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::Stats64;

    #[test]
    fn a_link_message_is_read_whole() {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.header.flags = LinkFlags::Up;
        let mut stats = Stats64::default();
        stats.rx_bytes = 10;
        stats.tx_bytes = 20;
        msg.attributes = vec![
            LinkAttribute::IfName("qmvtap0".into()),
            LinkAttribute::Address(vec![0x52, 0x54, 0, 0, 0, 1]),
            LinkAttribute::Link(3),
            LinkAttribute::LinkNetNsId(2),
            LinkAttribute::Stats64(stats),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::MacVtap)]),
        ];
        let link = Link::from_message(&msg);
        assert_eq!(link.name, "qmvtap0");
        assert_eq!(
            (link.index, link.up, link.lower, link.lower_netnsid),
            (7, true, Some(3), Some(2))
        );
        assert_eq!(link.stats, Some((10, 20)));
        assert_eq!(link.kind_name().as_deref(), Some("macvtap"));
        assert!(!link.is_bridge());
        // IFLA_LINK 0 and a negative nsid mean "none".
        msg.attributes = vec![LinkAttribute::Link(0), LinkAttribute::LinkNetNsId(-1)];
        let link = Link::from_message(&msg);
        assert_eq!((link.lower, link.lower_netnsid), (None, None));
        assert_eq!(
            link.describe_kind(),
            "a device without a link type (e.g. a physical NIC)"
        );
    }
}
