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
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use qnet_api::Mac;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use thiserror::Error;

use crate::api::Mode;
use crate::config::NetworkConfig;
use crate::netlink::{is_errno, Link, Netlink, NetlinkError};

#[derive(Debug, Error)]
pub enum NetworkError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
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
            Self::Netlink(e) => e.raw_os_error(),
            Self::Sysctl { source: e, .. } => e.raw_os_error(),
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

fn failed(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let refused = NetlinkError::refused(action);
    move |e| NetworkError::Netlink(refused(e))
}

/// Creates bridge `name` with `mac` (and up) if missing, and returns the
/// device of that name: the caller refuses one that is no bridge.
pub(crate) async fn ensure_bridge(
    netlink: &Netlink,
    name: &str,
    mac: [u8; 6],
) -> Result<Link, NetworkError> {
    if let Some(dev) = netlink.link_by_name(name).await? {
        return Ok(dev);
    }
    let create = netlink
        .handle()
        .link()
        .add(LinkBridge::new(name).address(mac.to_vec()).build())
        .execute()
        .await;
    match create {
        Ok(()) => tracing::info!(bridge = name, mac = %Mac::from_octets(mac), "created bridge"),
        // Someone created it between our lookup and now: adopt or refuse it
        // below like any existing device.
        Err(e) if is_errno(&e, libc::EEXIST) => {}
        Err(e) => return Err(failed(format!("creating bridge `{name}`"))(e)),
    }
    netlink.link_by_name(name).await?.ok_or_else(|| {
        NetworkError::Netlink(NetlinkError::Refused {
            action: format!("looking up bridge `{name}` after creating it"),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        })
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

async fn remove_address(handle: &Handle, bridge: &str, addr: Addr) -> Result<(), NetworkError> {
    let what = format!("removing {}/{} from `{bridge}`", addr.ip, addr.prefix_len);
    handle
        .address()
        .del(addr.message)
        .execute()
        .await
        .map_err(failed(what))
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
            remove_address(handle, bridge, addr).await?;
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
        Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
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
    let netlink = Netlink::open()?;
    let handle = netlink.handle();
    let name = net.bridge.as_str();
    let mac = bridge_mac(&net.name);
    let dev = ensure_bridge(&netlink, name, mac).await?;
    if !dev.is_bridge() {
        return Err(NetworkError::NotABridge {
            name: name.to_owned(),
            kind: dev.describe_kind(),
        });
    }
    if dev.mac.as_deref() != Some(&mac[..]) {
        tracing::info!(bridge = name, mac = %Mac::from_octets(mac), "setting the bridge's MAC address");
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
    for (router, prefix_len) in router_addresses(net) {
        ensure_address(handle, name, dev.index, router, prefix_len).await?;
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
        if net.ipv6().is_some() && enable_sysctl("/proc/sys/net/ipv6/conf/all/forwarding")? {
            warn_about_accept_ra(name);
        }
    }
    Ok(())
}

/// Deletes the network's bridge (its addresses and routes go with it).
/// A missing bridge is not an error; a non-bridge with its name is, and is
/// left alone. Sysctls are left as they are: other users may rely on them.
pub async fn bring_down(net: &NetworkConfig) -> Result<(), NetworkError> {
    delete_bridge(&Netlink::open()?, net.bridge.as_str()).await
}

/// Deletes bridge `name` (see [`bring_down`]).
pub(crate) async fn delete_bridge(netlink: &Netlink, name: &str) -> Result<(), NetworkError> {
    let Some(dev) = netlink.link_by_name(name).await? else {
        return Ok(());
    };
    if !dev.is_bridge() {
        return Err(NetworkError::NotABridge {
            name: name.to_owned(),
            kind: dev.describe_kind(),
        });
    }
    match netlink.handle().link().del(dev.index).execute().await {
        Ok(()) => {
            tracing::info!(bridge = name, "deleted bridge");
            Ok(())
        }
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
        Err(e) => Err(failed(format!("deleting bridge `{name}`"))(e)),
    }
}

/// Moves network `old` to the bridge and addresses of `new` (same
/// network, changed config) without taking its guests off it: on the same
/// bridge, the old router addresses make way for the new ones; a renamed
/// bridge is made, takes over every port of the old one, and the old one
/// is deleted. Guests see their router move, not their link go.
pub async fn readdress(old: &NetworkConfig, new: &NetworkConfig) -> Result<(), NetworkError> {
    if old.bridge != new.bridge {
        bring_up(new).await?;
        move_ports(&old.bridge, &new.bridge).await?;
        return bring_down(old).await;
    }
    let netlink = Netlink::open()?;
    let handle = netlink.handle();
    let Some(dev) = netlink.link_by_name(&old.bridge).await? else {
        return bring_up(new).await;
    };
    let keep = router_addresses(new);
    let gone: Vec<(IpAddr, u8)> = router_addresses(old)
        .into_iter()
        .filter(|a| !keep.contains(a))
        .collect();
    for addr in addresses_on(handle, dev.index).await? {
        if gone.contains(&(addr.ip, addr.prefix_len)) {
            tracing::info!(bridge = %old.bridge, "removing {}/{}", addr.ip, addr.prefix_len);
            remove_address(handle, &old.bridge, addr).await?;
        }
    }
    bring_up(new).await
}

/// The router addresses a network puts on its bridge (a LAN network: none,
/// its bridge carries what its uplink had).
fn router_addresses(net: &NetworkConfig) -> Vec<(IpAddr, u8)> {
    let Some(own) = &net.addressing else {
        return Vec::new();
    };
    let mut addrs = vec![(IpAddr::V4(own.router), own.subnet.prefix_len())];
    if let Some(v6) = &own.ipv6 {
        addrs.push((IpAddr::V6(v6.router), v6.subnet.prefix_len()));
    }
    addrs
}

/// Enslaves every port of bridge `from` to bridge `to`.
async fn move_ports(from: &str, to: &str) -> Result<(), NetworkError> {
    let netlink = Netlink::open()?;
    let (Some(from_dev), Some(to_dev)) = (
        netlink.link_by_name(from).await?,
        netlink.link_by_name(to).await?,
    ) else {
        return Ok(());
    };
    for port in netlink.links().await? {
        if port.master != Some(from_dev.index) {
            continue;
        }
        netlink
            .handle()
            .link()
            .set(
                LinkUnspec::new_with_index(port.index)
                    .controller(to_dev.index)
                    .build(),
            )
            .execute()
            .await
            .map_err(failed(format!(
                "moving `{}` from `{from}` to `{to}`",
                port.name
            )))?;
        tracing::info!(port = %port.name, from, to, "moved a port to the renamed bridge");
    }
    Ok(())
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
/// cannot be queried.
pub async fn bridge_counters(bridge: &str) -> Option<(u64, u64)> {
    let netlink = Netlink::open().ok()?;
    match netlink.link_by_name(bridge).await {
        Ok(link) => link?.stats,
        Err(e) => {
            tracing::debug!(bridge, "cannot read the bridge's counters: {e}");
            None
        }
    }
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
        assert_eq!(
            Mac::from_octets(bridge_mac("qnet0")).to_string(),
            "02:92:0f:37:db:ac"
        );
    }
}
