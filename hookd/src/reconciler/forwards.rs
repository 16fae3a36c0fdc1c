//! Port forwards: what users declared (hookd.toml, qnetctl, the libvirt
//! hook) and the nft map elements installed for it.
//!
//! Adding or removing one run-time forward writes its own file and changes
//! its own elements only, so its cost does not depend on how many exist.
//! Every other change recomputes the elements that should exist and
//! changes only the difference.

use std::collections::BTreeSet;
use std::net::IpAddr;

use qnet_api::{ApiError, ForwardInfo, ForwardSpec, GuestUuid, Proto, Reply};

use super::networks::done;
use super::{plan, Peer, Reconciler};
use crate::error::{conflict, denied, not_found};
use crate::firewall::{ElementReport, ForwardElement};
use crate::forwards;
use crate::hostports;
use crate::state::{Forward, Guest};

/// A declared forward, wherever it was declared.
pub(super) struct Declared<'a> {
    pub spec: &'a ForwardSpec,
    /// `config`, `runtime` or `libvirt`, as `forward list` shows it.
    pub origin: &'static str,
    /// Who added it at run time; `None` for hookd.toml's.
    pub owner_uid: Option<u32>,
    /// The UUID of the libvirt domain that declares it.
    pub libvirt: Option<&'a GuestUuid>,
}

impl Reconciler {
    /// Every forward declared, from the file and from requests.
    pub(super) fn declared(&self) -> impl Iterator<Item = Declared<'_>> {
        let config = self.config_forwards.iter().map(|spec| Declared {
            spec,
            origin: "config",
            owner_uid: None,
            libvirt: None,
        });
        let runtime = self.state.forwards.iter().map(|f| Declared {
            spec: &f.spec,
            origin: if f.libvirt.is_some() {
                "libvirt"
            } else {
                "runtime"
            },
            owner_uid: Some(f.owner_uid),
            libvirt: f.libvirt.as_ref(),
        });
        config.chain(runtime)
    }

    /// Run-time forwards saved before that clash with hookd.toml's (or
    /// with an earlier saved one) are dropped at start, and said so: the
    /// admin's file wins, and one port never goes to two guests.
    pub(super) fn set_aside_clashing_forwards(&mut self) {
        let runtime: Vec<ForwardSpec> =
            self.state.forwards.iter().map(|f| f.spec.clone()).collect();
        let lost = plan::clashes(&self.config_forwards, &runtime);
        if lost.is_empty() {
            return;
        }
        for (index, winner) in &lost {
            let f = &self.state.forwards[*index];
            tracing::warn!(
                "run-time forward {} to `{}` clashes with the forward {} to `{}`, which wins: removing the run-time one",
                f.spec.ports_text(),
                f.spec.guest,
                winner.ports_text(),
                winner.guest
            );
        }
        let mut index = 0;
        self.state.forwards.retain(|_| {
            index += 1;
            !lost.contains_key(&(index - 1))
        });
        self.dirty.state = true;
    }

    /// The forward map elements that must exist now.
    pub(super) fn desired_elements(&self) -> BTreeSet<ForwardElement> {
        self.elements_of(self.declared().map(|d| d.spec))
    }

    /// The elements `specs` need now (a subset of [`Self::desired_elements`]).
    fn elements_of<'a>(
        &self,
        specs: impl IntoIterator<Item = &'a ForwardSpec>,
    ) -> BTreeSet<ForwardElement> {
        let guests: Vec<&Guest> = self.state.guests.values().collect();
        plan::desired_elements(specs, &guests, &self.networks_up())
    }

    pub(super) async fn forward_add(
        &mut self,
        spec: ForwardSpec,
        peer: Peer,
    ) -> Result<Reply, ApiError> {
        if let Some(net) = &spec.network {
            if self.networks.contains_key(net.as_str()) || !self.is_libvirt_network(net) {
                self.network_for(net, peer)?;
            }
            if self
                .networks
                .get(net.as_str())
                .is_some_and(|n| n.config.is_lan())
            {
                return Err(crate::error::invalid(crate::config::lan_forward(net)));
            }
        }
        if let Some(other) = self.declared().find(|d| d.spec.overlaps(&spec)) {
            if other.spec == &spec {
                return Ok(done(format!(
                    "{} to {} is already forwarded",
                    spec.ports_text(),
                    spec.guest
                )));
            }
            return Err(conflict(format!(
                "{} is taken by guest `{}` ({} forward {})",
                spec.ports_text(),
                other.spec.guest,
                other.origin,
                other.spec.ports_text()
            )));
        }
        for port in spec.ports.first()..=spec.ports.last() {
            if let Some(owner) = hostports::host_listener(spec.proto, port) {
                return Err(conflict(format!(
                    "{}/{port} is taken by a host socket of {owner}: stop it or pick another port",
                    spec.proto
                )));
            }
        }
        let text = format!("{} to {}", spec.ports_text(), spec.guest);
        let forward = Forward {
            spec,
            owner_uid: peer.uid,
            libvirt: None,
        };
        self.state.forwards.push(forward.clone());
        self.commit(|state| {
            state.forwards.pop();
        })?;
        let elements = self.elements_of([&forward.spec]);
        self.install(elements).await;
        Ok(done(format!("forwarding {text}")))
    }

    pub(super) async fn forward_rm(
        &mut self,
        index: usize,
        _peer: Peer,
    ) -> Result<Reply, ApiError> {
        // Its elements, worked out while it is still declared (no other
        // forward can map the same keys: overlaps are refused).
        let elements = self.elements_of([&self.state.forwards[index].spec]);
        let removed = self.state.forwards.remove(index);
        let back = removed.clone();
        self.commit(move |state| state.forwards.insert(index, back))?;
        self.uninstall(elements).await;
        Ok(done(format!(
            "removed the forward of {} to {}",
            removed.spec.ports_text(),
            removed.spec.guest
        )))
    }

    /// The run-time forward `forward rm` names, or why there is none.
    pub(super) fn find_forward(
        &self,
        proto: Proto,
        port: u16,
        addr: Option<IpAddr>,
    ) -> Result<usize, ApiError> {
        let found = self.state.forwards.iter().position(|f| {
            f.spec.proto == proto
                && f.spec.ports.contains(port)
                && (addr.is_none() || f.spec.host_addr == addr)
        });
        found.ok_or_else(|| {
            let in_config = self
                .config_forwards
                .iter()
                .any(|f| f.proto == proto && f.ports.contains(port));
            if in_config {
                denied(format!(
                    "{proto}/{port} is forwarded by {}: remove it there",
                    self.paths().config.display()
                ))
            } else {
                not_found(format!("no forward of {proto}/{port}"))
            }
        })
    }

    /// Every forward the caller may see, with the guest address it goes to
    /// while it is installed, or why it is not in force.
    pub(super) fn forward_list(&self, peer: Peer) -> Reply {
        let guests: Vec<&Guest> = self.state.guests.values().collect();
        let forwards = self
            .declared()
            .filter(|d| peer.is_root() || d.owner_uid == Some(peer.uid))
            .map(|d| {
                let elements = self.elements_of([d.spec]);
                let refused = elements.iter().find_map(|e| self.refused.get(e));
                let installed =
                    !elements.is_empty() && elements.iter().all(|e| self.installed.contains(e));
                let inactive = match (refused, installed) {
                    (Some(why), _) => Some(why.clone()),
                    (None, true) => None,
                    (None, false) if elements.is_empty() => Some("the guest is not running".into()),
                    (None, false) => Some("not installed".into()),
                };
                ForwardInfo {
                    forward: d.spec.clone(),
                    origin: d.origin.to_string(),
                    guest_addr: installed
                        .then(|| forwards::target_nic(d.spec, guests.iter().copied()))
                        .flatten()
                        .and_then(|nic| nic.ip)
                        .map(IpAddr::V4),
                    inactive,
                }
            })
            .collect();
        Reply::Forwards { forwards }
    }

    /// Brings the installed elements to the desired set, changing only the
    /// difference.
    pub(super) async fn sync_forwards(&mut self) {
        // Forwards to guests on libvirt networks follow their leases: the
        // set of lease files to watch changes with the same events.
        self.update_lease_watch();
        let desired = self.desired_elements();
        let stale: BTreeSet<ForwardElement> =
            self.installed.difference(&desired).copied().collect();
        self.uninstall(stale).await;
        self.refused.retain(|e, _| desired.contains(e));
        self.install(desired).await;
        // Forwards into libvirt's networks need an accept in its chain.
        if self.libvirt_forwards() != self.peers_opened.libvirt {
            self.sync_peers().await;
        }
    }

    /// Adds the elements of `elements` that are not installed yet. The
    /// kernel may refuse some (a key taken by another guest); the others
    /// go in regardless, and each refusal is kept for `forward list`.
    async fn install(&mut self, elements: BTreeSet<ForwardElement>) {
        let new: Vec<ForwardElement> = elements
            .difference(&self.installed)
            .filter(|e| !self.refused.contains_key(e))
            .copied()
            .collect();
        if new.is_empty() {
            return;
        }
        match self.firewall.add_elements(&new).await {
            Ok(report) => self.record(report, true),
            Err(e) => {
                tracing::warn!("adding {} forward(s): {e}", new.len());
                for element in new {
                    self.refused.insert(element, e.to_string());
                }
            }
        }
    }

    /// Removes the installed elements of `elements`.
    async fn uninstall(&mut self, elements: BTreeSet<ForwardElement>) {
        let stale: Vec<ForwardElement> = elements.intersection(&self.installed).copied().collect();
        for element in &elements {
            self.refused.remove(element);
        }
        if stale.is_empty() {
            return;
        }
        match self.firewall.remove_elements(&stale).await {
            Ok(report) => self.record(report, false),
            Err(e) => tracing::warn!("removing {} forward(s): {e}", stale.len()),
        }
    }

    /// Tracks exactly what the kernel did with each element.
    fn record(&mut self, report: ElementReport, added: bool) {
        for element in report.changed {
            if added {
                self.installed.insert(element);
            } else {
                self.installed.remove(&element);
            }
        }
        for refused in report.refused {
            tracing::warn!("forward {}: {refused}", refused.element);
            if added {
                self.refused.insert(refused.element, refused.to_string());
            }
        }
    }
}
