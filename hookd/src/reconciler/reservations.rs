//! Explicit reservations: `qnetctl reserve add|rm`.

use std::net::Ipv4Addr;

use qnet_api::{ApiError, DnsLabel, GuestRef, Mac, NetName, Reply};

use super::networks::done;
use super::{Peer, Reconciler};
use crate::error::{conflict, exhausted, invalid, not_found};
use crate::state::alloc::{self, AllocError, ReservationTable as _};
use crate::state::{self, Reservation};

impl Reconciler {
    pub(super) fn reserve_add(
        &mut self,
        network: &NetName,
        mac: Mac,
        ip: Option<Ipv4Addr>,
        name: Option<GuestRef>,
        peer: Peer,
    ) -> Result<Reply, ApiError> {
        let net = self.network_for(network, peer)?.config.clone();
        let domain = alloc::addressing(&net).map_err(alloc_error)?.domain.clone();
        let name = match name {
            Some(n) => Some(DnsLabel::from_guest_name(n.as_str()).ok_or_else(|| {
                invalid(format!(
                    "`{n}` is not a DNS name: use letters, digits and `-`"
                ))
            })?),
            None => None,
        };
        let now = state::now();
        let in_use = self.state.guests.running_on(network);
        let mut table = self.state.reservations.table_mut(network);
        let (ip, reclaimed) = alloc::explicit_address(
            &table,
            &net,
            mac,
            ip,
            &in_use,
            self.limits.reservations,
            now,
        )
        .map_err(alloc_error)?;
        let evicted = reclaimed.and_then(|old| table.remove(&old).map(|r| (old, r)));
        let previous = table.insert(
            mac,
            Reservation {
                ip,
                name: name.clone(),
                explicit: true,
                owner_uid: Some(peer.uid),
                nic: None,
                last_seen: now,
            },
        );
        let key = network.clone();
        self.commit(move |state| {
            let mut table = state.reservations.table_mut(&key);
            match previous {
                Some(old) => table.insert(mac, old),
                None => table.remove(&mac),
            };
            if let Some((old_mac, old)) = evicted {
                table.insert(old_mac, old);
            }
        })?;
        self.dirty.dnsmasq = true;
        self.dirty.forwards = true;
        let named = name.map(|n| format!(" ({n}.{domain})")).unwrap_or_default();
        Ok(done(format!("reserved {ip}{named} for {mac} on {network}")))
    }

    pub(super) fn reserve_rm(&mut self, network: &NetName, mac: Mac) -> Result<Reply, ApiError> {
        self.network(network)?;
        let removed = self.state.reservations.table_mut(network).remove(&mac);
        let Some(removed) = removed else {
            return Err(not_found(format!("{mac} has no reservation on {network}")));
        };
        let (key, back) = (network.clone(), removed.clone());
        self.commit(move |state| {
            state.reservations.table_mut(&key).insert(mac, back);
        })?;
        self.dirty.dnsmasq = true;
        self.dirty.forwards = true;
        Ok(done(format!(
            "removed the reservation of {} for {mac} on {network}",
            removed.ip
        )))
    }
}

fn alloc_error(e: AllocError) -> ApiError {
    match e {
        AllocError::Exhausted { .. } => exhausted(e.to_string()),
        AllocError::Taken { .. } => conflict(e.to_string()),
        AllocError::NotAGuestAddress { .. } | AllocError::Lan { .. } => invalid(e.to_string()),
    }
}
