//! TAP devices through `/dev/net/tun`, and macvtap character devices.
//!
//! A [`Tap`] is one open file descriptor on a tun/tap queue plus the name
//! the kernel gave the device. The helpers create it, configure the link
//! over netlink and hand the descriptor to QEMU; they never persist it, so
//! until the descriptor is sent the device disappears as soon as the fd is
//! closed. That is what makes every failure path leak-free: dropping the
//! `Tap` is the cleanup.
//!
//! The holder of the fd can persist the device (`TUNSETPERSIST` needs no
//! capability on an attached fd). So the bridge helper also makes the
//! caller the device's owner ([`Tap::restrict_to`]: nobody else can attach
//! to a persisted TAP), marks it ([`TapMarker`]) and leaves a reaper that
//! deletes it when QEMU exits; a daemon deletes marked TAPs whose QEMU is
//! gone.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use thiserror::Error;

use crate::owner::Owner;

const TUN_CLONE_DEVICE: &str = "/dev/net/tun";

#[derive(Debug, Error)]
pub enum TapError {
    #[error("cannot open {path}: {source}{hint}")]
    Open {
        path: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{op} on {path} failed: {source}{hint}")]
    Ioctl {
        op: &'static str,
        path: String,
        source: std::io::Error,
        hint: &'static str,
    },
}

/// An open TAP queue. Dropping it closes the fd (and so removes a
/// non-persistent TAP device).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
}

impl Tap {
    /// Creates a brand-new TAP device with a kernel-chosen `tapN` name.
    ///
    /// `IFF_TUN_EXCL` plus an empty name guarantee that the device did not
    /// exist before this call, so a caller can never obtain a queue of
    /// somebody else's TAP through us. `IFF_VNET_HDR` is requested only when
    /// asked for and supported by the kernel, as qemu-bridge-helper does.
    pub fn create_new(want_vnet_hdr: bool) -> Result<Tap, TapError> {
        let file = open_rw(Path::new(TUN_CLONE_DEVICE), TUN_CLONE_DEVICE)?;
        let features = tun_features(&file)?;
        let vnet_hdr = want_vnet_hdr && features & (libc::IFF_VNET_HDR as u32) != 0;

        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        let mut ifr = ifreq_with_flags(flags);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `ifr` is.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            return Err(TapError::Ioctl {
                op: "TUNSETIFF",
                path: TUN_CLONE_DEVICE.into(),
                hint: open_hint(&source),
                source,
            });
        }
        Ok(Tap {
            file,
            name: ifreq_name(&ifr),
            vnet_hdr,
        })
    }

    /// Opens the character device of an existing macvtap link
    /// (`/dev/tapN`, N = ifindex) and sets `IFF_VNET_HDR` when asked for.
    pub fn open_macvtap(node: &Path, name: &str, want_vnet_hdr: bool) -> Result<Tap, TapError> {
        let path = node.display().to_string();
        let file = open_rw(node, &path)?;
        Self::from_macvtap_file(file, &path, name, want_vnet_hdr)
    }

    /// Like [`Tap::open_macvtap`], for a macvtap character device the
    /// caller has already opened (and checked); `path` is only for error
    /// messages.
    pub fn from_macvtap_file(
        file: File,
        path: &str,
        name: &str,
        want_vnet_hdr: bool,
    ) -> Result<Tap, TapError> {
        let path = path.to_string();
        let ioctl_err = |op, source: std::io::Error| TapError::Ioctl {
            op,
            path: path.clone(),
            hint: "",
            source,
        };
        let mut ifr = ifreq_with_flags(0);
        // SAFETY: TUNGETIFF fills a `struct ifreq`.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut ifr) } < 0 {
            return Err(ioctl_err("TUNGETIFF", std::io::Error::last_os_error()));
        }
        let features = tun_features(&file)?;
        let vnet_hdr = want_vnet_hdr && features & (libc::IFF_VNET_HDR as u32) != 0;
        // SAFETY: the kernel filled the flags member of the union.
        let mut flags = unsafe { ifr.ifr_ifru.ifru_flags } as libc::c_int;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        } else {
            flags &= !libc::IFF_VNET_HDR;
        }
        let mut set = ifreq_with_flags(flags);
        // SAFETY: TUNSETIFF on a macvtap fd only updates the queue flags.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut set) } < 0 {
            return Err(ioctl_err("TUNSETIFF", std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
            vnet_hdr,
        })
    }

    /// `TUNSETOWNER`/`TUNSETGROUP` to this process' real uid and gid (the
    /// caller's): once persisted, only a process of that user in that
    /// group (or with CAP_NET_ADMIN) may attach to the device, so a TAP
    /// the caller persists is of no use to anyone else.
    pub fn restrict_to_caller(&self) -> Result<(), TapError> {
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        for (op, request, id) in [
            ("TUNSETOWNER", libc::TUNSETOWNER, uid),
            ("TUNSETGROUP", libc::TUNSETGROUP, gid),
        ] {
            // SAFETY: both ioctls take the id as an integer argument.
            let rc =
                unsafe { libc::ioctl(self.file.as_raw_fd(), request, libc::c_ulong::from(id)) };
            if rc < 0 {
                return Err(TapError::Ioctl {
                    op,
                    path: TUN_CLONE_DEVICE.into(),
                    source: std::io::Error::last_os_error(),
                    hint: "",
                });
            }
        }
        Ok(())
    }

    /// The interface name the kernel gave the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the queue carries a virtio-net header.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// First word of the `ifalias` of every TAP the bridge helper creates.
pub const TAP_MARKER_TAG: &str = "qnet-tap";

/// The `ifalias` of a TAP the bridge helper made:
/// `qnet-tap uid=1000 pid=4242 start=123456 pidns=4026531836`, naming the
/// user it was made for and the QEMU process it lives as long as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapMarker {
    pub owner: Owner,
}

impl std::fmt::Display for TapMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{TAP_MARKER_TAG} {}", self.owner)
    }
}

impl std::str::FromStr for TapMarker {
    type Err = ();

    /// Parses what `Display` writes; unknown `key=value` words are ignored.
    fn from_str(text: &str) -> Result<Self, ()> {
        let mut words = text.split(' ');
        if words.next() != Some(TAP_MARKER_TAG) {
            return Err(());
        }
        let pairs = words.map(|w| w.split_once('=').ok_or(()));
        let pairs: Result<Vec<_>, ()> = pairs.collect();
        Owner::from_words(pairs?)
            .map(|owner| TapMarker { owner })
            .ok_or(())
    }
}

/// What an open tun/tap fd is: its interface name and `IFF_*` flags.
/// Used by tests and by the daemon to identify fds handed to QEMU.
pub fn tap_info(fd: BorrowedFd<'_>) -> std::io::Result<(String, i32)> {
    let mut ifr = ifreq_with_flags(0);
    // SAFETY: TUNGETIFF fills a `struct ifreq`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags } as i32;
    Ok((ifreq_name(&ifr), flags))
}

fn tun_features(file: &File) -> Result<u32, TapError> {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETFEATURES, &mut features) } < 0 {
        return Err(TapError::Ioctl {
            op: "TUNGETFEATURES",
            path: TUN_CLONE_DEVICE.into(),
            hint: "",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(features)
}

fn ifreq_with_flags(flags: libc::c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid (empty-name) value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    // The kernel always NUL-terminates ifr_name; fall back to lossy on the
    // off chance it did not.
    let bytes: Vec<u8> = ifr.ifr_name.iter().map(|&c| c as u8).collect();
    match CStr::from_bytes_until_nul(&bytes) {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Opens a tun/tap character device for reading and writing; `path` names
/// it in the error.
fn open_rw(node: &Path, path: &str) -> Result<std::fs::File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(node)
        .map_err(|source| TapError::Open {
            path: path.into(),
            hint: open_hint(&source),
            source,
        })
}

fn open_hint(err: &std::io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EACCES) => {
            " (the device node must be usable by the calling user: distributions make /dev/net/tun mode 0666)"
        }
        Some(libc::EPERM) => {
            " (needs CAP_NET_ADMIN: install the helper setuid root or with `setcap cap_net_admin+ep`)"
        }
        Some(libc::ENOENT) | Some(libc::ENODEV) => {
            " (is the tun module loaded? try `modprobe tun`)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_marker_round_trips_and_junk_is_refused() {
        let marker = TapMarker {
            owner: Owner {
                uid: 1000,
                pid: 4242,
                start_time: 123456,
                pidns: 4026531836,
            },
        };
        let text = marker.to_string();
        assert_eq!(
            text,
            "qnet-tap uid=1000 pid=4242 start=123456 pidns=4026531836"
        );
        assert_eq!(text.parse::<TapMarker>(), Ok(marker));
        for junk in [
            "",
            "qnet-tap",
            "qnet-tap uid=1 pid=2",
            "qnet-tapx uid=1 pid=2 start=3 pidns=4",
            "qnet-tap uid pid=2",
        ] {
            assert!(junk.parse::<TapMarker>().is_err(), "{junk:?}");
        }
    }
}
