//! The only module that uses CAP_NET_ADMIN: create a TAP and attach it.

use std::path::Path;

use qnet_hostnet::link::{LinkSocket, PortChange};
use qnet_hostnet::tap::Tap;

use crate::error::HelperError;

/// Creates a new TAP and makes it a running port of `bridge`: MTU copied
/// from the bridge, MAC starting with `fe:` (a Linux bridge takes the
/// lowest port MAC as its own; `fe:` keeps the bridge's address stable),
/// enslaved and up, all in one netlink request.
pub fn create_attached_tap(bridge: &str, vnet_hdr: bool, conf: &Path) -> Result<Tap, HelperError> {
    let mut netlink = LinkSocket::new().map_err(HelperError::Netlink)?;
    let bridge_link = netlink
        .link_by_name(bridge)
        .map_err(HelperError::Netlink)?
        .ok_or_else(|| HelperError::NoSuchBridge {
            bridge: bridge.to_string(),
            conf: conf.to_path_buf(),
        })?;
    if bridge_link.kind.as_deref() != Some("bridge") {
        return Err(HelperError::NotABridge {
            bridge: bridge.to_string(),
            kind: bridge_link.kind.unwrap_or_else(|| "plain".into()),
        });
    }

    let tap = Tap::create_new(vnet_hdr).map_err(HelperError::Tap)?;
    let attach_err = |source| HelperError::Attach {
        tap: tap.name().to_string(),
        bridge: bridge.to_string(),
        source,
    };
    let tap_link = netlink
        .link_by_name(tap.name())
        .map_err(attach_err)?
        .ok_or_else(|| HelperError::TapVanished {
            tap: tap.name().to_string(),
        })?;
    let change = PortChange {
        mtu: Some(bridge_link.mtu),
        mac: tap_link.mac.map(with_fe_prefix),
        master: Some(bridge_link.index),
        up: true,
    };
    netlink
        .configure_port(tap_link.index, change)
        .map_err(attach_err)?;
    Ok(tap)
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
