//! Noticing that a peer changed, so the reconciler opens our networks in
//! it again: dockerd starting (it creates `DOCKER-USER` and may set the
//! `FORWARD` policy to DROP), ufw or an admin changing rules, firewalld
//! reloading (`Reloaded`) or restarting (`NameOwnerChanged`).
//!
//! Three sources, each calling `changed` (the reconciler's input):
//!
//! - nftables' own change notifications (netlink group
//!   `NFNLGRP_NFTABLES`): tables, chains and rules added or removed by
//!   anyone (iptables-nft, firewalld, nft), coalesced over [`QUIET`];
//!   set element changes (port forwards, firewalld's sets) are ignored;
//! - x_tables (iptables-legacy) sends no notification: while a legacy
//!   filter table exists, every [`LEGACY_POLL`];
//! - firewalld's D-Bus signals.
//!
//! Applying is idempotent, so our own changes waking the watcher once
//! more cost one listing and change nothing.

use std::time::Duration;

use futures_util::StreamExt;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use super::firewalld::BUS_NAME;

/// nftables notifications closer than this are one change.
pub const QUIET: Duration = Duration::from_millis(300);
/// How often legacy iptables tables are looked at.
pub const LEGACY_POLL: Duration = Duration::from_secs(5);
/// How often a missing system bus is looked for again.
const BUS_RETRY: Duration = Duration::from_secs(10);

const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;

/// Starts every watcher; each calls `changed` until it returns false.
pub fn spawn(changed: impl Fn() -> bool + Send + Sync + Clone + 'static) {
    let nft = changed.clone();
    std::thread::Builder::new()
        .name("nft-watch".into())
        .spawn(move || {
            if let Err(e) = watch_nftables(&nft) {
                tracing::warn!("not following nftables changes of other firewalls: {e}");
            }
        })
        .ok();
    let legacy = changed.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEGACY_POLL).await;
            if legacy_filter_exists() && !legacy() {
                return;
            }
        }
    });
    tokio::spawn(watch_firewalld(changed));
}

fn legacy_filter_exists() -> bool {
    ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|t| t.lines().any(|l| l == "filter")))
}

/// Whether one datagram of notifications holds a table, chain or rule
/// change (not only set elements or generation ids).
pub fn is_relevant(datagram: &[u8]) -> bool {
    const NEWTABLE: u16 = 0;
    const DELRULE: u16 = 8;
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let (subsys, msg) = (kind >> 8, kind & 0xff);
        if subsys == NFNL_SUBSYS_NFTABLES && (NEWTABLE..=DELRULE).contains(&msg) {
            return true;
        }
        let step = (len + 3) & !3;
        if len < 16 || step > rest.len() {
            break;
        }
        rest = &rest[step..];
    }
    false
}

fn watch_nftables(changed: &impl Fn() -> bool) -> std::io::Result<()> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.add_membership(NFNLGRP_NFTABLES)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        setsockopt(&socket, sockopt::ReceiveTimeout, &TimeVal::new(0, 0))?;
        let relevant = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => is_relevant(&buf[..n]),
            // Overrun: we missed notifications, some may be relevant.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
            Err(e) => return Err(e),
        };
        if !relevant {
            continue;
        }
        // Wait for the burst (a firewall reload is many messages) to end.
        let quiet = TimeVal::new(0, QUIET.as_micros() as _);
        setsockopt(&socket, sockopt::ReceiveTimeout, &quiet)?;
        while socket.recv(&mut &mut buf[..], 0).is_ok() {}
        if !changed() {
            return Ok(());
        }
    }
}

async fn watch_firewalld(changed: impl Fn() -> bool) {
    loop {
        match follow_firewalld(&changed).await {
            Ok(()) => return,
            Err(e) => tracing::debug!("firewalld signals: {e}; looking again in {BUS_RETRY:?}"),
        }
        tokio::time::sleep(BUS_RETRY).await;
    }
}

/// Follows firewalld's `Reloaded` and its (re)appearance on the bus until
/// `changed` returns false (`Ok`) or the bus goes (`Err`).
async fn follow_firewalld(changed: &impl Fn() -> bool) -> zbus::Result<()> {
    let conn = zbus::Connection::system().await?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
    for rule in [
        format!("type='signal',interface='{BUS_NAME}',member='Reloaded'"),
        format!("type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BUS_NAME}'"),
    ] {
        dbus.add_match_rule(zbus::MatchRule::try_from(rule.as_str())?)
            .await?;
    }
    let mut stream = zbus::MessageStream::from(&conn);
    while let Some(msg) = stream.next().await {
        let msg = msg?;
        let header = msg.header();
        let member = header.member().map(|m| m.as_str().to_owned());
        if matches!(member.as_deref(), Some("Reloaded" | "NameOwnerChanged")) {
            tracing::debug!(signal = ?member, "firewalld changed");
            if !changed() {
                return Ok(());
            }
        }
    }
    Err(zbus::Error::Failure("the system bus went away".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(subsys: u16, msg: u16, len: u32) -> Vec<u8> {
        let mut m = len.to_ne_bytes().to_vec();
        m.extend_from_slice(&((subsys << 8) | msg).to_ne_bytes());
        m.resize(len as usize, 0);
        m
    }

    #[test]
    fn only_table_chain_and_rule_changes_are_relevant() {
        let newrule = message(NFNL_SUBSYS_NFTABLES, 6, 20);
        let newsetelem = message(NFNL_SUBSYS_NFTABLES, 12, 20);
        let newgen = message(NFNL_SUBSYS_NFTABLES, 15, 16);
        assert!(is_relevant(&newrule));
        assert!(!is_relevant(&[newsetelem.clone(), newgen.clone()].concat()));
        assert!(is_relevant(&[newsetelem, newgen, newrule].concat()));
        assert!(!is_relevant(&message(1, 6, 16)), "another subsystem");
        assert!(!is_relevant(&[1, 2, 3]));
    }
}
