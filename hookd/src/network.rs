//! A network's kernel side: its bridge, the router addresses on it and the
//! forwarding sysctls.
//!
//! Everything here acts on the network namespace of the calling thread (the
//! rtnetlink socket and the `/proc/sys/net` files are resolved per thread),
//! so the daemon works unchanged under `ip netns exec`.
//!
//! We own exactly one device per network: the bridge named in its config.
//! [`bring_up`] adopts a bridge that is already there (after a daemon
//! restart) and only adds what is missing; it never touches another device,
//! nor addresses on the bridge other than the router's.

use std::io;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use thiserror::Error;

use crate::api::Mode;
use crate::config::NetworkConfig;

const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;

#[derive(Debug, Error)]
pub enum NetworkError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused a request; `source` carries its errno.
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        #[source]
        source: io::Error,
    },
    /// A device with the bridge's name exists and is something else: it is
    /// not ours, so we neither use nor delete it.
    #[error("device `{name}` exists but is {kind}, not a bridge: refusing to use or remove it")]
    NotABridge { name: String, kind: String },
    #[error("cannot set {path} to 1: {source}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

impl NetworkError {
    /// The errno of a refused netlink request.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Socket(e) | Self::Netlink { source: e, .. } | Self::Sysctl { source: e, .. } => {
                e.raw_os_error()
            }
            Self::NotABridge { .. } => None,
        }
    }
}

/// The bridge's MAC address for network `network_name`.
///
/// `02:xx:xx:xx:xx:xx`: the first octet 0x02 marks a locally administered
/// unicast address (QEMU's guests use 52:54:00:…, also locally administered,
/// so the two never collide); the other five bytes are the first five bytes
/// of the 64-bit FNV-1a hash of `"qnet-bridge:" + network_name`. FNV-1a is
/// spelled out here rather than taken from std's `DefaultHasher`, whose
/// output may change between Rust releases: the address must stay the same
/// across daemon upgrades, or guests' ARP/neighbour caches and any DHCP
/// server-identifier bookkeeping would see the router change MAC.
///
/// A fixed address matters because a bridge without one takes the lowest
/// MAC of its ports, so the router's address would change as guests come
/// and go.
pub fn bridge_mac(network_name: &str) -> [u8; 6] {
    let h = crate::fsutil::fnv1a(format!("qnet-bridge:{network_name}").as_bytes()).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// Opens an rtnetlink connection in the calling thread's namespace and
/// drives it on the current tokio runtime.
pub(crate) fn rtnl() -> Result<Handle, NetworkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// rtnetlink's errors as `io::Error`s, keeping the kernel's errno.
pub(crate) fn netlink_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

fn failed(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let action = action.into();
    move |e| NetworkError::Netlink {
        action,
        source: netlink_io(e),
    }
}

/// What we need to know about a device with the bridge's name.
struct Device {
    index: u32,
    kind: Option<InfoKind>,
    mac: Option<Vec<u8>>,
    up: bool,
}

impl Device {
    fn from_message(msg: &LinkMessage) -> Device {
        let mut dev = Device {
            index: msg.header.index,
            kind: None,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Address(mac) => dev.mac = Some(mac.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            dev.kind = Some(kind.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        dev
    }

    fn is_bridge(&self) -> bool {
        self.kind == Some(InfoKind::Bridge)
    }

    fn describe_kind(&self) -> String {
        match &self.kind {
            Some(kind) => format!("a {kind} device"),
            None => "a device without a link type (e.g. a physical NIC)".into(),
        }
    }
}

async fn device_by_name(handle: &Handle, name: &str) -> Result<Option<Device>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(Device::from_message(&msg))),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(msg)) if msg.raw_code() == -ENODEV => Ok(None),
        Err(e) => Err(failed(format!("looking up device `{name}`"))(e)),
    }
}

/// Creates the bridge if missing and returns it; refuses a non-bridge.
async fn ensure_bridge(handle: &Handle, name: &str, mac: [u8; 6]) -> Result<Device, NetworkError> {
    if let Some(dev) = device_by_name(handle, name).await? {
        return Ok(dev);
    }
    let create = handle
        .link()
        .add(LinkBridge::new(name).address(mac.to_vec()).build())
        .execute()
        .await;
    match create {
        Ok(()) => tracing::info!(bridge = name, mac = %fmt_mac(&mac), "created bridge"),
        // Someone created it between our lookup and now: adopt or refuse it
        // below like any existing device.
        Err(rtnetlink::Error::NetlinkError(msg)) if msg.raw_code() == -EEXIST => {}
        Err(e) => return Err(failed(format!("creating bridge `{name}`"))(e)),
    }
    device_by_name(handle, name)
        .await?
        .ok_or_else(|| NetworkError::Netlink {
            action: format!("looking up bridge `{name}` after creating it"),
            source: io::Error::from_raw_os_error(ENODEV),
        })
}

/// An address on the bridge, as the kernel reports it.
struct Addr {
    ip: IpAddr,
    prefix_len: u8,
    message: AddressMessage,
}

async fn addresses_on(handle: &Handle, index: u32) -> Result<Vec<Addr>, NetworkError> {
    let mut dump = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = dump
        .try_next()
        .await
        .map_err(failed(format!("listing the addresses of ifindex {index}")))?
    {
        // IFA_LOCAL is the local address of an IPv4 address (IFA_ADDRESS may
        // be a point-to-point peer); IPv6 has only IFA_ADDRESS.
        let mut local = None;
        let mut address = None;
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        if let Some(ip) = local.or(address) {
            out.push(Addr {
                ip,
                prefix_len: msg.header.prefix_len,
                message: msg,
            });
        }
    }
    Ok(out)
}

/// Puts `ip/prefix_len` on the bridge unless it is there already. The same
/// address with another prefix length (the config changed while we were
/// down) is replaced: the router address is ours.
async fn ensure_address(
    handle: &Handle,
    bridge: &str,
    index: u32,
    ip: IpAddr,
    prefix_len: u8,
) -> Result<(), NetworkError> {
    let existing = addresses_on(handle, index).await?;
    let mut present = false;
    for addr in existing.into_iter().filter(|a| a.ip == ip) {
        if addr.prefix_len == prefix_len {
            present = true;
        } else {
            tracing::info!(
                bridge,
                "replacing {ip}/{} with {ip}/{prefix_len}",
                addr.prefix_len
            );
            handle
                .address()
                .del(addr.message)
                .execute()
                .await
                .map_err(failed(format!(
                    "removing {ip}/{} from `{bridge}`",
                    addr.prefix_len
                )))?;
        }
    }
    if present {
        return Ok(());
    }
    let mut request = handle.address().add(index, ip, prefix_len);
    if ip.is_ipv6() {
        // The router address must be usable at once (dnsmasq binds it and
        // sends RAs from it), and there is nobody to collide with on a
        // bridge that only we put addresses on.
        let msg = request.message_mut();
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match request.execute().await {
        Ok(()) => {
            tracing::info!(bridge, "added {ip}/{prefix_len}");
            Ok(())
        }
        // Added concurrently: present now, which is all we want.
        Err(rtnetlink::Error::NetlinkError(msg)) if msg.raw_code() == -EEXIST => Ok(()),
        Err(e) => Err(failed(format!("adding {ip}/{prefix_len} to `{bridge}`"))(e)),
    }
}

/// Brings network `net` up in the current network namespace; idempotent.
///
/// - the bridge `net.bridge` exists (created if missing; adopted if it is a
///   bridge already; an error if another kind of device has the name) and
///   has the MAC from [`bridge_mac`];
/// - the router address `router/prefix` is on it (and the IPv6 router
///   address, with `nodad`, if configured), each exactly once;
/// - the bridge is up;
/// - for `nat` and `routed` networks, `net.ipv4.ip_forward` is 1 (and
///   `net.ipv6.conf.all.forwarding` when the network has IPv6).
///
/// Addresses on the bridge other than the router's are left alone.
pub async fn bring_up(net: &NetworkConfig) -> Result<(), NetworkError> {
    let handle = rtnl()?;
    let name = net.bridge.as_str();
    let mac = bridge_mac(&net.name);
    let dev = ensure_bridge(&handle, name, mac).await?;
    if !dev.is_bridge() {
        return Err(NetworkError::NotABridge {
            name: name.to_owned(),
            kind: dev.describe_kind(),
        });
    }
    if dev.mac.as_deref() != Some(&mac[..]) {
        tracing::info!(bridge = name, mac = %fmt_mac(&mac), "setting the bridge's MAC address");
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(dev.index)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(failed(format!("setting the MAC address of `{name}`")))?;
    }
    ensure_address(
        &handle,
        name,
        dev.index,
        IpAddr::V4(net.router),
        net.subnet.prefix_len(),
    )
    .await?;
    if let Some(v6) = &net.ipv6 {
        ensure_address(
            &handle,
            name,
            dev.index,
            IpAddr::V6(v6.router),
            v6.subnet.prefix_len(),
        )
        .await?;
    }
    if !dev.up {
        handle
            .link()
            .set(LinkUnspec::new_with_index(dev.index).up().build())
            .execute()
            .await
            .map_err(failed(format!("bringing `{name}` up")))?;
    }
    if matches!(net.mode, Mode::Nat | Mode::Routed) {
        enable_sysctl("/proc/sys/net/ipv4/ip_forward")?;
        if net.ipv6.is_some() && enable_sysctl("/proc/sys/net/ipv6/conf/all/forwarding")? {
            warn_about_accept_ra(name);
        }
    }
    Ok(())
}

/// Deletes the network's bridge (its addresses and routes go with it).
/// A missing bridge is not an error; a non-bridge with its name is, and is
/// left alone. Sysctls are left as they are: other users may rely on them.
pub async fn bring_down(net: &NetworkConfig) -> Result<(), NetworkError> {
    let handle = rtnl()?;
    let name = net.bridge.as_str();
    let Some(dev) = device_by_name(&handle, name).await? else {
        return Ok(());
    };
    if !dev.is_bridge() {
        return Err(NetworkError::NotABridge {
            name: name.to_owned(),
            kind: dev.describe_kind(),
        });
    }
    match handle.link().del(dev.index).execute().await {
        Ok(()) => {
            tracing::info!(bridge = name, "deleted bridge");
            Ok(())
        }
        Err(rtnetlink::Error::NetlinkError(msg)) if msg.raw_code() == -ENODEV => Ok(()),
        Err(e) => Err(failed(format!("deleting bridge `{name}`"))(e)),
    }
}

/// Sets a boolean sysctl of the current network namespace to 1, unless it
/// is 1 already; returns whether it changed. `/proc/sys/net` resolves to
/// the namespace of the calling thread, so this is a plain file write (not
/// via tokio's blocking pool, whose threads may live elsewhere).
fn enable_sysctl(path: &'static str) -> Result<bool, NetworkError> {
    let err = |source| NetworkError::Sysctl { path, source };
    let current = std::fs::read_to_string(path).map_err(err)?;
    if current.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(path, "1\n").map_err(err)?;
    tracing::info!("set {path} to 1");
    Ok(true)
}

/// With IPv6 forwarding on, the kernel ignores router advertisements on
/// interfaces with `accept_ra=1` (only 2 accepts them on a router): a host
/// that got its IPv6 default route by SLAAC loses it when it expires. We do
/// not change other interfaces' settings; we say so.
fn warn_about_accept_ra(bridge: &str) {
    let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv6/conf") else {
        return;
    };
    let affected: Vec<String> = dir
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| !matches!(name.as_str(), "all" | "default" | "lo") && name != bridge)
        .filter(|name| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/accept_ra"))
                .map(|v| v.trim() == "1")
                .unwrap_or(false)
        })
        .collect();
    if !affected.is_empty() {
        tracing::warn!(
            "IPv6 forwarding is now on: {} ignore router advertisements from now on \
             (accept_ra=1); set their accept_ra to 2 if they rely on SLAAC",
            affected.join(", ")
        );
    }
}

/// Received and transmitted bytes of device `bridge` in the current
/// network namespace (`IFLA_STATS64`), or `None` if it does not exist or
/// cannot be queried. Blocking, but a single netlink round trip.
pub fn bridge_counters(bridge: &str) -> Option<(u64, u64)> {
    match query_stats64(bridge) {
        Ok(stats) => stats,
        Err(e) => {
            tracing::debug!(bridge, "cannot read the bridge's counters: {e}");
            None
        }
    }
}

fn query_stats64(name: &str) -> io::Result<Option<(u64, u64)>> {
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

    if !qnet_hostnet::link::valid_ifname(name) {
        return Ok(None);
    }
    let socket = Socket::new(NETLINK_ROUTE)?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    let mut packet = NetlinkMessage::from(RouteNetlinkMessage::GetLink(msg));
    packet.header.flags = NLM_F_REQUEST;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < datagram.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = reply.header.length as usize;
            if reply.header.sequence_number == 1 {
                match reply.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                        return Ok(link.attributes.iter().find_map(|attr| match attr {
                            LinkAttribute::Stats64(s) => Some((s.rx_bytes, s.tx_bytes)),
                            _ => None,
                        }));
                    }
                    NetlinkPayload::Error(err) if err.raw_code() == -ENODEV => return Ok(None),
                    NetlinkPayload::Error(err) => return Err(err.to_io()),
                    _ => {}
                }
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub(crate) fn fmt_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_mac_is_fixed_local_unicast_and_differs_per_network() {
        let a = bridge_mac("lab");
        assert_eq!(a, bridge_mac("lab"));
        assert_eq!(a[0], 0x02);
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
        assert_ne!(a, bridge_mac("lab2"));
        assert_ne!(bridge_mac("qnet0"), bridge_mac("qnet1"));
        // Pinned: changing the derivation would change every router's MAC.
        assert_eq!(fmt_mac(&bridge_mac("qnet0")), "02:92:0f:37:db:ac");
    }
}
