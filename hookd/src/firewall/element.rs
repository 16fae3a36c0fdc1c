//! One port forward as one element of one of our four DNAT maps: its map,
//! its key and value as nft writes them, and as the kernel stores them.
//!
//! This is the vocabulary every other module of the firewall shares; it
//! depends on none of them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::api::Proto;

/// One forwarded host port (a port range is expanded into one
/// `ForwardElement` per port by the caller: `HOSTPORT-HOSTPORT2:GUESTPORT`
/// means GUESTPORT is the guest port of HOSTPORT, and the offsets are
/// kept, e.g. `9000-9002:80` is 9000→80, 9001→81, 9002→82).
///
/// It is one element of one map: `host_addr` `Some(v4)` → `fwd4`,
/// `Some(v6)` → `fwd6`, `None` → `fwd4_any` or `fwd6_any` after the
/// family of `guest_addr`. The map key is (host address, proto, host
/// port): two elements with the same key and different guests conflict.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ForwardElement {
    /// Tcp | Udp.
    pub proto: Proto,
    /// `None`: every local address of the host (for IPv4 including
    /// 127.0.0.1; for IPv6 excluding `::1`, which cannot be forwarded).
    pub host_addr: Option<IpAddr>,
    pub host_port: u16,
    /// IPv4 or IPv6; must be of the family of `host_addr` when that is set.
    pub guest_addr: IpAddr,
    pub guest_port: u16,
}

/// The four forward maps of `table inet qnet`, in the order nft lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Map {
    Fwd4,
    Fwd4Any,
    Fwd6,
    Fwd6Any,
}

impl Map {
    pub const ALL: [Map; 4] = [Map::Fwd4, Map::Fwd4Any, Map::Fwd6, Map::Fwd6Any];

    /// The map's name in our table.
    pub fn name(self) -> &'static str {
        match self {
            Map::Fwd4 => "fwd4",
            Map::Fwd4Any => "fwd4_any",
            Map::Fwd6 => "fwd6",
            Map::Fwd6Any => "fwd6_any",
        }
    }

    /// The map's `type` line: key `:` value.
    pub fn type_decl(self) -> &'static str {
        match self {
            Map::Fwd4 => "ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service",
            Map::Fwd4Any => "inet_proto . inet_service : ipv4_addr . inet_service",
            Map::Fwd6 => "ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service",
            Map::Fwd6Any => "inet_proto . inet_service : ipv6_addr . inet_service",
        }
    }
}

impl fmt::Display for Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an element cannot be installed, found before the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("port forward `{element}`: {problem}")]
pub struct InvalidElement {
    pub element: ForwardElement,
    pub problem: String,
}

impl ForwardElement {
    /// Why nft could not install this element, if it could not.
    pub fn problem(&self) -> Option<&'static str> {
        if self.host_port == 0 || self.guest_port == 0 {
            return Some("port 0 cannot be forwarded");
        }
        match (self.host_addr, self.guest_addr) {
            (Some(IpAddr::V4(_)), IpAddr::V6(_)) => {
                Some("an IPv4 host address needs an IPv4 guest address")
            }
            (Some(IpAddr::V6(_)), IpAddr::V4(_)) => {
                Some("an IPv6 host address needs an IPv6 guest address")
            }
            _ => None,
        }
    }

    /// The map this element belongs to.
    pub fn map(&self) -> Map {
        match (self.host_addr, self.guest_addr) {
            (Some(IpAddr::V4(_)), _) => Map::Fwd4,
            (Some(IpAddr::V6(_)), _) => Map::Fwd6,
            (None, IpAddr::V4(_)) => Map::Fwd4Any,
            (None, IpAddr::V6(_)) => Map::Fwd6Any,
        }
    }

    /// The element's key as nft writes it: `10.99.0.1 . tcp . 8080`, or
    /// `tcp . 8080` for any address.
    pub fn key(&self) -> String {
        match self.host_addr {
            Some(addr) => format!("{addr} . {} . {}", self.proto, self.host_port),
            None => format!("{} . {}", self.proto, self.host_port),
        }
    }

    /// The element's value: `10.42.0.10 . 80`.
    pub fn value(&self) -> String {
        format!("{} . {}", self.guest_addr, self.guest_port)
    }

    /// The order nft lists a map's elements in: by the key's bytes.
    pub(super) fn listing_order(&self) -> ListingOrder {
        let addr = match self.host_addr {
            Some(IpAddr::V4(a)) => a.octets().to_vec(),
            Some(IpAddr::V6(a)) => a.octets().to_vec(),
            None => Vec::new(),
        };
        (addr, proto_number(self.proto), self.host_port)
    }

    /// The key as the kernel stores it: `[host address .] proto . host
    /// port`, each field padded to whole 4-byte registers, in network byte
    /// order: `10.99.0.1 . tcp . 8080` is `0a 63 00 01 | 06 00 00 00 | 1f 90 00 00`.
    pub fn key_bytes(&self) -> Vec<u8> {
        let mut key = Vec::with_capacity(24);
        if let Some(addr) = self.host_addr {
            push_addr(&mut key, addr);
        }
        push_register(&mut key, &[proto_number(self.proto)]);
        push_register(&mut key, &self.host_port.to_be_bytes());
        key
    }

    /// The value as the kernel stores it: `guest address . guest port`.
    pub fn value_bytes(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(20);
        push_addr(&mut value, self.guest_addr);
        push_register(&mut value, &self.guest_port.to_be_bytes());
        value
    }

    /// The element of `map` the kernel stores as `key` → `value`; `None`
    /// for bytes no element of ours encodes (wrong lengths, a protocol
    /// other than TCP or UDP, padding that is not zero).
    pub fn from_bytes(map: Map, key: &[u8], value: &[u8]) -> Option<ForwardElement> {
        let v6 = matches!(map, Map::Fwd6 | Map::Fwd6Any);
        let (host_addr, rest) = match map {
            Map::Fwd4 | Map::Fwd6 => {
                let (addr, rest) = take_addr(key, v6)?;
                (Some(addr), rest)
            }
            Map::Fwd4Any | Map::Fwd6Any => (None, key),
        };
        let (proto, rest) = take_register(rest, 1)?;
        let proto = match proto[0] {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            _ => return None,
        };
        let (host_port, rest) = take_port(rest)?;
        let (guest_addr, value_rest) = take_addr(value, v6)?;
        let (guest_port, value_rest) = take_port(value_rest)?;
        (rest.is_empty() && value_rest.is_empty()).then_some(ForwardElement {
            proto,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
        })
    }
}

/// Sorts like nft's listing of a map: (address bytes, protocol number, port).
pub(super) type ListingOrder = (Vec<u8>, u8, u16);

fn proto_number(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    }
}

fn push_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// `field` padded with zeros to a whole number of 4-byte registers.
fn push_register(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(field);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The first `len` bytes of a register-padded field, and what follows it.
fn take_register(bytes: &[u8], len: usize) -> Option<(&[u8], &[u8])> {
    let padded = len.next_multiple_of(4);
    let field = bytes.get(..padded)?;
    field[len..]
        .iter()
        .all(|&b| b == 0)
        .then(|| (&field[..len], &bytes[padded..]))
}

fn take_addr(bytes: &[u8], v6: bool) -> Option<(IpAddr, &[u8])> {
    if v6 {
        let (field, rest) = take_register(bytes, 16)?;
        let octets: [u8; 16] = field.try_into().ok()?;
        Some((Ipv6Addr::from(octets).into(), rest))
    } else {
        let (field, rest) = take_register(bytes, 4)?;
        let octets: [u8; 4] = field.try_into().ok()?;
        Some((Ipv4Addr::from(octets).into(), rest))
    }
}

fn take_port(bytes: &[u8]) -> Option<(u16, &[u8])> {
    let (field, rest) = take_register(bytes, 2)?;
    Some((u16::from_be_bytes([field[0], field[1]]), rest))
}

/// `tcp 10.99.0.1:8080 -> 10.42.0.10:80`, `udp *:53 -> [fd42::10]:53`.
impl fmt::Display for ForwardElement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sock = |addr: IpAddr, port: u16| match addr {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        let host = match self.host_addr {
            Some(addr) => sock(addr, self.host_port),
            None => format!("*:{}", self.host_port),
        };
        write!(
            f,
            "{} {host} -> {}",
            self.proto,
            sock(self.guest_addr, self.guest_port)
        )
    }
}

/// Checks every element and that no two elements give one key different
/// guests (a duplicate is harmless).
pub fn check_elements(elements: &[ForwardElement]) -> Result<(), InvalidElement> {
    let mut seen: BTreeMap<(Map, String), &ForwardElement> = BTreeMap::new();
    for element in elements {
        if let Some(problem) = element.problem() {
            return Err(InvalidElement {
                element: *element,
                problem: problem.into(),
            });
        }
        if let Some(other) = seen.insert((element.map(), element.key()), element) {
            if other.value() != element.value() {
                return Err(InvalidElement {
                    element: *element,
                    problem: format!("conflicts with `{other}`: one host port, two guests"),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn rule(
        proto: Proto,
        host: Option<&str>,
        port: u16,
        guest: &str,
        gport: u16,
    ) -> ForwardElement {
        ForwardElement {
            proto,
            host_addr: host.map(|h| h.parse().unwrap()),
            host_port: port,
            guest_addr: guest.parse().unwrap(),
            guest_port: gport,
        }
    }

    #[test]
    fn keys_and_values_are_padded_registers_in_network_order() {
        let r = rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.10", 80);
        assert_eq!(r.key_bytes(), [10, 99, 0, 1, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]);
        assert_eq!(r.value_bytes(), [10, 42, 0, 10, 0, 80, 0, 0]);
        let any = rule(Proto::Udp, None, 53, "fd42::10", 5353);
        assert_eq!(any.key_bytes(), [17, 0, 0, 0, 0, 53, 0, 0]);
        let value = any.value_bytes();
        assert_eq!(value.len(), 20);
        assert_eq!(&value[16..], [0x14, 0xe9, 0, 0]);
        let v6 = rule(Proto::Tcp, Some("fd00::1"), 1, "fd42::10", 1);
        assert_eq!(v6.key_bytes().len(), 24);
    }

    #[test]
    fn bytes_read_back_into_the_same_element_in_every_map() {
        for element in [
            rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.10", 80),
            rule(Proto::Udp, None, 53, "10.42.0.11", 5353),
            rule(Proto::Tcp, Some("fd99::1"), 443, "fd42::10", 8443),
            rule(Proto::Udp, None, 65535, "fd42::11", 1),
        ] {
            let (key, value) = (element.key_bytes(), element.value_bytes());
            assert_eq!(
                ForwardElement::from_bytes(element.map(), &key, &value),
                Some(element)
            );
        }
    }

    #[test]
    fn bytes_no_element_of_ours_encodes_are_not_read() {
        let web = rule(Proto::Tcp, Some("10.99.0.1"), 8080, "10.42.0.10", 80);
        let (key, value) = (web.key_bytes(), web.value_bytes());
        // Another map's layout, a short key, a long value.
        assert_eq!(ForwardElement::from_bytes(Map::Fwd4Any, &key, &value), None);
        assert_eq!(
            ForwardElement::from_bytes(Map::Fwd4, &key[..8], &value),
            None
        );
        let mut long = value.clone();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(ForwardElement::from_bytes(Map::Fwd4, &key, &long), None);
        // SCTP, and dirt in the protocol's padding.
        let mut sctp = key.clone();
        sctp[4] = 132;
        assert_eq!(ForwardElement::from_bytes(Map::Fwd4, &sctp, &value), None);
        let mut dirty = key.clone();
        dirty[5] = 1;
        assert_eq!(ForwardElement::from_bytes(Map::Fwd4, &dirty, &value), None);
    }
}
