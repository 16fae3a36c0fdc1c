//! Networks: bringing them up and down (bridge, dnsmasq), the nft ruleset
//! of every network that is up, and the hosts each dnsmasq serves.

use std::path::Path;

use qnet_api::{ApiError, NetName, Reply};

use super::{plan, NetworkRuntime, Peer, Reconciler};
use crate::config::{Config, NetworkConfig};
use crate::error::{not_found, DaemonError};
use crate::firewall::peers::{LibvirtForward, Opened, Openings};
use crate::state::State;
use crate::{dnsmasq, lan, network, subnet};

/// Brings network `net` up whatever its mode: a LAN network through
/// [`lan`] (which keeps what its uplink had in `state_dir`), the others
/// through [`network`]. Kept here, above both, since `lan` uses
/// `network`'s bridge code.
pub(super) async fn bring_up(net: &NetworkConfig, state_dir: &Path) -> Result<(), DaemonError> {
    match net.is_lan() {
        true => lan::bring_up(net, state_dir)
            .await
            .map_err(DaemonError::lan(&net.name)),
        false => network::bring_up(net)
            .await
            .map_err(DaemonError::network(&net.name)),
    }
}

/// Takes network `net` down whatever its mode (see [`bring_up`]).
pub(super) async fn bring_down(net: &NetworkConfig, state_dir: &Path) -> Result<(), DaemonError> {
    match net.is_lan() {
        true => lan::bring_down(net, state_dir)
            .await
            .map_err(DaemonError::lan(&net.name)),
        false => network::bring_down(net)
            .await
            .map_err(DaemonError::network(&net.name)),
    }
}

impl Reconciler {
    /// The networks of `config` (plus the default network when it asks for
    /// it) become the networks of the daemon: those it brought up before
    /// that are no longer configured are removed, the others brought up
    /// unless `network down` took them down.
    pub(super) async fn start_networks(&mut self, config: Config) -> Result<(), DaemonError> {
        if let Err(e) = self.firewall.enable_localhost_forwards() {
            tracing::warn!("enabling forwards to 127.0.0.1 (route_localnet): {e}");
        }
        self.refuse_silent_teardown(&config)?;
        let mut wanted = config.networks;
        if config.use_default_network {
            wanted.push(Config::default_network(self.default_subnet().await?));
        }
        let lan_up: Vec<String> = wanted
            .iter()
            .filter(|n| n.is_lan() && !self.state.networks_down.contains(&n.name))
            .map(|n| n.name.to_string())
            .collect();
        crate::lan::restore_unwanted(&self.paths().state_dir, |n| lan_up.iter().any(|u| u == n))
            .await;
        let vanished: Vec<NetworkConfig> = self
            .state
            .known_networks
            .values()
            .filter(|known| !wanted.iter().any(|n| n.name == known.name))
            .cloned()
            .collect();
        for net in vanished {
            self.remove_network(&net).await;
        }
        for net in wanted {
            let name = net.name.clone();
            self.insert_network(net);
            if !self.state.networks_down.contains(&name) {
                self.network_up(&name).await?;
            }
        }
        Ok(())
    }

    /// A file that names no network while networks configured before run
    /// (an emptied or truncated hookd.toml, say) is refused rather than
    /// taken to mean "tear them all down"; `default-network` written in
    /// the file says the admin means it.
    pub(super) fn refuse_silent_teardown(&self, config: &Config) -> Result<(), DaemonError> {
        if !config.networks.is_empty() || config.default_network_explicit {
            return Ok(());
        }
        let running: Vec<&str> = self
            .state
            .known_networks
            .keys()
            .map(NetName::as_str)
            .filter(|name| *name != crate::config::DEFAULT_NETWORK)
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        Err(DaemonError::Refused(format!(
            "{} configures no network, but network(s) {} configured before still run: refusing to tear them down; \
             configure them again, or write `default-network = true` (the default network only) or `default-network = false` (no network) to remove them",
            self.paths().config.display(),
            running.join(", ")
        )))
    }

    /// The default network's subnet: the one picked before, else a free
    /// /24 picked now and remembered, so it never moves.
    pub(super) async fn default_subnet(&mut self) -> Result<ipnet::Ipv4Net, DaemonError> {
        if let Some(subnet) = self.state.default_subnet {
            return Ok(subnet);
        }
        let subnet = subnet::pick_free_subnet().await?;
        tracing::info!(%subnet, "default network qnet0 on a free /24");
        self.state.default_subnet = Some(subnet);
        self.dirty.state = true;
        Ok(subnet)
    }

    pub(super) async fn network_up(&mut self, name: &NetName) -> Result<(), DaemonError> {
        let paths = self.dnsmasq_paths();
        let Some(runtime) = self.networks.get_mut(name) else {
            return Ok(());
        };
        let net = runtime.config.clone();
        bring_up(&net, &paths.state_dir).await?;
        // A LAN network's guests lease from the LAN's own DHCP server.
        if let Some(own) = &net.addressing {
            let handle = dnsmasq::spawn(&net, own, &paths).map_err(DaemonError::dnsmasq(name))?;
            runtime.dnsmasq = Some(handle);
        }
        runtime.up = true;
        if self.state.known_networks.get(name) != Some(&net) {
            self.state.known_networks.insert(name.clone(), net);
            self.dirty.state = true;
        }
        Ok(())
    }

    async fn network_down(&mut self, name: &NetName) -> Result<(), DaemonError> {
        let Some(runtime) = self.networks.get_mut(name) else {
            return Ok(());
        };
        if let Some(handle) = runtime.dnsmasq.take() {
            handle.stop().await;
        }
        runtime.up = false;
        let net = runtime.config.clone();
        bring_down(&net, &self.paths().state_dir).await?;
        self.state.known_networks.remove(name);
        self.dirty.state = true;
        Ok(())
    }

    /// `network up` (`up`) and `network down`.
    pub(super) async fn ctl_network_up(
        &mut self,
        name: &NetName,
        up: bool,
        _peer: Peer,
    ) -> Result<Reply, ApiError> {
        let wanted = if up { "up" } else { "down" };
        if !self.want_up(name, up)? {
            return Ok(done(format!("network `{name}` is already {wanted}")));
        }
        if up {
            self.network_up(name).await?;
        } else {
            self.network_down(name).await?;
        }
        self.apply_rules().await?;
        if up {
            self.dirty.all();
            Ok(done(format!("network `{name}` is up")))
        } else {
            self.dirty.state = true;
            Ok(done(format!(
                "network `{name}` is down: bridge, rules and dnsmasq removed (reservations kept)"
            )))
        }
    }

    /// Records durably whether the admin wants `name` up, before the
    /// bridge changes, so a restart keeps the choice. `false`: the network
    /// already is as wanted, and nothing was changed.
    fn want_up(&mut self, name: &NetName, up: bool) -> Result<bool, ApiError> {
        if self.network(name)?.up == up {
            return Ok(false);
        }
        let set_down = |state: &mut State, down: bool| {
            if down {
                state.networks_down.insert(name.clone());
            } else {
                state.networks_down.remove(name);
            }
        };
        set_down(&mut self.state, !up);
        self.commit(|state| set_down(state, up))?;
        Ok(true)
    }

    pub(super) fn network(&self, name: &str) -> Result<&NetworkRuntime, ApiError> {
        self.network_for(name, Peer::ROOT)
    }

    /// Network `name` if `peer` may see it: a network a user owns is
    /// theirs (and root's) alone, and to everyone else it does not exist.
    pub(super) fn network_for(&self, name: &str, peer: Peer) -> Result<&NetworkRuntime, ApiError> {
        match self.networks.get(name) {
            Some(runtime) if visible(&runtime.config, peer) => Ok(runtime),
            _ => {
                let known: Vec<&str> = self
                    .networks
                    .values()
                    .filter(|n| visible(&n.config, peer))
                    .map(|n| n.config.name.as_str())
                    .collect();
                Err(not_found(format!(
                    "no network `{name}` (networks: {})",
                    known.join(", ")
                )))
            }
        }
    }

    /// The networks that are up.
    pub(super) fn networks_up(&self) -> Vec<&NetworkConfig> {
        self.networks
            .values()
            .filter(|n| n.up)
            .map(|n| &n.config)
            .collect()
    }

    pub(super) fn network_of_bridge(&self, bridge: &str) -> Option<NetName> {
        self.networks
            .values()
            .find(|n| n.config.bridge == bridge)
            .map(|n| n.config.name.clone())
    }

    /// Replaces our nft table with the rules of every network that is up
    /// and every forward element that should be installed, in one
    /// transaction.
    pub(super) async fn apply_rules(&mut self) -> Result<(), DaemonError> {
        let up: Vec<NetworkConfig> = self.networks_up().into_iter().cloned().collect();
        let elements: Vec<_> = self.desired_elements().into_iter().collect();
        self.firewall.apply_ruleset(&up, &elements).await?;
        self.installed = elements.into_iter().collect();
        self.refused.clear();
        self.sync_peers().await;
        Ok(())
    }

    /// Opens the networks that are up (and integrated) in the host's
    /// other firewalls, and closes the others there. Failures are logged
    /// and kept for `doctor`; our own table stands either way.
    pub(super) async fn sync_peers(&mut self) {
        let networks: Vec<Opened> = self
            .networks_up()
            .into_iter()
            .filter(|n| self.integration.enabled(&n.name))
            .map(Opened::of)
            .collect();
        let what = Openings {
            networks,
            libvirt: self.libvirt_forwards(),
        };
        self.peer_failures = self.firewall.open_in_peers(&what).await;
        self.peers_opened = what;
    }

    /// The installed forwards to guests on libvirt's own networks (global
    /// `firewall-integration` decides for those: they are no qnet
    /// network's).
    pub(super) fn libvirt_forwards(&self) -> Vec<LibvirtForward> {
        if !self.integration.global {
            return Vec::new();
        }
        self.libvirt_forwards_installed()
    }

    /// The installed forwards to guests on libvirt's own networks.
    pub(super) fn libvirt_forwards_installed(&self) -> Vec<LibvirtForward> {
        let mut forwards: Vec<LibvirtForward> = self
            .installed
            .iter()
            .filter_map(|e| {
                let std::net::IpAddr::V4(ip) = e.guest_addr else {
                    return None;
                };
                let a = self.state.libvirt_addresses.values().find(|a| a.ip == ip)?;
                Some(LibvirtForward {
                    network: a.network.clone(),
                    bridge: a.bridge.clone(),
                    guest: ip,
                    proto: e.proto,
                    port: e.guest_port,
                })
            })
            .collect();
        forwards.sort();
        forwards.dedup();
        forwards
    }

    pub(super) fn dnsmasq_paths(&self) -> dnsmasq::Paths {
        dnsmasq::Paths {
            run_dir: self.paths().run_dir.clone(),
            state_dir: self.paths().state_dir.clone(),
        }
    }

    /// Gives every running dnsmasq the hosts of its network: those of the
    /// MACs whose reservation or running NIC changed since the last time
    /// (see `state::tracked`), or all of them to a new dnsmasq.
    pub(super) async fn sync_dnsmasq(&mut self) {
        let changed = plan::hosts_changed(&mut self.state);
        for runtime in self.networks.values() {
            let Some(handle) = &runtime.dnsmasq else {
                continue;
            };
            let name = &runtime.config.name;
            let macs = changed.get(name.as_str()).into_iter().flatten();
            let updates = plan::host_updates(&self.state, name, macs);
            let everything = || plan::dnsmasq_hosts(&self.state, name);
            if let Err(e) = handle.update_hosts(&updates, everything).await {
                tracing::warn!(network = %name, "updating dnsmasq hosts: {e}");
            }
            #[cfg(debug_assertions)]
            {
                let (dhcp, dns) = plan::dnsmasq_hosts(&self.state, name);
                handle.assert_hosts_are(dhcp, dns).await;
            }
        }
    }
}

/// Whether `peer` may see (and use) network `net`: the admin's networks
/// are everyone's, a user's network its owner's (and root's).
pub(super) fn visible(net: &NetworkConfig, peer: Peer) -> bool {
    peer.is_root() || net.owner.is_none_or(|owner| owner == peer.uid)
}

pub(super) fn done(message: String) -> Reply {
    Reply::Done { message }
}
