//! The only module that changes links: create the macvtap, open its
//! queue, leave a reaper behind, and undo everything if anything fails.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use qnet_hostnet::devnode::{self, NodeSource};
use qnet_hostnet::link::{Link, LinkError, LinkSocket, MacvtapMode};
use qnet_hostnet::macvtap::{self, format_mac, Marker, OwnedMacvtap, NAME_PREFIX};
use qnet_hostnet::reaper::{self, Control, Detached, Verdict};
use qnet_hostnet::tap::{tap_info, Tap};

use crate::error::HelperError;

/// How many `qmvtapN` names are tried before giving up.
const MAX_NAMES: u32 = 4096;

/// What the caller asked for, already validated and allowed by the ACL.
#[derive(Debug)]
pub struct Request<'a> {
    pub lower: &'a str,
    pub mode: MacvtapMode,
    /// The guest MAC; `None` only in passthru mode.
    pub mac: Option<[u8; 6]>,
    pub qemu_pid: u32,
    /// The ACL file, for error messages.
    pub conf: &'a Path,
}

/// A macvtap this helper created. Until [`Macvtap::disarm`] is called,
/// dropping it deletes the device and puts a passthru lower device's MAC
/// back: whatever fails after creation leaves nothing behind.
pub struct Macvtap {
    netlink: LinkSocket,
    device: OwnedMacvtap,
    /// The marker is on the device (so [`macvtap::remove`] recognises it).
    marked: bool,
    armed: bool,
}

impl Macvtap {
    /// Creates `qmvtapN` on the lower device with the guest MAC and the
    /// lower device's MTU, marks it, puts the guest MAC on the lower device
    /// in passthru mode, and brings it up.
    pub fn create(request: &Request<'_>) -> Result<Macvtap, HelperError> {
        let mut netlink = LinkSocket::new().map_err(HelperError::Netlink)?;
        let lower = netlink
            .link_by_name(request.lower)
            .map_err(HelperError::Netlink)?
            .ok_or_else(|| HelperError::NoSuchLower {
                lower: request.lower.to_string(),
                conf: request.conf.to_path_buf(),
            })?;
        let lower_mac = check_lower(&lower)?;
        let passthru = request.mode == MacvtapMode::Passthru;
        let marker = Marker {
            qemu_pid: request.qemu_pid,
            lower: lower.name.clone(),
            lower_index: lower.index,
            mode: request.mode,
            mac: request.mac,
            restore_mac: request
                .mac
                .filter(|&mac| passthru && mac != lower_mac)
                .map(|_| lower_mac),
        };

        // In passthru mode the kernel ignores this MAC and copies the lower
        // device's (which then follows the lower device's changes).
        let name = create_unique(
            &mut netlink,
            &lower,
            request,
            request.mac.unwrap_or(lower_mac),
        )?;
        let link = netlink
            .link_by_name(&name)
            .map_err(HelperError::Netlink)?
            .filter(|link| link.kind.as_deref() == Some("macvtap"))
            .ok_or_else(|| HelperError::Vanished { name: name.clone() })?;
        let mut created = Macvtap {
            netlink,
            device: OwnedMacvtap {
                index: link.index,
                name,
                marker,
            },
            marked: false,
            armed: true,
        };
        created.configure()?;
        tracing::debug!(
            name = created.device.name,
            index = created.device.index,
            alias = %created.device.marker,
            "macvtap ready"
        );
        Ok(created)
    }

    fn configure(&mut self) -> Result<(), HelperError> {
        let index = self.device.index;
        let name = self.device.name.clone();
        let configure_err = |source| HelperError::Configure {
            name: name.clone(),
            source,
        };
        // The marker goes on first: from then on a daemon can recognise the
        // device (and the lower device's original MAC) even if this process
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

    pub fn name(&self) -> &str {
        &self.device.name
    }

    /// Opens the macvtap's character device (safely: see
    /// [`devnode`]) as a queue with `IFF_VNET_HDR` if asked for, and checks
    /// that the queue is this device's.
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

    /// Starts the reaper, which from now on watches QEMU (`qemu` is its
    /// pidfd). Until [`Detached::commit`], the reaper removes the device
    /// as soon as this process exits; after it, once QEMU has exited.
    pub fn start_reaper(&self, qemu: OwnedFd) -> Result<Detached, HelperError> {
        let device = self.device.clone();
        let keep = [qemu.as_raw_fd()];
        reaper::spawn_detached(c"qmvtap-reaper", &keep, move |control| {
            reap(control, &qemu, &device)
        })
        .map_err(|source| HelperError::Reaper {
            name: self.device.name.clone(),
            source,
        })
    }

    /// The device now belongs to QEMU and its reaper: do not remove it.
    pub fn disarm(mut self) {
        self.armed = false;
    }

    /// Deletes the device (if it is still ours) and restores a passthru
    /// MAC; called on every failure path.
    fn undo(&mut self) -> Result<(), LinkError> {
        if self.marked {
            let (removal, restore) = macvtap::remove(&mut self.netlink, &self.device)?;
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

impl Drop for Macvtap {
    fn drop(&mut self) {
        if self.armed {
            if let Err(err) = self.undo() {
                eprintln!(
                    "{}: also failed to remove macvtap `{}`: {err}",
                    crate::PROGRAM,
                    self.device.name
                );
            }
        }
    }
}

/// The reaper's whole life (in the detached grandchild).
fn reap(control: Control, qemu: &OwnedFd, device: &OwnedMacvtap) {
    // Its own socket: the helper may still be using its own one while it
    // undoes a failure, and two processes must not share one.
    let Ok(mut netlink) = LinkSocket::new() else {
        return; // no `ready`: the helper fails and removes the device
    };
    if !control.ready() {
        return;
    }
    let verdict = control.verdict();
    drop(control);
    if verdict == Verdict::Committed {
        // An error here (there is none for a valid pidfd) must not leave
        // the device behind forever: fall through and clean up.
        let _ = reaper::wait_for_exit(qemu.as_fd());
    }
    for _ in 0..5 {
        if macvtap::remove(&mut netlink, device).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
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

/// Creates a macvtap under the first free `qmvtapN` name. `NLM_F_EXCL`
/// makes the kernel refuse a name that exists, so an existing device is
/// never reused or modified.
fn create_unique(
    netlink: &mut LinkSocket,
    lower: &Link,
    request: &Request<'_>,
    mac: [u8; 6],
) -> Result<String, HelperError> {
    for n in 0..MAX_NAMES {
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
    request: &Request<'_>,
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
                "{kind} {} (the guest of QEMU pid {})",
                self.link.name, marker.qemu_pid
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
