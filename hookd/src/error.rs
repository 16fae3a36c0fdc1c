//! The daemon's errors: one type for what can stop it from starting or
//! fail a change, each with the [`ErrorKind`] a client sees.

use std::path::PathBuf;

use qnet_api::{ApiError, ErrorKind, NetName};
use thiserror::Error;

use crate::config::ConfigError;
use crate::dnsmasq::DnsmasqError;
use crate::firewall::FirewallError;
use crate::lan::LanError;
use crate::network::NetworkError;
use crate::state::StateError;
use crate::subnet::SubnetError;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state directory could not be read or written.
    #[error("saving state: {0} (nothing changed: fix the state directory, then retry)")]
    State(#[from] StateError),
    #[error("network `{network}`: {source}")]
    Network {
        network: String,
        #[source]
        source: NetworkError,
    },
    /// A LAN network's switch-over of its uplink, or its undoing.
    #[error("network `{network}`: {source}")]
    Lan {
        network: String,
        #[source]
        source: LanError,
    },
    #[error("network `{network}`: dnsmasq: {source}")]
    Dnsmasq {
        network: String,
        #[source]
        source: DnsmasqError,
    },
    #[error("nftables: {0}")]
    Firewall(#[from] FirewallError),
    #[error("picking the default network's subnet: {0}")]
    Subnet(#[from] SubnetError),
    /// The daemon will not do what it was asked; the message says why
    /// and what to do instead.
    #[error("{0}")]
    Refused(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DaemonError {
        let path = path.into();
        move |source| DaemonError::Io { path, source }
    }

    /// What a failure of network `name`'s bridge becomes:
    /// `.map_err(DaemonError::network(name))`.
    pub fn network(name: &NetName) -> impl Fn(NetworkError) -> DaemonError + Copy + '_ {
        move |source| DaemonError::Network {
            network: name.to_string(),
            source,
        }
    }

    /// What a failure of LAN network `name`'s uplink switch-over becomes.
    pub fn lan(name: &NetName) -> impl Fn(LanError) -> DaemonError + Copy + '_ {
        move |source| DaemonError::Lan {
            network: name.to_string(),
            source,
        }
    }

    /// What a failure of network `name`'s dnsmasq becomes.
    pub fn dnsmasq(name: &NetName) -> impl Fn(DnsmasqError) -> DaemonError + Copy + '_ {
        move |source| DaemonError::Dnsmasq {
            network: name.to_string(),
            source,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            DaemonError::Config(_) | DaemonError::Refused(_) => ErrorKind::Invalid,
            DaemonError::State(_) => ErrorKind::Storage,
            _ => ErrorKind::Failed,
        }
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> ApiError {
        ApiError::new(e.kind(), e.to_string())
    }
}

/// Shorthands for the errors handlers return: `invalid("...")` is an
/// [`ApiError`] of kind [`ErrorKind::Invalid`], and so on for each kind.
macro_rules! shorthands {
    ($($name:ident => $kind:ident),* $(,)?) => {$(
        pub fn $name(message: impl Into<String>) -> ApiError {
            ApiError::new(ErrorKind::$kind, message)
        }
    )*};
}

shorthands! {
    invalid => Invalid,
    not_found => NotFound,
    denied => Denied,
    conflict => Conflict,
    exhausted => Exhausted,
    storage => Storage,
    failed => Failed,
}
