//! The hosts directories dnsmasq reads: one small file per reservation
//! (`dhcp-hosts.d/MAC`, `MAC,IP[,NAME]`) and one per DNS name
//! (`dns-hosts.d/NAME`, `IP NAME.DOMAIN NAME`).
//!
//! Why a file each: dnsmasq watches both directories with inotify
//! (`dhcp-hostsdir`, `hostsdir`) and reads a *new* file by itself, without
//! a SIGHUP; a SIGHUP makes it re-read every reservation and name, which
//! costs O(guests) per connect. A changed or removed reservation file
//! still needs a SIGHUP, and so does a changed or removed name file before
//! dnsmasq 2.89 (see `version`): [`needs_sighup`] says when. A guest that
//! connects adds files; a guest that leaves removes its name (exits are
//! coalesced by the reconciler), which dnsmasq 2.89 and later follow by
//! themselves.
//!
//! What the directories hold is kept typed ([`Hosts`]), as the files say
//! it: a flush compares values and renders only the files that differ, so
//! its cost is a comparison per host, not a formatted line per host.
//! Files are read back into the same types ([`parse_dhcp`], [`parse_dns`])
//! when a daemon starts over a previous one's directories.
//!
//! Everything here is pure: the handle in `mod.rs` writes the files.

use std::collections::{BTreeMap, BTreeSet};
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

/// What one network's two hosts directories hold: a file per MAC in
/// `dhcp-hosts.d` (its address and name) and a file per name in
/// `dns-hosts.d` (its addresses: a name held by two guests lists both).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Hosts {
    pub dhcp: BTreeMap<Mac, (Ipv4Addr, Option<DnsLabel>)>,
    pub dns: BTreeMap<DnsLabel, BTreeSet<Ipv4Addr>>,
}

impl Hosts {
    pub fn new(dhcp: Vec<DhcpHost>, dns: Vec<DnsHost>) -> Hosts {
        let mut hosts = Hosts {
            dhcp: dhcp.into_iter().map(|h| (h.mac, (h.ip, h.name))).collect(),
            dns: BTreeMap::new(),
        };
        for h in dns {
            hosts.dns.entry(h.name).or_default().insert(h.ip);
        }
        hosts
    }
}

/// The file of one reservation: its name and contents.
pub fn dhcp_file(mac: Mac, (ip, name): &(Ipv4Addr, Option<DnsLabel>)) -> (String, String) {
    let line = match name {
        Some(name) => format!("{mac},{ip},{name}\n"),
        None => format!("{mac},{ip}\n"),
    };
    (mac.to_string(), line)
}

/// The file of one name: its name and contents, a line per address.
pub fn dns_file(domain: &str, name: &DnsLabel, ips: &BTreeSet<Ipv4Addr>) -> (String, String) {
    let lines = ips
        .iter()
        .map(|ip| format!("{ip} {name}.{domain} {name}\n"))
        .collect();
    (name.to_string(), lines)
}

/// Reads back a file [`dhcp_file`] wrote; `None` for anything else.
pub fn parse_dhcp(file_name: &str, text: &str) -> Option<(Mac, (Ipv4Addr, Option<DnsLabel>))> {
    let mut fields = text.strip_suffix('\n')?.split(',');
    let mac: Mac = fields.next()?.parse().ok()?;
    let ip = fields.next()?.parse().ok()?;
    let name = fields.next().map(str::parse::<DnsLabel>).transpose().ok()?;
    let entry = (mac, (ip, name));
    (fields.next().is_none() && dhcp_file(mac, &entry.1) == (file_name.into(), text.into()))
        .then_some(entry)
}

/// Reads back a file [`dns_file`] wrote for `domain`; `None` for anything
/// else.
pub fn parse_dns(
    domain: &str,
    file_name: &str,
    text: &str,
) -> Option<(DnsLabel, BTreeSet<Ipv4Addr>)> {
    let name: DnsLabel = file_name.parse().ok()?;
    let ips = text
        .lines()
        .map(|line| line.split(' ').next()?.parse().ok())
        .collect::<Option<BTreeSet<Ipv4Addr>>>()?;
    (!ips.is_empty() && dns_file(domain, &name, &ips).1 == text).then_some((name, ips))
}

/// One MAC's hosts as the state has them now: its reservation's address
/// and name, if it has one, and whether that name is in DNS (the
/// reservation is explicit, or a guest with the MAC runs on the network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostUpdate {
    pub mac: Mac,
    pub reservation: Option<(Ipv4Addr, Option<DnsLabel>)>,
    pub in_dns: bool,
}

/// Brings `hosts` to the state after a change of the MACs of `updates`
/// alone, and returns the changes of files, as [`diff`] would for the
/// whole state: only the files of those MACs and of their old and new
/// names are looked at.
///
/// A name's addresses are those of its MACs that are in DNS; addresses
/// are unique on a network, so a MAC's old address leaves its old name's
/// file before any new address joins one (within one call, an address may
/// move from one MAC to another).
pub fn update(domain: &str, hosts: &mut Hosts, updates: &[HostUpdate]) -> [Change; 2] {
    let mut dhcp = Change::default();
    // Each name touched, with its addresses before the call.
    let mut names: BTreeMap<DnsLabel, Option<BTreeSet<Ipv4Addr>>> = BTreeMap::new();
    for u in updates {
        if let Some((ip, Some(name))) = hosts.dhcp.get(&u.mac) {
            let before = hosts.dns.get(name).cloned();
            names.entry(name.clone()).or_insert(before);
            if let Some(ips) = hosts.dns.get_mut(name) {
                ips.remove(ip);
                if ips.is_empty() {
                    hosts.dns.remove(name);
                }
            }
        }
    }
    for u in updates {
        let old = hosts.dhcp.get(&u.mac);
        dhcp.add(&u.mac, old, u.reservation.as_ref(), |mac, e| {
            dhcp_file(*mac, e)
        });
        match &u.reservation {
            Some(entry) => hosts.dhcp.insert(u.mac, entry.clone()),
            None => hosts.dhcp.remove(&u.mac),
        };
        if let Some((ip, Some(name))) = u.reservation.as_ref().filter(|_| u.in_dns) {
            let before = hosts.dns.get(name).cloned();
            names.entry(name.clone()).or_insert(before);
            hosts.dns.entry(name.clone()).or_default().insert(*ip);
        }
    }
    let mut dns = Change::default();
    for (name, before) in names {
        dns.add(&name, before.as_ref(), hosts.dns.get(&name), |name, ips| {
            dns_file(domain, name, ips)
        });
    }
    [dhcp, dns]
}

/// What turns one directory's files into another's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Files to write (new or changed), with their contents.
    pub write: Vec<(String, String)>,
    /// Files to remove.
    pub remove: Vec<String>,
    /// Whether a file changed or went away, which dnsmasq may not notice
    /// by itself (see [`needs_sighup`]). New files it always picks up.
    pub needs_reload: bool,
}

/// Whether dnsmasq must re-read everything (SIGHUP) to see `changes`
/// (`dhcp-hosts.d`'s, then `dns-hosts.d`'s, as [`diff`] gives them): a
/// reservation that changed or went, or a name that did when dnsmasq does
/// not follow `dns-hosts.d`'s files by itself (`names_follow_files`).
pub fn needs_sighup([dhcp, dns]: &[Change; 2], names_follow_files: bool) -> bool {
    dhcp.needs_reload || (dns.needs_reload && !names_follow_files)
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.write.is_empty() && self.remove.is_empty()
    }

    /// Adds what turns the file of `key` from `before` into `after` (a
    /// missing file is `None`); `render` gives a file's name and contents.
    fn add<K, V: PartialEq>(
        &mut self,
        key: &K,
        before: Option<&V>,
        after: Option<&V>,
        render: impl Fn(&K, &V) -> (String, String),
    ) {
        match (before, after) {
            (before, after) if before == after => {}
            (before, Some(value)) => {
                self.needs_reload |= before.is_some();
                self.write.push(render(key, value));
            }
            (Some(value), None) => {
                self.needs_reload = true;
                self.remove.push(render(key, value).0);
            }
            (None, None) => {}
        }
    }
}

/// The changes from `old` to `new`: `dhcp-hosts.d`'s, then `dns-hosts.d`'s.
pub fn diff(domain: &str, old: &Hosts, new: &Hosts) -> [Change; 2] {
    [
        diff_maps(&old.dhcp, &new.dhcp, |mac, entry| dhcp_file(*mac, entry)),
        diff_maps(&old.dns, &new.dns, |name, ips| dns_file(domain, name, ips)),
    ]
}

/// The change from `old` to `new`, one file per key (`render` gives its
/// name and contents); only the files that differ are rendered.
fn diff_maps<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    render: impl Fn(&K, &V) -> (String, String),
) -> Change {
    let mut change = Change::default();
    for (key, value) in new {
        change.add(key, old.get(key), Some(value), &render);
    }
    for (key, value) in old.iter().filter(|(key, _)| !new.contains_key(*key)) {
        change.add(key, Some(value), None, &render);
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

    fn dns(ip: [u8; 4], name: &str) -> DnsHost {
        DnsHost {
            ip: ip.into(),
            name: name.parse().unwrap(),
        }
    }

    fn files(hosts: &Hosts) -> [Vec<(String, String)>; 2] {
        diff("lab.qnet", &Hosts::default(), hosts).map(|c| c.write)
    }

    /// Two reservations, one named, and the name held by both addresses.
    fn two_hosts_one_name() -> Hosts {
        Hosts::new(
            vec![
                host("52:54:00:00:00:02", [10, 42, 0, 12], None),
                host("52:54:00:AA:00:01", [10, 42, 0, 11], Some("web")),
            ],
            vec![dns([10, 42, 0, 12], "web"), dns([10, 42, 0, 11], "web")],
        )
    }

    #[test]
    fn one_file_per_reservation_and_per_name() {
        let [dhcp, dns] = files(&two_hosts_one_name());
        assert_eq!(
            dhcp,
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
        assert_eq!(
            dns,
            [(
                "web".into(),
                "10.42.0.11 web.lab.qnet web\n10.42.0.12 web.lab.qnet web\n".into()
            )]
        );
    }

    #[test]
    fn only_changes_and_removals_need_a_reload() {
        let one = Hosts::new(
            vec![host("52:54:00:00:00:01", [10, 42, 0, 11], None)],
            vec![],
        );
        let two = Hosts::new(
            vec![
                host("52:54:00:00:00:01", [10, 42, 0, 11], None),
                host("52:54:00:00:00:02", [10, 42, 0, 12], None),
            ],
            vec![],
        );
        // A guest connects: one new file, no SIGHUP.
        let [added, _] = diff("q", &one, &two);
        assert_eq!(added.write.len(), 1);
        assert!(added.remove.is_empty() && !added.needs_reload);
        // Nothing changed: nothing to do.
        assert!(diff("q", &two, &two).iter().all(Change::is_empty));
        // A removal and a change both need one.
        let [removed, _] = diff("q", &two, &one);
        assert_eq!(removed.remove, ["52:54:00:00:00:02"]);
        assert!(removed.needs_reload);
        let moved = Hosts::new(
            vec![host("52:54:00:00:00:01", [10, 42, 0, 99], None)],
            vec![],
        );
        let [changed, _] = diff("q", &one, &moved);
        assert_eq!(changed.write.len(), 1);
        assert!(changed.needs_reload);
    }

    #[test]
    fn a_name_that_goes_needs_a_sighup_only_before_dnsmasq_2_89() {
        // (what happens, from, to, SIGHUP before 2.89, SIGHUP since)
        let cases = [
            (
                "a guest connects",
                lab(&[(1, 11, "a")], &["a"]),
                lab(&[(1, 11, "a"), (2, 12, "b")], &["a", "b"]),
                false,
                false,
            ),
            (
                "a guest leaves, its reservation stays",
                lab(&[(1, 11, "a")], &["a"]),
                lab(&[(1, 11, "a")], &[]),
                true,
                false,
            ),
            (
                "a reservation is removed",
                lab(&[(1, 11, "a")], &[]),
                lab(&[], &[]),
                true,
                true,
            ),
            (
                "a reservation moves",
                lab(&[(1, 11, "a")], &["a"]),
                lab(&[(1, 99, "a")], &["a"]),
                true,
                true,
            ),
            (
                "nothing changes",
                lab(&[(1, 11, "a")], &["a"]),
                lab(&[(1, 11, "a")], &["a"]),
                false,
                false,
            ),
        ];
        for (what, from, to, before, since) in cases {
            let changes = diff("q", &from, &to);
            assert_eq!(needs_sighup(&changes, false), before, "{what}, before 2.89");
            assert_eq!(needs_sighup(&changes, true), since, "{what}, since 2.89");
        }
    }

    /// Hosts on 10.0.0.0/24 in one line: `(last byte of the MAC, of the
    /// address, name)` each, and the names in DNS.
    fn lab(hosts: &[(u8, u8, &str)], in_dns: &[&str]) -> Hosts {
        let dhcp = hosts.iter().map(|(m, ip, name)| DhcpHost {
            mac: Mac::from_octets([0x52, 0x54, 0, 0, 0, *m]),
            ip: [10, 0, 0, *ip].into(),
            name: Some(name.parse().unwrap()),
        });
        let dns = hosts
            .iter()
            .filter(|(m, _, name)| in_dns.contains(name) || in_dns.contains(&&*m.to_string()))
            .map(|(_, ip, name)| dns([10, 0, 0, *ip], name));
        Hosts::new(dhcp.collect(), dns.collect())
    }

    #[test]
    fn updating_some_macs_is_the_diff_of_the_whole() {
        let old = lab(
            &[(1, 2, "web"), (2, 3, "web"), (3, 4, "db")],
            &["web", "db"],
        );
        // (what happens, the hosts after, the MACs that changed)
        let cases: [(&str, Hosts, &[u8]); 3] = [
            (
                "1 connects again, 2's guest leaves (its name goes, its reservation stays), 3 is renamed",
                lab(&[(1, 2, "web"), (2, 3, "web"), (3, 4, "api")], &["1", "api"]),
                &[1, 2, 3],
            ),
            (
                "an address moves from one MAC to another, and a MAC goes",
                lab(&[(1, 2, "web"), (3, 3, "web")], &["web"]),
                &[2, 3],
            ),
            ("nothing changed", old.clone(), &[1]),
        ];
        for (what, new, macs) in cases {
            let updates: Vec<HostUpdate> = macs
                .iter()
                .map(|m| {
                    let mac = Mac::from_octets([0x52, 0x54, 0, 0, 0, *m]);
                    let reservation = new.dhcp.get(&mac).cloned();
                    let in_dns = reservation
                        .as_ref()
                        .is_some_and(|(ip, _)| new.dns.values().any(|ips| ips.contains(ip)));
                    HostUpdate {
                        mac,
                        reservation,
                        in_dns,
                    }
                })
                .collect();
            let mut updated = old.clone();
            let changes = update("q", &mut updated, &updates);
            assert_eq!(updated, new, "{what}");
            assert_eq!(changes, diff("q", &old, &new), "{what}");
        }
        // A first guest: new files only, no SIGHUP.
        let first = lab(&[(1, 2, "web")], &["web"]);
        let mut updated = Hosts::default();
        let mac = Mac::from_octets([0x52, 0x54, 0, 0, 0, 1]);
        let reservation = first.dhcp.get(&mac).cloned();
        let [d, n] = update(
            "q",
            &mut updated,
            &[HostUpdate {
                mac,
                reservation,
                in_dns: true,
            }],
        );
        assert!(!d.needs_reload && !n.needs_reload && d.write.len() == 1 && n.write.len() == 1);
        assert_eq!(updated, first);
    }

    #[test]
    fn files_read_back_as_what_was_written_and_nothing_else() {
        let hosts = two_hosts_one_name();
        let [dhcp, dns] = files(&hosts);
        let mut back = Hosts::default();
        for (name, text) in &dhcp {
            let (mac, entry) = parse_dhcp(name, text).unwrap();
            back.dhcp.insert(mac, entry);
        }
        for (name, text) in &dns {
            let (label, ips) = parse_dns("lab.qnet", name, text).unwrap();
            back.dns.insert(label, ips);
        }
        assert_eq!(back, hosts);
        let (name, text) = &dhcp[0];
        // Another file name, another domain, edited or cut files: not ours.
        assert_eq!(parse_dhcp("52:54:00:00:00:09", text), None);
        assert_eq!(parse_dhcp(name, &text.replace('\n', "")), None);
        assert_eq!(parse_dhcp(name, &format!("{text}x\n")), None);
        assert_eq!(
            parse_dhcp(name, "52:54:00:00:00:01,10.42.0.11,web,x\n"),
            None
        );
        assert_eq!(parse_dns("other.qnet", &dns[0].0, &dns[0].1), None);
        assert_eq!(parse_dns("lab.qnet", "web", ""), None);
        assert_eq!(parse_dns("lab.qnet", "web", "10.42.0.9 web.lab.qnet"), None);
        assert_eq!(
            parse_dns("lab.qnet", "-x", "10.42.0.9 -x.lab.qnet -x\n"),
            None
        );
    }
}
