//! Guests followed over QMP: connecting, changing NICs, leaving; and the
//! guests of a previous run, adopted at start.

use qnet_api::DnsLabel;

use super::{plan, ConnId, GuestUp, Peer, Reconciler, Session};
use crate::discover::GuestPort;
use crate::follow::{self, Origin};
use crate::orphans;
use crate::procfs::Process;
use crate::qmp::NicInfo;
use crate::state::alloc::{self, AutoRequest};
use crate::state::{self, Guest, Nic, NicNetwork, NicOwner};

impl Reconciler {
    pub(super) fn guest_up(&mut self, up: GuestUp) {
        let pid = up.identity.pid;
        // Made safe where QMP said it (qmp::session::query_info).
        let name = up.info.name.clone();
        tracing::info!(
            pid,
            name = name.as_deref().unwrap_or("-"),
            nics = up.info.nics.len(),
            "guest connected"
        );
        // A newer session of the same QEMU replaces the older one, whose
        // follower ends when its keepalive is dropped here: one QEMU holds
        // one session, however often it (or anyone with its pid) connects.
        self.sessions.retain(|_, s| s.pid != pid);
        self.sessions.insert(
            up.conn,
            Session {
                pid,
                qmp: up.qmp,
                powerdown: None,
                _keepalive: up.keepalive,
            },
        );
        if let Some(path) = &up.qmp_server {
            self.state.attached.insert(path.clone());
        }
        self.state.guests.insert(
            pid,
            Guest {
                // Already gone: start time 0 is no QEMU's, so it is not running.
                process: up.process.unwrap_or(Process { pid, start_time: 0 }),
                uid: up.identity.uid,
                name,
                uuid: up.info.uuid.clone(),
                qmp_server: up.qmp_server,
                nics: Vec::new(),
            },
        );
        self.assign_nics(pid, &up.info.nics, &up.ports);
        self.dirty.all();
    }

    pub(super) fn guest_nics(&mut self, conn: ConnId, nics: &[NicInfo], ports: &[GuestPort]) {
        if let Some(pid) = self.sessions.get(&conn).map(|s| s.pid) {
            self.assign_nics(pid, nics, ports);
            self.dirty.all();
        }
    }

    pub(super) fn guest_gone(&mut self, conn: ConnId, why: &str) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        // A guest that reconnected has a newer session.
        if self.sessions.values().any(|s| s.pid == session.pid) {
            return;
        }
        tracing::info!(pid = session.pid, %why, "guest gone: tearing down");
        self.forget_guest(session.pid);
    }

    pub(super) fn stale_guest_exited(&mut self, pid: u32) {
        let followed = self.sessions.values().any(|s| s.pid == pid);
        if !followed && self.state.guests.get(&pid).is_some_and(|g| !g.is_running()) {
            tracing::info!(pid, "guest exited");
            self.forget_guest(pid);
        }
    }

    /// The guest's record goes (its reservations stay: sticky), and with
    /// it its DNS names and forwards.
    fn forget_guest(&mut self, pid: u32) {
        if let Some(guest) = self.state.guests.remove(&pid) {
            self.gone_since_trim += 1;
            let now = state::now();
            for nic in &guest.nics {
                self.touch_reservation(nic, now);
            }
            if let Some(path) = guest.qmp_server {
                self.state.attached.remove(&path);
            }
            self.dirty.all();
        }
    }

    /// Marks the reservation of `nic` as seen at `now`.
    fn touch_reservation(&mut self, nic: &Nic, now: u64) {
        let Some(network) = nic.qnet_network() else {
            return;
        };
        if let Some(r) = self.state.reservations.get_mut(network.as_str(), &nic.mac) {
            r.last_seen = now;
        }
    }

    /// Places each NIC on its network and gives it its sticky reservation
    /// there (within the per-NIC limit, see [`alloc`]).
    fn assign_nics(&mut self, pid: u32, nics: &[NicInfo], ports: &[GuestPort]) {
        let Some(guest) = self.state.guests.get(&pid) else {
            return;
        };
        // A user's network serves its owner's guests (and root's) only.
        let peer = Peer {
            pid,
            uid: guest.uid,
        };
        let placements = plan::place_nics(nics, ports, |bridge| {
            let name = self.network_of_bridge(bridge)?;
            self.network_for(&name, peer).is_ok().then_some(name)
        });
        let label = guest.name.as_deref().and_then(DnsLabel::from_guest_name);
        let (owner, uid) = (guest.owner_key(), guest.uid);
        let now = state::now();
        let mut assigned = Vec::new();
        for placed in placements {
            let ip = placed.network.as_ref().and_then(|net_name| {
                // A LAN network's guests get their addresses from the LAN.
                let net = &self.networks.get(net_name).filter(|n| !n.config.is_lan())?.config;
                let in_use = self.state.guests.running_on(net_name);
                let mut table = self.state.reservations.table_mut(net_name);
                let request = AutoRequest {
                    mac: placed.mac,
                    name: label.clone(),
                    owner: NicOwner {
                        guest: owner.clone(),
                        nic: placed.qemu_name.clone(),
                    },
                    uid,
                };
                match alloc::reserve_auto(&mut table, net, request, &in_use, self.limits.reservations, now) {
                    Ok(granted) => {
                        for (mac, ip, why) in granted.evicted {
                            tracing::info!(network = %net_name, %mac, %ip, "automatic reservation removed: {why}");
                        }
                        Some(granted.ip)
                    }
                    Err(e) => {
                        tracing::warn!(pid, mac = %placed.mac, "no reservation: {e}");
                        None
                    }
                }
            });
            assigned.push(Nic {
                mac: placed.mac,
                qemu_name: Some(placed.qemu_name),
                device: placed.device,
                network: placed.network.map(NicNetwork::Qnet),
                ip,
            });
        }
        if let Some(mut guest) = self.state.guests.get_mut(&pid) {
            guest.nics = assigned;
        }
    }

    /// Guests recorded before a restart: the dead are dropped, the living
    /// watched until they exit, server-mode ones dialed again.
    pub(super) fn adopt_guests(&mut self) {
        let pids: Vec<u32> = self.state.guests.keys().copied().collect();
        for pid in pids {
            let guest = &self.state.guests[&pid];
            if !guest.is_running() {
                tracing::info!(pid, "guest gone while the daemon was down");
                self.forget_guest(pid);
                continue;
            }
            follow::watch_exit(guest.process, self.inputs.clone());
            if let Some(path) = guest.qmp_server.clone() {
                let conn = self.new_conn();
                tokio::spawn(follow::follow_guest(
                    Origin::Server(path),
                    conn,
                    self.inputs.clone(),
                    None,
                    None,
                ));
            }
        }
        let known: Vec<_> = self
            .state
            .guests
            .values()
            .filter_map(|g| g.qmp_server.clone())
            .collect();
        self.state.attached.retain(|path| known.contains(path));
    }

    /// Deletes qnet macvtaps and TAPs whose QEMU is gone (left by a host
    /// crash or a killed reaper). In the background: an unmarked device
    /// is given a grace period first, which must not delay start-up.
    pub(super) fn remove_orphan_devices(&self) {
        tokio::task::spawn_blocking(|| match orphans::remove_orphans() {
            Ok(removed) => {
                for name in removed {
                    tracing::info!(device = %name, "removed orphaned qnet device");
                }
            }
            Err(e) => tracing::warn!("looking for orphaned qnet devices: {e}"),
        });
    }

    /// Starts following the QMP server socket `conn` was made for.
    pub(super) fn dial(&mut self, origin: Origin, attach: Option<follow::Attach>) {
        let conn = self.new_conn();
        tokio::spawn(follow::follow_guest(
            origin,
            conn,
            self.inputs.clone(),
            attach,
            None,
        ));
    }
}
