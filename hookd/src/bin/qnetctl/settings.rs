//! Network keys from the command line into the values the daemon checks
//! (hookd.toml's keys and types): `--dhcp-range A-B` becomes the file's
//! `["A", "B"]`, `--blocked-ports tcp/25,udp/53` and `--set
//! connect-to-one-way=a,b` lists, and so on. The daemon validates them;
//! this only gives them their shape.

use qnet_api::{Invalid, Settings};
use qnet_hookd::cli::qnetctl::NetworkKeys;
use qnet_hookd::config::Link;
use serde_json::Value;

/// The settings `keys` name, `--set KEY=VALUE` ones last (they win).
pub fn from_keys(keys: NetworkKeys) -> Result<Settings, Invalid> {
    let named = [
        ("mode", keys.mode),
        ("subnet", keys.subnet),
        ("dhcp-range", keys.dhcp_range),
        ("domain", keys.domain),
        ("ipv6", keys.ipv6),
        ("blocked-ports", keys.blocked_ports),
        ("uplink", keys.uplink),
    ];
    let mut settings = Settings::new();
    for (key, text) in named {
        if let Some(text) = text {
            settings.insert(key.to_owned(), value(key, &text)?);
        }
    }
    for pair in keys.set {
        let (key, text) = pair
            .split_once('=')
            .ok_or_else(|| Invalid(format!("--set `{pair}`: write KEY=VALUE")))?;
        let key = key.trim();
        settings.insert(key.to_owned(), value(key, text.trim())?);
    }
    Ok(settings)
}

/// The value of `key` written as `text` on the command line.
pub fn value(key: &str, text: &str) -> Result<Value, Invalid> {
    let list = |text: &str| {
        Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )
    };
    Ok(match key {
        _ if text.starts_with('[') || text.starts_with('{') => {
            serde_json::from_str(text).map_err(|e| {
                Invalid(format!(
                    "`{key}`: `{text}` is not a JSON list or table: {e}"
                ))
            })?
        }
        "dhcp-range" => {
            let (first, last) = text.split_once(['-', ',']).ok_or_else(|| {
                Invalid(format!(
                    "`dhcp-range`: write FIRST-LAST, e.g. 10.0.0.100-10.0.0.199, not `{text}`"
                ))
            })?;
            list(&format!("{},{}", first.trim(), last.trim()))
        }
        "blocked-ports" => list(text),
        _ if key == Link::key_for(false) || key == Link::key_for(true) => list(text),
        "ipv6" => serde_json::json!({ "subnet": text }),
        "firewall-integration" => match text {
            "true" | "yes" | "on" => Value::Bool(true),
            "false" | "no" | "off" => Value::Bool(false),
            _ => {
                return Err(Invalid(format!(
                    "`{key}`: write true or false, not `{text}`"
                )))
            }
        },
        _ => Value::String(text.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_values_take_the_file_s_shapes() {
        let cases = [
            (
                "dhcp-range",
                "10.0.0.5-10.0.0.9",
                r#"["10.0.0.5","10.0.0.9"]"#,
            ),
            ("blocked-ports", "tcp/25, udp/53", r#"["tcp/25","udp/53"]"#),
            ("blocked-ports", "", "[]"),
            ("connect-to", "lab, dmz", r#"["lab","dmz"]"#),
            ("connect-to-one-way", "lab,dmz", r#"["lab","dmz"]"#),
            ("connect-to-one-way", "lab", r#"["lab"]"#),
            ("ipv6", "fd00::/64", r#"{"subnet":"fd00::/64"}"#),
            (
                "ipv6",
                r#"{"subnet":"fd00::/64","router":"fd00::9"}"#,
                r#"{"router":"fd00::9","subnet":"fd00::/64"}"#,
            ),
            ("firewall-integration", "off", "false"),
            ("subnet", "auto", r#""auto""#),
            ("mode", "isolated", r#""isolated""#),
        ];
        for (key, text, json) in cases {
            assert_eq!(value(key, text).unwrap().to_string(), json, "{key}={text}");
        }
        assert!(value("dhcp-range", "10.0.0.5").is_err());
        assert!(value("firewall-integration", "maybe").is_err());
    }
}
