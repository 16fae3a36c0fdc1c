//! The vocabulary every qnet door shares: values that are checked once,
//! where they enter (a request, a config file, a saved state file, QMP),
//! and are then known to be good everywhere else.
//!
//! Each type parses from a string (`FromStr`), prints in the one canonical
//! form (`Display`), and is a string in JSON and TOML: serde goes through
//! the same `FromStr`, so a bad value in a request or a file is refused
//! with the same message as on the command line.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use macaddr::MacAddr6;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A value that is not what it claims to be. The message names the value
/// and says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl Invalid {
    /// Unless `ok`: `text` refused, quoted (bounded, one line) and followed
    /// by `problem`.
    fn unless(ok: bool, text: &str, problem: &str) -> Result<(), Invalid> {
        if ok {
            Ok(())
        } else {
            Err(Invalid(format!("`{}` {problem}", preview(text))))
        }
    }
}

/// Serde as a string, through `Display` and `FromStr`.
macro_rules! string_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A string-backed name type: `Deref<Target = str>`, `Display`, `as_str`.
macro_rules! string_newtype {
    ($ty:ident) => {
        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $ty {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Maps keyed by the type can be looked up by `&str`: the order
        // and hash are those of the inner string.
        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        string_serde!($ty);
    };
}

/// Longest guest name (`-name`, a libvirt domain name) the daemon keeps.
pub const MAX_GUEST_NAME: usize = 255;

/// A string a peer gave (a QEMU's `-name`, anything else a QMP peer says)
/// as qnet keeps and shows it: each control character replaced by U+FFFD,
/// and cut to at most [`MAX_GUEST_NAME`] bytes on a character boundary.
/// Whatever is kept lives in every guest record, state file and `guests`
/// reply, and is printed in root's terminal by `qnetctl guests`: a peer
/// may send megabytes, or escape sequences that rewrite the terminal.
pub fn kept_text(text: &str) -> String {
    let mut kept = String::new();
    for c in text.chars() {
        let c = if c.is_control() {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        };
        // The replacement is 3 bytes: the bound is on what is kept.
        if kept.len() + c.len_utf8() > MAX_GUEST_NAME {
            break;
        }
        kept.push(c);
    }
    kept
}

/// A guest's name as qnet keeps it (QEMU's `-name`, a libvirt domain's
/// name): [`kept_text`] of what its peer said. Made, never refused, since a
/// guest is followed whatever it is called; parsing cannot fail either.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestName(String);

impl GuestName {
    /// `text` made safe to keep and show.
    pub fn kept(text: &str) -> GuestName {
        GuestName(kept_text(text))
    }
}

impl FromStr for GuestName {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<GuestName, Self::Err> {
        Ok(GuestName::kept(text))
    }
}

string_newtype!(GuestName);

/// A guest's UUID as QEMU (`query-uuid`) and libvirt (`<uuid>`) write it:
/// hex digits and `-`, at most 64 bytes. Unlike a name it is refused when
/// it is anything else: it keys reservations and forwards, and ends up in
/// saved state and logs.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestUuid(String);

impl FromStr for GuestUuid {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<GuestUuid, Invalid> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        Invalid::unless(
            ok,
            text,
            "is not a UUID such as 4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
        )?;
        Ok(GuestUuid(text.to_owned()))
    }
}

string_newtype!(GuestUuid);

/// A guest NIC's MAC address: unicast, printed lower-case as
/// `52:54:00:12:34:56` (as QEMU, libvirt and dnsmasq write it). Parses
/// `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` and `aabb.ccdd.eeff`, in
/// either case.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(MacAddr6);

impl Mac {
    /// A MAC the kernel reported (a device's address): not checked for
    /// unicast, since it is not a claim anybody makes to us.
    pub const fn from_octets(octets: [u8; 6]) -> Mac {
        Mac(MacAddr6::new(
            octets[0], octets[1], octets[2], octets[3], octets[4], octets[5],
        ))
    }

    pub const fn octets(&self) -> [u8; 6] {
        self.0.into_array()
    }

    /// The modified EUI-64 interface identifier (RFC 4291 appendix A):
    /// what a guest takes as the low 64 bits of its SLAAC address.
    pub fn eui64(&self) -> [u8; 8] {
        let b = self.octets();
        [b[0] ^ 0x02, b[1], b[2], 0xff, 0xfe, b[3], b[4], b[5]]
    }
}

impl FromStr for Mac {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<Mac, Invalid> {
        let mac = MacAddr6::from_str(text).map_err(|_| {
            Invalid(format!(
                "`{}` is not a MAC address such as 52:54:00:12:34:56",
                preview(text)
            ))
        })?;
        if mac.is_multicast() {
            return Err(Invalid(format!(
                "`{text}` is a multicast address, not a NIC's MAC"
            )));
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.octets();
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Compares with a MAC written in any accepted spelling.
impl PartialEq<&str> for Mac {
    fn eq(&self, other: &&str) -> bool {
        other.parse::<Mac>().is_ok_and(|m| m == *self)
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

string_serde!(Mac);

/// A network interface name as the kernel accepts it (1-15 bytes, no `/`,
/// `:` or whitespace): the rules of `qnet_hostnet::acl::check_name`, the
/// same the helpers apply.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfName(String);

impl FromStr for IfName {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<IfName, Invalid> {
        qnet_hostnet::acl::check_name(text)
            .map_err(|e| Invalid(format!("`{}`: {e}", preview(text))))?;
        Ok(IfName(text.to_owned()))
    }
}

string_newtype!(IfName);

/// A qnet network's name: 1-32 of `a-z A-Z 0-9 - _`. It becomes part of
/// file names, nft chain names and comments, so nothing else is allowed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetName(String);

pub const MAX_NET_NAME: usize = 32;

impl FromStr for NetName {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<NetName, Invalid> {
        let ok = !text.is_empty()
            && text.len() <= MAX_NET_NAME
            && text
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        Invalid::unless(
            ok,
            text,
            "must be 1-32 characters of a-z, A-Z, 0-9, `-`, `_`",
        )?;
        Ok(NetName(text.to_owned()))
    }
}

string_newtype!(NetName);

/// One DNS label: 1-63 of `a-z 0-9 -`, not starting or ending with `-`,
/// lower-case (upper-case letters are accepted and lowered).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsLabel(String);

pub const MAX_LABEL: usize = 63;

impl DnsLabel {
    /// The label a guest's name (`-name`, a libvirt domain name) gives:
    /// lower-cased, `_`, `.` and spaces turned into `-`, anything else
    /// dropped, `-` trimmed at both ends; `None` if nothing is left or
    /// more than 63 bytes remain.
    pub fn from_guest_name(name: &str) -> Option<DnsLabel> {
        let label: String = name
            .chars()
            .filter_map(|c| match c {
                'a'..='z' | '0'..='9' | '-' => Some(c),
                'A'..='Z' => Some(c.to_ascii_lowercase()),
                '_' | '.' | ' ' => Some('-'),
                _ => None,
            })
            .collect();
        label.trim_matches('-').parse().ok()
    }
}

impl FromStr for DnsLabel {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<DnsLabel, Invalid> {
        let problem = "is not a DNS name: use 1-63 letters, digits and `-`";
        Invalid::unless(is_label(text), text, problem)?;
        Ok(DnsLabel(text.to_ascii_lowercase()))
    }
}

string_newtype!(DnsLabel);

fn is_label(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_LABEL
        && text.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// A DNS domain such as `lab.qnet`: labels joined by `.`, at most 253
/// bytes, lower-case.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainName(String);

impl FromStr for DomainName {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<DomainName, Invalid> {
        let ok = text.len() <= 253 && text.split('.').all(is_label);
        Invalid::unless(ok, text, "is not a DNS domain such as lab.qnet")?;
        Ok(DomainName(text.to_ascii_lowercase()))
    }
}

string_newtype!(DomainName);

/// Transport protocol of a forward or a blocked port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(Invalid(format!(
                "`{}` is not a protocol: use tcp or udp",
                preview(other)
            ))),
        }
    }
}

/// Host ports `first..=last` forwarded to guest ports `guest..`, offsets
/// kept: `9000-9002:80` is 9000→80, 9001→81, 9002→82. Every value of this
/// type is valid: no port 0, `first <= last`, and the guest ports stay
/// within 1-65535, so arithmetic on them cannot overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortMap {
    first: u16,
    last: u16,
    guest: u16,
}

impl PortMap {
    pub fn new(first: u16, last: u16, guest: u16) -> Result<PortMap, Invalid> {
        let text = || {
            if first == last {
                format!("{first}:{guest}")
            } else {
                format!("{first}-{last}:{guest}")
            }
        };
        if first == 0 || last == 0 || guest == 0 {
            return Err(Invalid(format!("`{}`: port 0 cannot be forwarded", text())));
        }
        if last < first {
            return Err(Invalid(format!(
                "`{}`: the range ends before it starts",
                text()
            )));
        }
        if u32::from(guest) + u32::from(last - first) > u32::from(u16::MAX) {
            return Err(Invalid(format!(
                "`{}`: the guest ports would run past 65535",
                text()
            )));
        }
        Ok(PortMap { first, last, guest })
    }

    /// Parses `HOSTPORT[-HOSTPORT2][:GUESTPORT]` (the guest port defaults
    /// to the first host port).
    pub fn parse(text: &str) -> Result<PortMap, Invalid> {
        let bad = || {
            Invalid(format!(
                "`{}` is not HOSTPORT[-HOSTPORT2][:GUESTPORT], e.g. 8080 or 8080:80 or 9000-9009:9000",
                preview(text)
            ))
        };
        let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
        let (hosts, guest) = match text.split_once(':') {
            Some((hosts, guest)) => (hosts, Some(port(guest)?)),
            None => (text, None),
        };
        let (first, last) = match hosts.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(hosts)?, port(hosts)?),
        };
        PortMap::new(first, last, guest.unwrap_or(first))
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    /// The guest port of the first host port.
    pub fn guest(&self) -> u16 {
        self.guest
    }

    /// Whether `port` is one of the host ports.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Whether two maps share a host port.
    pub fn meets(&self, other: &PortMap) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// Each host port with its guest port.
    pub fn pairs(&self) -> impl Iterator<Item = (u16, u16)> {
        let (first, guest) = (self.first, self.guest);
        // In range by construction: guest + (last - first) <= 65535.
        (first..=self.last).map(move |host| (host, guest + (host - first)))
    }
}

impl FromStr for PortMap {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<PortMap, Invalid> {
        PortMap::parse(text)
    }
}

/// `8080:80`, `9000-9009:9000`, as [`PortMap::parse`] reads it.
impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}:{}", self.first, self.guest)
        } else {
            write!(f, "{}-{}:{}", self.first, self.last, self.guest)
        }
    }
}

/// At most this much of a bad value is echoed back: a peer must not be
/// able to make the daemon log or answer with megabytes of its input.
const PREVIEW: usize = 64;

/// `text`, cut to [`PREVIEW`] bytes with `…` and made one line (see
/// [`one_line`]).
pub fn preview(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= PREVIEW && !text.contains(char::is_control) {
        return text.into();
    }
    one_line(text, PREVIEW).into()
}

/// `text` as one line of about `max` bytes at most (the helpers' and
/// hookd's one escaping, for echoing what a peer sent).
pub use qnet_hostnet::protocol::one_line;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_name_is_made_safe_never_refused() {
        let name: GuestName = "web\u{1b}[2J".parse().unwrap();
        assert_eq!(name, "web\u{fffd}[2J");
        let read: GuestName = serde_json::from_str("\"a\\nb\"").unwrap();
        assert_eq!(read.as_str(), "a\u{fffd}b");
        assert_eq!(serde_json::to_string(&read).unwrap(), "\"a\u{fffd}b\"");
    }

    #[test]
    fn uuids_are_bounded() {
        let uuid = |text: &str| text.parse::<GuestUuid>();
        assert!(uuid("4dea22b3-1d52-d8f3-2516-782e98ab3fa0").is_ok());
        assert!(uuid("").is_err());
        assert!(uuid("../../etc").is_err());
        assert!(uuid(&"a".repeat(65)).is_err());
        let refused = serde_json::from_str::<GuestUuid>("\"\\u001b[2J\"").unwrap_err();
        assert!(
            refused.to_string().contains("is not a UUID such as"),
            "{refused}"
        );
    }

    #[test]
    fn kept_text_is_bounded_and_has_no_control_characters() {
        assert_eq!(kept_text("web-1 ü"), "web-1 ü");
        assert_eq!(
            kept_text("a\u{1b}[2Jb\nc\u{7f}"),
            "a\u{fffd}[2Jb\u{fffd}c\u{fffd}"
        );
        let long = "é".repeat(MAX_GUEST_NAME);
        let cut = kept_text(&long);
        assert!(cut.len() <= MAX_GUEST_NAME && cut.len() >= MAX_GUEST_NAME - 1);
        assert!(cut.chars().all(|c| c == 'é'));
        let escapes = kept_text(&"\u{1b}".repeat(MAX_GUEST_NAME));
        assert!(escapes.len() <= MAX_GUEST_NAME && escapes.len() >= MAX_GUEST_NAME - 2);
        assert!(escapes.chars().all(|c| c == char::REPLACEMENT_CHARACTER));
    }

    #[test]
    fn macs_parse_in_every_spelling_and_print_lower_case() {
        for text in ["52:54:00:AB:cd:0F", "52-54-00-ab-cd-0f", "5254.00ab.cd0f"] {
            assert_eq!(
                text.parse::<Mac>().unwrap().to_string(),
                "52:54:00:ab:cd:0f"
            );
        }
        for bad in [
            "52:54:00:ab:cd",
            "zz:54:00:ab:cd:0f",
            "",
            "52:54:00:ab:cd:0f:00",
            "5:54:00:ab:cd:ef",
            "52:54:00:ab:cd:eg",
            "+2:54:00:ab:cd:ef",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        let err = "01:00:5e:00:00:01".parse::<Mac>().unwrap_err();
        assert!(err.to_string().contains("multicast"), "{err}");
        let mac: Mac = serde_json::from_str("\"52:54:00:00:00:01\"").unwrap();
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            "\"52:54:00:00:00:01\""
        );
        assert!(serde_json::from_str::<Mac>("\"nope\"").is_err());
        assert_eq!(
            mac.eui64(),
            [0x50, 0x54, 0x00, 0xff, 0xfe, 0x00, 0x00, 0x01]
        );
    }

    #[test]
    fn names_follow_their_rules() {
        assert!("br0".parse::<IfName>().is_ok());
        for bad in ["", "waytoolongbridgename", "a/b", "a b", "a:b"] {
            assert!(bad.parse::<IfName>().is_err(), "{bad:?}");
        }
        assert!("lab_1-x".parse::<NetName>().is_ok());
        for bad in ["", "a.b", &"n".repeat(33), "ä"] {
            assert!(bad.parse::<NetName>().is_err(), "{bad:?}");
        }
        assert_eq!("Web1".parse::<DnsLabel>().unwrap(), "web1");
        for bad in ["", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(bad.parse::<DnsLabel>().is_err(), "{bad:?}");
        }
        assert_eq!("Lab.QNET".parse::<DomainName>().unwrap(), "lab.qnet");
        for bad in ["", "a..b", "bad domain", ".a"] {
            assert!(bad.parse::<DomainName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn guest_names_become_labels() {
        let label = |n: &str| DnsLabel::from_guest_name(n).map(|l| l.to_string());
        assert_eq!(label("Web_Server 1"), Some("web-server-1".into()));
        assert_eq!(label("--ä--"), None);
        assert_eq!(label(&"x".repeat(64)), None);
        assert_eq!(label("db.example"), Some("db-example".into()));
    }

    #[test]
    fn port_maps_are_always_valid() {
        let map = |t: &str| PortMap::parse(t).map(|m| (m.first(), m.last(), m.guest()));
        assert_eq!(map("8080"), Ok((8080, 8080, 8080)));
        assert_eq!(map("8080:80"), Ok((8080, 8080, 80)));
        assert_eq!(map("9000-9009:100"), Ok((9000, 9009, 100)));
        assert_eq!(map("9000-9009"), Ok((9000, 9009, 9000)));
        for bad in [
            "",
            "0",
            "x",
            "80-79",
            "65535-65535:0",
            "100-200:65500",
            "1:2:3",
            "80-",
            "60000-60010:65530",
            "0-0",
        ] {
            assert!(PortMap::parse(bad).is_err(), "{bad}");
        }
        let m = PortMap::new(65530, 65535, 65530).unwrap();
        assert_eq!(m.pairs().last(), Some((65535, 65535)));
        assert_eq!(m.to_string(), "65530-65535:65530");
        assert!(PortMap::new(9000, 8000, 80).is_err());
        assert!(PortMap::new(60000, 60010, 65530).is_err());
    }

    #[test]
    fn bad_values_are_echoed_only_in_part() {
        let long = "x".repeat(100_000);
        let err = long.parse::<Mac>().unwrap_err().to_string();
        assert!(err.len() < 200, "{}", err.len());
        assert!(preview(&"é".repeat(100)).ends_with('…'));
    }

    /// Found by the ctl_request and hookd_toml fuzz targets: a value with a
    /// line break or another control character was echoed raw, making an
    /// error two lines (or carrying a terminal escape).
    #[test]
    fn echoed_values_are_one_line() {
        assert_eq!(
            one_line("a\nb\u{1b}[2J\u{7f}", 100),
            "a\\nb\\u{1b}[2J\\u{7f}"
        );
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(preview("br\n0"), "br\\n0");
        let err = "eth0\n".parse::<IfName>().unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        let err = "lab\r\ninjected"
            .parse::<NetName>()
            .unwrap_err()
            .to_string();
        assert!(!err.chars().any(char::is_control), "{err}");
    }
}
