//! Networks as live objects: a new configuration, from a reload (SIGHUP,
//! `qnetctl reload`) or from one of the `qnetctl network` verbs
//! (`netverbs`), made the running one.
//!
//! Every change is a new set of config files ([`ConfigFiles`]), validated
//! whole exactly as at start, then planned as one diff ([`diff`]) and
//! checked (a subnet moving under reservations or guests needs `force`)
//! before anything is touched. A run-time network's file is written
//! durably before the change is applied (persist first); if the system
//! refuses the change, the old file is put back and the old networks
//! re-applied, so a refused change leaves nothing half-done. Networks the
//! diff does not name are not touched at all.

use std::path::Path;

use ipnet::Ipv4Net;
use qnet_api::{ApiError, NetName, Reply};

use super::networks::{bring_down, bring_up, done};
use super::users::departed_owners;
use super::{NetworkRuntime, Reconciler};
use crate::config::diff::{self, Change, NetworkDiff};
use crate::config::{self, runtime, Config, ConfigFiles, NetworkConfig, RuntimeFile};
use crate::error::{conflict, failed, invalid, storage};
use crate::{dnsmasq, network};

/// A new configuration, checked and planned, not applied yet.
struct Plan {
    config: Config,
    files: ConfigFiles,
    diff: NetworkDiff,
}

impl Reconciler {
    /// Re-reads hookd.toml and the run-time networks and applies what
    /// changed. A refused configuration leaves the running one as it is.
    pub(super) async fn reload(&mut self, force: bool) -> Result<Reply, ApiError> {
        let result = self.try_reload(force).await;
        match &result {
            Ok(message) => tracing::info!("reload: {message}"),
            Err(e) => tracing::error!("reload refused, the running configuration stays: {e}"),
        }
        result.map(done)
    }

    async fn try_reload(&mut self, force: bool) -> Result<String, ApiError> {
        crate::ctl::set_group(&self.paths.ctl_socket);
        let mut files = ConfigFiles::read(&self.paths.config).map_err(config_refused)?;
        let mut config = files.parse().map_err(config_refused)?;
        let departed = departed_owners(&config);
        if !departed.is_empty() {
            for (_, path) in &departed {
                files = files.with_runtime(path, None);
            }
            // Read again without their networks (what linked to one of
            // them is refused now, say).
            config = files.parse().map_err(config_refused)?;
        }
        let plan = self.plan_parsed(files, config, force).await?;
        let summary = summary(&plan.diff);
        // Persist first: a departed user's networks are gone for good
        // before they are taken down.
        for (name, path) in &departed {
            tracing::info!(network = %name, "its owner left group `{}`: deleting it", crate::ctl::CTL_GROUP);
            runtime::remove(path).map_err(|e| {
                storage(format!(
                    "cannot remove {}: {e}; nothing was changed",
                    path.display()
                ))
            })?;
        }
        self.apply(plan).await?;
        for (name, _) in &departed {
            self.forget_network(name);
        }
        Ok(format!("{}: {summary}", self.paths.config.display()))
    }

    /// Writes (or removes, with `None`) the run-time network file at
    /// `path` and applies the configuration it makes; on any refusal the
    /// old file and networks are back as they were.
    pub(super) async fn change_runtime_file(
        &mut self,
        path: &Path,
        text: Option<String>,
        force: bool,
    ) -> Result<String, ApiError> {
        let files = self.files.with_runtime(path, text.clone());
        let plan = self.plan(files, force).await?;
        let summary = summary(&plan.diff);
        let old = self.files.runtime.iter().find(|f| f.path == path).cloned();
        let written = match &text {
            Some(text) => runtime::write(&RuntimeFile {
                path: path.to_path_buf(),
                text: text.clone(),
            }),
            None => runtime::remove(path),
        };
        written.map_err(|e| {
            storage(format!(
                "cannot write {}: {e}; nothing was changed: fix the directory and retry",
                path.display()
            ))
        })?;
        let previous = self.files.clone();
        if let Err(e) = self.apply(plan).await {
            self.roll_back(path, old, previous).await;
            return Err(e);
        }
        Ok(summary)
    }

    /// Puts the file at `path` back to `old` and the networks back to
    /// `previous`, after a change the system refused.
    async fn roll_back(&mut self, path: &Path, old: Option<RuntimeFile>, previous: ConfigFiles) {
        let restored = match &old {
            Some(file) => runtime::write(file),
            None => runtime::remove(path),
        };
        if let Err(e) = restored {
            tracing::error!("putting {} back: {e}", path.display());
        }
        match self.plan(previous, true).await {
            Ok(plan) => {
                if let Err(e) = self.apply(plan).await {
                    tracing::error!("restoring the networks after a refused change: {e}");
                }
            }
            Err(e) => tracing::error!("restoring the networks after a refused change: {e}"),
        }
    }

    /// Checks a new configuration against the running one and plans it,
    /// touching nothing.
    async fn plan(&mut self, files: ConfigFiles, force: bool) -> Result<Plan, ApiError> {
        let config = files.parse().map_err(config_refused)?;
        self.plan_parsed(files, config, force).await
    }

    /// [`Self::plan`] of `files` already parsed into `config`.
    async fn plan_parsed(
        &mut self,
        files: ConfigFiles,
        config: Config,
        force: bool,
    ) -> Result<Plan, ApiError> {
        self.refuse_silent_teardown(&config)
            .map_err(|e| invalid(e.to_string()))?;
        let wanted = self.wanted_networks(&config).await?;
        config::check_overlaps(&wanted).map_err(|(index, problem)| {
            invalid(format!(
                "network `{}`: `subnet`: {problem}",
                wanted[index].name
            ))
        })?;
        let current: Vec<NetworkConfig> =
            self.networks.values().map(|n| n.config.clone()).collect();
        let paths = self.dnsmasq_paths();
        let conf = |n: &NetworkConfig| {
            (n.addressing.as_ref()).map(|own| dnsmasq::render_config(n, own, &paths, false))
        };
        let diff = diff::diff(&current, &wanted, |a, b| conf(a) != conf(b));
        if !force {
            self.refuse_moving_subnets(&diff)?;
        }
        Ok(Plan {
            config,
            files,
            diff,
        })
    }

    /// The networks `config` asks for, with the default network when it
    /// does.
    pub(super) async fn wanted_networks(
        &mut self,
        config: &Config,
    ) -> Result<Vec<NetworkConfig>, ApiError> {
        let mut wanted = config.networks.clone();
        if config.use_default_network {
            let subnet = self.default_subnet().await?;
            wanted.push(Config::default_network(subnet));
        }
        Ok(wanted)
    }

    /// A subnet that moves under reservations or running guests would
    /// leave them with addresses of the old one: only with `force`.
    fn refuse_moving_subnets(&self, diff: &NetworkDiff) -> Result<(), ApiError> {
        let shown = |n: &NetworkConfig| {
            n.subnet()
                .map_or_else(|| "the LAN".into(), |s| s.to_string())
        };
        for (old, new, _) in &diff.changed {
            if old.subnet() == new.subnet() {
                continue;
            }
            let reservations = self
                .state
                .reservations
                .get(&old.name)
                .map_or(0, |r| r.len());
            let guests = self.state.guests_on(&old.name);
            if reservations + guests > 0 {
                return Err(conflict(format!(
                    "network `{}`: moving it from {} to {} would strand {reservations} reservation(s) and {guests} running guest(s): \
                     use --force (reservations outside the new subnet are dropped; guests get new addresses when they renew)",
                    old.name,
                    shown(old),
                    shown(new)
                )));
            }
        }
        Ok(())
    }

    /// Makes the world follow a plan: networks removed, changed as little
    /// as their change needs, added; then the rules in one transaction.
    async fn apply(&mut self, plan: Plan) -> Result<(), ApiError> {
        let Plan {
            config,
            files,
            diff,
        } = plan;
        let mut failures = Vec::new();
        for net in &diff.removed {
            self.remove_network(net).await;
        }
        for (old, new, change) in diff.changed {
            if let Err(e) = self.change_network(&old, new, change).await {
                failures.push(e.to_string());
            }
        }
        for net in diff.added {
            let name = net.name.clone();
            self.insert_network(net);
            if !self.state.networks_down.contains(&name) {
                if let Err(e) = self.network_up(&name).await {
                    failures.push(e.to_string());
                }
            }
        }
        self.files = files;
        self.origins = config.origins;
        self.user_policy = config.user_networks;
        self.config_forwards = config.forwards;
        self.limits = config.limits;
        self.qmp_sessions
            .set_per_uid(config.limits.qmp_sessions_per_user);
        self.integration = config.integration;
        self.sync_user_acls();
        self.set_aside_clashing_forwards();
        let rules = self.apply_rules().await;
        self.dirty.all();
        if let Err(e) = rules {
            failures.push(e.to_string());
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failed(failures.join("; ")))
        }
    }

    /// Redoes network `old` as `new`, as much as `change` needs.
    async fn change_network(
        &mut self,
        old: &NetworkConfig,
        new: NetworkConfig,
        change: Change,
    ) -> Result<(), crate::error::DaemonError> {
        let name = new.name.clone();
        self.drop_reservations_outside(&name, new.subnet());
        let Some(runtime) = self.networks.get_mut(&name) else {
            return Ok(());
        };
        runtime.config = new.clone();
        if !runtime.up {
            return Ok(());
        }
        if change >= Change::Dnsmasq {
            if let Some(handle) = runtime.dnsmasq.take() {
                handle.stop().await;
            }
        }
        let failed = crate::error::DaemonError::network(&name);
        if change == Change::Recreate && (old.is_lan() || new.is_lan()) {
            // A LAN network's uplink goes back before it is taken over
            // again (or given to another network).
            bring_down(old, &self.paths.state_dir).await?;
        } else if change == Change::Recreate {
            network::readdress(old, &new).await.map_err(failed)?;
        }
        // Brings up what is missing (dnsmasq, sysctls) and records the
        // new config as the one the network runs with.
        if change >= Change::Dnsmasq {
            self.network_up(&name).await
        } else {
            bring_up(&new, &self.paths.state_dir).await?;
            self.state.known_networks.insert(name, new);
            self.dirty.state = true;
            Ok(())
        }
    }

    /// Takes a network that is no longer configured away: its dnsmasq,
    /// bridge and run directory. Its reservations stay (the network may
    /// come back), unless `network delete` removes them.
    pub(super) async fn remove_network(&mut self, net: &NetworkConfig) {
        tracing::info!(network = %net.name, "no longer configured: removing it");
        if let Some(runtime) = self.networks.remove(&net.name) {
            if let Some(handle) = runtime.dnsmasq {
                handle.stop().await;
            }
        }
        if let Err(e) = bring_down(net, &self.paths.state_dir).await {
            tracing::warn!(network = %net.name, "removing: {e}");
        }
        dnsmasq::remove_stale(net.name.as_str(), &self.dnsmasq_paths()).await;
        self.state.known_networks.remove(&net.name);
        self.dirty.state = true;
    }

    pub(super) fn insert_network(&mut self, config: NetworkConfig) {
        self.networks.insert(
            config.name.clone(),
            NetworkRuntime {
                config,
                up: false,
                dnsmasq: None,
            },
        );
    }

    /// After `--force` moved a network's subnet: its reservations outside
    /// the new one cannot be served any more.
    fn drop_reservations_outside(&mut self, name: &NetName, subnet: Option<Ipv4Net>) {
        if self.state.reservations.contains_key(name) {
            let mut reservations = self.state.reservations.table_mut(name);
            let before = reservations.len();
            reservations.retain(|_, r| subnet.is_some_and(|s| s.contains(&r.ip)));
            if reservations.len() != before {
                let dropped = before - reservations.len();
                match subnet {
                    Some(subnet) => {
                        tracing::warn!(network = %name, dropped, "dropped reservations outside the new subnet {subnet}")
                    }
                    None => {
                        tracing::warn!(network = %name, dropped, "dropped reservations: the network is bridged now, on the LAN's addresses")
                    }
                }
                self.dirty.state = true;
            }
        }
    }

    /// Removes the reservations of a deleted network and the forwards
    /// that name it, durably; returns how many of each.
    pub(super) fn forget_network(&mut self, name: &NetName) -> (usize, usize) {
        let reservations = self
            .state
            .reservations
            .remove_network(name)
            .map_or(0, |r| r.len());
        let before = self.state.forwards.len();
        self.state
            .forwards
            .retain(|f| f.spec.network.as_deref() != Some(name.as_str()));
        let forwards = before - self.state.forwards.len();
        self.state.networks_down.remove(name);
        self.dirty.all();
        (reservations, forwards)
    }
}

fn config_refused(e: config::ConfigError) -> ApiError {
    invalid(e.to_string())
}

/// "added a, b; changed c; removed d", or "nothing changed".
fn summary(diff: &NetworkDiff) -> String {
    let names = |nets: Vec<&NetworkConfig>| {
        nets.iter()
            .map(|n| n.name.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = Vec::new();
    if !diff.added.is_empty() {
        parts.push(format!("added {}", names(diff.added.iter().collect())));
    }
    if !diff.changed.is_empty() {
        let changed = diff.changed.iter().map(|(_, new, _)| new).collect();
        parts.push(format!("changed {}", names(changed)));
    }
    if !diff.removed.is_empty() {
        parts.push(format!("removed {}", names(diff.removed.iter().collect())));
    }
    if parts.is_empty() {
        "no network changed".into()
    } else {
        parts.join("; ")
    }
}
