//! The LAN switch-over's side that touches the system: reading the
//! uplink ([`Kernel::snapshot`], [`Kernel::observe`]) and performing one
//! [`Action`] at a time, over the daemon's rtnetlink connection. Every
//! action is idempotent (adding what is there or removing what is gone is
//! success), so a restore may run over any state a crash left.
//!
//! Devices are looked up by name for every action: a restart, or the
//! bridge being deleted and made again, never leaves a stale ifindex.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope, CacheInfo,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RoutePreference,
};
use netlink_packet_route::AddressFamily;
use qnet_api::{IfName, Mac};
use rtnetlink::LinkUnspec;

use super::plan::{self, Action, Addr, Dev, LinkState, Observed, Route, Snapshot, FOREVER};
use super::record::{MAX_ADDRESSES, MAX_ROUTES};
use super::LanError;
use crate::netlink::{is_errno, Link, Netlink, NetlinkError};
use crate::network::{self, NetworkError};

/// The two devices of one LAN network, in the calling thread's namespace.
pub struct Kernel {
    netlink: Netlink,
    uplink: IfName,
    bridge: IfName,
}

fn refused(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LanError {
    let refused = NetlinkError::refused(action);
    move |e| LanError::Netlink(refused(e))
}

impl Kernel {
    pub fn open(uplink: &IfName, bridge: &IfName) -> Result<Kernel, LanError> {
        Ok(Kernel {
            netlink: Netlink::open()?,
            uplink: uplink.clone(),
            bridge: bridge.clone(),
        })
    }

    fn uplink_problem(&self, problem: impl Into<String>) -> LanError {
        LanError::Uplink {
            uplink: self.uplink.to_string(),
            problem: problem.into(),
        }
    }

    fn name(&self, dev: Dev) -> &IfName {
        match dev {
            Dev::Uplink => &self.uplink,
            Dev::Bridge => &self.bridge,
        }
    }

    async fn link(&self, dev: Dev) -> Result<Option<Link>, LanError> {
        Ok(self.netlink.link_by_name(self.name(dev)).await?)
    }

    /// The uplink, or an error saying it is missing.
    async fn uplink(&self) -> Result<Link, LanError> {
        self.link(Dev::Uplink)
            .await?
            .ok_or_else(|| self.uplink_problem("no such device"))
    }

    /// Our bridge, if it exists; an error if a device of its name is no
    /// bridge (not ours: never used nor removed).
    async fn bridge(&self) -> Result<Option<Link>, LanError> {
        match self.link(Dev::Bridge).await? {
            Some(dev) if !dev.is_bridge() => Err(not_a_bridge(&dev)),
            other => Ok(other),
        }
    }

    /// The uplink is a port of our bridge: the switch-over is in place.
    pub async fn switched(&self) -> Result<bool, LanError> {
        let (Some(bridge), Some(uplink)) = (self.bridge().await?, self.link(Dev::Uplink).await?)
        else {
            return Ok(false);
        };
        Ok(uplink.master == Some(bridge.index))
    }

    /// What the uplink has now, checked to be something we can take over
    /// and give back exactly.
    pub async fn snapshot(&self, taken_at: u64) -> Result<Snapshot, LanError> {
        let link = self.uplink().await?;
        if link.is_bridge() {
            return Err(self.uplink_problem("is a bridge itself: give its guests a bridge of its own (e.g. a routed network) or bridge a physical interface"));
        }
        if let Some(master) = link.master {
            let name = self.netlink.name_of(master).await?.unwrap_or_default();
            return Err(self.uplink_problem(format!(
                "is already a port of `{name}`: take it out of there first"
            )));
        }
        let state = link_state(&link).ok_or_else(|| {
            self.uplink_problem(
                "has no Ethernet MAC address: only an Ethernet interface can be bridged",
            )
        })?;
        let addresses = self.addresses(link.index).await?;
        let routes = self.routes(link.index).await?;
        Ok(Snapshot {
            uplink: self.uplink.clone(),
            bridge: self.bridge.clone(),
            link: state,
            addresses,
            routes,
            taken_at,
        })
    }

    /// What a restore needs to know of the system now.
    pub async fn observe(&self) -> Result<Observed, LanError> {
        let bridge = self.bridge().await?;
        let Some(uplink) = self.link(Dev::Uplink).await? else {
            return Ok(Observed {
                uplink: None,
                uplink_addrs: Vec::new(),
                enslaved: false,
                bridge: bridge.is_some(),
            });
        };
        let uplink_addrs = self
            .address_messages(uplink.index)
            .await?
            .iter()
            .filter_map(|m| Some((local_ip(m)?, m.header.prefix_len)))
            .collect();
        Ok(Observed {
            uplink: link_state(&uplink),
            uplink_addrs,
            enslaved: bridge
                .as_ref()
                .is_some_and(|b| uplink.master == Some(b.index)),
            bridge: bridge.is_some(),
        })
    }

    async fn address_messages(&self, index: u32) -> Result<Vec<AddressMessage>, LanError> {
        let request = self
            .netlink
            .handle()
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let action = format!("listing the addresses of `{}`", self.uplink);
        Ok(crate::netlink::dump(request, &action).await?)
    }

    /// The uplink's addresses that move ([`plan::moves_address`]).
    async fn addresses(&self, index: u32) -> Result<Vec<Addr>, LanError> {
        let addrs: Vec<Addr> = self
            .address_messages(index)
            .await?
            .iter()
            .filter_map(read_address)
            .filter(|a| plan::moves_address(&a.ip))
            .collect();
        if addrs.len() > MAX_ADDRESSES {
            return Err(self.uplink_problem(format!("has more than {MAX_ADDRESSES} addresses")));
        }
        Ok(addrs)
    }

    /// The routes through the uplink that move ([`plan::moves_route`]),
    /// of every table, IPv4 then IPv6. A multipath route through it is
    /// refused: it could not be given back exactly.
    async fn routes(&self, index: u32) -> Result<Vec<Route>, LanError> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let mut dump = self.netlink.handle().route().get(query).execute();
            while let Some(msg) = dump.try_next().await.map_err(refused("listing routes"))? {
                if through_multipath(&msg, index) {
                    return Err(self.uplink_problem(
                        "carries a multipath route, which a LAN network cannot take over: remove it first",
                    ));
                }
                if let Some(route) = read_route(&msg, index) {
                    routes.push(route);
                }
            }
        }
        if routes.len() > MAX_ROUTES {
            return Err(self.uplink_problem(format!("has more than {MAX_ROUTES} routes")));
        }
        Ok(routes)
    }

    /// Performs one action; idempotent.
    pub async fn apply(&self, action: &Action) -> Result<(), LanError> {
        match action {
            Action::CreateBridge { mac } => {
                let dev = network::ensure_bridge(&self.netlink, &self.bridge, mac.octets())
                    .await
                    .map_err(Box::new)?;
                if !dev.is_bridge() {
                    return Err(not_a_bridge(&dev));
                }
                // A bridge of that name made before (by us) keeps its MAC.
                let octets = mac.octets().to_vec();
                match dev.mac.as_ref() == Some(&octets) {
                    true => Ok(()),
                    false => {
                        self.set_link(Dev::Bridge, |l| l.address(octets), "setting the MAC of")
                            .await
                    }
                }
            }
            Action::BridgeUp => self.set_link(Dev::Bridge, |l| l.up(), "bringing up").await,
            Action::DeleteBridge => Ok(network::delete_bridge(&self.netlink, &self.bridge)
                .await
                .map_err(Box::new)?),
            Action::AddAddr(dev, addr) => self.add_address(*dev, addr).await,
            Action::DelAddr(dev, addr) => self.del_address(*dev, addr).await,
            Action::Enslave => {
                let bridge = self.bridge().await?.ok_or_else(|| {
                    self.uplink_problem(format!("bridge `{}` vanished", self.bridge))
                })?;
                let master = bridge.index;
                self.set_link(Dev::Uplink, move |l| l.controller(master), "enslaving")
                    .await
            }
            Action::Release => {
                self.set_link(Dev::Uplink, |l| l.nocontroller(), "releasing")
                    .await
            }
            Action::PutRoute(dev, route) => self.put_route(*dev, route).await,
            Action::SetUplink(state) => self.set_uplink(state).await,
        }
    }

    async fn index(&self, dev: Dev) -> Result<Option<u32>, LanError> {
        Ok(self.link(dev).await?.map(|l| l.index))
    }

    async fn set_link(
        &self,
        dev: Dev,
        build: impl FnOnce(
            rtnetlink::LinkMessageBuilder<LinkUnspec>,
        ) -> rtnetlink::LinkMessageBuilder<LinkUnspec>,
        what: &str,
    ) -> Result<(), LanError> {
        let name = self.name(dev);
        let index = self
            .index(dev)
            .await?
            .ok_or_else(|| self.uplink_problem(format!("{what} `{name}`: no such device")))?;
        let message = build(LinkUnspec::new_with_index(index)).build();
        self.netlink
            .handle()
            .link()
            .set(message)
            .execute()
            .await
            .map_err(refused(format!("{what} `{name}`")))
    }

    async fn add_address(&self, dev: Dev, addr: &Addr) -> Result<(), LanError> {
        let what = format!(
            "adding {}/{} to `{}`",
            addr.ip,
            addr.prefix_len,
            self.name(dev)
        );
        let index = self
            .index(dev)
            .await?
            .ok_or_else(|| self.uplink_problem(format!("{what}: no such device")))?;
        let mut request = self
            .netlink
            .handle()
            .address()
            .add(index, addr.ip, addr.prefix_len);
        let msg = request.message_mut();
        let flags = plan::settable(addr.flags);
        msg.header.flags = AddressHeaderFlags::from_bits_retain(flags as u8);
        msg.header.scope = AddressScope::from(addr.scope);
        msg.attributes
            .retain(|a| !matches!(a, AddressAttribute::Broadcast(_)));
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::from_bits_retain(
                flags,
            )));
        if let Some(broadcast) = addr.broadcast {
            msg.attributes.push(AddressAttribute::Broadcast(broadcast));
        }
        if let Some(label) = &addr.label {
            msg.attributes.push(AddressAttribute::Label(label.clone()));
        }
        if addr.valid_lft != FOREVER {
            let mut lifetimes = CacheInfo::default();
            lifetimes.ifa_preferred = addr.preferred_lft;
            lifetimes.ifa_valid = addr.valid_lft;
            msg.attributes.push(AddressAttribute::CacheInfo(lifetimes));
        }
        match request.execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            Err(e) => Err(refused(what)(e)),
        }
    }

    async fn del_address(&self, dev: Dev, addr: &Addr) -> Result<(), LanError> {
        let Some(index) = self.index(dev).await? else {
            return Ok(());
        };
        let mut msg = AddressMessage::default();
        msg.header.family = family(&addr.ip);
        msg.header.prefix_len = addr.prefix_len;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.ip));
        match self.netlink.handle().address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) || is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(refused(format!(
                "removing {}/{} from `{}`",
                addr.ip,
                addr.prefix_len,
                self.name(dev)
            ))(e)),
        }
    }

    async fn put_route(&self, dev: Dev, route: &Route) -> Result<(), LanError> {
        let what = format!("putting route {} on `{}`", describe(route), self.name(dev));
        let index = self
            .index(dev)
            .await?
            .ok_or_else(|| self.uplink_problem(format!("{what}: no such device")))?;
        self.netlink
            .handle()
            .route()
            .add(route_message(route, index))
            .replace()
            .execute()
            .await
            .map_err(refused(what))
    }

    async fn set_uplink(&self, state: &LinkState) -> Result<(), LanError> {
        let (mac, mtu, up) = (state.mac.octets().to_vec(), state.mtu, state.up);
        self.set_link(
            Dev::Uplink,
            move |l| {
                let l = l.address(mac).mtu(mtu);
                if up {
                    l.up()
                } else {
                    l.down()
                }
            },
            "restoring MAC, MTU and state of",
        )
        .await
    }
}

fn not_a_bridge(dev: &Link) -> LanError {
    LanError::Bridge(Box::new(NetworkError::NotABridge {
        name: dev.name.clone(),
        kind: dev.describe_kind(),
    }))
}

fn link_state(link: &Link) -> Option<LinkState> {
    let mac: [u8; 6] = link.mac.as_deref()?.try_into().ok()?;
    Some(LinkState {
        mac: Mac::from_octets(mac),
        mtu: link.mtu?,
        up: link.up,
    })
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// IFA_LOCAL is the local address of an IPv4 address (IFA_ADDRESS may be
/// a point-to-point peer); IPv6 has only IFA_ADDRESS.
fn local_ip(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// An address as the kernel reported it.
fn read_address(msg: &AddressMessage) -> Option<Addr> {
    let mut addr = Addr {
        ip: local_ip(msg)?,
        prefix_len: msg.header.prefix_len,
        flags: u32::from(msg.header.flags.bits()),
        scope: u8::from(msg.header.scope),
        broadcast: None,
        label: None,
        valid_lft: FOREVER,
        preferred_lft: FOREVER,
    };
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Flags(f) => addr.flags = f.bits(),
            AddressAttribute::Broadcast(b) => addr.broadcast = Some(*b),
            AddressAttribute::Label(l) => addr.label = Some(l.clone()),
            AddressAttribute::CacheInfo(c) => {
                addr.valid_lft = c.ifa_valid;
                addr.preferred_lft = c.ifa_preferred;
            }
            _ => {}
        }
    }
    Some(addr)
}

fn route_ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn through_multipath(msg: &RouteMessage, index: u32) -> bool {
    msg.attributes.iter().any(|a| {
        matches!(a, RouteAttribute::MultiPath(hops) if hops.iter().any(|h| h.interface_index == index))
    })
}

/// A route out of device `index` that moves, as the kernel reported it.
fn read_route(msg: &RouteMessage, index: u32) -> Option<Route> {
    let header = &msg.header;
    let mut route = Route {
        v6: header.address_family == AddressFamily::Inet6,
        dst: None,
        dst_len: header.destination_prefix_length,
        gateway: None,
        prefsrc: None,
        metric: None,
        table: u32::from(header.table),
        protocol: u8::from(header.protocol),
        scope: u8::from(header.scope),
        kind: u8::from(header.kind),
        tos: header.tos,
        onlink: header.flags.contains(RouteFlags::Onlink),
        pref: None,
    };
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(a) => route.dst = route_ip(a),
            RouteAttribute::Gateway(a) => route.gateway = route_ip(a),
            RouteAttribute::PrefSource(a) => route.prefsrc = route_ip(a),
            RouteAttribute::Priority(p) => route.metric = Some(*p),
            RouteAttribute::Table(t) => route.table = *t,
            RouteAttribute::Preference(p) => route.pref = Some(u8::from(*p)),
            _ => {}
        }
    }
    let ours = oif == Some(index) && plan::moves_route(route.table, route.protocol);
    ours.then_some(route)
}

/// The `RTM_NEWROUTE` that puts `route` on device `index`.
fn route_message(route: &Route, index: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let h = &mut msg.header;
    h.address_family = if route.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    h.destination_prefix_length = route.dst_len;
    h.tos = route.tos;
    h.table = u8::try_from(route.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    h.protocol = route.protocol.into();
    h.scope = route.scope.into();
    h.kind = route.kind.into();
    if route.onlink {
        h.flags |= RouteFlags::Onlink;
    }
    let attrs = &mut msg.attributes;
    attrs.push(RouteAttribute::Table(route.table));
    if let Some(dst) = route.dst {
        attrs.push(RouteAttribute::Destination(dst.into()));
    }
    if let Some(gateway) = route.gateway {
        attrs.push(RouteAttribute::Gateway(gateway.into()));
    }
    if let Some(src) = route.prefsrc {
        attrs.push(RouteAttribute::PrefSource(src.into()));
    }
    if let Some(metric) = route.metric {
        attrs.push(RouteAttribute::Priority(metric));
    }
    if let Some(pref) = route.pref {
        attrs.push(RouteAttribute::Preference(RoutePreference::from(pref)));
    }
    attrs.push(RouteAttribute::Oif(index));
    msg
}

/// `default via 192.0.2.1 metric 100`, for messages.
pub fn describe(route: &Route) -> String {
    let mut text = match route.dst {
        Some(dst) => format!("{dst}/{}", route.dst_len),
        None => "default".into(),
    };
    if let Some(gw) = route.gateway {
        text.push_str(&format!(" via {gw}"));
    }
    if let Some(metric) = route.metric {
        text.push_str(&format!(" metric {metric}"));
    }
    if route.table != 254 {
        text.push_str(&format!(" table {}", route.table));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_read_and_written_back_the_same() {
        let route = Route {
            v6: false,
            dst: Some("198.51.100.0".parse().unwrap()),
            dst_len: 24,
            gateway: Some("192.0.2.1".parse().unwrap()),
            prefsrc: Some("192.0.2.10".parse().unwrap()),
            metric: Some(50),
            table: 1000,
            protocol: 4,
            scope: 0,
            kind: 1,
            tos: 0,
            onlink: true,
            pref: None,
        };
        let msg = route_message(&route, 7);
        assert_eq!(
            msg.header.table,
            RouteHeader::RT_TABLE_UNSPEC,
            "table > 255"
        );
        assert_eq!(read_route(&msg, 7), Some(route.clone()));
        assert_eq!(read_route(&msg, 8), None, "another device's");
        assert_eq!(
            describe(&route),
            "198.51.100.0/24 via 192.0.2.1 metric 50 table 1000"
        );
        let mut kernel = route_message(&route, 7);
        kernel.header.protocol = 2u8.into();
        assert_eq!(read_route(&kernel, 7), None, "the kernel's own");
    }

    #[test]
    fn an_address_is_read_with_flags_label_and_lifetimes() {
        let mut lifetimes = CacheInfo::default();
        lifetimes.ifa_preferred = 100;
        lifetimes.ifa_valid = 200;
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = 24;
        msg.attributes = vec![
            AddressAttribute::Address("192.0.2.10".parse().unwrap()),
            AddressAttribute::Local("192.0.2.10".parse().unwrap()),
            AddressAttribute::Label("eth0:1".into()),
            AddressAttribute::Flags(AddressFlags::from_bits_retain(0x200)),
            AddressAttribute::CacheInfo(lifetimes),
        ];
        let addr = read_address(&msg).unwrap();
        assert_eq!(addr.ip, "192.0.2.10".parse::<IpAddr>().unwrap());
        assert_eq!(
            (addr.flags, addr.valid_lft, addr.preferred_lft),
            (0x200, 200, 100)
        );
        assert_eq!(addr.label.as_deref(), Some("eth0:1"));
    }
}
