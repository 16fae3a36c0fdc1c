//! Read-only replies: what the caller may see of networks, guests and
//! reservations, as wire types.

use std::net::Ipv4Addr;

use qnet_api::{
    GuestNic, GuestStatus, NetName, NetworkStatus, Reply, Reservation as WireReservation,
};

use super::networks::visible;
use super::{Peer, Reconciler};
use crate::network;
use crate::state::{Guest, Reservation};

impl Reconciler {
    /// The networks `peer` may see (see [`visible`]).
    pub(super) async fn status(&self, peer: Peer) -> Reply {
        let mut networks = Vec::new();
        for n in self.networks.values().filter(|n| visible(&n.config, peer)) {
            let counters = match n.up {
                true => network::bridge_counters(&n.config.bridge).await,
                false => None,
            };
            let (rx_bytes, tx_bytes) = counters.unwrap_or((0, 0));
            networks.push(NetworkStatus {
                name: n.config.name.to_string(),
                mode: n.config.mode,
                bridge: n.config.bridge.to_string(),
                subnet: match (&n.config.addressing, &n.config.uplink) {
                    (Some(own), _) => own.subnet.to_string(),
                    (None, Some(uplink)) => format!("LAN of {uplink}"),
                    (None, None) => "LAN".to_owned(),
                },
                // The wire says 0.0.0.0 for a LAN network (see NetworkStatus).
                router: (n.config.addressing.as_ref()).map_or(Ipv4Addr::UNSPECIFIED, |a| a.router),
                ipv6: n.config.ipv6().map(|v6| v6.subnet.to_string()),
                up: n.up,
                degraded: n.dnsmasq.as_ref().and_then(|d| d.degraded()),
                guests: self.state.guests_on(&n.config.name),
                rx_bytes,
                tx_bytes,
                owner: n.config.owner,
            });
        }
        Reply::Status { networks }
    }

    pub(super) fn guest_list(&self, peer: Peer) -> Reply {
        let guests = self
            .state
            .guests
            .values()
            .filter(|g| peer.is_root() || g.uid == peer.uid)
            .map(guest_status)
            .collect();
        Reply::Guests { guests }
    }

    /// Reservations of `network` (or all) that the caller may see: all for
    /// root; for others those they made or whose MAC is one of their
    /// running guests'.
    pub(super) fn reserve_list(
        &self,
        network: Option<&NetName>,
        peer: Peer,
    ) -> Result<Reply, qnet_api::ApiError> {
        if let Some(name) = network {
            self.network_for(name, peer)?;
        }
        let own = self.state.macs_of(peer.uid);
        let reservations = self
            .networks
            .keys()
            .filter(|name| network.is_none_or(|n| n == *name))
            .flat_map(|name| {
                self.state
                    .reservations
                    .get(name)
                    .into_iter()
                    .flatten()
                    .map(move |(mac, r)| (name, mac, r))
            })
            .filter(|(_, mac, r)| {
                peer.is_root() || r.owner_uid == Some(peer.uid) || own.contains(mac)
            })
            .map(|(name, mac, r)| wire_reservation(name, *mac, r))
            .collect();
        Ok(Reply::Reservations { reservations })
    }
}

fn guest_status(g: &Guest) -> GuestStatus {
    GuestStatus {
        name: g.name.as_ref().map(ToString::to_string),
        uuid: g.uuid.as_ref().map(ToString::to_string),
        pid: g.process.pid,
        uid: g.uid,
        user: user_name(g.uid),
        status: if g.is_running() { "running" } else { "gone" }.into(),
        nics: g
            .nics
            .iter()
            .map(|n| GuestNic {
                mac: n.mac,
                device: n.device.as_ref().map(ToString::to_string),
                network: n.network.as_ref().map(|on| on.name().to_owned()),
                ip: n.ip,
                libvirt_bridge: n.libvirt_bridge().map(ToString::to_string),
            })
            .collect(),
    }
}

fn wire_reservation(network: &NetName, mac: qnet_api::Mac, r: &Reservation) -> WireReservation {
    WireReservation {
        network: network.to_string(),
        mac,
        ip: r.ip,
        name: r.name.clone(),
        explicit: r.explicit,
        owner_uid: r.owner_uid,
    }
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}
