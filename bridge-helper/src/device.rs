//! The only module that uses CAP_NET_ADMIN: create a TAP, attach it, and
//! leave behind what deletes it once QEMU is gone.

use std::os::fd::{AsFd, AsRawFd};

use qnet_hostnet::link::{Link, LinkSocket, PortChange};
use qnet_hostnet::macvtap::remove_marked;
use qnet_hostnet::owner::Qemu;
use qnet_hostnet::reaper::{self, Detached};
use qnet_hostnet::tap::{Tap, TapMarker};

use crate::error::HelperError;

/// Creates a new TAP and makes it a running port of `bridge`: MTU copied
/// from the bridge, MAC starting with `fe:` (a Linux bridge takes the
/// lowest port MAC as its own; `fe:` keeps the bridge's address stable),
/// without IPv6 addresses of its own (see [`PortChange`]), then enslaved
/// and up in one netlink request.
pub fn create_attached_tap(
    netlink: &mut LinkSocket,
    bridge: &Link,
    vnet_hdr: bool,
) -> Result<Tap, HelperError> {
    if bridge.kind.as_deref() != Some("bridge") {
        return Err(HelperError::NotABridge {
            bridge: bridge.name.clone(),
            kind: bridge.kind.clone().unwrap_or_else(|| "plain".into()),
        });
    }

    let tap = Tap::create_new(vnet_hdr).map_err(HelperError::Tap)?;
    let attach_err = |source| HelperError::Attach {
        tap: tap.name().to_string(),
        bridge: bridge.name.clone(),
        source,
    };
    let tap_link = netlink
        .link_by_name(tap.name())
        .map_err(attach_err)?
        .ok_or_else(|| HelperError::TapVanished {
            tap: tap.name().to_string(),
        })?;
    let change = PortChange {
        mtu: Some(bridge.mtu),
        mac: tap_link.mac.map(with_fe_prefix),
        master: Some(bridge.index),
        up: true,
        no_ipv6_addresses: true,
    };
    netlink
        .configure_port(tap_link.index, change)
        .map_err(attach_err)?;
    Ok(tap)
}

/// Makes sure the TAP cannot outlive QEMU, though its holder may persist
/// it (`TUNSETPERSIST` needs no capability on an attached fd): only the
/// caller may attach to it again, it is marked with its owner (so a daemon
/// can delete it once QEMU is gone) and a reaper deletes it when QEMU
/// exits. Until [`Detached::commit`] the reaper deletes it as soon as this
/// process exits.
pub fn guard_tap(netlink: &mut LinkSocket, tap: &Tap, qemu: Qemu) -> Result<Detached, HelperError> {
    let name = tap.name().to_string();
    tap.restrict_to_caller().map_err(HelperError::Tap)?;
    let configure_err = |source| HelperError::Attach {
        tap: name.clone(),
        bridge: "its bridge".into(),
        source,
    };
    let index = netlink
        .link_by_name(&name)
        .map_err(configure_err)?
        .ok_or_else(|| HelperError::TapVanished { tap: name.clone() })?
        .index;
    let alias = TapMarker { owner: qemu.owner }.to_string();
    netlink.set_alias(index, &alias).map_err(configure_err)?;

    let pidfd = qemu.pidfd;
    let keep = [pidfd.as_raw_fd()];
    let reaper_name = name.clone();
    reaper::spawn_detached(c"qtap-reaper", &keep, move |control| {
        // Its own socket: two processes must not share one.
        let Ok(mut netlink) = LinkSocket::new() else {
            return; // no `ready`: the helper fails, and the TAP with it
        };
        if !control.ready() {
            return;
        }
        control.guard(pidfd.as_fd(), || {
            remove_marked(&mut netlink, index, &reaper_name, "tun", &alias).is_ok()
        });
    })
    .map_err(|source| HelperError::Reaper { tap: name, source })
}

fn with_fe_prefix(mut mac: [u8; 6]) -> [u8; 6] {
    mac[0] = 0xfe;
    mac
}

#[cfg(test)]
mod tests {
    use super::with_fe_prefix;

    #[test]
    fn fe_prefix_replaces_only_the_first_byte() {
        let random = [0x3a, 0x11, 0x22, 0x33, 0x44, 0x55];
        assert_eq!(with_fe_prefix(random), [0xfe, 0x11, 0x22, 0x33, 0x44, 0x55]);
    }
}
