//! `/etc/qnet/hookd.toml`: the networks the daemon keeps up.
//!
//! ```toml
//! [[network]]
//! name = "lab"                  # required; also the default bridge name
//! bridge = "qnlab"              # default: the name
//! mode = "nat"                  # nat (default) | routed | isolated | bridged
//! subnet = "10.42.0.0/24"       # required (IPv4)
//! router = "10.42.0.1"          # default: the subnet's first address
//! dhcp-range = ["10.42.0.100", "10.42.0.199"]   # default: .2 .. last-1
//! domain = "lab.qnet"           # default: "<name>.qnet"
//! uplink = "eth0"               # optional: masquerade/forward only via it
//! blocked-ports = ["tcp/25", "udp/1900"]        # outgoing, from guests
//! ipv6 = { subnet = "fd42::/64", router = "fd42::1" }   # optional
//! connect-to = ["web"]          # guests of lab and web may connect to each other
//! connect-to-one-way = ["db"]   # lab's guests may connect to db's, not back
//!
//! [[network]]                   # the LAN of eth0 (see `lan`)
//! name = "lan"
//! mode = "bridged"              # only name, bridge, uplink apply
//! uplink = "eth0"               # required: the interface to share
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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use toml::Spanned;

use crate::api::types::one_line;
use crate::api::{DomainName, ForwardSpec, IfName, Mode, NetName, PortMap, Proto};

pub mod diff;
mod files;
mod lan;
pub mod links;
pub mod policy;
mod raw;
pub mod runtime;
pub mod show;
use files::{invalid_at, Table};
pub use files::{ConfigFiles, Origin, Place};
pub use links::Link;
pub use policy::UserPolicy;
use raw::*;
pub use runtime::RuntimeFile;

pub const DEFAULT_CONFIG: &str = "/etc/qnet/hookd.toml";
pub const DEFAULT_NETWORK: &str = "qnet0";

/// The run directory's subdirectory of the guests' records
/// (`RUN/guests/PID.json`).
pub const RUN_GUESTS_DIR: &str = "guests";
/// The run directory's subdirectory of the bridge helper's ACL files for
/// users' networks (`RUN/users/`).
pub const RUN_USERS_DIR: &str = "users";
/// The daemon's own directories in the run directory, beside each
/// network's `RUN/NET/`: no network may be named as one of them, or
/// removing it would remove them.
pub const RUN_DIRS: [&str; 2] = [RUN_GUESTS_DIR, RUN_USERS_DIR];

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
    #[error("{path}: [user-networks]: `{key}`: {problem}")]
    InvalidPolicy {
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
            Self::InvalidForward { problem, .. }
            | Self::InvalidLimits { problem, .. }
            | Self::InvalidPolicy { problem, .. } => clean(problem),
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
///
/// A LAN network ([`NetworkConfig::is_lan`]) has no addressing of its
/// own, so its [`addressing`](Self::addressing) is `None`: code that needs
/// a subnet, router or DNS domain must say what a LAN network does
/// instead. The saved state has its own form (`state::saved`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub name: NetName,
    pub bridge: IfName,
    pub mode: Mode,
    pub uplink: Option<IfName>,
    /// The user a network belongs to (`qnetctl network create` by a
    /// member of group qnet): only they and root see it, change it and
    /// put guests on it. `None`: the admin's, usable by everyone.
    pub owner: Option<u32>,
    /// What a network that gives its guests their addresses has: `Some`
    /// in every mode but bridged, `None` in bridged.
    pub addressing: Option<Addressing>,
}

/// The addresses, names and policy of a nat, routed or isolated network:
/// everything a LAN network takes from the LAN instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addressing {
    pub subnet: Ipv4Net,
    pub router: Ipv4Addr,
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    pub domain: DomainName,
    pub blocked_ports: Vec<BlockedPort>,
    pub ipv6: Option<Ipv6Config>,
    /// `connect-to` and `connect-to-one-way`: the networks this one's
    /// guests may open connections to (see [`links`]), sorted by name, each
    /// once. Only the firewall reads them.
    pub connect_to: Vec<Link>,
}

/// The parts of its [`Addressing`] that code asks of any network, each
/// `None` (or empty) for a LAN network.
impl NetworkConfig {
    pub fn subnet(&self) -> Option<Ipv4Net> {
        self.addressing.as_ref().map(|a| a.subnet)
    }

    pub fn ipv6(&self) -> Option<Ipv6Config> {
        self.addressing.as_ref().and_then(|a| a.ipv6)
    }

    /// Its links to other networks (`connect-to`).
    pub fn connect_to(&self) -> &[Link] {
        self.addressing.as_ref().map_or(&[], |a| &a.connect_to)
    }
}

impl Addressing {
    /// Whether `ip` is in the network's IPv4 subnet or its IPv6 one.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.subnet.contains(&ip),
            IpAddr::V6(ip) => self.ipv6.is_some_and(|v6| v6.subnet.contains(&ip)),
        }
    }
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
    /// hookd.toml's networks, then the run-time ones.
    pub networks: Vec<NetworkConfig>,
    /// Where each network was configured.
    pub origins: BTreeMap<NetName, Origin>,
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
    /// `[user-networks]`: what members of group qnet may create.
    pub user_networks: UserPolicy,
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

impl RawNetwork {
    /// A `[[network]]`, validated by its mode: bridged by [`lan`], the
    /// others by [`raw`] (which `lan` builds on).
    fn validate(self) -> Result<NetworkConfig, raw::Problem> {
        match self.mode {
            Some(Mode::Bridged) => lan::validate_bridged(self),
            _ => self.validate_addressed(),
        }
    }
}

/// `[limits]`: how much one guest or user may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub reservations: ReservationLimits,
    /// QMP sessions one non-root uid may hold open at once.
    pub qmp_sessions_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            reservations: ReservationLimits::default(),
            qmp_sessions_per_user: 64,
        }
    }
}

/// How far automatic reservations go (the daemon's `state::alloc` applies
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationLimits {
    /// Automatic reservations one guest NIC may hold.
    pub per_nic: usize,
    /// Seconds a MAC must have been unseen before its automatic
    /// reservation may be reused for another guest when the pool is empty.
    pub reclaim_after: u64,
}

impl Default for ReservationLimits {
    fn default() -> Self {
        ReservationLimits {
            per_nic: 4,
            reclaim_after: 30 * 24 * 3600,
        }
    }
}

impl Config {
    /// Reads `path` and the run-time networks next to it (see [`runtime`]);
    /// a missing file means "the default network".
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        ConfigFiles::read(path)?.parse()
    }

    /// Parses and validates `text`, read from `path`, alone (no run-time
    /// networks). The error is one line: what it quotes from the file is
    /// escaped and bounded.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        ConfigFiles {
            main: path.to_path_buf(),
            main_text: Some(text.to_owned()),
            runtime: Vec::new(),
        }
        .parse()
    }

    /// The network used when there is no config file, on `subnet`.
    pub fn default_network(subnet: Ipv4Net) -> NetworkConfig {
        NetworkConfig::with_defaults(DEFAULT_NETWORK, Mode::Nat, subnet)
    }
}

/// The network tables, validated one by one (a duplicate name or bridge
/// names the later table), then against each other (subnets that
/// overlap, links). Per-network `firewall-integration` goes into `integration`.
fn parse_networks(
    tables: Vec<Table>,
    integration: &mut Integration,
) -> Result<(Vec<NetworkConfig>, BTreeMap<NetName, Origin>), ConfigError> {
    let mut networks = Vec::new();
    let mut origins = BTreeMap::new();
    let mut placed = Vec::new();
    let mut bridges = BTreeSet::new();
    for table in tables {
        let origin = table.origin();
        let name = table.raw.name.clone();
        let own_integration = table.raw.firewall_integration;
        let invalid = |key, problem: String| invalid_at(&origin, &name, key, problem);
        let net = table
            .raw
            .validate()
            .map_err(|(key, problem)| invalid(key, problem))?;
        if let Some(other) = origins.get(&net.name) {
            return Err(invalid(
                "name",
                format!("another network has this name ({})", Place(other)),
            ));
        }
        if !bridges.insert(net.bridge.clone()) {
            return Err(invalid("bridge", "another network uses this bridge".into()));
        }
        if let Some(on) = own_integration {
            integration.per_network.insert(net.name.clone(), on);
        }
        placed.push(origin.clone());
        origins.insert(net.name.clone(), origin);
        networks.push(net);
    }
    let at = |index: usize, key, problem| {
        invalid_at(&placed[index], networks[index].name.as_str(), key, problem)
    };
    check_overlaps(&networks).map_err(|(index, problem)| at(index, "subnet", problem))?;
    lan::check_uplinks(&networks).map_err(|(index, key, problem)| at(index, key, problem))?;
    links::check(&networks).map_err(|(index, key, problem)| at(index, key, problem))?;
    Ok((networks, origins))
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
            match networks.iter().find(|n| n.name == net.as_str()) {
                None => {
                    return Err(invalid(
                        "network",
                        format!("no network `{net}` is configured"),
                    ))
                }
                Some(n) if n.is_lan() => return Err(invalid("network", lan_forward(net))),
                Some(_) => {}
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

/// Why a forward to the LAN network `network` is refused (here and at
/// run time).
pub fn lan_forward(network: &str) -> String {
    format!(
        "`{network}` is a bridged network: its guests are on the LAN itself and reachable there \
         at the address the LAN's DHCP gave them, so forwards do not apply"
    )
}

/// The index of the later of two networks whose subnets overlap, and why
/// (LAN networks have no subnet of their own).
pub fn check_overlaps(networks: &[NetworkConfig]) -> Result<(), (usize, String)> {
    let subnets: Vec<(usize, &NetName, Ipv4Net)> = (networks.iter().enumerate())
        .filter_map(|(i, n)| Some((i, &n.name, n.subnet()?)))
        .collect();
    for (k, (_, name, a)) in subnets.iter().enumerate() {
        for (j, _, b) in &subnets[k + 1..] {
            if a.contains(&b.network()) || b.contains(&a.network()) {
                return Err((*j, format!("{b} overlaps network `{name}` ({a})")));
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

    /// The error `text` is refused with.
    fn refused(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_network_gets_every_default() {
        let config = parse("[[network]]\nname = \"lab\"\nsubnet = \"10.42.0.0/24\"\n").unwrap();
        let net = &config.networks[0];
        assert_eq!(net.bridge, "lab");
        assert_eq!(net.mode, Mode::Nat);
        assert_eq!(net.own().router, Ipv4Addr::new(10, 42, 0, 1));
        assert_eq!(
            net.own().dhcp_range,
            (Ipv4Addr::new(10, 42, 0, 2), Ipv4Addr::new(10, 42, 0, 254))
        );
        assert_eq!(net.own().domain, "lab.qnet");
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
        assert_eq!(net.own().router, Ipv4Addr::new(10, 43, 0, 254));
        assert_eq!(net.own().blocked_ports.len(), 2);
        assert_eq!(net.own().blocked_ports[0].to_string(), "tcp/25");
        assert_eq!(
            net.own().ipv6.unwrap().router,
            "fd43::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(net.uplink.as_deref(), Some("eth0"));
    }

    #[test]
    fn errors_name_line_and_key() {
        let text = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\n\n[[network]]\nname = \"b\"\nsubnet = \"10.1.0.0/24\"\nrouter = \"10.9.9.9\"\n";
        let err = refused(text);
        assert_eq!(
            err,
            "/etc/qnet/hookd.toml:5: network `b`: `router`: 10.9.9.9 is not a host address of 10.1.0.0/24"
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors_with_a_line() {
        let err = refused("[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\nmtu = 9000\n");
        assert!(err.contains("line 4") && err.contains("mtu"), "{err}");
        let err =
            refused("[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\nmode = \"macvlan\"\n");
        assert!(err.contains("line 4") && err.contains("macvlan"), "{err}");
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
            let err = refused(&text);
            assert!(err.contains(&format!("`{key}`")), "{body}: {err}");
        }
    }

    /// A network named as one of the daemon's own directories in the run
    /// directory would share it (and delete it with itself).
    #[test]
    fn the_run_directorys_own_names_are_refused_as_network_names() {
        for name in RUN_DIRS {
            for mode in ["nat", "bridged"] {
                let text = format!(
                    "[[network]]\nname = \"{name}\"\nmode = \"{mode}\"\nsubnet = \"10.0.0.0/24\"\nuplink = \"eth0\"\n"
                );
                let err = refused(&text);
                assert!(
                    err.contains("`name`: `") && err.contains("reserved"),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn duplicate_names_bridges_and_overlapping_subnets_are_refused() {
        let dup = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\n[[network]]\nname = \"a\"\nsubnet = \"10.1.0.0/24\"\n";
        assert!(refused(dup).contains("`name`"));
        let bridge = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\n[[network]]\nname = \"b\"\nbridge = \"a\"\nsubnet = \"10.1.0.0/24\"\n";
        assert!(refused(bridge).contains("`bridge`"));
        let overlap = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/16\"\n[[network]]\nname = \"b\"\nsubnet = \"10.0.5.0/24\"\n";
        assert!(refused(overlap).contains("overlaps"));
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
        for (forwards, says) in [
            (
                "[[forward]]\nguest = \"web\"\nproto = \"tcp\"\nports = \"80-70\"\n",
                ":4: forward: `ports`",
            ),
            (
                "[[forward]]\nguest = \"a\"\nproto = \"tcp\"\nports = \"8080\"\n[[forward]]\nguest = \"b\"\nproto = \"tcp\"\nports = \"8000-8090\"\n",
                "overlaps",
            ),
            (
                "[[forward]]\nguest = \"a\"\nproto = \"tcp\"\nports = \"8080\"\nnetwork = \"nope\"\n",
                "no network `nope`",
            ),
        ] {
            let err = refused(&format!("{base}{forwards}"));
            assert!(err.contains(says), "{err}");
        }
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
        let err = refused("[limits]\nauto-reservations-per-nic = 0\n");
        assert!(
            err.contains("[limits]: `auto-reservations-per-nic`"),
            "{err}"
        );
        assert!(parse("[limits]\nbogus = 1\n").is_err());
    }

    #[test]
    fn overlapping_subnets_name_the_line_of_the_later_network() {
        let text = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/16\"\n\n[[network]]\nname = \"b\"\nsubnet = \"10.0.5.0/24\"\n";
        let err = refused(text);
        assert!(
            err.starts_with("/etc/qnet/hookd.toml:5: network `b`: `subnet`:"),
            "{err}"
        );
    }

    fn with_runtime(main: &str, runtime: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = Path::new("/etc/qnet/networks.d");
        ConfigFiles {
            main: PathBuf::from("/etc/qnet/hookd.toml"),
            main_text: Some(main.to_owned()),
            runtime: runtime
                .iter()
                .map(|(file, text)| RuntimeFile {
                    path: dir.join(file),
                    text: text.to_string(),
                })
                .collect(),
        }
        .parse()
    }

    #[test]
    fn runtime_networks_are_checked_with_hookd_toml_s_keys_and_messages() {
        let main = "[[network]]\nname = \"lab\"\nsubnet = \"10.0.0.0/24\"\n";
        let dev = "name = \"dev\"\nsubnet = \"10.1.0.0/24\"\nmode = \"isolated\"\n";
        let config = with_runtime(main, &[("dev.toml", dev)]).unwrap();
        assert_eq!(config.networks.len(), 2);
        assert!(!config.use_default_network);
        let origin = &config.origins[&NetName::from_str("dev").unwrap()];
        assert!(origin.runtime);
        assert!(origin.keys.contains("mode") && !origin.keys.contains("domain"));
        assert!(!config.origins[&NetName::from_str("lab").unwrap()].runtime);
        let cases = [
            ("dev.toml", "name = \"dev\"\nsubnet = \"10.0.0.128/25\"\n", "/etc/qnet/networks.d/dev.toml:1: network `dev`: `subnet`: 10.0.0.128/25 overlaps network `lab`"),
            ("dev.toml", "name = \"lab\"\nsubnet = \"10.1.0.0/24\"\n", "must be named lab.toml"),
            ("lab.toml", "name = \"lab\"\nsubnet = \"10.1.0.0/24\"\n", "another network has this name (/etc/qnet/hookd.toml:1)"),
            ("dev.toml", "name = \"dev\"\nsubnet = \"10.1.0.0/24\"\nmtu = 1\n", "unknown field `mtu`"),
            ("dev.toml", "name = \"dev\"\nsubnet = \"10.1.0.0/24\"\nrouter = \"10.9.9.9\"\n", "`router`: 10.9.9.9 is not a host address of 10.1.0.0/24"),
        ];
        for (file, text, expected) in cases {
            let err = with_runtime(main, &[(file, text)]).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn runtime_networks_keep_the_default_network_and_may_be_forwarded_to() {
        let dev = "name = \"dev\"\nsubnet = \"10.1.0.0/24\"\n";
        let config = with_runtime("", &[("dev.toml", dev)]).unwrap();
        assert!(
            config.use_default_network,
            "hookd.toml configures no network"
        );
        let clash = "name = \"qnet0\"\nsubnet = \"10.1.0.0/24\"\n";
        let err = with_runtime("", &[("qnet0.toml", clash)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("the default network has this name"), "{err}");
        let forward =
            "[[forward]]\nguest = \"g\"\nproto = \"tcp\"\nports = \"8080\"\nnetwork = \"dev\"\n";
        assert_eq!(
            with_runtime(forward, &[("dev.toml", dev)])
                .unwrap()
                .forwards
                .len(),
            1
        );
    }

    #[test]
    fn missing_file_means_default_network() {
        let config = Config::load(Path::new("/nonexistent/qnet/hookd.toml")).unwrap();
        assert!(config.use_default_network);
        let net = Config::default_network("10.213.7.0/24".parse().unwrap());
        assert_eq!(net.name, "qnet0");
        assert_eq!(net.bridge, "qnet0");
        assert_eq!(net.own().router, Ipv4Addr::new(10, 213, 7, 1));
        assert_eq!(net.mode, Mode::Nat);
    }

    /// Found while writing the hookd_toml fuzz target (and seeded into its
    /// corpus): the all-ones /128 made the default router overflow, a
    /// panic with the release profile's overflow checks.
    #[test]
    fn ipv6_subnet_without_hosts_is_an_error() {
        let text = "[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\nipv6 = { subnet = \"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128\" }\n";
        let err = refused(text);
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
            let err = refused(text);
            assert!(!err.chars().any(char::is_control), "{err:?}");
        }
    }
}
