//! The only module that changes links: create the macvtap, open its
//! queue, and leave a reaper behind that undoes everything.
//!
//! The reaper is started *before* the device exists and creates it itself:
//! the device never exists without a live process that knows it, so
//! killing the helper at any moment leaves nothing behind (the reaper sees
//! its control socket close and deletes the device). Creating it checks
//! the caller's limit of devices and picks a free `qmvtapN` name from one
//! listing of the links.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use qnet_hostnet::acl::{AclReader, FsReader, ReadError};
use qnet_hostnet::devnode::{self, NodeSource};
use qnet_hostnet::link::{Link, LinkError, LinkSocket, MacvtapMode};
use qnet_hostnet::macvtap::{self, format_mac, Marker, OwnedMacvtap, NAME_PREFIX};
use qnet_hostnet::owner::Owner;
use qnet_hostnet::privilege;
use qnet_hostnet::reaper::{self, Detached};
use qnet_hostnet::tap::{tap_info, Tap};

use crate::error::HelperError;

/// How many `qmvtapN` names are tried before giving up.
const MAX_NAMES: u32 = 4096;
/// Macvtaps one user may hold at a time unless `macvtap-user-limit` in the
/// config directory says otherwise.
pub const DEFAULT_USER_LIMIT: usize = 64;

/// What the caller asked for, already validated and allowed by the ACL.
#[derive(Debug, Clone)]
pub struct Request {
    pub lower: Link,
    pub mode: MacvtapMode,
    /// The guest MAC; `None` only in passthru mode.
    pub mac: Option<[u8; 6]>,
    pub owner: Owner,
    /// How many marked macvtaps the caller may hold (root is not limited).
    pub limit: usize,
}

/// The per-user limit: `CONFIG_DIR/macvtap-user-limit` holds one number
/// (read as the caller, like the ACL); without the file the default.
pub fn user_limit(config_dir: &Path) -> Result<usize, HelperError> {
    let path = config_dir.join("macvtap-user-limit");
    let bad = |why: String| HelperError::BadLimit {
        path: path.clone(),
        why,
    };
    match FsReader::default().read(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| bad("it must hold one number, e.g. `64`".into())),
        Err(ReadError::NotFound) => Ok(DEFAULT_USER_LIMIT),
        Err(err) => Err(bad(err.to_string())),
    }
}

/// A macvtap being made and guarded by its reaper.
pub struct Guarded {
    pub device: OwnedMacvtap,
    /// `None` once committed; dropping a `Guarded` that is still armed
    /// abandons the device, and waits until the reaper has removed it.
    reaper: Option<Detached>,
}

impl Guarded {
    /// Starts the reaper, which creates the device (see the module docs)
    /// and from then on watches QEMU (`qemu` is its pidfd).
    pub fn create(request: Request, qemu: OwnedFd) -> Result<Guarded, HelperError> {
        let keep = [qemu.as_raw_fd()];
        let reaper_request = request.clone();
        let reaper = reaper::spawn_detached(c"qmvtap-reaper", &keep, move |control| {
            // The reaper never opens a device node.
            let _ = privilege::release_spare();
            // Its own socket: two processes must not share one.
            let Ok(mut netlink) = LinkSocket::new() else {
                return; // no `ready`: the helper fails
            };
            if !control.ready() {
                return;
            }
            let device = match create(&mut netlink, &reaper_request) {
                Ok(device) => device,
                Err(err) => {
                    control.report(&format!("err {err}"));
                    return;
                }
            };
            control.report(&format!("ok {}", device.index));
            control.guard(qemu.as_fd(), || {
                macvtap::remove(&mut netlink, &device).is_ok()
            });
        })
        .map_err(|source| HelperError::Reaper {
            name: "(not created yet)".into(),
            source,
        })?;
        let report = reaper.wait_report().map_err(|source| HelperError::Reaper {
            name: "(not created yet)".into(),
            source,
        })?;
        let index = match report.split_once(' ') {
            Some(("ok", index)) => index.parse().ok(),
            Some(("err", message)) => return Err(HelperError::InReaper(message.to_string())),
            _ => None,
        };
        let mut netlink = LinkSocket::new().map_err(HelperError::Netlink)?;
        let link = match index {
            Some(index) => netlink.link_by_index(index).map_err(HelperError::Netlink)?,
            None => None,
        };
        let mut guarded = Guarded {
            device: OwnedMacvtap {
                index: index.unwrap_or(0),
                name: String::new(),
                marker: marker(&request, [0; 6]),
            },
            reaper: Some(reaper),
        };
        let Some(link) = link.filter(|l| l.kind.as_deref() == Some("macvtap")) else {
            return Err(HelperError::Vanished {
                name: format!("ifindex {}", guarded.device.index),
            });
        };
        let marker = link.alias.as_deref().and_then(|a| a.parse::<Marker>().ok());
        guarded.device.name = link.name;
        if let Some(marker) = marker {
            guarded.device.marker = marker;
        }
        tracing::debug!(
            name = guarded.device.name,
            index = guarded.device.index,
            alias = %guarded.device.marker,
            "macvtap ready"
        );
        Ok(guarded)
    }

    pub fn name(&self) -> &str {
        &self.device.name
    }

    /// Opens the macvtap's character device (safely: see [`devnode`]) as
    /// a queue with `IFF_VNET_HDR` if asked for, and checks that the queue
    /// is this device's.
    pub fn open_queue(&self, vnet_hdr: bool) -> Result<Tap, HelperError> {
        let name = self.device.name.as_str();
        let index = self.device.index;
        let (file, source) =
            devnode::open_macvtap_node(name, index).map_err(|source| HelperError::DevNode {
                name: name.to_string(),
                source,
            })?;
        let path = match source {
            NodeSource::Dev => format!("/dev/tap{index}"),
            NodeSource::Private => format!("a private node of /dev/tap{index}"),
        };
        tracing::debug!(node = path, "character device open");
        let tap = Tap::from_macvtap_file(file, &path, name, vnet_hdr).map_err(|source| {
            HelperError::Tap {
                name: name.to_string(),
                source,
            }
        })?;
        let (found, _) = tap_info(tap.as_fd()).map_err(|source| HelperError::Tap {
            name: name.to_string(),
            source: qnet_hostnet::tap::TapError::Ioctl {
                op: "TUNGETIFF",
                path,
                source,
                hint: "",
            },
        })?;
        if found != name {
            return Err(HelperError::WrongQueue {
                name: name.to_string(),
                found,
            });
        }
        Ok(tap)
    }

    /// QEMU has the descriptor: from now on the reaper removes the device
    /// once QEMU exits.
    pub fn commit(mut self) -> Result<(), HelperError> {
        let reaper = self.reaper.take().expect("committed once");
        reaper.commit().map_err(|source| HelperError::Reaper {
            name: self.device.name.clone(),
            source,
        })
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(reaper) = self.reaper.take() {
            reaper.abandon();
        }
    }
}

fn marker(request: &Request, lower_mac: [u8; 6]) -> Marker {
    let passthru = request.mode == MacvtapMode::Passthru;
    Marker {
        owner: request.owner,
        lower: request.lower.name.clone(),
        lower_index: request.lower.index,
        mode: request.mode,
        mac: request.mac,
        restore_mac: request
            .mac
            .filter(|&mac| passthru && mac != lower_mac)
            .map(|_| lower_mac),
    }
}

/// In the reaper: creates `qmvtapN` on the lower device with the guest MAC
/// and the lower device's MTU, marks it, puts the guest MAC on the lower
/// device in passthru mode, and brings it up. Undone on any error.
fn create(netlink: &mut LinkSocket, request: &Request) -> Result<OwnedMacvtap, HelperError> {
    let lower = &request.lower;
    let lower_mac = check_lower(lower)?;
    let links = netlink.links().map_err(HelperError::Netlink)?;
    check_limit(&links, request, None)?;
    // In passthru mode the kernel ignores this MAC and copies the lower
    // device's (which then follows the lower device's changes).
    let mac = request.mac.unwrap_or(lower_mac);
    let name = create_unique(netlink, &links, request, mac)?;
    let link = netlink
        .link_by_name(&name)
        .map_err(HelperError::Netlink)?
        .filter(|link| link.kind.as_deref() == Some("macvtap"))
        .ok_or_else(|| HelperError::Vanished { name: name.clone() })?;
    let mut created = Creation {
        netlink,
        device: OwnedMacvtap {
            index: link.index,
            name,
            marker: marker(request, lower_mac),
        },
        marked: false,
        armed: true,
    };
    created.configure()?;
    // Two runs of the same user may have passed the check above at once;
    // counting again now that this device is marked lets at most the
    // limit through (whoever counts last sees every device).
    let links = created.netlink.links().map_err(HelperError::Netlink)?;
    check_limit(&links, request, Some(created.device.index))?;
    Ok(created.finish())
}

/// Refuses the request if the caller holds `limit` or more (marked)
/// macvtaps already, not counting `ours` (the one being made).
fn check_limit(links: &[Link], request: &Request, ours: Option<u32>) -> Result<(), HelperError> {
    let uid = request.owner.uid;
    if uid == 0 {
        return Ok(());
    }
    let held = links
        .iter()
        .filter(|link| link.kind.as_deref() == Some("macvtap") && Some(link.index) != ours)
        .filter_map(|link| link.alias.as_deref()?.parse::<Marker>().ok())
        .filter(|marker| marker.owner.uid == uid)
        .count();
    if held >= request.limit {
        return Err(HelperError::UserLimit {
            uid,
            held,
            limit: request.limit,
        });
    }
    Ok(())
}

/// A macvtap just created in the reaper; dropped before [`Creation::finish`]
/// it deletes the device and restores a passthru MAC.
struct Creation<'a> {
    netlink: &'a mut LinkSocket,
    device: OwnedMacvtap,
    /// The marker is on the device (so [`macvtap::remove`] recognises it).
    marked: bool,
    armed: bool,
}

impl Creation<'_> {
    fn configure(&mut self) -> Result<(), HelperError> {
        let index = self.device.index;
        let name = self.device.name.clone();
        let configure_err = |source| HelperError::Configure {
            name: name.clone(),
            source,
        };
        // The marker goes on first: from then on a daemon can recognise the
        // device (and the lower device's original MAC) even if the reaper
        // is killed.
        let alias = self.device.marker.to_string();
        self.netlink
            .set_alias(index, &alias)
            .map_err(configure_err)?;
        self.marked = true;
        let marker = &self.device.marker;
        if let (Some(mac), Some(_)) = (marker.mac, marker.restore_mac) {
            self.netlink
                .set_mac(marker.lower_index, mac)
                .map_err(|source| HelperError::PassthruMac {
                    mac: format_mac(mac),
                    lower: marker.lower.clone(),
                    source,
                })?;
        }
        self.netlink.set_up(index).map_err(configure_err)
    }

    fn finish(mut self) -> OwnedMacvtap {
        self.armed = false;
        self.device.clone()
    }

    /// Deletes the device (if it is still ours) and restores a passthru MAC.
    fn undo(&mut self) -> Result<(), LinkError> {
        if self.marked {
            let (removal, restore) = macvtap::remove(self.netlink, &self.device)?;
            tracing::debug!(?removal, ?restore, "undone");
            return Ok(());
        }
        // Not marked yet: recognise it by ifindex, name and kind.
        match self.netlink.link_by_index(self.device.index)? {
            Some(link)
                if link.name == self.device.name && link.kind.as_deref() == Some("macvtap") =>
            {
                match self.netlink.delete(self.device.index) {
                    Err(e) if e.errno() != Some(Errno::ENODEV) => Err(e),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Creation<'_> {
    fn drop(&mut self) {
        if self.armed {
            // The reaper's stderr is /dev/null; the helper reports the
            // original error.
            let _ = self.undo();
        }
    }
}

/// Refuses lower devices a macvtap cannot (or must not) sit on; returns
/// the lower device's MAC.
fn check_lower(lower: &Link) -> Result<[u8; 6], HelperError> {
    let unsuitable = |why: String| HelperError::UnsuitableLower {
        lower: lower.name.clone(),
        why,
    };
    if let Some(kind @ ("macvtap" | "macvlan")) = lower.kind.as_deref() {
        // The kernel would silently use that device's own lower device,
        // which the ACL did not allow.
        return Err(unsuitable(format!(
            "it is itself a {kind} device: name the device it sits on (ip -d link show {})",
            lower.name
        )));
    }
    match lower.mac {
        Some(mac) if mac != [0; 6] => Ok(mac),
        _ => Err(unsuitable(
            "it has no Ethernet address (a macvtap needs an Ethernet device)".into(),
        )),
    }
}

/// Creates a macvtap under the lowest `qmvtapN` name that `links` (one
/// listing) shows free. `NLM_F_EXCL` makes the kernel refuse a name taken
/// since, and an existing device is never reused or modified: the next
/// free name is tried.
fn create_unique(
    netlink: &mut LinkSocket,
    links: &[Link],
    request: &Request,
    mac: [u8; 6],
) -> Result<String, HelperError> {
    let taken: BTreeSet<u32> = links
        .iter()
        .filter_map(|link| link.name.strip_prefix(NAME_PREFIX)?.parse().ok())
        .collect();
    let lower = &request.lower;
    for n in (0..MAX_NAMES).filter(|n| !taken.contains(n)) {
        let name = format!("{NAME_PREFIX}{n}");
        match netlink.create_macvtap(&name, lower.index, mac, request.mode, Some(lower.mtu)) {
            Ok(()) => return Ok(name),
            Err(LinkError::Exists { .. }) => continue,
            Err(source) => {
                return Err(explain_create_failure(netlink, lower, request, mac, source))
            }
        }
    }
    Err(HelperError::NoFreeName { tried: MAX_NAMES })
}

/// Turns the kernel's terse errno into a message that says what is wrong.
fn explain_create_failure(
    netlink: &mut LinkSocket,
    lower: &Link,
    request: &Request,
    mac: [u8; 6],
    source: LinkError,
) -> HelperError {
    let generic = |source| HelperError::Create {
        lower: lower.name.clone(),
        mode: request.mode,
        source,
    };
    match source.errno() {
        Some(Errno::EADDRINUSE) => HelperError::MacInUse {
            mac: format_mac(mac),
            lower: lower.name.clone(),
        },
        // The kernel answers EINVAL when a passthru macvtap holds the lower
        // device, or when passthru is asked for on a shared one.
        Some(Errno::EINVAL) => {
            let uppers = macvlan_uppers(netlink, lower);
            if let Some(holder) = uppers.iter().find(|u| u.passthru) {
                return HelperError::HeldInPassthru {
                    lower: lower.name.clone(),
                    holder: holder.describe(),
                };
            }
            if request.mode == MacvtapMode::Passthru && !uppers.is_empty() {
                let list: Vec<String> = uppers.iter().map(Upper::describe).collect();
                return HelperError::SharedLower {
                    lower: lower.name.clone(),
                    uppers: list.join(", "),
                };
            }
            generic(source)
        }
        _ => generic(source),
    }
}

/// A macvlan or macvtap device on top of the lower device.
struct Upper {
    link: Link,
    passthru: bool,
}

impl Upper {
    fn describe(&self) -> String {
        let kind = self.link.kind.as_deref().unwrap_or("device");
        match self.link.alias.as_deref().map(str::parse::<Marker>) {
            Some(Ok(marker)) => format!(
                "{kind} {} (the guest of QEMU pid {}, uid {})",
                self.link.name, marker.owner.pid, marker.owner.uid
            ),
            _ => format!("{kind} {}", self.link.name),
        }
    }
}

/// The macvlan/macvtap devices stacked on `lower`, from its `upper_*`
/// links in sysfs (used for error messages only).
fn macvlan_uppers(netlink: &mut LinkSocket, lower: &Link) -> Vec<Upper> {
    let dir = Path::new("/sys/class/net").join(&lower.name);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut uppers = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_prefix("upper_")) else {
            continue;
        };
        let Ok(Some(link)) = netlink.link_by_name(name) else {
            continue;
        };
        if !matches!(link.kind.as_deref(), Some("macvtap" | "macvlan")) {
            continue;
        }
        let marked_passthru = link
            .alias
            .as_deref()
            .and_then(|alias| alias.parse::<Marker>().ok())
            .is_some_and(|marker| marker.mode == MacvtapMode::Passthru);
        let passthru = link.macvtap_mode == Some(MacvtapMode::Passthru) || marked_passthru;
        uppers.push(Upper { link, passthru });
    }
    uppers.sort_by(|a, b| a.link.name.cmp(&b.link.name));
    uppers
}
