//! The file as TOML gives it (`Raw*`, serde), and its validation into the
//! typed config: every key checked once, here, with the key named in the
//! error.

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) network: Vec<Spanned<RawNetwork>>,
    #[serde(default)]
    pub(super) forward: Vec<Spanned<RawForward>>,
    pub(super) default_network: Option<bool>,
    pub(super) limits: Option<RawLimits>,
    pub(super) firewall_integration: Option<bool>,
    pub(super) user_networks: Option<super::policy::RawPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawLimits {
    pub(super) auto_reservations_per_nic: Option<usize>,
    pub(super) reclaim_after_days: Option<u64>,
    pub(super) qmp_sessions_per_user: Option<usize>,
}

impl RawLimits {
    pub(super) fn validate(self) -> Result<Limits, Problem> {
        let d = Limits::default();
        let RawLimits {
            auto_reservations_per_nic: per_nic,
            qmp_sessions_per_user: sessions,
            reclaim_after_days: days,
        } = self;
        let per_nic = per_nic.unwrap_or(d.reservations.per_nic);
        let sessions = sessions.unwrap_or(d.qmp_sessions_per_user);
        let days = days.unwrap_or(d.reservations.reclaim_after / 86_400);
        within("auto-reservations-per-nic", per_nic, 1..=1024, "1-1024")?;
        within("qmp-sessions-per-user", sessions, 1..=100_000, "1-100000")?;
        within("reclaim-after-days", days, 0..=36_500, "at most 36500")?;
        Ok(Limits {
            reservations: ReservationLimits {
                per_nic,
                reclaim_after: days * 86_400,
            },
            qmp_sessions_per_user: sessions,
        })
    }
}

/// Unless `range` holds `value` of `key`: the problem, saying it must be
/// `expected`.
fn within<T: PartialOrd + fmt::Display>(
    key: &'static str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    expected: &str,
) -> Result<(), Problem> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err((key, format!("{value} must be {expected}")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawForward {
    pub(super) guest: String,
    pub(super) proto: Proto,
    pub(super) ports: String,
    pub(super) host_addr: Option<std::net::IpAddr>,
    pub(super) network: Option<String>,
}

impl RawForward {
    pub(super) fn validate(self) -> Result<ForwardSpec, Problem> {
        let guest = self
            .guest
            .parse()
            .map_err(|e: crate::api::Invalid| ("guest", e.0))?;
        let ports = PortMap::parse(&self.ports).map_err(|e| ("ports", e.0))?;
        Ok(ForwardSpec {
            guest,
            proto: self.proto,
            ports,
            host_addr: self.host_addr,
            network: self.network,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawNetwork {
    pub(super) name: String,
    pub(super) bridge: Option<String>,
    pub(super) mode: Option<Mode>,
    pub(super) subnet: Option<String>,
    pub(super) router: Option<Ipv4Addr>,
    pub(super) dhcp_range: Option<(Ipv4Addr, Ipv4Addr)>,
    pub(super) domain: Option<String>,
    pub(super) uplink: Option<String>,
    #[serde(default)]
    pub(super) blocked_ports: Vec<String>,
    pub(super) ipv6: Option<RawIpv6>,
    pub(super) firewall_integration: Option<bool>,
    pub(super) owner: Option<u32>,
    #[serde(default)]
    pub(super) connect_to: Vec<String>,
    #[serde(default)]
    pub(super) connect_to_one_way: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIpv6 {
    pub(super) subnet: String,
    pub(super) router: Option<Ipv6Addr>,
}

pub(super) type Problem = (&'static str, String);

impl RawNetwork {
    /// The keys this table sets.
    pub(super) fn keys(&self) -> BTreeSet<&'static str> {
        let set = [
            ("name", true),
            ("bridge", self.bridge.is_some()),
            ("mode", self.mode.is_some()),
            ("subnet", self.subnet.is_some()),
            ("router", self.router.is_some()),
            ("dhcp-range", self.dhcp_range.is_some()),
            ("domain", self.domain.is_some()),
            ("uplink", self.uplink.is_some()),
            ("blocked-ports", !self.blocked_ports.is_empty()),
            ("ipv6", self.ipv6.is_some()),
            ("firewall-integration", self.firewall_integration.is_some()),
            ("owner", self.owner.is_some()),
            ("connect-to", !self.connect_to.is_empty()),
            ("connect-to-one-way", !self.connect_to_one_way.is_empty()),
        ];
        set.into_iter()
            .filter(|(_, present)| *present)
            .map(|(key, _)| key)
            .collect()
    }

    /// A network with addresses of its own (every mode but bridged),
    /// validated.
    pub(super) fn validate_addressed(self) -> Result<NetworkConfig, Problem> {
        let name = network_name(&self.name)?;
        let bridge: IfName = typed("bridge", self.bridge.as_deref().unwrap_or(&self.name))?;
        let uplink: Option<IfName> = self
            .uplink
            .as_deref()
            .map(|u| typed("uplink", u))
            .transpose()?;
        let subnet = validate_subnet(self.subnet.as_deref())?;
        let first = u32::from(subnet.network()) + 1;
        let last = u32::from(subnet.broadcast()) - 1;
        let in_hosts = |a: Ipv4Addr| (first..=last).contains(&u32::from(a));
        let router = self.router.unwrap_or(Ipv4Addr::from(first));
        if !in_hosts(router) {
            return Err((
                "router",
                format!("{router} is not a host address of {subnet}"),
            ));
        }
        let dhcp_range = self
            .dhcp_range
            .unwrap_or((Ipv4Addr::from(first + 1), Ipv4Addr::from(last)));
        let (start, end) = dhcp_range;
        if !in_hosts(start) || !in_hosts(end) || u32::from(start) > u32::from(end) {
            return Err((
                "dhcp-range",
                format!("{start}..{end} must be host addresses of {subnet}, in order"),
            ));
        }
        if (u32::from(start)..=u32::from(end)).contains(&u32::from(router)) {
            return Err((
                "dhcp-range",
                format!("{start}..{end} contains the router address {router}"),
            ));
        }
        let domain: DomainName = typed(
            "domain",
            &self.domain.unwrap_or_else(|| format!("{}.qnet", self.name)),
        )?;
        let mut blocked_ports = Vec::new();
        for port in &self.blocked_ports {
            blocked_ports.push(typed("blocked-ports", port)?);
        }
        blocked_ports.sort();
        blocked_ports.dedup();
        let ipv6 = self.ipv6.map(validate_ipv6).transpose()?;
        let connect_to = validate_links(&self.connect_to, &self.connect_to_one_way)?;
        Ok(NetworkConfig {
            name,
            bridge,
            mode: self.mode.unwrap_or(Mode::Nat),
            uplink,
            owner: self.owner,
            addressing: Some(Addressing {
                subnet,
                router,
                dhcp_range,
                domain,
                blocked_ports,
                ipv6,
                connect_to,
            }),
        })
    }
}

impl NetworkConfig {
    /// A nat, routed or isolated network as a `[[network]]` table with
    /// only `name`, `mode` and `subnet` gives it: bridge named like the
    /// network, router `.1`, DHCP from `.2` to the last host, domain
    /// `NAME.qnet`, nothing else. For the built-in default network, tests
    /// and benchmarks, which pass constants: panics on a bridged `mode`, a
    /// name that is no network or bridge name, or a subnet under /29.
    pub fn with_defaults(name: &str, mode: Mode, subnet: Ipv4Net) -> NetworkConfig {
        RawNetwork {
            name: name.into(),
            mode: Some(mode),
            subnet: Some(subnet.to_string()),
            ..RawNetwork::default()
        }
        .validate()
        .unwrap_or_else(|(key, problem)| panic!("network `{name}`: {key}: {problem}"))
    }
}

impl Ipv6Config {
    /// `subnet` with its first host address as the router, as `ipv6 = {
    /// subnet = ... }` alone gives it; `None` for an all-ones /128, which
    /// has no host address (and adding one to it would overflow).
    pub fn first_router(subnet: Ipv6Net) -> Option<Ipv6Config> {
        let first = u128::from(subnet.network()).checked_add(1)?;
        Some(Ipv6Config {
            subnet,
            router: Ipv6Addr::from(first),
        })
    }
}

/// `connect-to` (two-way) and `connect-to-one-way` as one list of links,
/// sorted by name, each network once; a network in both lists is an error.
/// Whether the names exist is checked once every network is read
/// ([`super::links::check`]).
pub(super) fn validate_links(two_way: &[String], one_way: &[String]) -> Result<Vec<Link>, Problem> {
    let mut links = BTreeMap::new();
    for name in two_way {
        links.insert(typed::<NetName>("connect-to", name)?, false);
    }
    for name in one_way {
        let to: NetName = typed("connect-to-one-way", name)?;
        if links.get(&to) == Some(&false) {
            return Err((
                "connect-to-one-way",
                format!("`{to}` is in `connect-to` too: name it in one of the two"),
            ));
        }
        links.insert(to, true);
    }
    Ok(links
        .into_iter()
        .map(|(to, one_way)| Link { to, one_way })
        .collect())
}

/// `subnet` of a nat, routed or isolated network: required, an IPv4 CIDR
/// without host bits, /29 or larger.
fn validate_subnet(text: Option<&str>) -> Result<Ipv4Net, Problem> {
    let Some(text) = text else {
        return Err((
            "subnet",
            "missing: write the network's IPv4 subnet, e.g. subnet = \"10.42.0.0/24\"".into(),
        ));
    };
    let subnet: Ipv4Net = text.parse().map_err(|_| {
        (
            "subnet",
            format!("`{text}` is not an IPv4 CIDR such as 10.42.0.0/24"),
        )
    })?;
    if subnet != subnet.trunc() {
        return Err((
            "subnet",
            format!("`{subnet}` has host bits set: write `{}`", subnet.trunc()),
        ));
    }
    if subnet.prefix_len() > 29 {
        return Err((
            "subnet",
            format!("`{subnet}` is too small: use /29 or larger"),
        ));
    }
    Ok(subnet)
}

pub(super) fn validate_ipv6(raw: RawIpv6) -> Result<Ipv6Config, Problem> {
    let subnet: Ipv6Net = raw.subnet.parse().map_err(|_| {
        (
            "ipv6",
            format!("`{}` is not an IPv6 CIDR such as fd42::/64", raw.subnet),
        )
    })?;
    if subnet != subnet.trunc() {
        return Err((
            "ipv6",
            format!("`{subnet}` has host bits set: write `{}`", subnet.trunc()),
        ));
    }
    let first = Ipv6Config::first_router(subnet).map(|v6| v6.router);
    let Some(router) = raw.router.or(first) else {
        return Err(("ipv6", format!("`{subnet}` has no host address: use a /64")));
    };
    if !subnet.contains(&router) || router == subnet.network() {
        return Err((
            "ipv6",
            format!("router {router} is not a host address of {subnet}"),
        ));
    }
    Ok(Ipv6Config { subnet, router })
}

/// A network's name, which must not be one of the daemon's own
/// directories in the run directory ([`super::RUN_DIRS`]): each network's
/// dnsmasq files are `RUN/NET/`, removed with the network.
pub(super) fn network_name(value: &str) -> Result<NetName, Problem> {
    let name: NetName = typed("name", value)?;
    if super::RUN_DIRS.contains(&name.as_str()) {
        return Err((
            "name",
            format!("`{name}` is reserved (qnet keeps its own files in the run directory's {name}/): choose another name"),
        ));
    }
    Ok(name)
}

/// A typed value of `key`, or the problem with it.
pub(super) fn typed<T: FromStr<Err = crate::api::Invalid>>(
    key: &'static str,
    value: &str,
) -> Result<T, Problem> {
    value.parse().map_err(|e: crate::api::Invalid| (key, e.0))
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    1 + text[..offset.min(text.len())].matches('\n').count()
}

pub(super) fn toml_message(err: &toml::de::Error) -> String {
    let message = err.message().trim();
    match err.span() {
        Some(span) => {
            let line = line_of_span(err, span.start);
            format!("line {line}: {message}")
        }
        None => message.to_string(),
    }
}

pub(super) fn line_of_span(err: &toml::de::Error, offset: usize) -> usize {
    // toml's full Display holds "TOML parse error at line N, column M";
    // prefer it, fall back to counting from the offset we were given.
    let display = err.to_string();
    display
        .split("line ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(offset)
}
