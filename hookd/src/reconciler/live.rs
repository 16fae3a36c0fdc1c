//! Networks as live objects: reload (SIGHUP, `qnetctl reload`) and the
//! run-time networks of `qnetctl network create/edit/delete/show`.
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
use qnet_api::{ApiError, ErrorKind, NetName, NetworkInfo, Reply, Settings};

use super::networks::done;
use super::{NetworkRuntime, Peer, Reconciler};
use crate::config::diff::{self, Change, NetworkDiff};
use crate::config::policy;
use crate::config::{self, runtime, Config, ConfigFiles, NetworkConfig, RuntimeFile};
use crate::error::{conflict, denied, invalid, not_found};
use crate::{dnsmasq, network, subnet, useracl};

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
        let departed = departed_owners(&files.parse().map_err(config_refused)?);
        for (_, path) in &departed {
            files = files.with_runtime(path, None);
        }
        let plan = self.plan(files, force).await?;
        let summary = summary(&plan.diff);
        // Persist first: a departed user's networks are gone for good
        // before they are taken down.
        for (name, path) in &departed {
            tracing::info!(network = %name, "its owner left group `{}`: deleting it", crate::ctl::CTL_GROUP);
            runtime::remove(path).map_err(|e| {
                ApiError::new(
                    ErrorKind::Storage,
                    format!("cannot remove {}: {e}; nothing was changed", path.display()),
                )
            })?;
        }
        self.apply(plan).await?;
        for (name, _) in &departed {
            self.forget_network(name);
        }
        Ok(format!("{}: {summary}", self.paths.config.display()))
    }

    /// `network create`: by root, an admin's network; by a member of
    /// group qnet, a network of their own, within `[user-networks]`.
    pub(super) async fn network_create(
        &mut self,
        name: NetName,
        settings: Settings,
        peer: Peer,
    ) -> Result<Reply, ApiError> {
        if self.networks.contains_key(&name) {
            return Err(conflict(format!(
                "network `{name}` exists already: pick another name{}",
                if peer.is_root() {
                    format!(" ({})", self.where_configured(&name))
                } else {
                    String::new()
                }
            )));
        }
        let mut table = toml::Table::new();
        table.insert("name".into(), toml::Value::String(name.to_string()));
        set_keys(&mut table, settings)?;
        let owner = (!peer.is_root()).then_some(peer.uid);
        if let Some(uid) = owner {
            // The default mode (nat) only if the policy allows it.
            if !table.contains_key("mode") && !self.user_policy.modes.contains("nat") {
                if let Some(mode) = self.user_policy.modes.iter().next() {
                    table.insert("mode".into(), toml::Value::String(mode.clone()));
                }
            }
            self.user_policy.check_keys(&table).map_err(denied)?;
            self.user_policy
                .may_create(self.owned_by(uid))
                .map_err(|m| ApiError::new(ErrorKind::Exhausted, m))?;
            let bridge = policy::user_bridge(uid, name.as_str());
            table.insert("bridge".into(), toml::Value::String(bridge));
            table.insert("owner".into(), toml::Value::Integer(i64::from(uid)));
        }
        self.resolve_auto_subnet(&mut table, None, owner).await?;
        let path = runtime::file_in(&self.files.runtime_dir(), name.as_str());
        self.change_runtime_file(&path, Some(runtime::render(&table)), false)
            .await?;
        let net = &self.network(&name)?.config;
        let mut message = format!(
            "network `{name}` created: {} network on bridge {}, {} (router {})",
            net.mode, net.bridge, net.subnet, net.router
        );
        if owner.is_some() {
            message.push_str(&self.user_acl_note(peer.uid, &net.bridge));
        } else {
            message.push_str(&format!(", saved in {}", path.display()));
        }
        Ok(done(message))
    }

    /// `network edit`: root, or the network's owner within the policy.
    pub(super) async fn network_edit(
        &mut self,
        name: NetName,
        set: Settings,
        unset: Vec<String>,
        force: bool,
        peer: Peer,
    ) -> Result<Reply, ApiError> {
        let current = self.network_for(&name, peer)?.config.subnet;
        let file = self.runtime_file(&name, "edit")?;
        let mut table: toml::Table = toml::from_str(&file.text)
            .map_err(|e| invalid(format!("{}: {}", file.path.display(), e.message())))?;
        let mut changes = toml::Table::new();
        set_keys(&mut changes, set)?;
        for key in &unset {
            changes.insert(key.clone(), toml::Value::Boolean(false));
        }
        if !peer.is_root() {
            self.user_policy.check_keys(&changes).map_err(denied)?;
        }
        for key in &unset {
            if key == "name" || key == "subnet" {
                return Err(invalid(format!(
                    "`{key}` cannot be unset: a network needs one"
                )));
            }
            changes.remove(key);
            table.remove(key);
        }
        table.extend(changes);
        let owner = table
            .get("owner")
            .and_then(toml::Value::as_integer)
            .and_then(|o| u32::try_from(o).ok());
        self.resolve_auto_subnet(&mut table, Some(current), owner)
            .await?;
        let text = runtime::render(&table);
        if text == file.text {
            return Ok(done(format!("network `{name}`: nothing to change")));
        }
        let summary = self
            .change_runtime_file(&file.path, Some(text), force)
            .await?;
        Ok(done(format!("network `{name}` changed: {summary}")))
    }

    /// `network delete`: root, or the network's owner.
    pub(super) async fn network_delete(
        &mut self,
        name: NetName,
        force: bool,
        peer: Peer,
    ) -> Result<Reply, ApiError> {
        self.network_for(&name, peer)?;
        let file = self.runtime_file(&name, "delete")?;
        let guests = self.state.guests_on(&name);
        if guests > 0 && !force {
            return Err(conflict(format!(
                "network `{name}` has {guests} running guest(s): stop them first, or use --force (they lose their network)"
            )));
        }
        self.change_runtime_file(&file.path, None, force).await?;
        let (reservations, forwards) = self.forget_network(&name);
        Ok(done(format!(
            "network `{name}` deleted, with {reservations} reservation(s) and {forwards} forward(s) of it"
        )))
    }

    /// `network link FROM TO [--one-way]` and `network unlink`: an edit
    /// of FROM's `connect-to` lists. A user links only networks they own.
    pub(super) async fn network_link(
        &mut self,
        from: NetName,
        to: NetName,
        one_way: bool,
        remove: bool,
        peer: Peer,
    ) -> Result<Reply, ApiError> {
        self.network_for(&from, peer)?;
        self.network_for(&to, peer)?;
        if !peer.is_root() && self.network(&to)?.config.owner != Some(peer.uid) {
            return Err(denied(format!(
                "network `{to}` is not yours: only root may link to the admin's networks"
            )));
        }
        let file = self.runtime_file(&from, "link")?;
        let mut table: toml::Table = toml::from_str(&file.text)
            .map_err(|e| invalid(format!("{}: {}", file.path.display(), e.message())))?;
        for key in [LINK_KEY, LINK_ONE_WAY_KEY] {
            remove_from_list(&mut table, key, to.as_str());
        }
        if !remove {
            let key = if one_way { LINK_ONE_WAY_KEY } else { LINK_KEY };
            let list = table
                .entry(key)
                .or_insert_with(|| toml::Value::Array(Vec::new()));
            if let toml::Value::Array(items) = list {
                items.push(toml::Value::String(to.to_string()));
            }
        }
        let text = runtime::render(&table);
        if text == file.text {
            return Ok(done(format!("network `{from}`: nothing to change")));
        }
        self.change_runtime_file(&file.path, Some(text), false)
            .await?;
        Ok(done(match (remove, one_way) {
            (true, _) => format!("`{from}` and `{to}` are no longer linked"),
            (false, true) => format!("guests of `{from}` may connect to guests of `{to}`"),
            (false, false) => format!("guests of `{from}` and `{to}` may connect to each other"),
        }))
    }

    pub(super) fn network_show(&self, name: &NetName, peer: Peer) -> Result<Reply, ApiError> {
        let runtime = self.network_for(name, peer)?;
        let origin = self.files_origin(name);
        let enabled = self.integration.enabled(name);
        Ok(Reply::Network {
            network: NetworkInfo {
                name: name.to_string(),
                up: runtime.up,
                file: origin.map(|o| config::Place(o).to_string()),
                settings: config::show::settings(&runtime.config, enabled, origin),
            },
        })
    }

    /// Writes the bridge helper's ACL files of users' networks (see
    /// [`useracl`]). Failures are logged: the networks work, only their
    /// users' QEMUs cannot attach until root allows the bridge.
    pub(super) fn sync_user_acls(&mut self) {
        let bridges: Vec<(u32, String)> = self
            .networks
            .values()
            .filter_map(|n| Some((n.config.owner?, n.config.bridge.to_string())))
            .collect();
        let dir = self.paths.run_dir.join("users");
        match useracl::write(&dir, &useracl::render(&dir, &bridges)) {
            Ok(refused) => {
                for (uid, why) in &refused {
                    if self.acl_refused.get(uid) != Some(why) {
                        tracing::warn!(uid, "no bridge ACL file for this user: {why}");
                    }
                }
                self.acl_refused = refused.into_iter().collect();
            }
            Err(e) => tracing::error!(
                "writing the users' bridge ACL files in {}: {e}",
                dir.display()
            ),
        }
    }

    /// What a user who created a network needs to know to attach to it.
    fn user_acl_note(&self, uid: u32, bridge: &str) -> String {
        let top = self.paths.run_dir.join("users").join(useracl::TOP_FILE);
        match self.acl_refused.get(&uid) {
            None => format!(
                "; your QEMU may attach to it with qnet-bridge-helper (--br={bridge}) where /etc/qemu/bridge.conf has `include {}`",
                top.display()
            ),
            Some(why) => format!(
                "; but {why}, so qnet cannot allow the bridge for you alone: ask root to add `allow {bridge}` for you to /etc/qemu/bridge.conf"
            ),
        }
    }

    /// How many networks user `uid` owns.
    fn owned_by(&self, uid: u32) -> usize {
        self.networks
            .values()
            .filter(|n| n.config.owner == Some(uid))
            .count()
    }

    /// Writes (or removes, with `None`) the run-time network file at
    /// `path` and applies the configuration it makes; on any refusal the
    /// old file and networks are back as they were.
    async fn change_runtime_file(
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
            ApiError::new(
                ErrorKind::Storage,
                format!(
                    "cannot write {}: {e}; nothing was changed: fix the directory and retry",
                    path.display()
                ),
            )
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
        let diff = diff::diff(&current, &wanted, |a, b| {
            dnsmasq::render_config(a, &paths, false) != dnsmasq::render_config(b, &paths, false)
        });
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
        for (old, new, _) in &diff.changed {
            if old.subnet == new.subnet {
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
                    old.name, old.subnet, new.subnet
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
            Err(ApiError::new(ErrorKind::Failed, failures.join("; ")))
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
        self.drop_reservations_outside(&name, new.subnet);
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
        if change == Change::Recreate {
            network::readdress(old, &new).await.map_err(|source| {
                crate::error::DaemonError::Network {
                    network: name.to_string(),
                    source,
                }
            })?;
        }
        // Brings up what is missing (dnsmasq, sysctls) and records the
        // new config as the one the network runs with.
        if change >= Change::Dnsmasq {
            self.network_up(&name).await
        } else {
            network::bring_up(&new)
                .await
                .map_err(|source| crate::error::DaemonError::Network {
                    network: name.to_string(),
                    source,
                })?;
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
        if let Err(e) = network::bring_down(net).await {
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
    fn drop_reservations_outside(&mut self, name: &NetName, subnet: Ipv4Net) {
        if let Some(reservations) = self.state.reservations.get_mut(name) {
            let before = reservations.len();
            reservations.retain(|_, r| subnet.contains(&r.ip));
            if reservations.len() != before {
                tracing::warn!(network = %name, dropped = before - reservations.len(), "dropped reservations outside the new subnet {subnet}");
                self.dirty.state = true;
            }
        }
    }

    /// Removes the reservations of a deleted network and the forwards
    /// that name it, durably; returns how many of each.
    fn forget_network(&mut self, name: &NetName) -> (usize, usize) {
        let reservations = self.state.reservations.remove(name).map_or(0, |r| r.len());
        let before = self.state.forwards.len();
        self.state
            .forwards
            .retain(|f| f.spec.network.as_deref() != Some(name.as_str()));
        let forwards = before - self.state.forwards.len();
        self.state.networks_down.remove(name);
        self.dirty.all();
        (reservations, forwards)
    }

    /// The run-time file of network `name`, which `what` (edit, delete)
    /// needs: hookd.toml's networks and the default network are the
    /// admin's.
    fn runtime_file(&self, name: &NetName, what: &str) -> Result<RuntimeFile, ApiError> {
        self.network(name)?;
        match self.files_origin(name) {
            Some(origin) if origin.runtime => self
                .files
                .runtime
                .iter()
                .find(|f| f.path == origin.file)
                .cloned()
                .ok_or_else(|| not_found(format!("network `{name}` has no file"))),
            Some(origin) => Err(invalid(format!(
                "network `{name}` is configured in {}: {what} it there, then run `qnetctl reload`",
                config::Place(origin)
            ))),
            None => Err(invalid(format!(
                "`{name}` is the default network (hookd.toml configures none): configure networks in {} instead",
                self.paths.config.display()
            ))),
        }
    }

    fn files_origin(&self, name: &NetName) -> Option<&config::Origin> {
        self.origins.get(name)
    }

    fn where_configured(&self, name: &NetName) -> String {
        match self.files_origin(name) {
            Some(origin) => config::Place(origin).to_string(),
            None => "the default network".into(),
        }
    }

    /// `subnet = "auto"` (or no subnet at all) becomes a free subnet: one
    /// no route or address of the host and no configured network
    /// overlaps; a /24 of the usual candidates for root's networks, one of
    /// the users' pool for a user's (`owner`). `current` is the network's
    /// own subnet (an edit), which is not in the way.
    async fn resolve_auto_subnet(
        &self,
        table: &mut toml::Table,
        current: Option<Ipv4Net>,
        owner: Option<u32>,
    ) -> Result<(), ApiError> {
        let auto = match table.get("subnet") {
            None => current.is_none(),
            Some(toml::Value::String(s)) => s == "auto",
            Some(_) => false,
        };
        if !auto {
            return Ok(());
        }
        let mut used = subnet::occupied()
            .await
            .map_err(|e| ApiError::new(ErrorKind::Failed, format!("picking a subnet: {e}")))?;
        for n in self.networks.values() {
            if Some(n.config.subnet) == current {
                continue;
            }
            used.push(subnet::Occupied::configured(
                &n.config.name,
                n.config.subnet,
            ));
        }
        let picked = match owner {
            None => subnet::pick_from(&used, &[]),
            Some(_) => subnet::pick_among(self.user_policy.candidates(), &used),
        };
        let picked = picked.ok_or_else(|| {
            ApiError::new(
                ErrorKind::Exhausted,
                "no free subnet left among the candidates: give `subnet` yourself",
            )
        })?;
        table.insert("subnet".into(), toml::Value::String(picked.to_string()));
        Ok(())
    }
}

/// The run-time networks whose owner is no longer a member of group
/// qnet (or no longer exists): they go on reload. If the group itself is
/// missing, nobody's membership can be told and nothing goes.
fn departed_owners(config: &Config) -> Vec<(NetName, std::path::PathBuf)> {
    let group = crate::ctl::CTL_GROUP;
    config
        .networks
        .iter()
        .filter_map(|net| {
            let origin = config.origins.get(&net.name)?;
            let owner = net.owner?;
            let member = useracl::is_member(owner, group);
            if member.is_none() {
                tracing::warn!(network = %net.name, "group `{group}` does not exist: cannot tell whether owner uid {owner} is still a member; keeping the network");
            }
            (origin.runtime && member == Some(false)).then(|| (net.name.clone(), origin.file.clone()))
        })
        .collect()
}

/// The keys of a network's links (see `config`).
const LINK_KEY: &str = "connect-to";
const LINK_ONE_WAY_KEY: &str = "connect-to-one-way";

/// Removes `name` from the list `key` of `table` (and the key with its
/// last item).
fn remove_from_list(table: &mut toml::Table, key: &str, name: &str) {
    if let Some(toml::Value::Array(items)) = table.get_mut(key) {
        items.retain(|v| v.as_str() != Some(name));
        if items.is_empty() {
            table.remove(key);
        }
    }
}

/// `settings` into `table`, as TOML values (a JSON null or float is not
/// one a network key takes).
fn set_keys(table: &mut toml::Table, settings: Settings) -> Result<(), ApiError> {
    for (key, value) in settings {
        if key == "name" {
            return Err(invalid(
                "`name` is not a setting: it is the network's name (to rename, create the new network and delete the old)",
            ));
        }
        let value = toml::Value::try_from(&value).map_err(|_| {
            invalid(format!(
                "`{key}`: {value} is not a value a network key takes"
            ))
        })?;
        table.insert(key, value);
    }
    Ok(())
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
