//! The host firewall as far as qnet touches it: our one nftables table,
//! `table inet qnet` (masquerade, forwarding policy for our bridges,
//! blocked outgoing ports, port forwards), behind one interface,
//! [`Firewall`], which the reconciler holds.
//!
//! We never list, flush or edit any other table: libvirt, Docker,
//! firewalld keep theirs. The table is replaced as a whole in one
//! transaction (`nft -f -`, [`Firewall::apply_ruleset`]):
//!
//! ```text
//! add table inet qnet        # so that the delete cannot fail
//! delete table inet qnet     # drop the old contents...
//! table inet qnet { ... }    # ...and declare the new ones
//! ```
//!
//! nft commits the script atomically: packets see either the old table or
//! the new one, and a script with an error changes nothing.
//!
//! Our chains only ever *accept* or *drop/reject* traffic of our own
//! bridges, with policy accept: a verdict of accept in our table does not
//! override a drop in someone else's base chain on the same hook (nftables
//! evaluates every base chain), so everything else keeps working exactly as
//! it did — but note that a host firewall dropping forwarded traffic (e.g.
//! Docker's `FORWARD` policy drop) also drops our guests' traffic.
//!
//! # Port forwards
//!
//! Host ports are forwarded to guests by DNAT through four maps of the
//! table (see [`ForwardElement`] and [`render_with_forwards`]):
//!
//! | map | key | value |
//! |---|---|---|
//! | `fwd4` | `ipv4_addr . inet_proto . inet_service` (host address, proto, port) | `ipv4_addr . inet_service` |
//! | `fwd4_any` | `inet_proto . inet_service` (any local IPv4 address) | `ipv4_addr . inet_service` |
//! | `fwd6` | `ipv6_addr . inet_proto . inet_service` | `ipv6_addr . inet_service` |
//! | `fwd6_any` | `inet_proto . inet_service` (any local IPv6 address but `::1`) | `ipv6_addr . inet_service` |
//!
//! The maps are hash tables: a lookup costs the same with 1 or 10,000
//! forwards, and adding or removing a forward is one small transaction of
//! element additions / deletions ([`Firewall::add_elements`],
//! [`Firewall::remove_elements`]) that touches nothing else — the table is
//! only rebuilt by [`Firewall::apply_ruleset`] (daemon start, network
//! changes). Those element transactions are sent by the daemon itself over
//! nfnetlink ([`nfnetlink`], ~0.15 ms), not by an `nft` process (~2 ms of
//! process start alone); everything else is `nft -f` text. A transaction
//! that fails because of one element (a host port forwarded to another
//! guest) never takes the others with it: [`batch`] finds the refused
//! elements, changes the rest, and reports per element
//! ([`ElementReport`]). [`Firewall::installed_elements`] reads the maps
//! back from the kernel, so what is reported as installed is what is.
//!
//! The maps' values are concatenations, which nft 1.0.6 only handles in
//! its text syntax: its JSON cannot create such maps, and its JSON listing
//! of our DNAT rules is lossy (it drops the port half of the value, so
//! feeding it back would install different rules). We only ever speak text
//! to nft and only ever list our own table; elements are read back over
//! nfnetlink.
//!
//! The same chain `port_forwards` is jumped to from `prerouting` (packets
//! from the outside and from guests) and from `output` (the host's own
//! connections), so a forward works from every direction:
//!
//! - from the outside, to the uplink address (or any local address);
//! - from the host itself to one of its addresses, and to `127.0.0.1`
//!   (a "localhost forward", like QEMU's `hostfwd`): the DNAT'ed packet
//!   leaves through a bridge with source 127.0.0.1, which the kernel only
//!   routes with `route_localnet` (see
//!   [`Firewall::enable_localhost_forwards`]), and `postrouting`
//!   masquerades it to the bridge's (router) address;
//! - from a guest to the host's address, forwarded to a guest on the same
//!   bridge ("hairpin"): `postrouting` masquerades DNAT'ed connections from
//!   the network's subnet that leave through its own bridge, so that the
//!   target answers through the host instead of directly to the sender
//!   (which would drop the unexpected reply);
//! - IPv4 and IPv6 alike, except localhost: Linux cannot DNAT a connection
//!   to `::1` to another host (there is no IPv6 `route_localnet`), so
//!   `::1` is left alone (the host answers it itself) and localhost
//!   forwards are IPv4 only.
//!
//! A forward into a `nat` network passes `forward` through its
//! `ct status dnat accept`; into an `isolated` network it is dropped there
//! (except from the same bridge). Removing a forward stops *new*
//! connections; flows conntrack already knows (a TCP connection, a UDP
//! flow within its timeout) keep their translation until they end.
//!
//! With br_netfilter (Docker, Kubernetes; `bridge-nf-call-iptables=1`) the
//! IP hooks also run while a frame is bridged, so a forward from a guest
//! to a guest on the same bridge is applied by the bridge: that still
//! works (and is masqueraded), except for a guest reaching *its own*
//! forward, whose frame would have to leave by the port it came in by —
//! which the bridge only does for a port in hairpin mode.
//!
//! Besides the forwards themselves, the one rule that touches traffic not
//! of our bridges is in `loopback_guard` (prerouting, priority raw): a
//! packet arriving on any interface but `lo` for 127.0.0.0/8 is dropped.
//! Without `route_localnet` the kernel drops those itself; with it (which
//! localhost forwards need) a neighbour could otherwise reach the host's
//! loopback-only services (CVE-2020-8558). It runs before conntrack, so
//! the replies to localhost forwards (addressed to the router address on
//! the wire) pass.
//!
//! # Modules
//!
//! Each module is one concern, and dependencies point one way (no cycle):
//!
//! - [`element`]: the vocabulary ([`ForwardElement`], its map, key, value
//!   and bytes); depends on no other;
//! - [`error`]: [`FirewallError`] and its [`ErrorKind`];
//! - [`ruleset`]: the table's text, over an emitter;
//! - [`nft`]: running `nft` (apply, remove, list);
//! - [`nfnetlink`]: the wire, which knows sets and bytes, not forwards;
//! - [`batch`]: element changes with an outcome per element, over
//!   [`nfnetlink`];
//! - [`driver`]: the [`Driver`] trait every firewall we write to implements;
//! - [`table`]: our table as a [`Driver`] ([`QnetTable`]);
//! - this module: [`Firewall`], what the reconciler holds.
//!
//! # Other firewalls ([`peers`])
//!
//! Other firewalls on the host decide too: a drop in their base chains is
//! final whatever our table accepts. [`peers`] opens our bridges in each
//! (Docker's `DOCKER-USER`, iptables' `FORWARD`/`INPUT` where they drop,
//! firewalld zones and policies over D-Bus), each rule marked
//! `qnet:NETWORK`; [`Firewall::open_in_peers`] is called after our table
//! is applied and whenever a peer changes; [`Firewall::cleanup_peers`]
//! removes every trace.
//! [`Firewall::installed_elements`] stays our maps' (they are what
//! forwards).

mod batch;
mod driver;
mod element;
mod error;
mod nfnetlink;
mod nft;
pub mod peers;
mod ruleset;
mod table;

use std::collections::BTreeSet;

pub use batch::{Change, ElementReport, Refused};
pub use driver::Driver;
pub use element::{check_elements, ForwardElement, InvalidElement, Map};
pub use error::{ErrorKind, FirewallError};
pub use nft::{normalize, run_script};
pub use peers::Peers;
pub use ruleset::{
    add_forwards_script, remove_forwards_script, render, render_with_forwards, TABLE_FAMILY,
    TABLE_NAME,
};
pub use table::QnetTable;

use crate::config::NetworkConfig;

/// `net.ipv4.conf.all.route_localnet` of the current network namespace.
pub const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// The firewall as the reconciler sees it. See the module documentation.
#[derive(Debug, Default, Clone)]
pub struct Firewall {
    table: QnetTable,
    peers: Peers,
}

impl Firewall {
    pub const fn new() -> Firewall {
        Firewall {
            table: QnetTable,
            peers: Peers::new(),
        }
    }

    /// Opens exactly `networks` in the host's other firewalls (Docker,
    /// iptables, firewalld; see [`peers`]), removing what qnet had opened
    /// there for other networks. A peer failing does not stop the others;
    /// the failures come back one line each.
    pub async fn open_in_peers(&self, what: &peers::Openings) -> Vec<String> {
        self.peers.apply(what).await
    }

    /// The other firewalls, for reading (`doctor`).
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Removes every trace of qnet from the other firewalls (uninstall).
    pub async fn cleanup_peers(&self) -> Vec<String> {
        self.peers.cleanup().await
    }

    /// Our rules for `networks`, with exactly `elements` in the forward
    /// maps, replacing the previous table atomically (one transaction, also
    /// with 10,000 forwards). See [`Driver::apply_ruleset`]. LAN
    /// (`bridged`) networks have nothing in our table: their guests are on
    /// the LAN, neither routed nor NATed by the host.
    pub async fn apply_ruleset(
        &self,
        networks: &[NetworkConfig],
        elements: &[ForwardElement],
    ) -> Result<(), FirewallError> {
        let routed: Vec<NetworkConfig> = networks.iter().filter(|n| !n.is_lan()).cloned().collect();
        self.table.apply_ruleset(&routed, elements).await
    }

    /// Adds forward elements: one kernel transaction whatever their
    /// number, and per element an outcome. See [`Driver::add_elements`].
    pub async fn add_elements(
        &self,
        elements: &[ForwardElement],
    ) -> Result<ElementReport, FirewallError> {
        self.table.add_elements(elements).await
    }

    /// Removes forward elements. See [`Driver::remove_elements`].
    pub async fn remove_elements(
        &self,
        elements: &[ForwardElement],
    ) -> Result<ElementReport, FirewallError> {
        self.table.remove_elements(elements).await
    }

    /// The forward elements the kernel holds now, read back from our
    /// maps (empty without our table): what `forward list` shows as
    /// installed, and what a restarted daemon adopts.
    pub async fn installed_elements(&self) -> Result<BTreeSet<ForwardElement>, FirewallError> {
        self.table.installed_elements().await
    }

    /// Removes our table, if it exists. Nothing else is touched.
    pub async fn teardown(&self) -> Result<(), FirewallError> {
        self.table.teardown().await
    }

    /// Our table as `nft list` prints it, normalised ([`normalize`]);
    /// empty if it does not exist.
    pub async fn listing(&self) -> Result<String, FirewallError> {
        self.table.listing().await
    }

    /// Sets `net.ipv4.conf.all.route_localnet` to 1 in the current network
    /// namespace (the sysctl is per namespace; `/proc/sys/net` is the
    /// calling thread's). Needed for localhost forwards
    /// (`127.0.0.1:HOSTPORT` from the host itself): after DNAT, the
    /// connection leaves through a bridge with source 127.0.0.1, and the
    /// kernel refuses to route a loopback source (or destination, for the
    /// replies after de-NAT) to or from a device without `route_localnet`
    /// — the connection silently times out. `postrouting` masquerades such
    /// packets to the bridge's address before they leave.
    ///
    /// Turning it on also lets packets for 127.0.0.0/8 *arrive* from the
    /// network on every interface; our table's `loopback_guard` drops those
    /// while the table exists. The per-device sysctl
    /// (`net.ipv4.conf.<bridge>.route_localnet`) is enough too (the kernel
    /// ORs `all` and the device's), but does not survive the bridge being
    /// re-created. IPv6 has no equivalent: localhost forwards are IPv4 only.
    pub fn enable_localhost_forwards(&self) -> std::io::Result<()> {
        if std::fs::read_to_string(ROUTE_LOCALNET)?.trim() == "1" {
            return Ok(());
        }
        std::fs::write(ROUTE_LOCALNET, "1\n")?;
        tracing::info!("set {ROUTE_LOCALNET} to 1 (localhost port forwards)");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Proto;
    use element::tests::rule;

    #[test]
    fn invalid_and_conflicting_forwards_are_refused_before_nft() {
        let ok = rule(Proto::Tcp, None, 8080, "10.42.0.10", 80);
        assert!(check_elements(&[ok, ok]).is_ok(), "a duplicate is harmless");
        let cases = [
            (
                vec![rule(Proto::Tcp, Some("10.99.0.1"), 8080, "fd42::10", 80)],
                "IPv4 host address",
            ),
            (
                vec![rule(Proto::Tcp, Some("fd99::1"), 8080, "10.42.0.10", 80)],
                "IPv6 host address",
            ),
            (vec![rule(Proto::Udp, None, 0, "10.42.0.10", 80)], "port 0"),
            (
                vec![ok, rule(Proto::Tcp, None, 8080, "10.42.0.11", 80)],
                "conflicts with `tcp *:8080 -> 10.42.0.10:80`",
            ),
        ];
        for (rules, why) in cases {
            let err: FirewallError = check_elements(&rules).expect_err(why).into();
            assert!(matches!(err, FirewallError::InvalidElement(..)), "{err}");
            assert_eq!(err.kind(), ErrorKind::Invalid);
            assert!(err.to_string().contains(why), "{err}");
        }
        // Not a conflict: another family, protocol or address.
        assert!(check_elements(&[
            ok,
            rule(Proto::Tcp, None, 8080, "fd42::10", 80),
            rule(Proto::Udp, None, 8080, "10.42.0.11", 80),
            rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.11", 80),
        ])
        .is_ok());
    }
}
