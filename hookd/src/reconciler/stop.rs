//! `qnetctl guest stop|powerdown`: which guest the caller means and may
//! stop, then a task that does it ([`crate::guest_stop`]) and answers.

use qnet_api::{ApiError, Grace, GuestRef, Reply, Response};
use tokio::sync::oneshot;

use super::{Peer, Reconciler};
use crate::error::{conflict, denied, invalid, not_found};
use crate::guest_stop::{self, How, Target};
use crate::qmp::QmpSession;
use crate::state::Guest;

impl Reconciler {
    /// Starts stopping the guest `wanted` names; the answer goes out on
    /// `reply` once QEMU is gone (or the stop failed).
    pub(super) fn guest_stop(
        &mut self,
        wanted: &GuestRef,
        powerdown: Option<Grace>,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    ) {
        let (qmp, target) = match self.stop_target(wanted, powerdown, peer) {
            Ok(found) => found,
            Err(e) => {
                let _ = reply.send(Response::Error(e));
                return;
            }
        };
        let how = match powerdown {
            Some(grace) => How::Powerdown(grace.duration()),
            None => How::Quit,
        };
        tracing::info!(
            pid = target.process.pid,
            uid = peer.uid,
            ?how,
            "stopping guest"
        );
        let pid = target.process.pid;
        let task = tokio::spawn(async move {
            let response = match guest_stop::run(qmp, target, how).await {
                Ok(message) => {
                    tracing::info!("{message}");
                    Response::Ok(Reply::Done { message })
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    Response::Error(e)
                }
            };
            let _ = reply.send(response);
        });
        if let (Some(session), Some(_)) =
            (self.sessions.values_mut().find(|s| s.pid == pid), powerdown)
        {
            session.powerdown = Some(task);
        }
    }

    /// The session and description of the guest to stop, or why not.
    fn stop_target(
        &self,
        wanted: &GuestRef,
        powerdown: Option<Grace>,
        peer: Peer,
    ) -> Result<(QmpSession, Target), ApiError> {
        let guest = self.guest_to_stop(wanted, peer)?;
        // Named by what the caller typed (checked: no control characters),
        // not by QEMU's own -name, which could hold anything.
        let target = Target {
            process: guest.process,
            label: format!("`{wanted}` (pid {})", guest.process.pid),
        };
        let Some(session) = self.sessions.values().find(|s| s.pid == target.process.pid) else {
            return Err(not_found(format!(
                "{}: qnet-hookd holds no QMP session of it (a libvirt guest stops with `virsh shutdown`; a QEMU that is reconnecting can be stopped once `qnetctl guests` shows it again)",
                target.label
            )));
        };
        if powerdown.is_some() && session.powerdown.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(conflict(format!(
                "{} is already powering down: `qnetctl guest stop {wanted}` quits it now",
                target.label
            )));
        }
        Ok((session.qmp.clone(), target))
    }

    /// The one followed guest that `wanted` names (by its name or a NIC's
    /// MAC) among those `peer` may stop: root's are all, a user's those
    /// whose QEMU runs under their uid.
    pub(super) fn guest_to_stop(&self, wanted: &GuestRef, peer: Peer) -> Result<&Guest, ApiError> {
        let mac = wanted.mac();
        let named: Vec<&Guest> = self
            .state
            .guests
            .values()
            .filter(|g| {
                g.name.as_deref() == Some(wanted.as_str())
                    || mac.is_some_and(|m| g.nics.iter().any(|n| n.mac == m))
            })
            .filter(|g| peer.is_root() || g.uid == peer.uid)
            .collect();
        match named.as_slice() {
            [guest] => Ok(guest),
            [] if peer.is_root() => Err(not_found(format!(
                "no running guest is named `{wanted}` or has that MAC (`qnetctl guests` lists them)"
            ))),
            [] => Err(denied(format!(
                "`{wanted}` is not one of your running guests: only root may stop other users' guests"
            ))),
            many => Err(invalid(format!(
                "{} running guests are named `{wanted}`: name one by a NIC's MAC (`qnetctl guests`)",
                many.len()
            ))),
        }
    }
}
