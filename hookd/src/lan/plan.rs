//! Pure planning of the LAN switch-over: what the uplink had (a
//! [`Snapshot`]), which of it moves to the bridge, in which order, and how
//! each step is undone; and how to bring the uplink back from whatever
//! state a crash left. Nothing here touches the system: `kernel` performs
//! the [`Action`]s.
//!
//! The order keeps the host reachable at every step: the bridge gets the
//! uplink's MAC and addresses *before* the uplink is enslaved (frames
//! that then reach the bridge find the host's addresses on it), routes are
//! replaced in one request each (`NLM_F_REPLACE`: never absent), and the
//! uplink loses its addresses last. Between the steps, replies still
//! leave through the uplink itself (a port can transmit), so a ping
//! running across the switch-over loses nothing even if the daemon is
//! descheduled between two steps.

use std::net::{IpAddr, Ipv4Addr};

use qnet_api::{IfName, Mac};
use serde::{Deserialize, Serialize};

/// `IFA_F_NODAD`: the address is usable at once.
pub const IFA_F_NODAD: u32 = 0x02;
/// The address flags a `RTM_NEWADDR` may set (the others the kernel
/// computes: secondary, tentative, deprecated, permanent...).
const SETTABLE_FLAGS: u32 = 0x02 | 0x10 | 0x100 | 0x200 | 0x400;
/// A lifetime of `u32::MAX` seconds means "forever".
pub const FOREVER: u32 = u32::MAX;

/// The flags of `flags` a request may set.
pub fn settable(flags: u32) -> u32 {
    flags & SETTABLE_FLAGS
}

/// One address of the uplink, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addr {
    pub ip: IpAddr,
    pub prefix_len: u8,
    /// `IFA_FLAGS`.
    pub flags: u32,
    pub scope: u8,
    pub broadcast: Option<Ipv4Addr>,
    /// An IPv4 label (`eth0:1`); the bridge's copy has none.
    pub label: Option<String>,
    /// Seconds left when the snapshot was taken ([`FOREVER`]: permanent).
    pub valid_lft: u32,
    pub preferred_lft: u32,
}

/// One route through the uplink, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub v6: bool,
    /// `None`: a default route.
    pub dst: Option<IpAddr>,
    pub dst_len: u8,
    pub gateway: Option<IpAddr>,
    pub prefsrc: Option<IpAddr>,
    pub metric: Option<u32>,
    pub table: u32,
    pub protocol: u8,
    pub scope: u8,
    /// `RTN_*`: unicast, ...
    pub kind: u8,
    pub tos: u8,
    pub onlink: bool,
    /// IPv6 router preference.
    pub pref: Option<u8>,
}

/// The uplink's link-level settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    pub mac: Mac,
    pub mtu: u32,
    pub up: bool,
}

/// Everything the switch-over changes on the uplink, taken before it
/// starts: what a restore gives back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub uplink: IfName,
    pub bridge: IfName,
    pub link: LinkState,
    pub addresses: Vec<Addr>,
    pub routes: Vec<Route>,
    /// Seconds since the epoch: lifetimes count down from here.
    pub taken_at: u64,
}

/// Which device an action is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dev {
    Uplink,
    Bridge,
}

/// One change to the system; each is idempotent in `kernel` (adding what
/// is there, removing what is gone, is success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A bridge with the uplink's MAC (its MTU follows its port's: it is
    /// not set, which would pin it).
    CreateBridge {
        mac: Mac,
    },
    BridgeUp,
    DeleteBridge,
    AddAddr(Dev, Addr),
    DelAddr(Dev, Addr),
    Enslave,
    Release,
    /// `ip route replace` of the route on the device.
    PutRoute(Dev, Route),
    /// The uplink's MAC, MTU and up state back to these.
    SetUplink(LinkState),
}

/// One step of the switch-over and what undoes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    pub undo: Vec<Action>,
}

/// Whether an address of the uplink moves to the bridge: every one but
/// IPv6 link-local addresses (the bridge makes its own, the same one,
/// since it takes the uplink's MAC).
pub fn moves_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// `RTPROT_REDIRECT`, `RTPROT_KERNEL` and `RTPROT_RA`: routes the kernel
/// makes itself (from addresses, redirects, router advertisements), which
/// follow the addresses and are not moved.
const KERNEL_PROTOCOLS: [u8; 3] = [1, 2, 9];
/// The `local` table: the kernel's own, per address.
const TABLE_LOCAL: u32 = 255;

/// Whether a route through the uplink moves to the bridge.
pub fn moves_route(table: u32, protocol: u8) -> bool {
    table != TABLE_LOCAL && !KERNEL_PROTOCOLS.contains(&protocol)
}

/// The address as the bridge gets it: no label (an IPv4 label must name
/// its device) and, for IPv6, no duplicate address detection (the address
/// is already in use on this very link, by us).
pub fn for_bridge(addr: &Addr) -> Addr {
    let mut flags = settable(addr.flags);
    if addr.ip.is_ipv6() {
        flags |= IFA_F_NODAD;
    }
    Addr {
        flags,
        label: None,
        ..addr.clone()
    }
}

/// The address as the uplink gets it back: its own settable flags and
/// label, its lifetimes less the `elapsed` seconds since the snapshot;
/// `None` if it would have expired meanwhile.
pub fn for_uplink(addr: &Addr, elapsed: u64) -> Option<Addr> {
    let left = |lft: u32| -> Option<u32> {
        if lft == FOREVER {
            return Some(FOREVER);
        }
        u32::try_from(u64::from(lft).checked_sub(elapsed)?)
            .ok()
            .filter(|s| *s > 0)
    };
    let valid_lft = left(addr.valid_lft)?;
    // A preferred lifetime that ran out makes the address deprecated,
    // which a preferred lifetime of 0 says.
    let preferred_lft = left(addr.preferred_lft).unwrap_or(0).min(valid_lft);
    Some(Addr {
        flags: settable(addr.flags),
        valid_lft,
        preferred_lft,
        ..addr.clone()
    })
}

/// The switch-over, step by step, each with its undo: the bridge (the
/// uplink's MAC) comes up, gets the uplink's addresses, takes the
/// uplink as its port, takes over its routes, and the uplink's own
/// addresses go last.
pub fn switch_over(snap: &Snapshot) -> Vec<Step> {
    let mut steps = vec![
        Step {
            action: Action::CreateBridge { mac: snap.link.mac },
            undo: vec![Action::DeleteBridge],
        },
        Step {
            action: Action::BridgeUp,
            undo: Vec::new(),
        },
    ];
    for addr in &snap.addresses {
        let on_bridge = for_bridge(addr);
        steps.push(Step {
            action: Action::AddAddr(Dev::Bridge, on_bridge.clone()),
            undo: vec![Action::DelAddr(Dev::Bridge, on_bridge)],
        });
    }
    steps.push(Step {
        action: Action::Enslave,
        undo: vec![Action::Release],
    });
    for route in &snap.routes {
        steps.push(Step {
            action: Action::PutRoute(Dev::Bridge, route.clone()),
            undo: vec![Action::PutRoute(Dev::Uplink, route.clone())],
        });
    }
    for addr in &snap.addresses {
        steps.push(Step {
            action: Action::DelAddr(Dev::Uplink, addr.clone()),
            undo: vec![Action::AddAddr(Dev::Uplink, addr.clone())],
        });
    }
    steps
}

/// What is there now, as far as a restore needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The uplink's link settings (`None`: the uplink is gone).
    pub uplink: Option<LinkState>,
    /// Addresses (ip, prefix length) on the uplink now.
    pub uplink_addrs: Vec<(IpAddr, u8)>,
    /// The uplink is a port of our bridge.
    pub enslaved: bool,
    /// Our bridge exists (and is a bridge).
    pub bridge: bool,
}

/// How to give the uplink back what the snapshot says it had, from any
/// state the switch-over (or a crash in it) left: its addresses first
/// (with what is left of their lifetimes, `elapsed` seconds later), its
/// routes (replaced, so those the bridge took move back in one request),
/// out of the bridge, its MAC, MTU and up state, and the bridge goes last.
pub fn restore(snap: &Snapshot, seen: &Observed, elapsed: u64) -> Vec<Action> {
    let mut actions = Vec::new();
    for addr in &snap.addresses {
        if seen.uplink_addrs.contains(&(addr.ip, addr.prefix_len)) {
            continue;
        }
        if let Some(back) = for_uplink(addr, elapsed) {
            actions.push(Action::AddAddr(Dev::Uplink, back));
        }
    }
    for route in &snap.routes {
        actions.push(Action::PutRoute(Dev::Uplink, route.clone()));
    }
    if seen.enslaved {
        actions.push(Action::Release);
    }
    if seen.uplink.as_ref() != Some(&snap.link) {
        actions.push(Action::SetUplink(snap.link.clone()));
    }
    if seen.bridge {
        actions.push(Action::DeleteBridge);
    }
    actions
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn addr(ip: &str, prefix_len: u8) -> Addr {
        Addr {
            ip: ip.parse().unwrap(),
            prefix_len,
            flags: 0x80,
            scope: 0,
            broadcast: None,
            label: Some("eth0".into()),
            valid_lft: FOREVER,
            preferred_lft: FOREVER,
        }
    }

    fn default_route() -> Route {
        Route {
            v6: false,
            dst: None,
            dst_len: 0,
            gateway: Some("192.0.2.1".parse().unwrap()),
            prefsrc: None,
            metric: Some(100),
            table: 254,
            protocol: 4,
            scope: 0,
            kind: 1,
            tos: 0,
            onlink: false,
            pref: None,
        }
    }

    /// An uplink with an IPv4 and an IPv6 address and a default route.
    pub(crate) fn snapshot() -> Snapshot {
        Snapshot {
            uplink: "eth0".parse().unwrap(),
            bridge: "lan".parse().unwrap(),
            link: LinkState {
                mac: "52:54:00:aa:bb:cc".parse().unwrap(),
                mtu: 1500,
                up: true,
            },
            addresses: vec![addr("192.0.2.10", 24), addr("2001:db8::10", 64)],
            routes: vec![default_route()],
            taken_at: 1000,
        }
    }

    #[test]
    fn the_bridge_has_the_addresses_before_it_takes_the_uplink_and_the_uplink_loses_them_last() {
        let snap = snapshot();
        let steps = switch_over(&snap);
        let kinds: Vec<&str> = steps
            .iter()
            .map(|s| match &s.action {
                Action::CreateBridge { .. } => "create",
                Action::BridgeUp => "up",
                Action::AddAddr(Dev::Bridge, _) => "addr+br",
                Action::Enslave => "enslave",
                Action::PutRoute(Dev::Bridge, _) => "route>br",
                Action::DelAddr(Dev::Uplink, _) => "addr-up",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            ["create", "up", "addr+br", "addr+br", "enslave", "route>br", "addr-up", "addr-up"]
        );
        assert_eq!(steps[0].action, Action::CreateBridge { mac: snap.link.mac });
    }

    #[test]
    fn every_step_is_undone_by_its_inverse() {
        for step in switch_over(&snapshot()) {
            let expected = match &step.action {
                Action::CreateBridge { .. } => vec![Action::DeleteBridge],
                Action::BridgeUp => vec![],
                Action::AddAddr(Dev::Bridge, a) => vec![Action::DelAddr(Dev::Bridge, a.clone())],
                Action::Enslave => vec![Action::Release],
                Action::PutRoute(Dev::Bridge, r) => vec![Action::PutRoute(Dev::Uplink, r.clone())],
                Action::DelAddr(Dev::Uplink, a) => vec![Action::AddAddr(Dev::Uplink, a.clone())],
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(step.undo, expected);
        }
    }

    #[test]
    fn the_bridge_copy_has_no_label_and_ipv6_skips_dad() {
        let v4 = for_bridge(&addr("192.0.2.10", 24));
        assert_eq!((v4.label, v4.flags), (None, 0));
        let v6 = for_bridge(&addr("2001:db8::10", 64));
        assert_eq!(v6.flags, IFA_F_NODAD, "permanent is the kernel's to set");
    }

    #[test]
    fn link_local_and_kernel_routes_stay() {
        assert!(!moves_address(&"fe80::1".parse().unwrap()));
        assert!(moves_address(&"fd00::1".parse().unwrap()));
        assert!(moves_address(&"169.254.1.1".parse().unwrap()));
        assert!(moves_route(254, 4), "dhcp");
        assert!(moves_route(254, 3), "boot (ip route add)");
        assert!(moves_route(100, 4), "another table");
        assert!(!moves_route(254, 2), "kernel prefix route");
        assert!(!moves_route(254, 9), "router advertisement");
        assert!(!moves_route(255, 3), "local table");
    }

    #[test]
    fn lifetimes_count_down_and_an_expired_address_is_not_restored() {
        let mut a = addr("192.0.2.10", 24);
        assert_eq!(for_uplink(&a, 10_000).unwrap().valid_lft, FOREVER);
        a.valid_lft = 3600;
        a.preferred_lft = 1800;
        let back = for_uplink(&a, 600).unwrap();
        assert_eq!((back.valid_lft, back.preferred_lft), (3000, 1200));
        assert_eq!(back.label.as_deref(), Some("eth0"));
        let deprecated = for_uplink(&a, 2000).unwrap();
        assert_eq!((deprecated.valid_lft, deprecated.preferred_lft), (1600, 0));
        assert_eq!(for_uplink(&a, 3600), None);
        assert_eq!(for_uplink(&a, u64::MAX), None);
    }

    #[test]
    fn restore_after_a_complete_switch_over_brings_everything_back() {
        let snap = snapshot();
        let seen = Observed {
            uplink: Some(snap.link.clone()),
            uplink_addrs: vec![],
            enslaved: true,
            bridge: true,
        };
        let actions = restore(&snap, &seen, 0);
        let back: Vec<Addr> = snap
            .addresses
            .iter()
            .map(|a| for_uplink(a, 0).unwrap())
            .collect();
        assert_eq!(
            actions,
            vec![
                Action::AddAddr(Dev::Uplink, back[0].clone()),
                Action::AddAddr(Dev::Uplink, back[1].clone()),
                Action::PutRoute(Dev::Uplink, default_route()),
                Action::Release,
                Action::DeleteBridge,
            ]
        );
    }

    #[test]
    fn restore_before_anything_happened_only_puts_the_routes_again() {
        let snap = snapshot();
        let seen = Observed {
            uplink: Some(snap.link.clone()),
            uplink_addrs: vec![
                ("192.0.2.10".parse().unwrap(), 24),
                ("2001:db8::10".parse().unwrap(), 64),
            ],
            enslaved: false,
            bridge: false,
        };
        assert_eq!(
            restore(&snap, &seen, 5),
            vec![Action::PutRoute(Dev::Uplink, default_route())]
        );
    }

    #[test]
    fn restore_sets_the_link_back_when_it_changed() {
        let snap = snapshot();
        let mut link = snap.link.clone();
        link.mtu = 1400;
        let seen = Observed {
            uplink: Some(link),
            uplink_addrs: vec![
                ("192.0.2.10".parse().unwrap(), 24),
                ("2001:db8::10".parse().unwrap(), 64),
            ],
            enslaved: false,
            bridge: true,
        };
        let actions = restore(&snap, &seen, 0);
        assert!(actions.contains(&Action::SetUplink(snap.link.clone())));
        assert_eq!(actions.last(), Some(&Action::DeleteBridge));
    }
}
