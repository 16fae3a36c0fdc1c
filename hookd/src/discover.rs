//! Which host network devices a QEMU process is attached to.
//!
//! From a pid (from `SO_PEERCRED` on its QMP socket, see
//! [`crate::qmp::GuestIdentity`]) this walks `/proc/<pid>/fd`:
//!
//! * an fd on the TUN/TAP clone device (`/dev/net/tun`, checked to be
//!   char 10:200) is a TAP; `/proc/<pid>/fdinfo/<fd>` names it
//!   (`iff:\t<name>`; absent while the fd is not attached to a device);
//! * an fd on a macvtap character device is a macvtap: those nodes are named
//!   `tap<ifindex>`, whether it is devtmpfs' `/dev/tap<ifindex>` or a
//!   private node made elsewhere (and possibly already unlinked, which
//!   readlink shows as `... (deleted)`). The device number is checked
//!   against the `macvtap` major from `/proc/devices`, so a regular file
//!   called `tap3` is not mistaken for one.
//!
//! Each device is then resolved with rtnetlink, not sysfs (a daemon in a
//! network namespace may see another namespace's sysfs): for a TAP its
//! master (usually a bridge), for a macvtap its lower device.
//!
//! # Namespaces
//!
//! TAP names and ifindexes only mean something within a network namespace,
//! and `/proc` does not say which one a device lives in. Everything is
//! resolved in the namespace of the *calling thread*, which must be the one
//! QEMU's devices are in (normally the host's). A device found there under
//! that name but of the wrong kind (not a TAP, not a macvtap) is skipped
//! with a warning; a same-named TAP in another namespace cannot be told
//! apart.
//!
//! # Matching ports to guest NICs
//!
//! This module reports host-side devices; the MAC here is the device's own,
//! not the guest's. The guest's NICs and MACs come from QMP
//! ([`crate::qmp::QmpSession::query_nics`]). The caller matches them: a
//! macvtap's MAC *is* its guest's MAC (QEMU must be given the same one), so
//! match those by MAC; TAPs carry no trace of the guest MAC, so match them
//! in order (QEMU opens netdevs in command-line order, and ports are
//! returned by ascending fd number), one NIC per TAP. That order only lines
//! up if every NIC is on a TAP or macvtap: QMP does not say which backend a
//! NIC has (HMP `info network` shows it, unofficially, as the NIC's peer
//! line), so a guest that mixes TAPs with e.g. `-netdev user` NICs cannot be
//! matched by order alone.
//!
//! The `/proc` walk runs on tokio's blocking pool; names are resolved over
//! the daemon's rtnetlink layer ([`crate::netlink`]).

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::api::{IfName, Mac};
use crate::netlink::{Netlink, NetlinkError};

/// The TUN/TAP clone device, and its number (misc major 10, `TUN_MINOR`
/// 200).
const TUN_PATH: &str = "/dev/net/tun";
const TUN_MAJOR: u32 = 10;
const TUN_MINOR: u32 = 200;

/// The kind of host device behind a guest NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortKind {
    Tap,
    Macvtap,
}

/// A host network device a QEMU process holds open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPort {
    pub kind: PortKind,
    pub ifname: IfName,
    pub ifindex: u32,
    /// The host device's MAC address. For a TAP this is *not* the guest's;
    /// for a macvtap it is (see the module documentation).
    pub mac: Option<Mac>,
    /// Master device (bridge) a TAP is enslaved to, if any.
    pub master: Option<IfName>,
    /// Lower device of a macvtap; `None` if it is in another network
    /// namespace.
    pub lower: Option<IfName>,
    /// Lowest descriptor number QEMU holds on the device (a multiqueue NIC
    /// holds one per queue); ports are sorted by it.
    pub fd: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// No such process (it exited before we looked).
    #[error("process {pid} does not exist")]
    NoProcess { pid: u32 },

    /// `/proc` refused to show us the process' descriptors (usually
    /// EACCES: not root and not the process' owner).
    #[error("reading {}: {source}", path.display())]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// The TAPs and macvtaps process `pid` holds open, resolved in the
/// namespace of the calling thread (a fresh rtnetlink connection), sorted
/// by descriptor number.
///
/// A process that exits or closes descriptors during the walk is not an
/// error: whatever was gone is skipped. A process that does not exist at
/// all is [`DiscoverError::NoProcess`].
pub async fn guest_ports(pid: u32) -> Result<Vec<GuestPort>, DiscoverError> {
    // The /proc walk is blocking file I/O; it runs on the blocking pool.
    let devices = tokio::task::spawn_blocking(move || open_devices(pid))
        .await
        .map_err(|e| DiscoverError::Proc {
            path: PathBuf::from(format!("/proc/{pid}/fd")),
            source: io::Error::other(e.to_string()),
        })??;
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    resolve(&Netlink::open()?, devices).await
}

/// A device found in `/proc/<pid>/fd`, before netlink.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Device {
    Tap { name: String },
    Macvtap { index: u32 },
}

/// Walks `/proc/<pid>/fd`; returns each TAP/macvtap once, with its lowest
/// fd, sorted by fd.
fn open_devices(pid: u32) -> Result<Vec<(u32, Device)>, DiscoverError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiscoverError::NoProcess { pid })
        }
        Err(source) => return Err(DiscoverError::Proc { path: dir, source }),
    };
    let mut macvtap_major: Option<Option<u32>> = None;
    let mut found: Vec<(u32, Device)> = Vec::new();
    // Errors past this point mean the process or the fd went away: skip.
    for entry in entries.map_while(Result::ok) {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let Ok(target) = fs::read_link(&path) else {
            continue;
        };
        // Only names that can be ours are looked at (and stat'ed), so a
        // disk image on a hung network filesystem cannot block the walk.
        // Sockets, pipes and anon inodes ("socket:[123]") never qualify.
        let tap_index = tap_node_index(&target);
        if target != Path::new(TUN_PATH) && tap_index.is_none() {
            continue;
        }
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_char_device() {
            continue;
        }
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let device = if (major, minor) == (TUN_MAJOR, TUN_MINOR) {
            match tun_name(pid, fd) {
                Some(name) => Device::Tap { name },
                None => continue,
            }
        } else if let Some(index) = tap_index {
            let wanted =
                *macvtap_major.get_or_insert_with(|| qnet_hostnet::devnode::char_major("macvtap"));
            if wanted != Some(major) {
                continue;
            }
            Device::Macvtap { index }
        } else {
            continue;
        };
        match found.iter_mut().find(|(_, d)| *d == device) {
            Some((lowest, _)) => *lowest = (*lowest).min(fd),
            None => found.push((fd, device)),
        }
    }
    found.sort_by_key(|(fd, _)| *fd);
    Ok(found)
}

/// The interface a `/dev/net/tun` descriptor is attached to, from the
/// `iff:` line of its fdinfo.
fn tun_name(pid: u32, fd: u32) -> Option<String> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("iff:"))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
}

/// The ifindex in a macvtap node's name: `.../tap<N>`, possibly followed
/// by readlink's ` (deleted)`.
fn tap_node_index(target: &Path) -> Option<u32> {
    let bytes = target.as_os_str().as_bytes();
    let bytes = bytes.strip_suffix(b" (deleted)").unwrap_or(bytes);
    let base = bytes.rsplit(|&b| b == b'/').next()?;
    let digits = base.strip_prefix(b"tap")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) || digits[0] == b'0' {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

async fn resolve(
    netlink: &Netlink,
    devices: Vec<(u32, Device)>,
) -> Result<Vec<GuestPort>, DiscoverError> {
    let mut ports = Vec::with_capacity(devices.len());
    for (fd, device) in devices {
        let (kind, link) = match &device {
            Device::Tap { name } => (PortKind::Tap, netlink.link_by_name(name).await?),
            Device::Macvtap { index } => (PortKind::Macvtap, netlink.link_by_index(*index).await?),
        };
        let Some(link) = link else {
            tracing::debug!("{device:?} (fd {fd}) is gone or in another network namespace");
            continue;
        };
        let expected = match kind {
            PortKind::Tap => "tun",
            PortKind::Macvtap => "macvtap",
        };
        if link.kind_name().as_deref() != Some(expected) {
            tracing::warn!(
                "{device:?} (fd {fd}) resolved to {:?} of kind {:?}, not {expected}: \
                 the device is probably in another network namespace; skipping it",
                link.name,
                link.kind_name()
            );
            continue;
        }
        // The kernel's names keep IfName's rules (they are the kernel's);
        // one that does not is not a device we made or can act on.
        let Ok(ifname) = link.name.parse::<IfName>() else {
            tracing::warn!("{device:?} (fd {fd}) has a name no interface can have; skipping it");
            continue;
        };
        let name_of = |index| async move {
            let name = netlink.name_of(index).await?;
            Ok::<_, NetlinkError>(name.and_then(|n| n.parse::<IfName>().ok()))
        };
        let master = match link.master {
            Some(master) => name_of(master).await?,
            None => None,
        };
        // A lower device in another namespace has no name here.
        let lower = match (kind, link.lower, link.lower_netnsid) {
            (PortKind::Macvtap, Some(index), None) => name_of(index).await?,
            _ => None,
        };
        ports.push(GuestPort {
            kind,
            ifname,
            ifindex: link.index,
            mac: link
                .mac
                .as_deref()
                .and_then(|m| m.try_into().ok())
                .map(Mac::from_octets),
            master,
            lower,
            fd,
        });
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_nodes() {
        assert_eq!(tap_node_index(Path::new("/dev/tap7")), Some(7));
        assert_eq!(
            tap_node_index(Path::new("/dev/qnet-macvtap/a1b2/tap12 (deleted)")),
            Some(12)
        );
        for other in [
            "/dev/tap",
            "/dev/tap0",
            "/dev/tap7x",
            "/dev/net/tun",
            "/dev/tapx7",
            "/dev/tap07",
        ] {
            assert_eq!(tap_node_index(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn missing_process() {
        // pid_max is at most 2^22.
        assert!(matches!(
            open_devices(u32::MAX - 1),
            Err(DiscoverError::NoProcess { .. })
        ));
    }
}
