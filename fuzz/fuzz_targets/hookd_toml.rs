//! `hookd.toml`, the daemon's configuration (root-owned, but a typo or a
//! truncated file must be one clear error, never a panic).
//!
//! Properties: parsing never panics; an error is one line; an accepted
//! file keeps every invariant the daemon relies on (routers and DHCP
//! ranges inside their subnets, no overlaps, unique names and bridges,
//! forwards on declared networks and not overlapping); printing the
//! parsed configuration with every default written out and parsing it
//! again gives the same configuration. The same text read as a run-time
//! network's file (`networks.d/lab.toml`) keeps the first two.
#![no_main]

use std::fmt::Write;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use qnet_fuzz::{assert_bounded, assert_one_line};
use qnet_hookd::api::Mode;
use qnet_hookd::config::{Addressing, Config, ConfigFiles, NetworkConfig, RuntimeFile};

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn print(config: &Config) -> String {
    let mut out = String::new();
    if config.default_network_explicit {
        let _ = writeln!(out, "default-network = {}", config.use_default_network);
    }
    let _ = writeln!(out, "firewall-integration = {}", config.integration.global);
    let policy = &config.user_networks;
    let modes: Vec<String> = policy.modes.iter().map(|m| quote(m)).collect();
    let _ = writeln!(
        out,
        "[user-networks]\nper-user = {}\nmodes = [{}]\npool = \"{}\"\nprefix = {}",
        policy.per_user,
        modes.join(", "),
        policy.pool,
        policy.prefix
    );
    let limits = &config.limits;
    let _ = writeln!(
        out,
        "[limits]\nauto-reservations-per-nic = {}\nreclaim-after-days = {}\nqmp-sessions-per-user = {}",
        limits.reservations.per_nic,
        limits.reservations.reclaim_after / 86_400,
        limits.qmp_sessions_per_user
    );
    for n in &config.networks {
        print_network(&mut out, n);
        if let Some(on) = config.integration.per_network.get(&n.name) {
            let _ = writeln!(out, "firewall-integration = {on}");
        }
    }
    for f in &config.forwards {
        let _ = writeln!(
            out,
            "[[forward]]\nguest = {}\nproto = \"{}\"\nports = \"{}\"",
            quote(f.guest.as_str()),
            f.proto,
            f.ports
        );
        if let Some(addr) = f.host_addr {
            let _ = writeln!(out, "host-addr = \"{addr}\"");
        }
        if let Some(net) = &f.network {
            let _ = writeln!(out, "network = {}", quote(net));
        }
    }
    out
}

fn print_network(out: &mut String, n: &NetworkConfig) {
    let _ = writeln!(
        out,
        "[[network]]\nname = {}\nbridge = {}\nmode = \"{}\"",
        quote(&n.name),
        quote(&n.bridge),
        n.mode,
    );
    if let Some(uplink) = &n.uplink {
        let _ = writeln!(out, "uplink = {}", quote(uplink));
    }
    if let Some(owner) = n.owner {
        let _ = writeln!(out, "owner = {owner}");
    }
    // A LAN network has none of the rest.
    let Some(a) = &n.addressing else {
        return;
    };
    let _ = writeln!(
        out,
        "subnet = \"{}\"\nrouter = \"{}\"\ndhcp-range = [\"{}\", \"{}\"]\ndomain = {}",
        a.subnet,
        a.router,
        a.dhcp_range.0,
        a.dhcp_range.1,
        quote(&a.domain),
    );
    let ports: Vec<String> = a.blocked_ports.iter().map(|p| format!("\"{p}\"")).collect();
    let _ = writeln!(out, "blocked-ports = [{}]", ports.join(", "));
    if let Some(v6) = &a.ipv6 {
        let _ = writeln!(
            out,
            "ipv6 = {{ subnet = \"{}\", router = \"{}\" }}",
            v6.subnet, v6.router
        );
    }
    for (key, one_way) in [("connect-to", false), ("connect-to-one-way", true)] {
        let names: Vec<String> = a
            .connect_to
            .iter()
            .filter(|l| l.one_way == one_way)
            .map(|l| quote(&l.to))
            .collect();
        let _ = writeln!(out, "{key} = [{}]", names.join(", "));
    }
}

fn check_invariants(config: &Config) {
    let host = |a: &Addressing, ip: std::net::Ipv4Addr| {
        a.subnet.contains(&ip) && ip != a.subnet.network() && ip != a.subnet.broadcast()
    };
    for (i, n) in config.networks.iter().enumerate() {
        // Addressing exactly when the mode gives its guests addresses.
        assert_eq!(n.addressing.is_none(), n.mode == Mode::Bridged);
        for m in &config.networks[i + 1..] {
            assert!(n.name != m.name && n.bridge != m.bridge);
        }
        let Some(a) = &n.addressing else {
            continue;
        };
        assert!(a.subnet.prefix_len() <= 29 && a.subnet == a.subnet.trunc());
        assert!(host(a, a.router) && host(a, a.dhcp_range.0) && host(a, a.dhcp_range.1));
        assert!(a.dhcp_range.0 <= a.dhcp_range.1);
        assert!(!(a.dhcp_range.0..=a.dhcp_range.1).contains(&a.router));
        if let Some(v6) = &a.ipv6 {
            assert!(v6.subnet.contains(&v6.router) && v6.router != v6.subnet.network());
        }
        for link in &a.connect_to {
            let to = config.networks.iter().find(|m| m.name == link.to);
            assert!(to.is_some_and(|to| to.name != n.name && to.addressing.is_some()));
            assert!(n.mode != Mode::Isolated);
            assert!(link.one_way || to.is_some_and(|to| to.mode != Mode::Isolated));
        }
        for b in config.networks[i + 1..]
            .iter()
            .filter_map(|m| m.addressing.as_ref())
        {
            assert!(
                !a.subnet.contains(&b.subnet.network()) && !b.subnet.contains(&a.subnet.network())
            );
        }
    }
    for (i, f) in config.forwards.iter().enumerate() {
        if let Some(net) = &f.network {
            assert!(config.networks.iter().any(|n| n.name == net.as_str()));
        }
        assert!(config.forwards[i + 1..].iter().all(|g| !g.overlaps(f)));
    }
    // The default network stands in for hookd.toml's networks only.
    let from_main = config
        .networks
        .iter()
        .any(|n| config.origins.get(&n.name).is_some_and(|o| !o.runtime));
    assert!(!(config.use_default_network && from_main));
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    as_runtime_file(text, data.len());
    let path = Path::new("/etc/qnet/hookd.toml");
    let config = match Config::parse(path, text) {
        Ok(config) => config,
        Err(e) => return assert_one_line("config error", &e.to_string(), data.len()),
    };
    assert_bounded(
        "networks",
        config.networks.len() + config.forwards.len(),
        data.len() / 8,
    );
    check_invariants(&config);
    let printed = print(&config);
    let mut again = Config::parse(path, &printed)
        .unwrap_or_else(|e| panic!("the printed config does not parse: {e}\n{printed}"));
    // Where each network was written differs; what was written must not.
    let mut config = config;
    config.origins.clear();
    again.origins.clear();
    assert_eq!(config, again, "{printed}");
});

/// The text as the file of run-time network `lab`.
fn as_runtime_file(text: &str, len: usize) {
    let files = ConfigFiles {
        main: "/etc/qnet/hookd.toml".into(),
        main_text: None,
        runtime: vec![RuntimeFile {
            path: "/etc/qnet/networks.d/lab.toml".into(),
            text: text.to_owned(),
        }],
    };
    match files.parse() {
        Ok(config) => check_invariants(&config),
        Err(e) => assert_one_line("run-time network error", &e.to_string(), len),
    }
}
