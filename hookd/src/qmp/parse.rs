//! QMP's messages, parsed: pure functions from JSON values to what they
//! mean, with no I/O, so every one of them is unit-tested (and fuzzed)
//! on its own.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use serde_json::value::{to_raw_value, RawValue};
use serde_json::Value;

use super::shared::{Reply, ReplyError};
use super::types::{Greeting, NicInfo, QmpEvent};
use qnet_api::types::one_line;
use qnet_api::{kept_text, Mac};

/// One message after the greeting; a reply may borrow from its line.
#[derive(Debug)]
pub enum Message<'a> {
    Event(QmpEvent),
    /// A command's reply; `id` is the command's, if it is one of ours.
    Reply {
        id: Option<u64>,
        reply: Reply<'a>,
    },
}

/// Why a message is not QMP: the session ends with it as a protocol
/// error. Peer text in it is previewed (one line, bounded).
#[derive(Debug, thiserror::Error)]
pub enum NotQmp {
    #[error("expected a JSON object, got {0}")]
    NotAnObject(String),
    #[error("event name is not a string: {0}")]
    EventName(String),
    #[error("unexpected second greeting")]
    SecondGreeting,
    #[error("message is neither a reply nor an event (keys {0:?})")]
    Neither(Vec<String>),
    #[error("expected the QMP greeting, got event {0}")]
    EventForGreeting(String),
    #[error("expected the QMP greeting, got {0}")]
    NotAGreeting(String),
    /// Cannot happen for a parsed value; kept rather than a panic.
    #[error("cannot keep the reply: {0}")]
    Unkept(#[from] serde_json::Error),
}

/// What a message after the greeting is, or why it is not QMP.
pub fn message(message: Value) -> Result<Message<'static>, NotQmp> {
    let Value::Object(mut map) = message else {
        return Err(NotQmp::NotAnObject(preview_value(&message)));
    };
    if let Some(name) = map.get("event") {
        let Some(name) = name.as_str() else {
            return Err(NotQmp::EventName(preview_value(name)));
        };
        return Ok(Message::Event(parse_event(name, map.get("data"))));
    }
    let reply = if let Some(value) = map.remove("return") {
        Ok(Cow::Owned(to_raw_value(&value)?))
    } else if let Some(error) = map.get("error") {
        // QEMU's text goes into a one-line error: escaped and bounded.
        let field = |key: &str| {
            let text = error.get(key).and_then(Value::as_str);
            one_line(text.unwrap_or("(missing)"), MAX_ERROR_TEXT)
        };
        Err(ReplyError {
            class: field("class"),
            desc: field("desc"),
        })
    } else if map.contains_key("QMP") {
        return Err(NotQmp::SecondGreeting);
    } else {
        let keys = map.keys().take(8).cloned().collect();
        return Err(NotQmp::Neither(keys));
    };
    let id = map.get("id").and_then(Value::as_u64);
    Ok(Message::Reply { id, reply })
}

/// `line` read as a reply when it plainly is one (an object with a
/// `"return"`, an integer or no `"id"`, and no `"event"`), without a tree
/// of [`Value`]s: the `"return"` stays JSON text, borrowed from `line`,
/// until the command that waits for it decodes what it needs. QEMU's
/// `query-rx-filter` reply holds a 4,096-entry `vlan-table`: as Values
/// that is 128 KiB per guest while a burst of guests connect, as a copy
/// of the text 20 KiB, borrowed nothing. `None` for anything else, which
/// [`message`] reads from its Value (to the same result).
pub fn plain_reply(line: &[u8]) -> Option<Message<'_>> {
    /// Whether a member is there at all, whatever its value (`null`
    /// included, which `Option` would read as absent).
    #[derive(Default)]
    struct Present(bool);
    impl<'de> Deserialize<'de> for Present {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Present, D::Error> {
            IgnoredAny::deserialize(d).map(|_| Present(true))
        }
    }
    #[derive(Deserialize)]
    struct Plain<'a> {
        #[serde(rename = "return", borrow)]
        value: &'a RawValue,
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        event: Present,
    }
    // Only an object (serde would read a struct from an array too).
    if line.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    // Anything unusual (a repeated member, an id that is not an integer)
    // fails here and goes the general way.
    let plain: Plain = serde_json::from_slice(line).ok()?;
    (!plain.event.0).then_some(Message::Reply {
        id: plain.id,
        reply: Ok(Cow::Borrowed(plain.value)),
    })
}

/// The `{"QMP": {...}}` greeting, or why `message` is not one.
pub fn greeting(message: &Value) -> Result<Greeting, NotQmp> {
    let qmp = match message {
        Value::Object(map) => match map.get("QMP") {
            Some(Value::Object(qmp)) => qmp,
            _ if map.contains_key("event") => {
                return Err(NotQmp::EventForGreeting(preview_value(&map["event"])))
            }
            _ => return Err(NotQmp::NotAGreeting(preview_value(message))),
        },
        _ => return Err(NotQmp::NotAGreeting(preview_value(message))),
    };
    let version = qmp.get("version");
    let number = |key: &str| {
        version
            .and_then(|v| v.get("qemu"))
            .and_then(|q| q.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(Greeting {
        version: (number("major"), number("minor"), number("micro")),
        package: version
            .and_then(|v| v.get("package"))
            .and_then(Value::as_str)
            .map(kept_text)
            .unwrap_or_default(),
        capabilities: qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|caps| {
                caps.iter()
                    .filter_map(Value::as_str)
                    .take(16)
                    .map(kept_text)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

pub fn parse_event(name: &str, data: Option<&Value>) -> QmpEvent {
    let string = |key: &str| {
        data.and_then(|d| d.get(key))
            .and_then(Value::as_str)
            .map(kept_text)
    };
    match name {
        "SHUTDOWN" => QmpEvent::Shutdown {
            guest: data
                .and_then(|d| d.get("guest"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            reason: string("reason"),
        },
        "POWERDOWN" => QmpEvent::Powerdown,
        "RESET" => QmpEvent::Reset,
        "STOP" => QmpEvent::Stop,
        "RESUME" => QmpEvent::Resume,
        "NIC_RX_FILTER_CHANGED" => QmpEvent::NicRxFilterChanged {
            name: string("name"),
            path: string("path").unwrap_or_default(),
        },
        "DEVICE_DELETED" => QmpEvent::DeviceDeleted {
            device: string("device"),
            path: string("path").unwrap_or_default(),
        },
        other => QmpEvent::Other(kept_text(other)),
    }
}

/// Parses HMP `info network` output; keeps NICs (`type=nic`) once each
/// (multiqueue NICs have a line per queue). Lines it does not understand
/// are skipped.
pub fn parse_info_network(text: &str) -> Vec<NicInfo> {
    let mut nics: Vec<NicInfo> = Vec::new();
    for line in text.lines() {
        // Peers and hub ports are indented and prefixed with "\ ".
        let line = line.trim().trim_start_matches('\\').trim();
        let Some((name, rest)) = line.split_once(": ") else {
            continue;
        };
        let fields: Vec<(&str, &str)> = rest
            .split(',')
            .filter_map(|field| field.split_once('='))
            .collect();
        let field = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        if field("type") != Some("nic") || name.is_empty() || name.contains(char::is_whitespace) {
            continue;
        }
        let Some(mac) = field("macaddr").and_then(|m| m.parse::<Mac>().ok()) else {
            continue;
        };
        if nics.len() >= MAX_NICS {
            break;
        }
        // Cut first, then compare: two long names that share their first
        // MAX_GUEST_NAME bytes (see kept_text) are one NIC as far as we can tell them apart.
        let name = kept_text(name);
        if !nics.iter().any(|n| n.name == name) {
            nics.push(NicInfo { name, mac });
        }
    }
    nics
}

/// Most NICs kept of one guest (QEMU allows 32 PCI slots per bus).
pub const MAX_NICS: usize = 64;

pub fn is_nil_uuid(uuid: &str) -> bool {
    uuid.bytes().all(|b| b == b'0' || b == b'-')
}

const PREVIEW: usize = 80;
/// Longest error class or description of QEMU's kept (they are short).
const MAX_ERROR_TEXT: usize = 512;

pub fn preview_bytes(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(PREVIEW)]);
    let more = if bytes.len() > PREVIEW { "..." } else { "" };
    format!("{:?}{more}", text.trim_end())
}

/// `value` as compact JSON, cut to [`PREVIEW`] characters. JSON text
/// escapes line breaks but not DEL or C1 control characters, so those are
/// escaped too: the preview ends up in one-line messages.
pub fn preview_value(value: &Value) -> String {
    let text = value.to_string();
    let (text, more) = match text.char_indices().nth(PREVIEW) {
        Some((cut, _)) => (&text[..cut], "..."),
        None => (&text[..], ""),
    };
    format!("{}{more}", one_line(text, usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_network_names_are_unique_after_cutting() {
        // Found by the qmp fuzz target: names longer than the bound that
        // differ only after it came out twice under one (cut) name.
        let long = "n".repeat(qnet_api::MAX_GUEST_NAME);
        let text = format!(
            "{long}a: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:01\n\
             {long}b: index=1,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:02\n"
        );
        let nics = parse_info_network(&text);
        assert_eq!(nics.len(), 1, "{nics:?}");
        assert_eq!(nics[0].name, long);
    }

    #[test]
    fn info_network() {
        // QEMU 7.2, with an rtl8139 from -nic, a multiqueue NIC and a hub.
        let text = "rtl8139.0: index=0,type=nic,model=rtl8139,macaddr=52:54:00:00:00:09\r\n \\ #net000: index=0,type=user,net=10.0.2.0,restrict=off\r\n\
            nic1: index=0,type=nic,model=e1000,macaddr=52:54:00:AB:CD:EF\r\n \\ n1: index=0,type=user,net=10.0.2.0,restrict=off\r\n\
            mq: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:01\r\nmq: index=1,type=nic,model=virtio-net-pci,macaddr=52:54:00:00:00:01\r\n\
            hub 0\r\n \\ hub0port1: index=0,type=hubport,\r\n \\ net0: index=0,type=nic,model=e1000,macaddr=52:54:00:00:00:02\r\n\
            bad: index=0,type=nic,model=x,macaddr=zz\r\n";
        let nics = parse_info_network(text);
        let macs: Vec<String> = nics.iter().map(|n| n.mac.to_string()).collect();
        let names: Vec<(&str, &str)> = nics
            .iter()
            .zip(&macs)
            .map(|(n, mac)| (n.name.as_str(), mac.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("rtl8139.0", "52:54:00:00:00:09"),
                ("nic1", "52:54:00:ab:cd:ef"),
                ("mq", "52:54:00:00:00:01"),
                ("net0", "52:54:00:00:00:02"),
            ]
        );
    }

    #[test]
    fn events() {
        let data = serde_json::json!({"guest": true, "reason": "guest-shutdown"});
        assert_eq!(
            parse_event("SHUTDOWN", Some(&data)),
            QmpEvent::Shutdown {
                guest: true,
                reason: Some("guest-shutdown".into())
            }
        );
        assert_eq!(
            parse_event("SHUTDOWN", Some(&Value::Null)),
            QmpEvent::Shutdown {
                guest: false,
                reason: None
            }
        );
        assert_eq!(
            parse_event("FOO_BAR_FROM_QEMU_10", None),
            QmpEvent::Other("FOO_BAR_FROM_QEMU_10".into())
        );
    }

    /// Reproducer of the qmp fuzz target: a DEL in a key of a bad greeting
    /// was echoed raw in the session's error.
    #[test]
    fn previews_are_one_line() {
        let value: Value =
            serde_json::from_str("{\"QM\u{7f}\":{\"version\":{\"qemu\":{\"major\":7}}}}").unwrap();
        let err = greeting(&value).unwrap_err().to_string();
        assert!(!err.chars().any(char::is_control), "{err:?}");
        assert!(err.contains("\\u{7f}"), "{err}");
        let long = Value::String("\u{85}".repeat(1000));
        let preview = preview_value(&long);
        assert!(
            !preview.chars().any(char::is_control) && preview.len() < 1000,
            "{preview}"
        );
    }

    /// QEMU's error text becomes QmpError::Command's message: one line.
    #[test]
    fn reply_errors_are_one_line_and_bounded() {
        let desc = format!("bad\nthing{}", "x".repeat(100_000));
        let value =
            serde_json::json!({"error": {"class": "Generic\u{1b}Error", "desc": desc}, "id": 1});
        let Ok(Message::Reply {
            id: Some(1),
            reply: Err(e),
        }) = message(value)
        else {
            panic!("not an error reply");
        };
        for text in [&e.class, &e.desc] {
            assert!(
                !text.chars().any(char::is_control) && text.len() < 600,
                "{text:?}"
            );
        }
    }

    #[test]
    fn peer_strings_are_bounded_on_a_character_boundary() {
        assert_eq!(kept_text("web"), "web");
        let long = "é".repeat(qnet_api::MAX_GUEST_NAME);
        let cut = kept_text(&long);
        assert!(cut.len() <= qnet_api::MAX_GUEST_NAME && cut.len() >= qnet_api::MAX_GUEST_NAME - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        let data = serde_json::json!({"reason": "x".repeat(1 << 20)});
        let QmpEvent::Shutdown { reason, .. } = parse_event("SHUTDOWN", Some(&data)) else {
            panic!("not a shutdown");
        };
        assert_eq!(reason.unwrap().len(), qnet_api::MAX_GUEST_NAME);
        let many: String = (0..1000)
            .map(|i| {
                format!(
                    "n{i}: index=0,type=nic,model=e1000,macaddr=52:54:00:00:{:02x}:{:02x}\n",
                    i / 256,
                    i % 256
                )
            })
            .collect();
        assert_eq!(parse_info_network(&many).len(), MAX_NICS);
    }

    /// A plain reply reads as the general path reads it; anything else is
    /// left to the general path.
    #[test]
    fn plain_replies_read_as_the_general_way_does() {
        for line in [
            r#"{"return": {"a": [1, 2, {"b": null}]}, "id": 7}"#,
            r#"{"id": 1, "return": {}}"#,
            r#"{"return": "text", "error": {"class": "x"}}"#,
        ] {
            let Some(Message::Reply {
                id,
                reply: Ok(text),
            }) = plain_reply(line.as_bytes())
            else {
                panic!("not a plain reply: {line}");
            };
            let Ok(Message::Reply {
                id: general_id,
                reply: Ok(general),
            }) = message(serde_json::from_str(line).unwrap())
            else {
                panic!("not a reply: {line}");
            };
            assert_eq!(id, general_id);
            let value = |text: &RawValue| serde_json::from_str::<Value>(text.get()).unwrap();
            assert_eq!(value(&text), value(&general), "{line}");
        }
        for line in [
            r#"{"event": "STOP", "return": {}}"#,
            r#"{"event": null, "return": 1}"#,
            r#"{"return": 1, "id": "x"}"#,
            r#"{"return": 1, "return": 2}"#,
            r#"{"error": {"class": "GenericError", "desc": "no"}}"#,
            r#"[1]"#,
        ] {
            assert!(plain_reply(line.as_bytes()).is_none(), "{line}");
        }
    }

    #[test]
    fn nil_uuid() {
        assert!(is_nil_uuid("00000000-0000-0000-0000-000000000000"));
        assert!(!is_nil_uuid("6f1c1d3e-8a50-4d5b-9d0c-2b7cbb1e0a11"));
    }
}
