//! `[user-networks]`: what members of group qnet may create and change.
//!
//! ```toml
//! [user-networks]               # optional; these are the defaults
//! per-user = 4                  # networks one user may own; 0: none
//! modes = ["nat", "isolated"]   # routed may be added; never an uplink
//! pool = "10.214.0.0/16"        # where their subnets come from
//! prefix = 24                   # the size `subnet = "auto"` picks
//! ```
//!
//! A user's network is theirs alone, so the policy keeps it from
//! reaching what is the admin's: users set only the keys of their own
//! addressing and DNS ([`USER_KEYS`]); never a bridge name (the daemon
//! names it, so it cannot be a device of the host), an uplink, IPv6 or
//! the firewall integration; their subnets come from the pool, so they
//! cannot take an address range the host or the admin uses.

use std::collections::BTreeSet;

use ipnet::Ipv4Net;
use serde::Deserialize;
use thiserror::Error;

use crate::api::{ApiError, ErrorKind, Mode};
use crate::fsutil;

/// The keys a user may set on their own network.
pub const USER_KEYS: [&str; 6] = [
    "mode",
    "subnet",
    "router",
    "dhcp-range",
    "domain",
    "blocked-ports",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPolicy {
    pub per_user: usize,
    pub modes: BTreeSet<ModeName>,
    pub pool: Ipv4Net,
    pub prefix: u8,
}

/// A mode as the policy names it (ordered, for the set).
pub type ModeName = String;

impl Default for UserPolicy {
    fn default() -> Self {
        UserPolicy {
            per_user: 4,
            modes: ["nat", "isolated"].map(String::from).into(),
            pool: "10.214.0.0/16".parse().expect("valid CIDR"),
            prefix: 24,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawPolicy {
    per_user: Option<usize>,
    modes: Option<Vec<Mode>>,
    pool: Option<String>,
    prefix: Option<u8>,
}

impl RawPolicy {
    pub(super) fn validate(self) -> Result<UserPolicy, (&'static str, String)> {
        let defaults = UserPolicy::default();
        let per_user = self.per_user.unwrap_or(defaults.per_user);
        if per_user > 1024 {
            return Err(("per-user", format!("{per_user} must be 0-1024")));
        }
        let modes = match self.modes {
            Some(modes) => modes.iter().map(ToString::to_string).collect(),
            None => defaults.modes,
        };
        let pool = match self.pool {
            Some(text) => text.parse::<Ipv4Net>().map_err(|_| {
                (
                    "pool",
                    format!("`{text}` is not an IPv4 CIDR such as 10.214.0.0/16"),
                )
            })?,
            None => defaults.pool,
        };
        if pool != pool.trunc() {
            return Err((
                "pool",
                format!("`{pool}` has host bits set: write `{}`", pool.trunc()),
            ));
        }
        let prefix = self.prefix.unwrap_or(defaults.prefix);
        if prefix < pool.prefix_len() || prefix > 29 {
            return Err((
                "prefix",
                format!(
                    "/{prefix} must be from /{} (the pool) to /29",
                    pool.prefix_len()
                ),
            ));
        }
        Ok(UserPolicy {
            per_user,
            modes,
            pool,
            prefix,
        })
    }
}

/// Why the policy refuses a user's request, as the user reads it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("users may not create networks here ([user-networks] per-user = 0): ask root")]
    Off,
    #[error("you own {owned} network(s), the most [user-networks] per-user allows: delete one first, or ask root")]
    TooMany { owned: usize },
    #[error("only root may set `{key}` (you may set {})", USER_KEYS.join(", "))]
    RootsKey { key: String },
    #[error("mode `{mode}` is not one users may use here (allowed: {allowed})")]
    Mode { mode: String, allowed: String },
    #[error("subnet {subnet} is outside the users' pool {pool}: pick one inside it, or `auto`")]
    OutsidePool { subnet: Ipv4Net, pool: Ipv4Net },
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        let kind = match refusal {
            Refusal::Off | Refusal::TooMany { .. } => ErrorKind::Exhausted,
            _ => ErrorKind::Denied,
        };
        ApiError::new(kind, refusal.to_string())
    }
}

impl UserPolicy {
    /// Whether a user who owns `owned` networks may create another.
    pub fn may_create(&self, owned: usize) -> Result<(), Refusal> {
        if self.per_user == 0 {
            return Err(Refusal::Off);
        }
        if owned >= self.per_user {
            return Err(Refusal::TooMany { owned });
        }
        Ok(())
    }

    /// Checks the keys a user sets on their network against the policy.
    pub fn check_keys(&self, table: &toml::Table) -> Result<(), Refusal> {
        if let Some(key) = table
            .keys()
            .find(|key| *key != "name" && !USER_KEYS.contains(&key.as_str()))
        {
            return Err(Refusal::RootsKey { key: key.clone() });
        }
        if let Some(mode) = table.get("mode").and_then(toml::Value::as_str) {
            if !self.modes.contains(mode) {
                return Err(Refusal::Mode {
                    mode: mode.to_owned(),
                    allowed: self.modes.iter().cloned().collect::<Vec<_>>().join(", "),
                });
            }
        }
        let subnet = table.get("subnet").and_then(toml::Value::as_str);
        // Not a CIDR (or `auto`): the config check says so, in its words.
        if let Some(Ok(subnet)) = subnet.map(str::parse::<Ipv4Net>) {
            if !self.pool.contains(&subnet) {
                return Err(Refusal::OutsidePool {
                    subnet,
                    pool: self.pool,
                });
            }
        }
        Ok(())
    }

    /// The subnets `subnet = "auto"` may pick for a user, in order.
    pub fn candidates(&self) -> impl Iterator<Item = Ipv4Net> {
        self.pool
            .subnets(self.prefix)
            .expect("prefix checked against the pool")
    }
}

/// The bridge of user `uid`'s network `name`: named by the daemon, from
/// both, so it is stable, fits the kernel's 15 bytes, and cannot be the
/// name of a device the host has for something else.
pub fn user_bridge(uid: u32, name: &str) -> String {
    let hash = fsutil::fnv1a(format!("qnet-user-bridge:{uid}:{name}").as_bytes());
    format!("qu{:08x}", hash as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_validation() {
        let policy = RawPolicy::default().validate().unwrap();
        assert_eq!(policy, UserPolicy::default());
        assert_eq!(
            policy.candidates().next().unwrap().to_string(),
            "10.214.0.0/24"
        );
        assert_eq!(policy.candidates().count(), 256);
        let bad = |raw: RawPolicy| raw.validate().unwrap_err().0;
        assert_eq!(
            bad(RawPolicy {
                prefix: Some(8),
                ..Default::default()
            }),
            "prefix"
        );
        assert_eq!(
            bad(RawPolicy {
                pool: Some("10.1.2.3/16".into()),
                ..Default::default()
            }),
            "pool"
        );
        assert_eq!(
            bad(RawPolicy {
                per_user: Some(5000),
                ..Default::default()
            }),
            "per-user"
        );
    }

    #[test]
    fn users_set_only_their_own_keys_within_the_policy() {
        let policy = UserPolicy::default();
        let ok =
            "name = \"a\"\nmode = \"nat\"\nsubnet = \"10.214.3.0/24\"\ndomain = \"a.example\"\n";
        assert_eq!(policy.check_keys(&table(ok)), Ok(()));
        for (text, expected) in [
            ("uplink = \"eth0\"", "only root may set `uplink`"),
            ("bridge = \"eth0\"", "only root may set `bridge`"),
            ("owner = 0", "only root may set `owner`"),
            (
                "ipv6 = { subnet = \"fd00::/64\" }",
                "only root may set `ipv6`",
            ),
            (
                "mode = \"routed\"",
                "mode `routed` is not one users may use",
            ),
            ("subnet = \"192.168.1.0/24\"", "outside the users' pool"),
        ] {
            let err = policy.check_keys(&table(text)).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
        assert!(policy.may_create(3).is_ok());
        assert!(policy
            .may_create(4)
            .unwrap_err()
            .to_string()
            .contains("per-user"));
    }

    #[test]
    fn user_bridges_are_stable_short_and_distinct() {
        let a = user_bridge(1000, "dev");
        assert_eq!(a, user_bridge(1000, "dev"));
        assert_eq!(a.len(), 10);
        assert_ne!(a, user_bridge(1001, "dev"));
        assert_ne!(a, user_bridge(1000, "dev2"));
    }
}
