//! Garbage collection of the devices qnet's helpers left behind.
//!
//! `qnet-macvtap-helper` marks every macvtap it creates, and
//! `qnet-bridge-helper` every TAP (ifalias, see
//! `qnet_hostnet::macvtap::Marker` and `qnet_hostnet::tap::TapMarker`),
//! with the QEMU process it is for (pid *and* start time, so a recycled
//! pid does not keep a device alive), and leaves a reaper that deletes it
//! when QEMU exits. After a host crash, or if a reaper was killed, a
//! device can outlive its QEMU; the daemon removes those at start-up. A
//! `qmvtapN` macvtap with no alias at all was left by a reaper killed
//! between creating and marking it: it is removed if it is still unmarked
//! after a grace period (a live reaper marks its device within
//! microseconds).

use std::time::Duration;

use qnet_hostnet::link::{Link, LinkError, LinkSocket};
use qnet_hostnet::macvtap::{self, Marker, OwnedMacvtap, Removal, NAME_PREFIX};
use qnet_hostnet::owner::Liveness;
use qnet_hostnet::tap::TapMarker;

/// How long an unmarked `qmvtapN` may stay unmarked.
const GRACE: Duration = Duration::from_secs(5);

/// Deletes every device of the current namespace that qnet's helpers left
/// behind (see the module documentation); returns their names.
pub fn remove_orphans() -> Result<Vec<String>, LinkError> {
    let mut netlink = LinkSocket::new()?;
    let links = netlink.links()?;
    let mut removed = Vec::new();
    for link in &links {
        if remove_if_orphan(&mut netlink, link)? == Removal::Deleted {
            removed.push(link.name.clone());
        }
    }
    let unmarked: Vec<&Link> = links.iter().filter(|l| is_unmarked_qmvtap(l)).collect();
    if !unmarked.is_empty() {
        std::thread::sleep(GRACE);
        for link in unmarked {
            // Only the very same device (ifindex and name), still unmarked.
            match netlink.link_by_index(link.index)? {
                Some(now) if now.name == link.name && is_unmarked_qmvtap(&now) => {
                    netlink.delete(link.index)?;
                    removed.push(link.name.clone());
                }
                _ => {}
            }
        }
    }
    Ok(removed)
}

fn is_unmarked_qmvtap(link: &Link) -> bool {
    link.kind.as_deref() == Some("macvtap")
        && link.alias.is_none()
        && link
            .name
            .strip_prefix(NAME_PREFIX)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Deletes `link` if it carries a qnet marker whose QEMU is gone.
fn remove_if_orphan(netlink: &mut LinkSocket, link: &Link) -> Result<Removal, LinkError> {
    let Some(alias) = link.alias.as_deref() else {
        return Ok(Removal::NotOurs);
    };
    match link.kind.as_deref() {
        Some("macvtap") => {
            let Ok(marker) = alias.parse::<Marker>() else {
                return Ok(Removal::NotOurs);
            };
            if marker.owner.liveness() != Liveness::Gone {
                return Ok(Removal::NotOurs);
            }
            let device = OwnedMacvtap {
                index: link.index,
                name: link.name.clone(),
                marker,
            };
            Ok(macvtap::remove(netlink, &device)?.0)
        }
        Some("tun") => {
            let Ok(marker) = alias.parse::<TapMarker>() else {
                return Ok(Removal::NotOurs);
            };
            if marker.owner.liveness() != Liveness::Gone {
                return Ok(Removal::NotOurs);
            }
            macvtap::remove_marked(netlink, link.index, &link.name, "tun", alias)
        }
        _ => Ok(Removal::NotOurs),
    }
}
