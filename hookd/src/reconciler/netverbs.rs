//! The `qnetctl network` verbs: create, edit, delete, link, show. Each
//! builds the new run-time file of one network (a user's within the
//! policy) and hands it to [`Reconciler::change_runtime_file`], which
//! validates, persists and applies it.

use ipnet::Ipv4Net;
use qnet_api::{ApiError, NetName, NetworkInfo, Reply, Settings};

use super::networks::done;
use super::{Peer, Reconciler};
use crate::config::{self, policy, runtime, Link, RuntimeFile};
use crate::error::{conflict, denied, exhausted, failed, invalid, not_found};
use crate::subnet;

impl Reconciler {
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
            self.user_policy.check_keys(&table)?;
            self.user_policy.may_create(self.owned_by(uid))?;
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
            "network `{name}` created: {} network on bridge {}",
            net.mode, net.bridge
        );
        match (&net.addressing, &net.uplink) {
            (Some(own), _) => {
                message.push_str(&format!(", {} (router {})", own.subnet, own.router))
            }
            (None, Some(uplink)) => message.push_str(&format!(", on the LAN of {uplink}")),
            (None, None) => {}
        }
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
        let current = self.network_for(&name, peer)?.config.subnet();
        let file = self.runtime_file(&name, "edit")?;
        let mut table: toml::Table = toml::from_str(&file.text)
            .map_err(|e| invalid(format!("{}: {}", file.path.display(), e.message())))?;
        let mut changes = toml::Table::new();
        set_keys(&mut changes, set)?;
        for key in &unset {
            changes.insert(key.clone(), toml::Value::Boolean(false));
        }
        if !peer.is_root() {
            self.user_policy.check_keys(&changes)?;
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
        self.resolve_auto_subnet(&mut table, current, owner).await?;
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
        for key in [false, true].map(Link::key_for) {
            remove_from_list(&mut table, key, to.as_str());
        }
        if !remove {
            let key = Link::key_for(one_way);
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
    /// the users' pool for a user's (`owner`). `current` is the subnet of
    /// the network being edited, which is not in the way (`None`: a new
    /// network, or a LAN network, which has none and may become a nat one).
    async fn resolve_auto_subnet(
        &self,
        table: &mut toml::Table,
        current: Option<Ipv4Net>,
        owner: Option<u32>,
    ) -> Result<(), ApiError> {
        // A LAN network has no subnet of its own.
        if table.get("mode").and_then(toml::Value::as_str) == Some("bridged") {
            return Ok(());
        }
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
            .map_err(|e| failed(format!("picking a subnet: {e}")))?;
        for n in self.networks.values() {
            // A LAN network has no subnet of its own to avoid.
            let Some(taken) = n.config.subnet() else {
                continue;
            };
            if Some(taken) != current {
                used.push(subnet::Occupied::configured(&n.config.name, taken));
            }
        }
        let picked = match owner {
            None => subnet::pick_from(&used, &[]),
            Some(_) => subnet::pick_among(self.user_policy.candidates(), &used),
        };
        let picked = picked.ok_or_else(|| {
            exhausted("no free subnet left among the candidates: give `subnet` yourself")
        })?;
        table.insert("subnet".into(), toml::Value::String(picked.to_string()));
        Ok(())
    }
}

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
