//! `/etc/qnet/hookd.toml`: the networks the daemon keeps up.
//!
//! ```toml
//! [[network]]
//! name = "lab"                  # required; also the default bridge name
//! bridge = "qnlab"              # default: the name
//! mode = "nat"                  # nat (default) | routed | isolated
//! subnet = "10.42.0.0/24"       # required (IPv4)
//! router = "10.42.0.1"          # default: the subnet's first address
//! dhcp-range = ["10.42.0.100", "10.42.0.199"]   # default: .2 .. last-1
//! domain = "lab.qnet"           # default: "<name>.qnet"
//! uplink = "eth0"               # optional: masquerade/forward only via it
//! blocked-ports = ["tcp/25", "udp/1900"]        # outgoing, from guests
//! ipv6 = { subnet = "fd42::/64", router = "fd42::1" }   # optional
//!
//! [[forward]]                   # active while the guest runs
//! guest = "web1"                # the guest's -name, or a NIC's MAC
//! proto = "tcp"                 # tcp | udp
//! ports = "8080:80"             # HOSTPORT[-HOSTPORT2][:GUESTPORT]
//! host-addr = "192.0.2.10"      # optional: only this host address
//! network = "lab"               # optional: the guest NIC's network
//! ```
//!
//! ```toml
//! default-network = true        # see below
//!
//! [limits]                      # optional; these are the defaults
//! auto-reservations-per-nic = 4 # automatic reservations a guest NIC may hold
//! reclaim-after-days = 30       # an automatic reservation unseen this long may
//!                               # be reused when the pool is empty
//! qmp-sessions-per-user = 64    # QMP connections one non-root uid may hold
//! ```
//!
//! With no file at all, or a file without any `[[network]]`, one NAT
//! network `qnet0` is used, on a /24 the daemon picks (see
//! [`Config::default_network`]). Such a file never tears down networks
//! configured before: the daemon refuses it while they run (an emptied or
//! truncated file must not take every guest offline). `default-network =
//! true` takes the default network anyway and removes the others;
//! `default-network = false` means no network at all. Errors name the
//! file, the line and the key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use toml::Spanned;

use crate::api::types::one_line;
use crate::api::{DomainName, ForwardSpec, IfName, Mode, NetName, PortMap, Proto};
use crate::state::alloc;

mod raw;
use raw::*;

pub const DEFAULT_CONFIG: &str = "/etc/qnet/hookd.toml";
pub const DEFAULT_NETWORK: &str = "qnet0";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A TOML syntax or type error; toml's message names line, column and
    /// key.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: forward: `{key}`: {problem}")]
    InvalidForward {
        path: PathBuf,
        line: usize,
        key: &'static str,
        problem: String,
    },
    #[error("{path}: [limits]: `{key}`: {problem}")]
    InvalidLimits {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
    #[error("{path}:{line}: network `{network}`: `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        line: usize,
        network: String,
        key: &'static str,
        problem: String,
    },
}

/// Longest text quoted from the file in an error.
const MAX_ERROR_TEXT: usize = 512;

impl ConfigError {
    /// The same error, with what it quotes from the file (a network's
    /// name, a value, toml's message quoting a key) made one bounded line:
    /// a string in the file may hold line breaks and other control
    /// characters.
    fn one_line(mut self) -> Self {
        let clean = |text: &mut String| *text = one_line(text, MAX_ERROR_TEXT);
        match &mut self {
            Self::Parse { message, .. } => clean(message),
            Self::InvalidForward { problem, .. } | Self::InvalidLimits { problem, .. } => {
                clean(problem)
            }
            Self::Invalid {
                network, problem, ..
            } => {
                clean(network);
                clean(problem);
            }
            Self::Read { .. } => {}
        }
        self
    }
}

/// One network as the daemon uses it: every default filled in, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub name: NetName,
    pub bridge: IfName,
    pub mode: Mode,
    pub subnet: Ipv4Net,
    pub router: Ipv4Addr,
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    pub domain: DomainName,
    pub uplink: Option<IfName>,
    pub blocked_ports: Vec<BlockedPort>,
    pub ipv6: Option<Ipv6Config>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Config {
    pub subnet: Ipv6Net,
    pub router: Ipv6Addr,
}

/// An outgoing port guests may not reach: `tcp/25`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockedPort {
    pub proto: Proto,
    pub port: u16,
}

impl FromStr for BlockedPort {
    type Err = crate::api::Invalid;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = crate::api::Invalid;
        let (proto, port) = s
            .split_once('/')
            .ok_or_else(|| invalid(format!("`{s}` is not PROTO/PORT, e.g. `tcp/25`")))?;
        let proto = proto.parse()?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| invalid(format!("`{port}` is not a port number (1-65535)")))?;
        Ok(BlockedPort { proto, port })
    }
}

impl fmt::Display for BlockedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.proto, self.port)
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub networks: Vec<NetworkConfig>,
    /// Port forwards declared in the file.
    pub forwards: Vec<ForwardSpec>,
    /// No network is configured and the default network is wanted: the
    /// caller provides it, on a subnet it picks.
    pub use_default_network: bool,
    /// `default-network` was written in the file: its choice may tear
    /// down networks configured before.
    pub default_network_explicit: bool,
    pub limits: Limits,
    /// `firewall-integration`: whether qnet opens its networks in the
    /// other firewalls of the host (see `firewall::peers`).
    pub integration: Integration,
}

/// `firewall-integration = BOOL`, globally and per `[[network]]`: on by
/// default; off for admins who run their own firewall (`qnetctl doctor`
/// then names what they must allow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Integration {
    pub global: bool,
    /// Networks whose own setting differs from nothing: theirs wins.
    pub per_network: BTreeMap<NetName, bool>,
}

impl Default for Integration {
    fn default() -> Self {
        Integration {
            global: true,
            per_network: BTreeMap::new(),
        }
    }
}

impl Integration {
    /// Whether `network` is integrated with the host's other firewalls.
    pub fn enabled(&self, network: &NetName) -> bool {
        self.per_network
            .get(network)
            .copied()
            .unwrap_or(self.global)
    }
}

/// `[limits]`: how much one guest or user may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub reservations: alloc::Limits,
    /// QMP sessions one non-root uid may hold open at once.
    pub qmp_sessions_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            reservations: alloc::Limits::default(),
            qmp_sessions_per_user: 64,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file means "the default network".
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config {
                networks: Vec::new(),
                forwards: Vec::new(),
                use_default_network: true,
                default_network_explicit: false,
                limits: Limits::default(),
                integration: Integration::default(),
            }),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses and validates `text`, read from `path`. The error is one
    /// line: what it quotes from the file is escaped and bounded.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Self::parse_text(path, text).map_err(ConfigError::one_line)
    }

    fn parse_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: toml_message(&e),
        })?;
        let mut integration = Integration {
            global: raw.firewall_integration.unwrap_or(true),
            per_network: BTreeMap::new(),
        };
        let networks = parse_networks(path, text, raw.network, &mut integration)?;
        let forwards = parse_forwards(path, text, raw.forward, &networks)?;
        let use_default_network = networks.is_empty() && raw.default_network.unwrap_or(true);
        let limits = raw
            .limits
            .unwrap_or_default()
            .validate()
            .map_err(|(key, problem)| ConfigError::InvalidLimits {
                path: path.to_path_buf(),
                key,
                problem,
            })?;
        Ok(Config {
            networks,
            forwards,
            use_default_network,
            default_network_explicit: raw.default_network.is_some(),
            limits,
            integration,
        })
    }

    /// The network used when there is no config file, on `subnet`.
    pub fn default_network(subnet: Ipv4Net) -> NetworkConfig {
        RawNetwork {
            name: DEFAULT_NETWORK.into(),
            subnet: subnet.to_string(),
            ..RawNetwork::default()
        }
        .validate()
        .expect("the default network is valid for any /24")
    }
}

/// The `[[network]]` tables, validated one by one (a duplicate name or
/// bridge names the later table's line), then against each other (subnets
/// that overlap). Per-network `firewall-integration` goes into `integration`.
fn parse_networks(
    path: &Path,
    text: &str,
    tables: Vec<Spanned<RawNetwork>>,
    integration: &mut Integration,
) -> Result<Vec<NetworkConfig>, ConfigError> {
    let mut networks = Vec::new();
    let mut lines = Vec::new();
    let mut names = BTreeSet::new();
    let mut bridges = BTreeSet::new();
    for spanned in tables {
        let line = line_of(text, spanned.span().start);
        let raw = spanned.into_inner();
        let name = raw.name.clone();
        let own_integration = raw.firewall_integration;
        let invalid = |key, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            network: name.clone(),
            key,
            problem,
        };
        let net = raw
            .validate()
            .map_err(|(key, problem)| invalid(key, problem))?;
        if !names.insert(net.name.clone()) {
            return Err(invalid("name", "another network has this name".into()));
        }
        if !bridges.insert(net.bridge.clone()) {
            return Err(invalid("bridge", "another network uses this bridge".into()));
        }
        if let Some(on) = own_integration {
            integration.per_network.insert(net.name.clone(), on);
        }
        networks.push(net);
        lines.push(line);
    }
    check_overlaps(&networks).map_err(|(index, problem)| ConfigError::Invalid {
        path: path.to_path_buf(),
        line: lines[index],
        network: networks[index].name.to_string(),
        key: "subnet",
        problem,
    })?;
    Ok(networks)
}

/// The `[[forward]]` tables: each valid, on a network of this file, and
/// overlapping no other.
fn parse_forwards(
    path: &Path,
    text: &str,
    tables: Vec<Spanned<RawForward>>,
    networks: &[NetworkConfig],
) -> Result<Vec<ForwardSpec>, ConfigError> {
    let mut forwards: Vec<ForwardSpec> = Vec::new();
    for spanned in tables {
        let line = line_of(text, spanned.span().start);
        let raw = spanned.into_inner();
        let invalid = |key, problem: String| ConfigError::InvalidForward {
            path: path.to_path_buf(),
            line,
            key,
            problem,
        };
        let spec = raw
            .validate()
            .map_err(|(key, problem)| invalid(key, problem))?;
        if let Some(net) = &spec.network {
            if !networks.iter().any(|n| n.name == net.as_str()) {
                return Err(invalid(
                    "network",
                    format!("no network `{net}` in this file"),
                ));
            }
        }
        if let Some(other) = forwards.iter().find(|f| f.overlaps(&spec)) {
            return Err(invalid(
                "ports",
                format!(
                    "{} overlaps the forward of {} to `{}`",
                    spec.ports_text(),
                    other.ports_text(),
                    other.guest
                ),
            ));
        }
        forwards.push(spec);
    }
    Ok(forwards)
}

/// The index of the later of two networks whose subnets overlap, and why.
fn check_overlaps(networks: &[NetworkConfig]) -> Result<(), (usize, String)> {
    for (i, a) in networks.iter().enumerate() {
        for (j, b) in networks.iter().enumerate().skip(i + 1) {
            if a.subnet.contains(&b.subnet.network()) || b.subnet.contains(&a.subnet.network()) {
                return Err((
                    j,
                    format!("{} overlaps network `{}` ({})", b.subnet, a.name, a.subnet),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/qnet/hookd.toml"), text)
    }

    #[test]
    fn minimal_network_gets_every_default() {
        let config = parse("[[network]]\nname = \"lab\"\nsubnet = \"10.42.0.0/24\"\n").unwrap();
        let net = &config.networks[0];
        assert_eq!(net.bridge, "lab");
        assert_eq!(net.mode, Mode::Nat);
        assert_eq!(net.router, Ipv4Addr::new(10, 42, 0, 1));
        assert_eq!(
            net.dhcp_range,
            (Ipv4Addr::new(10, 42, 0, 2), Ipv4Addr::new(10, 42, 0, 254))
        );
        assert_eq!(net.domain, "lab.qnet");
        assert!(!config.use_default_network);
    }

    #[test]
    fn full_network_is_read() {
        let config = parse(
            r#"
[[network]]
name = "iso"
bridge = "qniso"
mode = "isolated"
subnet = "10.43.0.0/24"
router = "10.43.0.254"
dhcp-range = ["10.43.0.10", "10.43.0.20"]
domain = "iso.example"
uplink = "eth0"
blocked-ports = ["tcp/25", "udp/1900", "tcp/25"]
ipv6 = { subnet = "fd43::/64" }
"#,
        )
        .unwrap();
        let net = &config.networks[0];
        assert_eq!(net.mode, Mode::Isolated);
        assert_eq!(net.router, Ipv4Addr::new(10, 43, 0, 254));
        assert_eq!(net.blocked_ports.len(), 2);
        assert_eq!(net.blocked_ports[0].to_string(), "tcp/25");
        assert_eq!(
            net.ipv6.unwrap().router,
            "fd43::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(net.uplink.as_deref(), Some("eth0"));
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\n\n[[network]]\nname = \"b\"\nsubnet = \"10.1.0.0/24\"\nrouter = \"10.9.9.9\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert_eq!(
            err,
            "/etc/qnet/hookd.toml:5: network `b`: `router`: 10.9.9.9 is not a host address of 10.1.0.0/24"
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors_with_a_line() {
        let err = parse("[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\nmtu = 9000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4") && err.contains("mtu"), "{err}");
        let err =
            parse("[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\nmode = \"bridged\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("line 4") && err.contains("bridged"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn invalid_values_are_refused() {
        for (body, key) in [
            ("subnet = \"10.0.0.1/24\"", "subnet"),
            ("subnet = \"banana\"", "subnet"),
            ("subnet = \"10.0.0.0/30\"", "subnet"),
            (
                "subnet = \"10.0.0.0/24\"\nbridge = \"waytoolongbridgename\"",
                "bridge",
            ),
            (
                "subnet = \"10.0.0.0/24\"\ndhcp-range = [\"10.0.0.1\", \"10.0.0.9\"]",
                "dhcp-range",
            ),
            (
                "subnet = \"10.0.0.0/24\"\ndhcp-range = [\"10.0.0.9\", \"10.0.0.3\"]",
                "dhcp-range",
            ),
            (
                "subnet = \"10.0.0.0/24\"\nblocked-ports = [\"tcp/0\"]",
                "blocked-ports",
            ),
            (
                "subnet = \"10.0.0.0/24\"\nblocked-ports = [\"icmp/1\"]",
                "blocked-ports",
            ),
            (
                "subnet = \"10.0.0.0/24\"\ndomain = \"bad domain\"",
                "domain",
            ),
            (
                "subnet = \"10.0.0.0/24\"\nipv6 = { subnet = \"fd00::1/64\" }",
                "ipv6",
            ),
        ] {
            let text = format!("[[network]]\nname = \"n\"\n{body}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{body}: {err}");
        }
    }

    #[test]
    fn duplicate_names_bridges_and_overlapping_subnets_are_refused() {
        let dup = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\n[[network]]\nname = \"a\"\nsubnet = \"10.1.0.0/24\"\n";
        assert!(parse(dup).unwrap_err().to_string().contains("`name`"));
        let bridge = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\n[[network]]\nname = \"b\"\nbridge = \"a\"\nsubnet = \"10.1.0.0/24\"\n";
        assert!(parse(bridge).unwrap_err().to_string().contains("`bridge`"));
        let overlap = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/16\"\n[[network]]\nname = \"b\"\nsubnet = \"10.0.5.0/24\"\n";
        assert!(parse(overlap).unwrap_err().to_string().contains("overlaps"));
    }

    #[test]
    fn forwards_are_read_and_checked() {
        let base = "[[network]]\nname = \"lab\"\nsubnet = \"10.0.0.0/24\"\n";
        let config = parse(&format!(
            "{base}[[forward]]\nguest = \"web\"\nproto = \"tcp\"\nports = \"8080:80\"\nnetwork = \"lab\"\n"
        ))
        .unwrap();
        let ports = config.forwards[0].ports;
        assert_eq!((ports.first(), ports.last()), (8080, 8080));
        assert_eq!(ports.guest(), 80);
        let err = parse(&format!(
            "{base}[[forward]]\nguest = \"web\"\nproto = \"tcp\"\nports = \"80-70\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains(":4: forward: `ports`"), "{err}");
        let err = parse(&format!(
            "{base}[[forward]]\nguest = \"a\"\nproto = \"tcp\"\nports = \"8080\"\n[[forward]]\nguest = \"b\"\nproto = \"tcp\"\nports = \"8000-8090\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("overlaps"), "{err}");
        let err = parse(&format!(
            "{base}[[forward]]\nguest = \"a\"\nproto = \"tcp\"\nports = \"8080\"\nnetwork = \"nope\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("no network `nope`"), "{err}");
    }

    #[test]
    fn a_file_without_networks_means_the_default_network_unless_it_says_none() {
        for text in [
            "",
            "# nothing yet\n",
            "[[forward]]\nguest = \"web\"\nproto = \"tcp\"\nports = \"8080\"\n",
        ] {
            let config = parse(text).unwrap();
            assert!(config.use_default_network, "{text:?}");
            assert!(config.networks.is_empty());
        }
        assert!(!parse("").unwrap().default_network_explicit);
        let none = parse("default-network = false\n").unwrap();
        assert!(!none.use_default_network && none.default_network_explicit);
        let with = parse("[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\n").unwrap();
        assert!(!with.use_default_network);
    }

    #[test]
    fn firewall_integration_is_on_unless_turned_off_globally_or_per_network() {
        let name = |n: &str| NetName::from_str(n).unwrap();
        let on = parse("[[network]]\nname = \"a\"\nsubnet = \"10.1.0.0/24\"\n").unwrap();
        assert!(on.integration.enabled(&name("a")));
        let text = "firewall-integration = false\n\
            [[network]]\nname = \"a\"\nsubnet = \"10.1.0.0/24\"\n\
            [[network]]\nname = \"b\"\nsubnet = \"10.2.0.0/24\"\nfirewall-integration = true\n";
        let mixed = parse(text).unwrap();
        assert!(!mixed.integration.enabled(&name("a")));
        assert!(mixed.integration.enabled(&name("b")));
        assert!(!mixed.integration.enabled(&name("qnet0")));
        assert!(parse("firewall-integration = 1\n").is_err());
    }

    #[test]
    fn limits_are_read_and_checked() {
        let config = parse("[limits]\nauto-reservations-per-nic = 2\nreclaim-after-days = 1\nqmp-sessions-per-user = 8\n").unwrap();
        assert_eq!(config.limits.reservations.per_nic, 2);
        assert_eq!(config.limits.reservations.reclaim_after, 86_400);
        assert_eq!(config.limits.qmp_sessions_per_user, 8);
        assert_eq!(parse("").unwrap().limits, Limits::default());
        let err = parse("[limits]\nauto-reservations-per-nic = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[limits]: `auto-reservations-per-nic`"),
            "{err}"
        );
        assert!(parse("[limits]\nbogus = 1\n").is_err());
    }

    #[test]
    fn overlapping_subnets_name_the_line_of_the_later_network() {
        let text = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/16\"\n\n[[network]]\nname = \"b\"\nsubnet = \"10.0.5.0/24\"\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/qnet/hookd.toml:5: network `b`: `subnet`:"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_means_default_network() {
        let config = Config::load(Path::new("/nonexistent/qnet/hookd.toml")).unwrap();
        assert!(config.use_default_network);
        let net = Config::default_network("10.213.7.0/24".parse().unwrap());
        assert_eq!(net.name, "qnet0");
        assert_eq!(net.bridge, "qnet0");
        assert_eq!(net.router, Ipv4Addr::new(10, 213, 7, 1));
        assert_eq!(net.mode, Mode::Nat);
    }

    /// Found while writing the hookd_toml fuzz target (and seeded into its
    /// corpus): the all-ones /128 made the default router overflow, a
    /// panic with the release profile's overflow checks.
    #[test]
    fn ipv6_subnet_without_hosts_is_an_error() {
        let text = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\nipv6 = { subnet = \"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128\" }\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("has no host address"), "{err}");
    }

    /// Errors quote the file (names, values, keys); a string there may
    /// hold line breaks, the error must stay one line.
    #[test]
    fn errors_are_one_line() {
        for text in [
            "[[network]]\nname = \"a\\nb\"\nsubnet = \"10.0.0.0/24\"\n",
            "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\\n\\u001b[2J\"\n",
            "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\n[[forward]]\nguest = \"g\"\nproto = \"tcp\"\nports = \"80\"\nnetwork = \"x\\ny\"\n",
            "\"a\\nb\" = 1\n",
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(!err.chars().any(char::is_control), "{err:?}");
        }
    }
}
