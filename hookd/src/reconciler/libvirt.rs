//! libvirt guests, registered by the libvirt hook: their reservations and
//! forwards, and the addresses libvirt's own dnsmasq leases them on
//! libvirt's networks.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;

use qnet_api::{
    ApiError, DnsLabel, ForwardSpec, GuestName, GuestRef, GuestUuid, LibvirtNetwork, LibvirtNic,
    Mac, NetName, Reply,
};

use super::networks::done;
use super::{Peer, Reconciler};
use crate::error::{conflict, exhausted, invalid};
use crate::follow;
use crate::libvirt::{self, LeaseUpdate};
use crate::procfs::{self, Process};
use crate::state::alloc::{self, AutoRequest, ReservationTable as _};
use crate::state::{
    self, Forward, Guest, GuestKey, LibvirtAddress, Nic, NicNetwork, NicOwner, Reservation,
};

/// Where a libvirt guest's NIC is.
enum Place {
    /// On this qnet network.
    Qnet(NetName),
    /// On one of libvirt's own networks.
    Libvirt(LibvirtNetwork),
    /// Neither (a host bridge, macvtap, user networking...).
    Elsewhere,
}

/// A registration, checked as a whole before anything changes.
pub(super) struct Registration {
    pub name: GuestRef,
    pub uuid: GuestUuid,
    pub nics: Vec<LibvirtNic>,
    pub forwards: Vec<ForwardSpec>,
    pub pid: Option<u32>,
}

impl Reconciler {
    /// Registers a libvirt guest: reservations first, then the forwards of
    /// its domain XML (replacing those it declared before), then, with a
    /// pid, the guest record the daemon watches. Everything is checked
    /// before anything changes.
    ///
    /// A NIC on one of libvirt's own networks gets no reservation
    /// (libvirt's dnsmasq hands out its address): its address is the fixed
    /// one of the metadata, else the lease in libvirt's status file, else
    /// the last one remembered for its MAC; the lease watcher updates it.
    pub(super) async fn guest_register(
        &mut self,
        r: Registration,
        peer: Peer,
    ) -> Result<Reply, ApiError> {
        let name = r.name.as_str().to_owned();
        let process = r
            .pid
            .map(|pid| {
                Process::of(pid).ok_or_else(|| invalid(format!("guest `{name}`: no process {pid}")))
            })
            .transpose()?;
        let placed = self.place_libvirt_nics(&name, &r.nics)?;
        self.check_libvirt_forwards(&name, &r.uuid, &placed, &r.forwards)?;

        let label = DnsLabel::from_guest_name(&name);
        let mut nics = Vec::new();
        let mut libvirt_nets = Vec::new();
        for (place, nic) in placed {
            let (network, ip) = match place {
                Place::Qnet(net) => {
                    let ip = self.libvirt_reservation(&net, nic, &label, &r.uuid, peer)?;
                    (Some(NicNetwork::Qnet(net)), Some(ip))
                }
                Place::Libvirt(lv) => {
                    let ip = self.libvirt_address(nic.mac, &lv, nic.ip).await;
                    let on = NicNetwork::Libvirt {
                        name: lv.name.clone(),
                        bridge: lv.bridge.clone(),
                    };
                    libvirt_nets.push(lv);
                    (Some(on), ip)
                }
                Place::Elsewhere => (None, None),
            };
            nics.push(Nic {
                mac: nic.mac,
                qemu_name: None,
                device: nic.device.clone(),
                network,
                ip,
            });
        }
        if !r.forwards.is_empty() {
            self.warn_libvirt_inbound(&name, &r.uuid, &libvirt_nets);
        }
        self.state
            .forwards
            .retain(|f| f.libvirt.as_ref() != Some(&r.uuid));
        let forward_count = r.forwards.len();
        for spec in r.forwards {
            self.state.forwards.push(Forward {
                spec,
                owner_uid: peer.uid,
                libvirt: Some(r.uuid.clone()),
            });
        }
        if let Some(process) = process {
            self.record_libvirt_guest(process, &name, &r.uuid, nics.clone());
        }
        // Several files change at once here: a failed save leaves the
        // state dirty for a retry rather than half-undone.
        if let Err(e) = self.store.save(&mut self.state) {
            self.dirty.state = true;
            return Err(crate::error::DaemonError::State(e).into());
        }
        self.dirty.dnsmasq = true;
        self.dirty.forwards = true;
        tracing::info!(guest = %name, uuid = %r.uuid, pid = ?r.pid, "libvirt guest registered");
        Ok(done(format!(
            "registered libvirt guest `{name}`{}: {}; {forward_count} forward(s)",
            r.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            describe_nics(&nics)
        )))
    }

    /// Each NIC's network, with fixed addresses checked.
    fn place_libvirt_nics<'a>(
        &self,
        name: &str,
        nics: &'a [LibvirtNic],
    ) -> Result<Vec<(Place, &'a LibvirtNic)>, ApiError> {
        let mut placed = Vec::new();
        for nic in nics {
            let qnet = nic
                .network
                .as_deref()
                .and_then(|n| self.networks.get(n).map(|rt| rt.config.name.clone()))
                .or_else(|| {
                    nic.bridge
                        .as_deref()
                        .and_then(|b| self.network_of_bridge(b))
                });
            let place = match (qnet, &nic.libvirt_network) {
                (Some(net), _) => Place::Qnet(net),
                (None, Some(lv)) => {
                    libvirt::status_path(Path::new(libvirt::LEASE_DIR), &lv.bridge).map_err(
                        |e| {
                            invalid(format!(
                                "guest `{name}`: libvirt network `{}`: {e}",
                                lv.name
                            ))
                        },
                    )?;
                    Place::Libvirt(lv.clone())
                }
                (None, None) => Place::Elsewhere,
            };
            if let Some(ip) = nic.ip {
                self.check_fixed_address(name, &place, nic.mac, ip)?;
            }
            placed.push((place, nic));
        }
        Ok(placed)
    }

    fn check_fixed_address(
        &self,
        name: &str,
        place: &Place,
        mac: Mac,
        ip: Ipv4Addr,
    ) -> Result<(), ApiError> {
        match place {
            Place::Qnet(net_name) => {
                let net = &self.networks[net_name].config;
                alloc::check_guest_address(net, ip)
                    .map_err(|e| invalid(format!("guest `{name}`: {e}")))?;
                let taken = self
                    .state
                    .reservations
                    .get(net_name)
                    .and_then(|t| t.iter().find(|(m, r)| r.ip == ip && **m != mac));
                if let Some((other, _)) = taken {
                    return Err(conflict(format!(
                        "guest `{name}`: {ip} is already reserved for {other} on {net_name}"
                    )));
                }
            }
            Place::Libvirt(lv) => {
                let inside = lv.subnets.iter().any(|s| {
                    s.contains(&ip) && ip != s.network() && ip != s.broadcast() && ip != s.addr()
                });
                if !lv.subnets.is_empty() && !inside {
                    let subnets: Vec<String> =
                        lv.subnets.iter().map(|s| s.trunc().to_string()).collect();
                    return Err(invalid(format!(
                        "guest `{name}`: {ip} is not a guest address of libvirt network `{}` ({})",
                        lv.name,
                        subnets.join(", ")
                    )));
                }
            }
            Place::Elsewhere => {}
        }
        Ok(())
    }

    fn check_libvirt_forwards(
        &self,
        name: &str,
        uuid: &GuestUuid,
        placed: &[(Place, &LibvirtNic)],
        specs: &[ForwardSpec],
    ) -> Result<(), ApiError> {
        let libvirt_names: BTreeSet<&str> = placed
            .iter()
            .filter_map(|(place, _)| match place {
                Place::Libvirt(lv) => Some(lv.name.as_str()),
                _ => None,
            })
            .collect();
        for spec in specs {
            if let Some(net) = &spec.network {
                if !self.networks.contains_key(net.as_str())
                    && !libvirt_names.contains(net.as_str())
                {
                    self.network(net)?;
                }
            }
            let clash = self
                .declared()
                .find(|d| d.spec.overlaps(spec) && d.libvirt != Some(uuid));
            if let Some(other) = clash {
                return Err(conflict(format!(
                    "guest `{name}`: {} is taken by guest `{}` ({} forward {})",
                    spec.ports_text(),
                    other.spec.guest,
                    other.origin,
                    other.spec.ports_text()
                )));
            }
        }
        Ok(())
    }

    /// The reservation of a libvirt guest's NIC on qnet network `net`:
    /// its fixed address, or a sticky one from the pool.
    fn libvirt_reservation(
        &mut self,
        net: &NetName,
        nic: &LibvirtNic,
        label: &Option<DnsLabel>,
        uuid: &GuestUuid,
        peer: Peer,
    ) -> Result<Ipv4Addr, ApiError> {
        let config = self.networks[net].config.clone();
        let in_use = self.state.guests.running_on(net);
        let mut table = self.state.reservations.table_mut(net);
        let now = state::now();
        match nic.ip {
            Some(ip) => {
                let old = table.get(&nic.mac);
                let reservation = Reservation {
                    ip,
                    name: label.clone(),
                    explicit: old.is_some_and(|r| r.explicit),
                    owner_uid: old.and_then(|r| r.owner_uid).or(Some(peer.uid)),
                    nic: old.and_then(|r| r.nic.clone()),
                    last_seen: now,
                };
                table.insert(nic.mac, reservation);
                Ok(ip)
            }
            None => {
                let request = AutoRequest {
                    mac: nic.mac,
                    name: label.clone(),
                    owner: NicOwner {
                        guest: GuestKey::Uuid(uuid.clone()),
                        nic: nic.mac.to_string(),
                    },
                    uid: peer.uid,
                };
                alloc::reserve_auto(
                    &mut table,
                    &config,
                    request,
                    &in_use,
                    self.limits.reservations,
                    now,
                )
                .map(|granted| granted.ip)
                .map_err(|e| exhausted(e.to_string()))
            }
        }
    }

    fn record_libvirt_guest(
        &mut self,
        process: Process,
        name: &str,
        uuid: &GuestUuid,
        nics: Vec<Nic>,
    ) {
        let pid = process.pid;
        let known = self
            .state
            .guests
            .get(&pid)
            .is_some_and(|g| g.process == process);
        self.state
            .guests
            .retain(|p, g| *p == pid || g.uuid.as_ref() != Some(uuid));
        self.state.guests.insert(
            pid,
            Guest {
                process,
                uid: procfs::uid_of(pid).unwrap_or(0),
                // A GuestRef already: no control characters, 255 bytes.
                name: Some(GuestName::kept(name)),
                uuid: Some(uuid.clone()),
                qmp_server: None,
                nics,
            },
        );
        if !known {
            follow::watch_exit(process, self.inputs.clone());
        }
    }

    /// The address of `mac` on libvirt network `lv`: `fixed` (the
    /// metadata's), else its lease in libvirt's status file, else the last
    /// one remembered for it on that bridge. Remembers what it finds.
    async fn libvirt_address(
        &mut self,
        mac: Mac,
        lv: &LibvirtNetwork,
        fixed: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let leased = match fixed {
            Some(_) => None,
            None => {
                let path = libvirt::status_path(Path::new(libvirt::LEASE_DIR), &lv.bridge).ok()?;
                match tokio::task::spawn_blocking(move || libvirt::read_status(&path)).await {
                    Ok(Ok(leases)) => libvirt::address_of(&leases, mac),
                    Ok(Err(e)) => {
                        tracing::warn!("libvirt leases: {e}");
                        None
                    }
                    Err(_) => None,
                }
            }
        };
        let remembered = self
            .state
            .libvirt_addresses
            .get(&mac)
            .filter(|a| a.bridge == lv.bridge && !a.fixed)
            .map(|a| a.ip);
        let ip = fixed.or(leased).or(remembered)?;
        self.state.libvirt_addresses.insert(
            mac,
            LibvirtAddress {
                network: lv.name.clone(),
                bridge: lv.bridge.clone(),
                ip,
                fixed: fixed.is_some(),
            },
        );
        Some(ip)
    }

    /// Warns, once per guest and network, that forwards into a libvirt
    /// network whose own firewall rejects inbound connections work from
    /// the host only. We never edit libvirt's rules (they are not ours).
    fn warn_libvirt_inbound(&mut self, name: &str, uuid: &GuestUuid, nets: &[LibvirtNetwork]) {
        // Integrated, qnet accepts its forwards in libvirt's chain itself.
        if self.integration.global {
            return;
        }
        for lv in nets.iter().filter(|lv| !lv.admits_inbound()) {
            if self.libvirt_warned.insert((uuid.clone(), lv.name.clone())) {
                let mode = lv.forward_mode.as_deref().unwrap_or("isolated");
                tracing::warn!(
                    guest = %name,
                    network = %lv.name,
                    mode,
                    "forwards to this guest work from the host only: libvirt's firewall \
                     (iptables chain LIBVIRT_FWI, or nftables chain guest_input of table ip \
                     libvirt_network) rejects new connections from outside into \
                     {mode} networks, and firewall-integration is off; turn it on, use \
                     <forward mode='route'/> or 'open' for the libvirt network, or accept them \
                     in your own FORWARD rules"
                );
            }
        }
    }

    /// libvirt's dnsmasq changed the leases of `update.bridge`: guests on
    /// that bridge whose lease is new or moved get their forwards (re)made.
    pub(super) fn libvirt_leases(&mut self, update: LeaseUpdate) {
        let mut changed = Vec::new();
        let on_bridge: Vec<u32> = self
            .state
            .guests
            .values()
            .filter(|g| {
                g.nics.iter().any(|nic| {
                    nic.libvirt_bridge()
                        .is_some_and(|b| b.as_str() == update.bridge)
                })
            })
            .map(|g| g.process.pid)
            .collect();
        for pid in on_bridge {
            let Some(mut guest) = self.state.guests.get_mut(&pid) else {
                continue;
            };
            let guest = &mut *guest;
            for nic in guest.nics.iter_mut() {
                let Some(NicNetwork::Libvirt { name, bridge }) = &nic.network else {
                    continue;
                };
                if bridge.as_str() != update.bridge {
                    continue;
                }
                let (network, bridge) = (name.clone(), bridge.clone());
                let fixed = self
                    .state
                    .libvirt_addresses
                    .get(&nic.mac)
                    .is_some_and(|a| a.fixed && a.bridge == update.bridge.as_str());
                let Some(ip) = libvirt::address_of(&update.leases, nic.mac).filter(|_| !fixed)
                else {
                    continue;
                };
                if nic.ip != Some(ip) {
                    tracing::info!(guest = guest.name.as_deref().unwrap_or("-"), mac = %nic.mac, %ip, bridge = %update.bridge, "libvirt lease");
                    nic.ip = Some(ip);
                    changed.push((nic.mac, network, bridge, ip));
                }
            }
        }
        for (mac, network, bridge, ip) in changed {
            self.state.libvirt_addresses.insert(
                mac,
                LibvirtAddress {
                    network,
                    bridge,
                    ip,
                    fixed: false,
                },
            );
            self.dirty.state = true;
            self.dirty.forwards = true;
        }
    }

    /// Tells the lease watcher which bridges matter now: those of running
    /// libvirt guests' NICs whose address comes from a lease.
    pub(super) fn update_lease_watch(&self) {
        let bridges: BTreeSet<String> = self
            .state
            .nics()
            .filter(|nic| {
                !self
                    .state
                    .libvirt_addresses
                    .get(&nic.mac)
                    .is_some_and(|a| a.fixed)
            })
            .filter_map(|nic| nic.libvirt_bridge().map(ToString::to_string))
            .collect();
        self.lease_watch.send_if_modified(|current| {
            let changed = *current != bridges;
            if changed {
                *current = bridges;
            }
            changed
        });
    }

    /// Whether a running guest has a NIC on the libvirt network `name`.
    pub(super) fn is_libvirt_network(&self, name: &str) -> bool {
        self.state.nics().any(
            |nic| matches!(&nic.network, Some(NicNetwork::Libvirt { name: n, .. }) if n == name),
        )
    }

    /// The libvirt guest `uuid` stopped: its record and forwards go; its
    /// reservations stay (sticky).
    pub(super) fn guest_unregister(&mut self, uuid: &GuestUuid) -> Result<Reply, ApiError> {
        // A guest the daemon dialed over QMP is followed there, not here.
        let registered = |g: &Guest| g.qmp_server.is_none() && g.uuid.as_ref() == Some(uuid);
        let declared = |f: &Forward| f.libvirt.as_ref() == Some(uuid);
        let removed_guests: Vec<Guest> = self
            .state
            .guests
            .values()
            .filter(|g| registered(g))
            .cloned()
            .collect();
        let removed_forwards: Vec<Forward> = self
            .state
            .forwards
            .iter()
            .filter(|f| declared(f))
            .cloned()
            .collect();
        let (guests, forwards) = (removed_guests.len(), removed_forwards.len());
        self.state.guests.retain(|_, g| !registered(g));
        self.state.forwards.retain(|f| !declared(f));
        self.commit(move |state| {
            for g in removed_guests {
                state.guests.insert(g.process.pid, g);
            }
            state.forwards.extend(removed_forwards);
        })?;
        // Its next start warns again.
        self.libvirt_warned.retain(|(u, _)| u != uuid);
        self.dirty.dnsmasq = true;
        self.dirty.forwards = true;
        tracing::info!(%uuid, guests, forwards, "libvirt guest unregistered");
        Ok(done(format!(
            "unregistered libvirt guest {uuid}: {forwards} forward(s) removed"
        )))
    }
}

fn describe_nics(nics: &[Nic]) -> String {
    if nics.is_empty() {
        return "no NICs".into();
    }
    nics.iter()
        .map(|n| match (&n.network, n.ip) {
            (Some(NicNetwork::Qnet(net)), Some(ip)) => format!("{} {ip} on {net}", n.mac),
            (Some(NicNetwork::Libvirt { name, .. }), Some(ip)) => {
                format!("{} {ip} on libvirt network {name}", n.mac)
            }
            (Some(NicNetwork::Libvirt { name, .. }), None) => {
                format!("{} on libvirt network {name}, waiting for its lease", n.mac)
            }
            _ => format!("{} not on a qnet or libvirt network", n.mac),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
