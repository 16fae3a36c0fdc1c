//! A network's configuration key by key, as hookd.toml would write it
//! (`qnetctl network show`), so what the daemon uses can be read back in
//! the file's own terms, defaults included.

use toml::Value;

use super::{Addressing, Link, NetworkConfig, Origin};
use crate::api::{Setting, SettingSource};

/// Every key of `net`, with `integration` its effective
/// `firewall-integration`, in the order the file documents them; where
/// each value came from per `origin` (`None`: the default network).
pub fn settings(net: &NetworkConfig, integration: bool, origin: Option<&Origin>) -> Vec<Setting> {
    let mut values = vec![
        ("name", text(&net.name)),
        ("bridge", text(&net.bridge)),
        ("mode", text(&net.mode)),
    ];
    let own = net.addressing.as_ref();
    values.extend(own.map(addresses).unwrap_or_default());
    if let Some(uplink) = &net.uplink {
        values.push(("uplink", text(uplink)));
    }
    values.extend(own.map(policy).unwrap_or_default());
    values.push((
        "firewall-integration",
        Value::Boolean(integration).to_string(),
    ));
    values.extend(own.map(|a| links(&a.connect_to)).unwrap_or_default());
    if let Some(owner) = net.owner {
        values.push(("owner", Value::Integer(i64::from(owner)).to_string()));
    }
    values
        .into_iter()
        .map(|(key, value)| Setting {
            key: key.to_owned(),
            value: value.trim().to_owned(),
            source: source(origin, key),
        })
        .collect()
}

/// A network's own addresses, as the file has them before `uplink`: a LAN
/// network has none.
fn addresses(a: &Addressing) -> Vec<(&'static str, String)> {
    vec![
        ("subnet", text(&a.subnet)),
        ("router", text(&a.router)),
        (
            "dhcp-range",
            list(vec![a.dhcp_range.0.to_string(), a.dhcp_range.1.to_string()]).to_string(),
        ),
        ("domain", text(&a.domain)),
    ]
}

/// `blocked-ports` and `ipv6`, which a LAN network does not have either.
fn policy(a: &Addressing) -> Vec<(&'static str, String)> {
    let ports = a.blocked_ports.iter().map(ToString::to_string).collect();
    let mut values = vec![("blocked-ports", list(ports).to_string())];
    if let Some(v6) = &a.ipv6 {
        let mut table = toml::Table::new();
        table.insert("subnet".into(), Value::String(v6.subnet.to_string()));
        table.insert("router".into(), Value::String(v6.router.to_string()));
        values.push(("ipv6", Value::Table(table).to_string()));
    }
    values
}

/// Each link under the key that declares it, two-way ones first.
fn links(connect_to: &[Link]) -> Vec<(&'static str, String)> {
    let (one_way, two_way): (Vec<&Link>, Vec<&Link>) = connect_to.iter().partition(|l| l.one_way);
    let mut values = Vec::new();
    for links in [two_way, one_way] {
        if let Some(first) = links.first() {
            let names = links.iter().map(|l| l.to.to_string()).collect();
            values.push((first.key(), list(names).to_string()));
        }
    }
    values
}

/// A value as TOML writes a string.
fn text(s: &dyn ToString) -> String {
    Value::String(s.to_string()).to_string()
}

/// A list of strings as TOML writes it.
fn list(items: Vec<String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

fn source(origin: Option<&Origin>, key: &str) -> SettingSource {
    match origin {
        Some(origin) if origin.keys.contains(key) && origin.runtime => SettingSource::RunTime,
        Some(origin) if origin.keys.contains(key) => SettingSource::Toml,
        _ => SettingSource::Default,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn every_key_is_shown_with_its_source() {
        let text =
            "[[network]]\nname = \"lab\"\nsubnet = \"10.42.0.0/24\"\ndomain = \"lab.example\"\n";
        let config = Config::parse(Path::new("/etc/qnet/hookd.toml"), text).unwrap();
        let net = &config.networks[0];
        let shown = settings(net, true, config.origins.get(&net.name));
        let get = |key: &str| shown.iter().find(|s| s.key == key).unwrap();
        assert_eq!(get("subnet").value, "\"10.42.0.0/24\"");
        assert_eq!(get("subnet").source, SettingSource::Toml);
        assert_eq!(get("domain").source, SettingSource::Toml);
        assert_eq!(get("router").value, "\"10.42.0.1\"");
        assert_eq!(get("router").source, SettingSource::Default);
        assert_eq!(get("dhcp-range").value, "[\"10.42.0.2\", \"10.42.0.254\"]");
        assert_eq!(get("firewall-integration").value, "true");
        // What is shown reads back as the same network.
        let mut table = String::from("[[network]]\n");
        for s in &shown {
            table.push_str(&format!("{} = {}\n", s.key, s.value));
        }
        let again = Config::parse(Path::new("/x.toml"), &table).unwrap();
        assert_eq!(&again.networks[0], net);
    }

    #[test]
    fn links_are_shown_under_the_key_that_declares_them() {
        let mut text = String::new();
        for (n, name, links) in [
            (
                1,
                "a",
                "connect-to-one-way = [\"c\"]\nconnect-to = [\"b\", \"d\"]\n",
            ),
            (2, "b", ""),
            (3, "c", ""),
            (4, "d", ""),
        ] {
            let subnet = format!("subnet = \"10.42.{n}.0/24\"\n");
            text.push_str(&format!("[[network]]\nname = \"{name}\"\n{subnet}{links}"));
        }
        let config = Config::parse(Path::new("/etc/qnet/hookd.toml"), &text).unwrap();
        let shown = settings(&config.networks[0], true, None);
        let links: Vec<(&str, &str)> = shown
            .iter()
            .filter(|s| s.key.starts_with("connect-to"))
            .map(|s| (s.key.as_str(), s.value.as_str()))
            .collect();
        assert_eq!(
            links,
            [
                ("connect-to", "[\"b\", \"d\"]"),
                ("connect-to-one-way", "[\"c\"]")
            ]
        );
        let unlinked = settings(&config.networks[1], true, None);
        assert!(!unlinked.iter().any(|s| s.key.starts_with("connect-to")));
    }

    #[test]
    fn a_lan_network_shows_only_the_keys_it_has() {
        let text = "[[network]]\nname = \"lan\"\nmode = \"bridged\"\nuplink = \"eth0\"\n";
        let config = Config::parse(Path::new("/etc/qnet/hookd.toml"), text).unwrap();
        let net = &config.networks[0];
        let shown = settings(net, true, config.origins.get(&net.name));
        let keys: Vec<&str> = shown.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            keys,
            ["name", "bridge", "mode", "uplink", "firewall-integration"]
        );
        // What is shown reads back as the same network.
        let mut table = String::from("[[network]]\n");
        for s in &shown {
            table.push_str(&format!("{} = {}\n", s.key, s.value));
        }
        let again = Config::parse(Path::new("/x.toml"), &table).unwrap();
        assert_eq!(&again.networks[0], net);
    }
}
