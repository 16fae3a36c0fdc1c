//! Garbage collection of qnet macvtaps whose QEMU is gone.
//!
//! `qnet-macvtap-helper` marks every device it creates (ifalias, see
//! `qnet_hostnet::macvtap::Marker`) and leaves a reaper that deletes it when
//! QEMU exits. After a host crash, or if a reaper was killed, a device can
//! outlive its QEMU; the daemon removes those at start-up.

use qnet_hostnet::link::{LinkError, LinkSocket};
use qnet_hostnet::macvtap::{self, Marker, OwnedMacvtap};

/// Deletes every marked macvtap of the current namespace whose QEMU pid no
/// longer exists (restoring a passthru lower device's MAC); returns their
/// names.
pub fn remove_orphan_macvtaps() -> Result<Vec<String>, LinkError> {
    let mut netlink = LinkSocket::new()?;
    let mut removed = Vec::new();
    for link in netlink.links()? {
        if link.kind.as_deref() != Some("macvtap") {
            continue;
        }
        let Some(marker) = link.alias.as_deref().and_then(|a| a.parse::<Marker>().ok()) else {
            continue;
        };
        if process_exists(marker.qemu_pid) {
            continue;
        }
        let device = OwnedMacvtap {
            index: link.index,
            name: link.name.clone(),
            marker,
        };
        let (removal, _) = macvtap::remove(&mut netlink, &device)?;
        if removal == macvtap::Removal::Deleted {
            removed.push(link.name);
        }
    }
    Ok(removed)
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
