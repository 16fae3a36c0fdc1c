//! `mode = "bridged"`: a LAN network ("shared physical interface"). Its
//! bridge takes over the `uplink`'s MAC, addresses and routes and
//! enslaves it (see `crate::lan`); guests get their addresses, router and
//! DNS from the LAN's own DHCP server. So such a network has no subnet,
//! router, DHCP range, domain, IPv6, blocked ports or links of its own,
//! takes no forwards, reservations or links, and qnet runs no dnsmasq for
//! it.
//!
//! ```toml
//! [[network]]
//! name = "lan"
//! mode = "bridged"
//! uplink = "eth0"               # required: the interface to share
//! bridge = "lan"                # default: the name
//! ```

use super::*;

impl NetworkConfig {
    /// A LAN network (`mode = "bridged"`): no dnsmasq, reservations,
    /// forwards or rules of ours, and no [`Addressing`].
    pub fn is_lan(&self) -> bool {
        self.mode == Mode::Bridged
    }

    /// Its addressing, in unit tests of networks that have one.
    #[cfg(test)]
    pub fn own(&self) -> &Addressing {
        self.addressing.as_ref().expect("a network with addressing")
    }

    /// The same, to change it.
    #[cfg(test)]
    pub fn own_mut(&mut self) -> &mut Addressing {
        self.addressing.as_mut().expect("a network with addressing")
    }
}

/// The keys a LAN network refuses, in the order they are reported.
const INAPPLICABLE: [&str; 8] = [
    "subnet",
    "router",
    "dhcp-range",
    "domain",
    "ipv6",
    "blocked-ports",
    "connect-to",
    "connect-to-one-way",
];

/// A `[[network]]` with `mode = "bridged"`, validated.
pub(super) fn validate_bridged(raw: RawNetwork) -> Result<NetworkConfig, Problem> {
    let name = super::raw::network_name(&raw.name)?;
    let bridge: IfName = typed("bridge", raw.bridge.as_deref().unwrap_or(&raw.name))?;
    let Some(uplink) = raw.uplink.as_deref() else {
        return Err((
            "uplink",
            "missing: a bridged network shares a physical interface, e.g. uplink = \"eth0\"".into(),
        ));
    };
    let uplink: IfName = typed("uplink", uplink)?;
    if uplink == bridge {
        return Err((
            "bridge",
            format!(
                "`{bridge}` is the uplink itself: name a new bridge that takes `{uplink}` over"
            ),
        ));
    }
    let set = raw.keys();
    if let Some(key) = INAPPLICABLE.into_iter().find(|key| set.contains(key)) {
        return Err((
            key,
            "does not apply to a bridged network: its guests get addresses, router and DNS \
             from the LAN's own DHCP server; remove it"
                .into(),
        ));
    }
    Ok(NetworkConfig {
        name,
        bridge,
        mode: Mode::Bridged,
        uplink: Some(uplink),
        owner: raw.owner,
        addressing: None,
    })
}

/// Uplinks across networks: a LAN network's uplink is its bridge's port,
/// so no other LAN network may share it, no network may use it as a
/// bridge, and a nat or routed network leaving through it must name the
/// bridge instead (the uplink carries no addresses any more). Returns the
/// index of the later network of a clash, the key, and why.
pub(super) fn check_uplinks(
    networks: &[NetworkConfig],
) -> Result<(), (usize, &'static str, String)> {
    for (j, later) in networks.iter().enumerate() {
        for earlier in &networks[..j] {
            let clash = clash(earlier, later).or_else(|| clash(later, earlier));
            if let Some((key, problem)) = clash {
                return Err((j, key, problem));
            }
        }
    }
    Ok(())
}

/// What is wrong with `other` next to the LAN network `lan`, if anything
/// (`None` too when `lan` is not a LAN network). The key is `other`'s when
/// the problem is `other`'s setting, else `uplink`.
fn clash(lan: &NetworkConfig, other: &NetworkConfig) -> Option<(&'static str, String)> {
    let uplink = lan.uplink.as_ref().filter(|_| lan.is_lan())?;
    let (name, bridge) = (&lan.name, &lan.bridge);
    if other.bridge == *uplink {
        return Some((
            "bridge",
            format!("`{uplink}` is the uplink of bridged network `{name}`"),
        ));
    }
    if other.is_lan() && other.uplink.as_ref() == Some(uplink) {
        return Some((
            "uplink",
            format!("`{uplink}` is already the uplink of bridged network `{name}`"),
        ));
    }
    if other.is_lan() && other.uplink.as_ref() == Some(bridge) {
        return Some((
            "uplink",
            format!("`{bridge}` is the bridge of bridged network `{name}`"),
        ));
    }
    if !other.is_lan() && other.uplink.as_ref() == Some(uplink) {
        return Some((
            "uplink",
            format!(
                "`{uplink}` is a port of bridged network `{name}`, whose bridge now carries \
                 its addresses: write uplink = \"{bridge}\""
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/qnet/hookd.toml"), text)
    }

    const LAN: &str = "[[network]]\nname = \"lan\"\nmode = \"bridged\"\nuplink = \"eth0\"\n";

    #[test]
    fn a_bridged_network_needs_an_uplink_and_nothing_else() {
        let config = parse(LAN).unwrap();
        let net = &config.networks[0];
        assert!(net.is_lan());
        assert_eq!((net.bridge.as_str(), net.mode), ("lan", Mode::Bridged));
        assert_eq!(net.uplink.as_ref().map(IfName::as_str), Some("eth0"));
        let err = parse("[[network]]\nname = \"lan\"\nmode = \"bridged\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`uplink`: missing"), "{err}");
        let err = parse(&format!("{LAN}bridge = \"eth0\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`bridge`: `eth0` is the uplink itself"),
            "{err}"
        );
    }

    #[test]
    fn keys_of_qnet_addressing_are_refused_on_a_bridged_network() {
        for (line, key) in [
            ("subnet = \"10.0.0.0/24\"", "subnet"),
            ("router = \"10.0.0.1\"", "router"),
            ("dhcp-range = [\"10.0.0.2\", \"10.0.0.9\"]", "dhcp-range"),
            ("domain = \"lan.example\"", "domain"),
            ("ipv6 = { subnet = \"fd00::/64\" }", "ipv6"),
            ("blocked-ports = [\"tcp/25\"]", "blocked-ports"),
            ("connect-to = [\"x\"]", "connect-to"),
        ] {
            let err = parse(&format!("{LAN}{line}\n")).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{key}`: does not apply to a bridged network")),
                "{err}"
            );
            assert!(
                err.starts_with("/etc/qnet/hookd.toml:1: network `lan`"),
                "{err}"
            );
        }
    }

    #[test]
    fn other_modes_still_need_a_subnet() {
        let err = parse("[[network]]\nname = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`subnet`: missing"), "{err}");
    }

    #[test]
    fn uplinks_may_not_clash() {
        let nat = |uplink: &str| {
            format!("[[network]]\nname = \"n\"\nsubnet = \"10.0.0.0/24\"\nuplink = \"{uplink}\"\n")
        };
        let err = parse(&format!("{LAN}{}", nat("eth0")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("network `n`: `uplink`"), "{err}");
        assert!(
            err.contains("write uplink = \\\"lan\\\"") || err.contains("write uplink = \"lan\""),
            "{err}"
        );
        assert!(parse(&format!("{LAN}{}", nat("lan"))).is_ok());
        // Either order.
        let err = parse(&format!("{}{LAN}", nat("eth0")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("network `lan`: `uplink`"), "{err}");
        let twin = "[[network]]\nname = \"lan2\"\nmode = \"bridged\"\nuplink = \"eth0\"\n";
        let err = parse(&format!("{LAN}{twin}")).unwrap_err().to_string();
        assert!(
            err.contains("already the uplink of bridged network `lan`"),
            "{err}"
        );
        let on_bridge = "[[network]]\nname = \"x\"\nbridge = \"eth0\"\nsubnet = \"10.1.0.0/24\"\n";
        let err = parse(&format!("{LAN}{on_bridge}")).unwrap_err().to_string();
        assert!(err.contains("`bridge`: `eth0` is the uplink"), "{err}");
        // Two LAN networks on two uplinks, no subnets to overlap.
        let other = "[[network]]\nname = \"lan2\"\nmode = \"bridged\"\nuplink = \"eth1\"\n";
        assert_eq!(parse(&format!("{LAN}{other}")).unwrap().networks.len(), 2);
    }

    #[test]
    fn links_to_a_bridged_network_are_refused() {
        let nat = "[[network]]\nname = \"n\"\nsubnet = \"10.0.0.0/24\"\nconnect-to = [\"lan\"]\n";
        let err = parse(&format!("{LAN}{nat}")).unwrap_err().to_string();
        assert!(
            err.contains("`connect-to`: `lan` is a bridged network"),
            "{err}"
        );
    }

    #[test]
    fn forwards_to_a_bridged_network_are_refused() {
        let text = format!(
            "{LAN}[[forward]]\nguest = \"web\"\nproto = \"tcp\"\nports = \"8080:80\"\nnetwork = \"lan\"\n"
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("forward: `network`"), "{err}");
        assert!(err.contains("bridged"), "{err}");
    }
}
