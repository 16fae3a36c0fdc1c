//! The hosts directories dnsmasq reads: one small file per reservation
//! (`dhcp-hosts.d/MAC`, `MAC,IP[,NAME]`) and one per DNS name
//! (`dns-hosts.d/NAME`, `IP NAME.DOMAIN NAME`).
//!
//! Why a file each: dnsmasq watches both directories with inotify
//! (`dhcp-hostsdir`, `hostsdir`) and reads a *new* file by itself, without
//! a SIGHUP; a SIGHUP makes it re-read every reservation and name, which
//! costs O(guests) per connect. Its inotify only ever adds records, so a
//! changed or removed file still needs a SIGHUP: [`Change::needs_reload`]
//! says when. A guest that connects adds files; a guest that leaves
//! removes its name (exits are coalesced by the reconciler).
//!
//! Everything here is pure: the handle in `mod.rs` writes the files.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::api::{DnsLabel, Mac};

/// A DHCP reservation: `mac` always gets `ip` (and, with a name, registers
/// it in DNS through DHCP).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DhcpHost {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub name: Option<DnsLabel>,
}

/// A DNS name on the network: `name.DOMAIN` (and `name`) resolve to `ip`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsHost {
    pub ip: Ipv4Addr,
    pub name: DnsLabel,
}

/// The files of one hosts directory: file name → contents. Names are MACs
/// (`52:54:00:12:34:56`) or DNS labels, so never `.`-prefixed (dnsmasq
/// skips those, which is where our temp files go) nor containing `/`.
pub type Files = BTreeMap<String, String>;

/// `dhcp-hosts.d`: one file per MAC.
pub fn dhcp_files(hosts: &[DhcpHost]) -> Files {
    hosts
        .iter()
        .map(|h| {
            let line = match &h.name {
                Some(name) => format!("{},{},{name}\n", h.mac, h.ip),
                None => format!("{},{}\n", h.mac, h.ip),
            };
            (h.mac.to_string(), line)
        })
        .collect()
}

/// `dns-hosts.d`: one file per name (a name held by two addresses lists
/// both, sorted).
pub fn dns_files(domain: &str, hosts: &[DnsHost]) -> Files {
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in hosts {
        files.entry(h.name.to_string()).or_default().push(format!(
            "{} {n}.{domain} {n}\n",
            h.ip,
            n = h.name
        ));
    }
    files
        .into_iter()
        .map(|(name, mut lines)| {
            lines.sort();
            lines.dedup();
            (name, lines.concat())
        })
        .collect()
}

/// What turns one directory's files into another's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Files to write (new or changed), with their contents.
    pub write: Vec<(String, String)>,
    /// Files to remove.
    pub remove: Vec<String>,
    /// Whether dnsmasq must re-read everything (SIGHUP): a file changed or
    /// went away. New files alone it picks up by itself.
    pub needs_reload: bool,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.write.is_empty() && self.remove.is_empty()
    }
}

/// The change from `old` to `new`.
pub fn diff(old: &Files, new: &Files) -> Change {
    let mut change = Change::default();
    for (name, text) in new {
        match old.get(name) {
            Some(current) if current == text => {}
            Some(_) => {
                change.needs_reload = true;
                change.write.push((name.clone(), text.clone()));
            }
            None => change.write.push((name.clone(), text.clone())),
        }
    }
    for name in old.keys().filter(|name| !new.contains_key(*name)) {
        change.needs_reload = true;
        change.remove.push(name.clone());
    }
    change
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(mac: &str, ip: [u8; 4], name: Option<&str>) -> DhcpHost {
        DhcpHost {
            mac: mac.parse().unwrap(),
            ip: ip.into(),
            name: name.map(|n| n.parse().unwrap()),
        }
    }

    #[test]
    fn one_file_per_reservation_and_per_name() {
        let dhcp = dhcp_files(&[
            host("52:54:00:00:00:02", [10, 42, 0, 12], None),
            host("52:54:00:AA:00:01", [10, 42, 0, 11], Some("web")),
        ]);
        assert_eq!(
            dhcp.into_iter().collect::<Vec<_>>(),
            [
                (
                    "52:54:00:00:00:02".into(),
                    "52:54:00:00:00:02,10.42.0.12\n".into()
                ),
                (
                    "52:54:00:aa:00:01".into(),
                    "52:54:00:aa:00:01,10.42.0.11,web\n".into()
                ),
            ]
        );
        let dns = dns_files(
            "lab.qnet",
            &[
                DnsHost {
                    ip: [10, 42, 0, 12].into(),
                    name: "web".parse().unwrap(),
                },
                DnsHost {
                    ip: [10, 42, 0, 11].into(),
                    name: "web".parse().unwrap(),
                },
            ],
        );
        assert_eq!(
            dns["web"],
            "10.42.0.11 web.lab.qnet web\n10.42.0.12 web.lab.qnet web\n"
        );
    }

    #[test]
    fn only_changes_and_removals_need_a_reload() {
        let one = dhcp_files(&[host("52:54:00:00:00:01", [10, 42, 0, 11], None)]);
        let two = dhcp_files(&[
            host("52:54:00:00:00:01", [10, 42, 0, 11], None),
            host("52:54:00:00:00:02", [10, 42, 0, 12], None),
        ]);
        // A guest connects: one new file, no SIGHUP.
        let added = diff(&one, &two);
        assert_eq!(added.write.len(), 1);
        assert!(added.remove.is_empty() && !added.needs_reload);
        // Nothing changed: nothing to do.
        assert!(diff(&two, &two).is_empty());
        // A removal and a change both need one.
        let removed = diff(&two, &one);
        assert_eq!(removed.remove, ["52:54:00:00:00:02"]);
        assert!(removed.needs_reload);
        let moved = dhcp_files(&[host("52:54:00:00:00:01", [10, 42, 0, 99], None)]);
        let changed = diff(&one, &moved);
        assert_eq!(changed.write.len(), 1);
        assert!(changed.needs_reload);
    }
}
