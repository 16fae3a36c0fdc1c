//! `doctor`: gathers the facts [`crate::doctor`] diagnoses — the bridge,
//! dnsmasq, sysctls, every iptables filter table, firewalld's zone of each
//! bridge, host ports our forwards would shadow — for every network, one
//! network, or the networks of one guest.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use qnet_api::{ApiError, Mac, Problem, Reply};

use super::{NetworkRuntime, Reconciler};
use crate::config::{Addressing, NetworkConfig};
use crate::doctor::{
    diagnose, diagnose_libvirt, diagnose_libvirt_nft, last_rule_handles, BridgeState, NetworkFacts,
    TableFacts,
};
use crate::error::not_found;
use crate::firewall::peers::iptables::{self, Backend, Iptables};
use crate::firewall::peers::{Family, Opened, PeerDriver};
use crate::{hostports, network, nftrace};

impl Reconciler {
    pub(super) async fn doctor(
        &self,
        target: Option<&str>,
        trace: bool,
    ) -> Result<Reply, ApiError> {
        let chosen = self.doctor_networks(target)?;
        let tables = self.filter_tables().await;
        let mut problems = Vec::new();
        // LAN networks have no router address, dnsmasq or forwarding of
        // ours to diagnose.
        let addressed = chosen
            .into_iter()
            .filter_map(|n| Some((n, n.config.addressing.as_ref()?)));
        for (runtime, own) in addressed {
            let facts = self.network_facts(runtime, own).await;
            let bridge_ok = facts.bridge == BridgeState::Ok;
            problems.extend(diagnose(&facts, &tables));
            if trace && runtime.up && bridge_ok {
                problems.extend(self.trace(&runtime.config, own).await);
            }
        }
        if target.is_none() {
            let forwards = self.libvirt_forwards_installed();
            problems.extend(diagnose_libvirt(
                &forwards,
                &tables,
                self.integration.global,
            ));
            let chain = self.firewall.peers().libvirt_nft().chain().await;
            problems.extend(diagnose_libvirt_nft(
                &forwards,
                chain.ok().flatten().as_deref(),
                self.integration.global,
            ));
        }
        Ok(Reply::Doctor { problems })
    }

    /// The networks `target` names: one network, a guest's networks, or
    /// (no target) all.
    fn doctor_networks(&self, target: Option<&str>) -> Result<Vec<&NetworkRuntime>, ApiError> {
        let Some(target) = target else {
            return Ok(self.networks.values().collect());
        };
        if let Some(runtime) = self.networks.get(target) {
            return Ok(vec![runtime]);
        }
        let guest = self
            .state
            .guests
            .values()
            .find(|g| g.name.as_deref() == Some(target) || g.uuid.as_deref() == Some(target))
            .ok_or_else(|| not_found(format!("no network or running guest `{target}`")))?;
        Ok(self
            .networks
            .values()
            .filter(|n| {
                guest
                    .nics
                    .iter()
                    .any(|nic| nic.is_on_qnet_network(n.config.name.as_str()))
            })
            .collect())
    }

    /// The problems the nftrace probes of `net` (`own`: its addressing)
    /// find ([`nftrace`]).
    async fn trace(&self, net: &NetworkConfig, own: &Addressing) -> Vec<Problem> {
        let name = net.name.to_string();
        let taken: Vec<Ipv4Addr> = self
            .state
            .reservations
            .get(&net.name)
            .map(|r| r.values().map(|r| r.ip).collect())
            .unwrap_or_default();
        let one = |problem: String, fix: &str| {
            vec![Problem {
                subject: name.clone(),
                problem,
                fix: fix.to_owned(),
            }]
        };
        let Some(src) = nftrace::spare_address(own, &taken) else {
            return one(
                "nftrace: no spare address in the subnet to probe from".into(),
                "free one address of the subnet (a reservation) and try again",
            );
        };
        let probes = nftrace::probes(net, own, src);
        match nftrace::probe::run(&net.bridge, &probes).await {
            Ok(trace) => probes
                .iter()
                .filter_map(|p| {
                    nftrace::problem(&name, &net.bridge, p, &nftrace::outcome(&trace, p))
                })
                .collect(),
            Err(e) => one(
                format!("nftrace: the probe failed: {e}"),
                "read qnet-hookd's log; the static checks above still hold",
            ),
        }
    }

    async fn filter_tables(&self) -> Vec<TableFacts> {
        let mut tables = Vec::new();
        for ipt in self.firewall.peers().iptables() {
            match ipt.view().await {
                Ok(Some(view)) => tables.push(TableFacts {
                    program: ipt.program(),
                    family: ipt.family,
                    view,
                    last_handles: nft_handles(ipt).await,
                }),
                Ok(None) => {}
                Err(e) => tracing::debug!(peer = %ipt.name(), "doctor: {e}"),
            }
        }
        tables
    }

    async fn network_facts(&self, runtime: &NetworkRuntime, own: &Addressing) -> NetworkFacts {
        let net = &runtime.config;
        let dnsmasq_running = runtime
            .dnsmasq
            .as_ref()
            .and_then(|h| h.pid())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        let firewalld_zone = self
            .firewall
            .peers()
            .firewalld()
            .zone_of_interface(&net.bridge)
            .await;
        NetworkFacts {
            net: Opened::of(net),
            up: runtime.up,
            integrated: self.integration.enabled(&net.name),
            bridge: bridge_state(&net.bridge, IpAddr::V4(own.router)),
            bridge_mac: std::fs::read_to_string(format!("/sys/class/net/{}/address", net.bridge))
                .ok()
                .and_then(|a| a.trim().parse().ok()),
            want_mac: Mac::from_octets(network::bridge_mac(&net.name)),
            dnsmasq_running,
            ip_forward: read_flag("/proc/sys/net/ipv4/ip_forward"),
            rp_filter_strict: rp_filter_strict(&net.bridge),
            firewalld_zone,
            taken_ports: self.taken_ports(own),
        }
    }

    /// Installed forwards into the network addressed by `own` whose host
    /// port a host process listens on.
    fn taken_ports(&self, own: &Addressing) -> Vec<(String, String)> {
        self.installed
            .iter()
            .filter(|e| own.contains(e.guest_addr))
            .filter_map(|e| {
                let owner = hostports::host_listener(e.proto, e.host_port)?;
                Some((
                    format!(
                        "{} {} -> {}:{}",
                        e.proto, e.host_port, e.guest_addr, e.guest_port
                    ),
                    owner,
                ))
            })
            .collect()
    }
}

/// For the nf_tables backend, the last rule handle of each chain.
async fn nft_handles(ipt: &Iptables) -> BTreeMap<String, u64> {
    if ipt.backend != Backend::Nft {
        return BTreeMap::new();
    }
    let family = match ipt.family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    iptables::run("nft", &["-a", "list", "table", family, "filter"])
        .await
        .map(|listing| last_rule_handles(&listing))
        .unwrap_or_default()
}

/// The kernel uses the larger of `all` and the device's value.
fn rp_filter_strict(bridge: &str) -> bool {
    let read = |dev: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"))
            .ok()
            .and_then(|v| v.trim().parse::<u8>().ok())
            .unwrap_or(0)
    };
    read("all").max(read(bridge)) == 1
}

fn read_flag(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
}

/// The bridge's state: exists, up (`IFF_UP`), holds `router`.
fn bridge_state(bridge: &str, router: IpAddr) -> BridgeState {
    let Ok(flags) = std::fs::read_to_string(format!("/sys/class/net/{bridge}/flags")) else {
        return BridgeState::Missing;
    };
    let up =
        u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).is_ok_and(|f| f & 1 != 0);
    if !up {
        return BridgeState::Down;
    }
    let addressed = nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            a.interface_name == bridge
                && a.address
                    .and_then(|s| s.as_sockaddr_in().map(|sin| IpAddr::V4(sin.ip())))
                    == Some(router)
        })
    });
    if addressed {
        BridgeState::Ok
    } else {
        BridgeState::NoAddress
    }
}
