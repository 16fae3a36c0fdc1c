//! Macvtap devices that qnet creates for a guest: how they are marked, and
//! how they are removed again without ever touching somebody else's device.
//!
//! Every macvtap qnet creates is named `qmvtapN` and carries an
//! `ifalias` [`Marker`] such as
//! `qnet-macvtap uid=1000 pid=4242 start=123456 pidns=4026531836 lower=eth0 lower-ifindex=2 mode=passthru mac=52:54:00:12:34:56 restore-mac=0c:c4:7a:01:02:03`:
//! which user it was made for and which QEMU it belongs to (pid and start
//! time: see [`crate::owner`]), on which lower device it sits and, in
//! passthru mode, which MAC the lower device had before the guest's was put
//! on it. The reaper that the helper leaves behind uses it to check that a
//! device is still its own before deleting it; a daemon can use it to
//! garbage-collect the devices of QEMUs that are gone (after a host crash,
//! or when a reaper was killed).

use std::fmt;
use std::str::FromStr;

use nix::errno::Errno;

use crate::link::{LinkError, LinkSocket, MacvtapMode};
use crate::owner::Owner;

/// First word of every marker.
pub const MARKER_TAG: &str = "qnet-macvtap";
/// Name prefix of the macvtaps qnet creates (`qmvtap0`, `qmvtap1`, ...).
pub const NAME_PREFIX: &str = "qmvtap";

/// What the `ifalias` of a qnet macvtap says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The user and the QEMU process the device was made for.
    pub owner: Owner,
    pub lower: String,
    pub lower_index: u32,
    pub mode: MacvtapMode,
    /// The guest MAC the device (bridge, vepa, private) or the lower device
    /// (passthru) was given; `None` for passthru without `--mac`.
    pub mac: Option<[u8; 6]>,
    /// Passthru only: the lower device's MAC before the guest's replaced
    /// it, to be put back when the guest is gone.
    pub restore_mac: Option<[u8; 6]>,
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{MARKER_TAG} {} lower={} lower-ifindex={} mode={}",
            self.owner, self.lower, self.lower_index, self.mode
        )?;
        if let Some(mac) = self.mac {
            write!(f, " mac={}", format_mac(mac))?;
        }
        if let Some(mac) = self.restore_mac {
            write!(f, " restore-mac={}", format_mac(mac))?;
        }
        Ok(())
    }
}

/// A string that is not a qnet macvtap marker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a qnet-macvtap marker: {0:?}")]
pub struct NotAMarker(pub String);

impl FromStr for Marker {
    type Err = NotAMarker;

    /// Parses what [`Marker`]'s `Display` writes. Keys may be added later,
    /// so unknown `key=value` words are ignored.
    fn from_str(text: &str) -> Result<Self, NotAMarker> {
        let bad = || NotAMarker(text.to_string());
        let mut words = text.split(' ');
        if words.next() != Some(MARKER_TAG) {
            return Err(bad());
        }
        let (mut lower, mut lower_index, mut mode) = (None, None, None);
        let (mut mac, mut restore_mac) = (None, None);
        let pairs: Vec<(&str, &str)> = words
            .map(|word| word.split_once('=').ok_or_else(bad))
            .collect::<Result<_, _>>()?;
        let owner = Owner::from_words(pairs.iter().copied()).ok_or_else(bad)?;
        for (key, value) in pairs {
            match key {
                "lower" => lower = Some(value.to_string()),
                "lower-ifindex" => lower_index = Some(value.parse().map_err(|_| bad())?),
                "mode" => mode = Some(parse_mode(value).ok_or_else(bad)?),
                "mac" => mac = Some(parse_mac(value).ok_or_else(bad)?),
                "restore-mac" => restore_mac = Some(parse_mac(value).ok_or_else(bad)?),
                _ => {}
            }
        }
        Ok(Marker {
            owner,
            lower: lower.ok_or_else(bad)?,
            lower_index: lower_index.ok_or_else(bad)?,
            mode: mode.ok_or_else(bad)?,
            mac,
            restore_mac,
        })
    }
}

fn parse_mode(text: &str) -> Option<MacvtapMode> {
    [
        MacvtapMode::Bridge,
        MacvtapMode::Vepa,
        MacvtapMode::Private,
        MacvtapMode::Passthru,
    ]
    .into_iter()
    .find(|mode| mode.as_str() == text)
}

/// `aa:bb:cc:dd:ee:ff`, lower case (as `ip link` prints MACs).
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, g] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2)?;
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A macvtap qnet created: enough to find it again and to check that a
/// device found under its ifindex is still the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedMacvtap {
    pub index: u32,
    pub name: String,
    pub marker: Marker,
}

/// What [`remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The device was ours and is deleted.
    Deleted,
    /// No device has that ifindex any more (deleted by someone else, or its
    /// namespace is gone).
    AlreadyGone,
    /// A device with that ifindex exists but its name, kind or marker
    /// differ: it is not ours and was left alone.
    NotOurs,
}

/// What happened to the lower device's MAC in passthru mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacRestore {
    /// Nothing to restore (not passthru, or no guest MAC was set).
    NotNeeded,
    Restored,
    /// The lower device no longer carries the guest's MAC (someone changed
    /// it since): left as it is.
    ChangedSince,
    /// The lower device is gone or renamed.
    LowerGone,
}

/// Deletes `device` if the link with its ifindex still has its name, is a
/// macvtap and carries its marker; then, for passthru, puts the lower
/// device's original MAC back if the lower device (same ifindex and name)
/// still carries the guest's MAC.
///
/// Safe to call more than once and from two processes at the same time:
/// whoever comes second finds the device gone and the MAC already back.
pub fn remove(
    netlink: &mut LinkSocket,
    device: &OwnedMacvtap,
) -> Result<(Removal, MacRestore), LinkError> {
    let alias = device.marker.to_string();
    let removal = remove_marked(netlink, device.index, &device.name, "macvtap", &alias)?;
    let restore = restore_lower_mac(netlink, &device.marker)?;
    Ok((removal, restore))
}

/// Deletes the link with ifindex `index` if it still has name `name`, kind
/// `kind` and alias `alias` (a qnet marker): a device that was deleted and
/// replaced meanwhile is left alone. Used for qnet's macvtaps and TAPs.
pub fn remove_marked(
    netlink: &mut LinkSocket,
    index: u32,
    name: &str,
    kind: &str,
    alias: &str,
) -> Result<Removal, LinkError> {
    match netlink.link_by_index(index)? {
        None => Ok(Removal::AlreadyGone),
        Some(link)
            if link.name == name
                && link.kind.as_deref() == Some(kind)
                && link.alias.as_deref() == Some(alias) =>
        {
            match netlink.delete(index) {
                Ok(()) => Ok(Removal::Deleted),
                Err(e) if e.errno() == Some(Errno::ENODEV) => Ok(Removal::AlreadyGone),
                Err(e) => Err(e),
            }
        }
        Some(_) => Ok(Removal::NotOurs),
    }
}

/// The passthru half of [`remove`].
pub fn restore_lower_mac(
    netlink: &mut LinkSocket,
    marker: &Marker,
) -> Result<MacRestore, LinkError> {
    let (Some(original), Some(guest)) = (marker.restore_mac, marker.mac) else {
        return Ok(MacRestore::NotNeeded);
    };
    if marker.mode != MacvtapMode::Passthru || original == guest {
        return Ok(MacRestore::NotNeeded);
    }
    match netlink.link_by_index(marker.lower_index)? {
        Some(lower) if lower.name == marker.lower => {
            if lower.mac == Some(original) {
                Ok(MacRestore::Restored)
            } else if lower.mac == Some(guest) {
                netlink.set_mac(lower.index, original)?;
                Ok(MacRestore::Restored)
            } else {
                Ok(MacRestore::ChangedSince)
            }
        }
        _ => Ok(MacRestore::LowerGone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passthru() -> Marker {
        Marker {
            owner: Owner {
                uid: 1000,
                pid: 4242,
                start_time: 123456,
                pidns: 4026531836,
            },
            lower: "eth0".into(),
            lower_index: 2,
            mode: MacvtapMode::Passthru,
            mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            restore_mac: Some([0x0c, 0xc4, 0x7a, 1, 2, 0xab]),
        }
    }

    #[test]
    fn marker_round_trips() {
        let marker = passthru();
        let text = marker.to_string();
        assert_eq!(
            text,
            "qnet-macvtap uid=1000 pid=4242 start=123456 pidns=4026531836 lower=eth0 \
             lower-ifindex=2 mode=passthru \
             mac=52:54:00:12:34:56 restore-mac=0c:c4:7a:01:02:ab"
        );
        assert!(text.len() < 256, "IFALIASZ is 256");
        assert_eq!(text.parse::<Marker>().unwrap(), marker);

        let bridge = Marker {
            mode: MacvtapMode::Bridge,
            restore_mac: None,
            ..passthru()
        };
        assert_eq!(bridge.to_string().parse::<Marker>().unwrap(), bridge);
    }

    #[test]
    fn unknown_keys_are_ignored_and_junk_is_refused() {
        let text = format!("{} future=1", passthru());
        assert_eq!(text.parse::<Marker>().unwrap(), passthru());
        for junk in [
            "",
            "libvirt-managed",
            "qnet-macvtap",
            "qnet-macvtap uid=1 pid=x start=1 pidns=1 lower=eth0 lower-ifindex=2 mode=bridge",
            "qnet-macvtap uid=1 pid=1 start=1 pidns=1 lower=eth0 lower-ifindex=2 mode=fancy",
            "qnet-macvtap uid=1 pid=1 start=1 pidns=1 lower-ifindex=2 mode=bridge",
            "qnet-macvtap uid=1 pid=1 start=1 pidns=1 lower=eth0 lower-ifindex=2 mode=bridge mac=zz",
            "qnet-macvtapx uid=1 pid=1 start=1 pidns=1 lower=eth0 lower-ifindex=2 mode=bridge",
            // The format before owners were recorded: not ours any more.
            "qnet-macvtap pid=1 lower=eth0 lower-ifindex=2 mode=bridge",
        ] {
            assert!(junk.parse::<Marker>().is_err(), "{junk:?}");
        }
    }

    #[test]
    fn macs_are_lower_case() {
        assert_eq!(format_mac([0xAB, 0xCD, 0xEF, 0, 1, 2]), "ab:cd:ef:00:01:02");
        assert_eq!(
            parse_mac("AB:cd:EF:00:01:02"),
            Some([0xab, 0xcd, 0xef, 0, 1, 2])
        );
        for bad in ["", "ab:cd:ef:00:01", "ab:cd:ef:00:01:02:03", "a:b:c:d:e:f"] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
