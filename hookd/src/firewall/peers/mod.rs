//! The host's other firewalls ("peers"): a drop in any of them is final
//! whatever `table inet qnet` accepts, so qnet opens its networks in each,
//! in the way that peer documents for other software:
//!
//! | peer | where | what |
//! |---|---|---|
//! | Docker | `DOCKER-USER` of `ip`/`ip6 filter` (nft or legacy backend) | accept from the bridge; to it: replies and DNAT'ed (nat), all (routed) |
//! | iptables (ufw, hand-written; no Docker) | first in `FORWARD`, `INPUT` when they drop | same in `FORWARD`; DHCP, DNS, ICMP in `INPUT` |
//! | libvirt (iptables backend) | first in `LIBVIRT_FWI` | per forward to a guest on a libvirt NAT network: `ctstate DNAT` to that guest and port |
//! | libvirt (nftables backend) | first in chain `guest_input` of `table ip libvirt_network` | the same, `ct status dnat` |
//! | firewalld | zone `qnet` (bridges), policies `qnet-out`, `qnet-in` | DHCP, DNS, ICMP to the host; forwarding per mode |
//!
//! Every iptables rule carries the comment `qnet:NETWORK` ([`marker`]),
//! every rule in libvirt's nftables table the comment
//! `qnet:libvirt-NETWORK`; in firewalld, everything of ours is named
//! `qnet*`. That is how a restart
//! (also after kill -9) adopts what is there without duplicates, how a
//! network going down takes exactly its own entries away, and how
//! `qnet-hookd --cleanup` ([`Peers::cleanup`]) removes every trace.
//!
//! Each peer is one [`PeerDriver`]; its planning is pure and unit-tested
//! ([`iptables_plan`], [`firewalld_plan`]) apart from the code that runs
//! `iptables` or talks D-Bus. Peers change under us (dockerd starts and
//! flips the `FORWARD` policy, `firewall-cmd --reload`, a firewalld
//! restart): [`watch`] notices and the reconciler applies again; applying
//! is idempotent, so a spurious wake-up costs a listing.

pub mod firewalld;
pub mod firewalld_plan;
pub mod head;
pub mod iptables;
pub mod iptables_plan;
pub mod libvirt_nft;
pub mod watch;

use std::future::Future;

use std::net::Ipv4Addr;

use crate::api::{IfName, Mode, NetName, Proto};
use crate::config::NetworkConfig;

pub use firewalld::Firewalld;
pub use iptables::{Backend, Iptables};
pub use libvirt_nft::LibvirtNft;

/// What every mark of ours starts with (an iptables comment; firewalld
/// names).
pub const MARKER_PREFIX: &str = "qnet:";

/// The comment of the rules qnet adds for `network` in others' chains.
pub fn marker(network: &NetName) -> String {
    format!("{MARKER_PREFIX}{network}")
}

/// IPv4 (`iptables`, `table ip filter`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// A network to open in the peers: what they need to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub name: NetName,
    pub bridge: IfName,
    pub mode: Mode,
    pub ipv6: bool,
}

impl Opened {
    pub fn of(net: &NetworkConfig) -> Opened {
        Opened {
            name: net.name.clone(),
            bridge: net.bridge.clone(),
            mode: net.mode,
            // A LAN bridge passes the LAN's IPv6 whatever qnet configures.
            ipv6: net.is_lan() || net.ipv6().is_some(),
        }
    }
}

/// A port forward of ours to a guest on one of libvirt's own NAT (or
/// isolated) networks, whose chain `LIBVIRT_FWI` rejects connections from
/// outside: it gets the narrowest accept there (DNAT'ed, to that guest
/// and port only).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LibvirtForward {
    /// The libvirt network's name (for the marker).
    pub network: String,
    pub bridge: IfName,
    pub guest: Ipv4Addr,
    pub proto: Proto,
    pub port: u16,
}

/// Everything qnet opens in the peers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Openings {
    pub networks: Vec<Opened>,
    pub libvirt: Vec<LibvirtForward>,
}

/// The marker of a libvirt network's rules: `qnet:libvirt-NAME`, with
/// anything but `A-Z a-z 0-9 . _ -` in the name made `_` (an iptables
/// comment is one word of at most 255 bytes here).
pub fn libvirt_marker(network: &str) -> String {
    let name: String = network
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{MARKER_PREFIX}libvirt-{name}")
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot run {program} (is it installed?): {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("firewalld over D-Bus: {0}")]
    Bus(String),
    #[error("no answer within {0:?}; trying again on its next change")]
    Timeout(std::time::Duration),
}

/// What one apply did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The peer runs here (its table, chain or bus name exists).
    pub present: bool,
    /// Entries added or removed.
    pub changes: usize,
}

/// One firewall of someone else's that qnet opens its networks in
/// (modelled on netavark's firewall driver).
pub trait PeerDriver {
    /// For logs: the peer and where it is (`iptables-nft ip filter`).
    fn name(&self) -> String;

    /// Makes this peer hold exactly the entries `what` needs (nothing:
    /// removes every entry of ours), adopting what is there already.
    /// Idempotent; nothing is done where the peer is absent.
    fn apply(&self, what: &Openings) -> impl Future<Output = Result<Applied, PeerError>> + Send;
}

/// Every peer driver.
#[derive(Debug, Clone)]
pub struct Peers {
    iptables: [Iptables; 4],
    libvirt_nft: LibvirtNft,
    firewalld: Firewalld,
}

impl Default for Peers {
    fn default() -> Self {
        Peers::new()
    }
}

impl Peers {
    pub const fn new() -> Peers {
        Peers {
            iptables: [
                Iptables::new(Backend::Nft, Family::V4),
                Iptables::new(Backend::Nft, Family::V6),
                Iptables::new(Backend::Legacy, Family::V4),
                Iptables::new(Backend::Legacy, Family::V6),
            ],
            libvirt_nft: LibvirtNft,
            firewalld: Firewalld::system(),
        }
    }

    pub fn firewalld(&self) -> &Firewalld {
        &self.firewalld
    }

    /// The iptables filter tables, every backend and family.
    pub fn iptables(&self) -> &[Iptables] {
        &self.iptables
    }

    pub fn libvirt_nft(&self) -> &LibvirtNft {
        &self.libvirt_nft
    }

    /// Opens exactly `networks` in every peer present; a peer failing is
    /// logged and does not stop the others (our own table is in place
    /// either way). Returns the failures, one line each.
    pub async fn apply(&self, what: &Openings) -> Vec<String> {
        let mut failures = Vec::new();
        for driver in &self.iptables {
            report(driver, bounded(driver.apply(what)).await, &mut failures);
        }
        let libvirt = &self.libvirt_nft;
        report(libvirt, bounded(libvirt.apply(what)).await, &mut failures);
        report(
            &self.firewalld,
            bounded(self.firewalld.apply(what)).await,
            &mut failures,
        );
        failures
    }

    /// Removes every trace of qnet from every peer (uninstall).
    pub async fn cleanup(&self) -> Vec<String> {
        let mut failures = self.apply(&Openings::default()).await;
        if let Err(e) = self.firewalld.remove_definitions().await {
            failures.push(format!("{}: {e}", self.firewalld.name()));
        }
        failures
    }
}

/// How long one peer may take: a hung firewalld (or an iptables waiting
/// for the xtables lock) must not stall the reconciler.
pub const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

async fn bounded(
    work: impl Future<Output = Result<Applied, PeerError>>,
) -> Result<Applied, PeerError> {
    tokio::time::timeout(PEER_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(PeerError::Bus(format!(
                "no answer within {PEER_TIMEOUT:?}; trying again on its next change"
            )))
        })
}

fn report(
    driver: &impl PeerDriver,
    outcome: Result<Applied, PeerError>,
    failures: &mut Vec<String>,
) {
    match outcome {
        Ok(Applied { present, changes }) if present && changes > 0 => {
            tracing::info!(peer = %driver.name(), changes, "opened qnet networks in another firewall")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(peer = %driver.name(), "{e}");
            failures.push(format!("{}: {e}", driver.name()));
        }
    }
}
