//! Control requests: one authorisation check for all of them, then
//! dispatch. Requests arrive decoded and typed (`qnet_api`): every value
//! in them was checked while it was read.

use qnet_api::{ApiError, Request, Response};
use tokio::sync::oneshot;

use super::libvirt::Registration;
use super::{Peer, Reconciler};
use crate::error::{denied, failed};
use crate::follow::{Attach, Origin};
use crate::forwards;

/// Who may do what, beyond root (who may do everything).
enum Allowed {
    Anyone,
    RootOnly(&'static str),
    /// Checked by [`Reconciler::authorize`] against the caller's guests.
    OwnGuest,
}

fn allowed(request: &Request) -> Allowed {
    match request {
        Request::Doctor { trace: true, .. } => {
            Allowed::RootOnly("trace packets through the firewall")
        }
        Request::Status
        | Request::Doctor { .. }
        | Request::Guests
        | Request::ReserveList { .. }
        | Request::ForwardList
        // The QEMU's own uid is checked once it is dialed.
        | Request::Attach { .. } => Allowed::Anyone,
        // Users' own networks: the handlers check owner and policy.
        Request::NetworkShow { .. }
        | Request::NetworkCreate { .. }
        | Request::NetworkEdit { .. }
        | Request::NetworkDelete { .. }
        | Request::NetworkLink { .. } => Allowed::Anyone,
        Request::NetworkUp { .. } => Allowed::RootOnly("bring networks up"),
        Request::Reload { .. } => Allowed::RootOnly("reload the configuration"),
        Request::NetworkDown { .. } => Allowed::RootOnly("take networks down"),
        Request::GuestRegister { .. } => Allowed::RootOnly("register libvirt guests"),
        Request::GuestUnregister { .. } => Allowed::RootOnly("unregister libvirt guests"),
        Request::ReserveAdd { .. } | Request::ReserveRm { .. } | Request::ForwardAdd { .. } | Request::ForwardRm { .. } => {
            Allowed::OwnGuest
        }
        Request::GuestStop { .. } => Allowed::OwnGuest,
    }
}

impl Reconciler {
    /// Handles a control request. Its reply goes out on `reply` once its
    /// change is durable and applied (later, from a task, for `attach` and
    /// `guest stop`).
    pub(super) async fn request(
        &mut self,
        request: Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    ) {
        if let Err(e) = self.authorize(&request, peer) {
            let _ = reply.send(Response::Error(e));
            return;
        }
        let result = match request {
            Request::Attach { qmp } => {
                self.dial(Origin::Server(qmp), Some(Attach { peer, reply }));
                return;
            }
            Request::GuestStop { guest, powerdown } => {
                self.guest_stop(&guest, powerdown, peer, reply);
                return;
            }
            request => self.dispatch(request, peer).await,
        };
        // Publish before answering: a client that was told "forwarding"
        // can connect at once.
        self.flush().await;
        let _ = reply.send(match result {
            Ok(r) => Response::Ok(r),
            Err(e) => Response::Error(e),
        });
    }

    /// The one place that says who may do what: root anything; anybody
    /// may look (replies show only their own); a user may change only
    /// what belongs to their own running guests, and forward host ports
    /// of 1024 and above only.
    fn authorize(&self, request: &Request, peer: Peer) -> Result<(), ApiError> {
        if peer.is_root() {
            return Ok(());
        }
        match allowed(request) {
            Allowed::Anyone => Ok(()),
            Allowed::RootOnly(what) => Err(denied(format!("only root may {what}"))),
            Allowed::OwnGuest => self.authorize_own(request, peer),
        }
    }

    fn authorize_own(&self, request: &Request, peer: Peer) -> Result<(), ApiError> {
        let own_macs = || self.state.macs_of(peer.uid);
        match request {
            Request::ReserveAdd { mac, .. } if !own_macs().contains(mac) => Err(denied(format!(
                "{mac} is not a NIC of one of your running guests: only root may reserve other MACs"
            ))),
            Request::ReserveRm { network, mac } => {
                let owned = self
                    .state
                    .reservations
                    .get(network)
                    .and_then(|t| t.get(mac))
                    .is_some_and(|r| r.owner_uid == Some(peer.uid));
                if owned || own_macs().contains(mac) {
                    Ok(())
                } else {
                    Err(denied(format!(
                        "{mac} is not a NIC of one of your guests: only root may remove other users' reservations"
                    )))
                }
            }
            Request::ForwardAdd { forward } if forward.ports.first() < 1024 => {
                Err(denied(format!(
                    "host port {} is privileged: only root may forward ports below 1024",
                    forward.ports.first()
                )))
            }
            Request::ForwardAdd { forward } => {
                let own = self.state.guests.values().filter(|g| g.uid == peer.uid);
                match forwards::target_nic(forward, own) {
                    Some(_) => Ok(()),
                    None => Err(denied(format!(
                        "`{}` is not one of your running guests: only root may forward to other guests",
                        forward.guest
                    ))),
                }
            }
            Request::ForwardRm {
                proto,
                host_port,
                host_addr,
            } => match self.find_forward(*proto, *host_port, *host_addr) {
                Ok(index) if self.state.forwards[index].owner_uid != peer.uid => Err(denied(
                    "that forward is not yours: only root may remove other users' forwards",
                )),
                _ => Ok(()),
            },
            Request::GuestStop { guest, .. } => self.guest_to_stop(guest, peer).map(|_| ()),
            _ => Ok(()),
        }
    }

    async fn dispatch(
        &mut self,
        request: Request,
        peer: Peer,
    ) -> Result<qnet_api::Reply, ApiError> {
        match request {
            Request::Status => Ok(self.status(peer).await),
            Request::Doctor { target, trace } => self.doctor(target.as_deref(), trace).await,
            Request::Guests => Ok(self.guest_list(peer)),
            Request::ReserveList { network } => self.reserve_list(network.as_ref(), peer),
            Request::ReserveAdd {
                network,
                mac,
                ip,
                name,
            } => self.reserve_add(&network, mac, ip, name, peer),
            Request::ReserveRm { network, mac } => self.reserve_rm(&network, mac),
            Request::NetworkUp { name } => self.ctl_network_up(&name, true, peer).await,
            Request::NetworkDown { name } => self.ctl_network_up(&name, false, peer).await,
            Request::NetworkCreate { name, settings } => {
                self.network_create(name, settings, peer).await
            }
            Request::NetworkEdit {
                name,
                set,
                unset,
                force,
            } => self.network_edit(name, set, unset, force, peer).await,
            Request::NetworkDelete { name, force } => self.network_delete(name, force, peer).await,
            Request::NetworkShow { name } => self.network_show(&name, peer),
            Request::NetworkLink {
                from,
                to,
                one_way,
                remove,
            } => self.network_link(from, to, one_way, remove, peer).await,
            Request::Reload { force } => self.reload(force).await,
            Request::ForwardAdd { forward } => self.forward_add(forward, peer).await,
            Request::ForwardRm {
                proto,
                host_port,
                host_addr,
            } => {
                let index = self.find_forward(proto, host_port, host_addr)?;
                self.forward_rm(index, peer).await
            }
            Request::ForwardList => Ok(self.forward_list(peer)),
            Request::GuestRegister {
                name,
                uuid,
                nics,
                forwards,
                pid,
            } => {
                let registration = Registration {
                    name,
                    uuid,
                    nics,
                    forwards,
                    pid,
                };
                self.guest_register(registration, peer).await
            }
            Request::GuestUnregister { uuid } => self.guest_unregister(&uuid),
            // Answered by a task of their own (see `request`); never get here.
            Request::Attach { .. } | Request::GuestStop { .. } => Err(failed(
                "attach and guest stop are answered by a task of their own",
            )),
        }
    }
}
