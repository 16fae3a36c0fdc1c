//! The libvirt domain XML as qnet reads it: name, UUID, interfaces, and
//! qnet's own block in `<metadata>` (see [`QNET_XMLNS`]).
//!
//! The input is hostile until proven otherwise: it is bounded
//! ([`MAX_XML_BYTES`]), must be UTF-8, may not carry a DTD (so no entity
//! can be defined), and may nest at most [`MAX_DEPTH`] elements deep. One
//! pass with a namespace-aware reader checks all that and picks out the
//! qnet block (whatever prefix the document gives the namespace); serde
//! then reads the domain's own elements, ignoring everything it does not
//! know.
//!
//! It also reads libvirt's live network status files
//! (`/run/libvirt/network/NAME.xml`, see [`parse_network_status`]) to tell
//! hookd which of a guest's NICs are on one of libvirt's own networks, and
//! on which bridge (whose lease file hookd then follows). Reading libvirt's
//! files is safe from a hook; calling libvirt is not (it waits for us).

pub mod cli;
mod error;
mod network;

pub use error::{HookError, XmlError, XmlErrorKind};
pub use network::{find_libvirt_network, parse_network_status};
use XmlErrorKind as Kind;

use std::collections::BTreeSet;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::Ipv4Net;
use qnet_api::{ForwardSpec, IfName, LibvirtNetwork, LibvirtNic, Mac, PortMap, Proto};
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;
use serde::Deserialize;

/// The XML namespace of qnet's `<metadata>` block. Stable: domains carry
/// it in their saved XML.
pub const QNET_XMLNS: &str = "https://qnet.example/xmlns/libvirt/1";
/// Longest domain XML the hook reads (libvirt's are a few KiB).
pub const MAX_XML_BYTES: usize = 4 * 1024 * 1024;
/// Deepest element nesting accepted (libvirt's is under 10).
pub const MAX_DEPTH: usize = 64;
/// Where libvirt keeps the live status of its running networks.
pub const LIBVIRT_NETWORK_DIR: &str = "/run/libvirt/network";
/// Longest network status file read (libvirt's are about 1 KiB).
pub const MAX_NETWORK_XML_BYTES: u64 = 1024 * 1024;
/// Most status files looked at when searching for a bridge's network.
const MAX_NETWORK_FILES: usize = 1024;

/// What qnet needs from a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub interfaces: Vec<Interface>,
    /// Whether the domain has a qnet block in its metadata (it then asks
    /// for qnet: without hookd it must not start).
    pub has_qnet: bool,
    pub forwards: Vec<ForwardSpec>,
    /// Fixed addresses: MAC → address.
    pub addresses: Vec<(Mac, Ipv4Addr)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `network`, `bridge`, `direct`, ...
    pub kind: String,
    pub mac: Mac,
    pub source_network: Option<String>,
    pub source_bridge: Option<String>,
    pub source_dev: Option<String>,
    pub target_dev: Option<String>,
}

impl DomainInfo {
    /// The NICs as the daemon takes them, with their fixed addresses.
    pub fn nics(&self) -> Vec<LibvirtNic> {
        self.nics_on(|_| None)
    }

    /// The NICs with the libvirt network each is on, found by `network_of`
    /// (e.g. [`find_libvirt_network`]).
    pub fn nics_on(
        &self,
        mut network_of: impl FnMut(&Interface) -> Option<LibvirtNetwork>,
    ) -> Vec<LibvirtNic> {
        self.interfaces
            .iter()
            .map(|i| LibvirtNic {
                mac: i.mac,
                network: i.source_network.clone(),
                bridge: if_name(&i.source_bridge),
                device: if_name(&i.target_dev),
                ip: self
                    .addresses
                    .iter()
                    .find(|(mac, _)| *mac == i.mac)
                    .map(|(_, ip)| *ip),
                libvirt_network: network_of(i),
            })
            .collect()
    }
}

/// A device name from the XML, when it is one the kernel could give a
/// device: any other names no device there is, so the daemon is not told.
fn if_name(name: &Option<String>) -> Option<IfName> {
    name.as_deref().and_then(|n| n.parse().ok())
}

// ----- serde view of the domain ---------------------------------------------

#[derive(Debug, Deserialize)]
struct XmlDomain {
    name: String,
    uuid: String,
    #[serde(default)]
    devices: XmlDevices,
}

#[derive(Debug, Default, Deserialize)]
struct XmlDevices {
    #[serde(default, rename = "interface")]
    interfaces: Vec<XmlInterface>,
}

#[derive(Debug, Deserialize)]
struct XmlInterface {
    #[serde(rename = "@type")]
    kind: String,
    #[serde(default)]
    mac: Option<XmlMac>,
    #[serde(default)]
    source: Option<XmlSource>,
    #[serde(default)]
    target: Option<XmlTarget>,
}

#[derive(Debug, Deserialize)]
struct XmlMac {
    #[serde(rename = "@address")]
    address: String,
}

#[derive(Debug, Deserialize)]
struct XmlSource {
    #[serde(default, rename = "@network")]
    network: Option<String>,
    #[serde(default, rename = "@bridge")]
    bridge: Option<String>,
    #[serde(default, rename = "@dev")]
    dev: Option<String>,
}

#[derive(Debug, Deserialize)]
struct XmlTarget {
    #[serde(default, rename = "@dev")]
    dev: Option<String>,
}

// ----- parsing -----------------------------------------------------------------

/// Reads the domain XML from raw bytes (stdin).
pub fn parse_domain_bytes(bytes: &[u8]) -> Result<DomainInfo, XmlError> {
    check_length(bytes.len())?;
    let text = std::str::from_utf8(bytes)
        .map_err(|e| XmlError::new(Kind::Refused, format!("domain XML is not UTF-8 ({e})")))?;
    parse_domain(text)
}

/// Refuses a domain XML of `len` bytes longer than [`MAX_XML_BYTES`],
/// whether it is to be read or only passed through.
pub fn check_length(len: usize) -> Result<(), XmlError> {
    if len <= MAX_XML_BYTES {
        return Ok(());
    }
    Err(XmlError::new(
        Kind::Refused,
        format!(
            "domain XML longer than {} MiB: refused",
            MAX_XML_BYTES / (1024 * 1024)
        ),
    ))
}

/// Reads the domain XML.
pub fn parse_domain(text: &str) -> Result<DomainInfo, XmlError> {
    check_length(text.len())?;
    let block = scan(text)?;
    let domain: XmlDomain = quick_xml::de::from_str(text)
        .map_err(|e| XmlError::new(Kind::Malformed, format!("domain XML: {e}")))?;
    if domain.name.trim().is_empty() {
        return Err(XmlError::new(Kind::Invalid, "domain XML: empty <name>"));
    }
    if domain.uuid.trim().is_empty() {
        return Err(XmlError::new(Kind::Invalid, "domain XML: empty <uuid>"));
    }
    let mut interfaces = Vec::new();
    for (i, iface) in domain.devices.interfaces.into_iter().enumerate() {
        // libvirt always writes a MAC; one without cannot be reserved.
        let Some(mac) = iface.mac else { continue };
        let mac: Mac = mac.address.parse().map_err(|e| {
            XmlError::new(
                Kind::Invalid,
                format!("domain XML: <interface> #{}: {e}", i + 1),
            )
        })?;
        let source = iface.source;
        interfaces.push(Interface {
            kind: iface.kind,
            mac,
            source_network: source.as_ref().and_then(|s| s.network.clone()),
            source_bridge: source.as_ref().and_then(|s| s.bridge.clone()),
            source_dev: source.as_ref().and_then(|s| s.dev.clone()),
            target_dev: iface.target.and_then(|t| t.dev),
        });
    }
    let name = domain.name.trim().to_string();
    let macs: BTreeSet<Mac> = interfaces.iter().map(|i| i.mac).collect();
    let mut forwards = Vec::new();
    for f in &block.forwards {
        if let Some(mac) = &f.mac {
            if !macs.contains(mac) {
                return Err(XmlError::new(
                    Kind::Metadata,
                    format!("qnet metadata: <forward mac=\"{mac}\">: the domain has no interface with that MAC"),
                ));
            }
        }
        let guest = match f.mac {
            Some(mac) => mac.to_string(),
            None => name.clone(),
        };
        forwards.push(ForwardSpec {
            guest: guest.parse().map_err(|e| {
                XmlError::new(Kind::Metadata, format!("qnet metadata: <forward>: {e}"))
            })?,
            proto: f.proto,
            ports: f.ports,
            host_addr: f.host_addr,
            network: f.network.clone(),
        });
    }
    for (mac, _) in &block.addresses {
        if !macs.contains(mac) {
            return Err(XmlError::new(
                Kind::Metadata,
                format!("qnet metadata: <address mac=\"{mac}\">: the domain has no interface with that MAC"),
            ));
        }
    }
    Ok(DomainInfo {
        name,
        uuid: domain.uuid.trim().to_string(),
        interfaces,
        has_qnet: block.present,
        forwards,
        addresses: block.addresses,
    })
}

#[derive(Debug, Default)]
struct QnetBlock {
    present: bool,
    forwards: Vec<RawForward>,
    addresses: Vec<(Mac, Ipv4Addr)>,
}

#[derive(Debug)]
struct RawForward {
    proto: Proto,
    ports: PortMap,
    host_addr: Option<IpAddr>,
    mac: Option<Mac>,
    network: Option<String>,
}

/// The checking pass: no DTD, bounded depth, well-formed, and the qnet
/// block of `<domain><metadata>` picked out by namespace.
fn scan(text: &str) -> Result<QnetBlock, XmlError> {
    let mut reader = NsReader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut block = QnetBlock::default();
    // Local names of the open elements (and whether each is in our
    // namespace).
    let mut stack: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut roots = 0;
    loop {
        let (ns, event) = reader.read_resolved_event().map_err(|e| {
            XmlError::new(
                Kind::Malformed,
                format!("domain XML is not well-formed: {e}"),
            )
        })?;
        let ours = matches!(ns, ResolveResult::Bound(n) if n.as_ref() == QNET_XMLNS.as_bytes());
        match event {
            Event::DocType(_) => {
                return Err(XmlError::new(
                    Kind::Refused,
                    "domain XML carries a DTD (<!DOCTYPE>): refused",
                ));
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                let local = e.local_name().as_ref().to_vec();
                if stack.is_empty() {
                    roots += 1;
                    check_root(e, &ns, roots)?;
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::new(
                        Kind::Refused,
                        format!("domain XML nests deeper than {MAX_DEPTH} elements: refused"),
                    ));
                }
                let in_metadata = stack.len() == 2 && stack[1].0 == b"metadata";
                let in_block = stack.len() == 3 && stack[1].0 == b"metadata" && stack[2].1;
                if ours && in_metadata {
                    if block.present {
                        return Err(XmlError::new(
                            Kind::Metadata,
                            format!(
                                "qnet metadata: more than one element in namespace {QNET_XMLNS}"
                            ),
                        ));
                    }
                    block.present = true;
                } else if ours && in_block {
                    qnet_element(&reader, e, &local, &mut block)?;
                }
                if !empty {
                    stack.push((local, ours));
                }
            }
            Event::End(_) => {
                stack.pop();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if roots == 0 {
        return Err(XmlError::new(Kind::Malformed, "domain XML is empty"));
    }
    Ok(block)
}

/// A root element (the `roots`th): the one root must be an unqualified
/// `<domain>`.
fn check_root(e: &BytesStart, ns: &ResolveResult, roots: usize) -> Result<(), XmlError> {
    if e.local_name().as_ref() != b"domain" || *ns != ResolveResult::Unbound {
        return Err(XmlError::new(
            Kind::Malformed,
            format!(
                "not a libvirt domain XML: the root element is <{}>",
                String::from_utf8_lossy(e.name().as_ref())
            ),
        ));
    }
    if roots > 1 {
        return Err(XmlError::new(
            Kind::Malformed,
            "domain XML has more than one root element",
        ));
    }
    Ok(())
}

/// One element of the qnet block.
fn qnet_element(
    reader: &NsReader<&[u8]>,
    e: &BytesStart<'_>,
    local: &[u8],
    block: &mut QnetBlock,
) -> Result<(), XmlError> {
    let attrs = Attrs::read(reader, e, local)?;
    match local {
        b"forward" => block.forwards.push(forward_element(&attrs)?),
        b"address" => {
            let (mac, ip) = address_element(&attrs)?;
            if block.addresses.iter().any(|(m, _)| *m == mac) {
                return Err(attrs.bad(format!("{mac} has two addresses")));
            }
            block.addresses.push((mac, ip));
        }
        // Unknown elements are for newer versions: ignored.
        _ => {}
    }
    Ok(())
}

/// The attributes of one element of the qnet block, decoded, with errors
/// that name the element.
struct Attrs {
    element: String,
    list: Vec<(String, String)>,
}

impl Attrs {
    fn read(reader: &NsReader<&[u8]>, e: &BytesStart<'_>, local: &[u8]) -> Result<Attrs, XmlError> {
        let mut attrs = Attrs {
            element: String::from_utf8_lossy(local).to_string(),
            list: Vec::new(),
        };
        for attr in e.attributes() {
            let attr = attr.map_err(|err| attrs.bad(err.to_string()))?;
            let key = String::from_utf8_lossy(attr.key.local_name().as_ref()).to_string();
            let value = attr
                .decode_and_unescape_value(reader.decoder())
                .map_err(|err| attrs.bad(format!("attribute `{key}`: {err}")))?
                .to_string();
            attrs.list.push((key, value));
        }
        Ok(attrs)
    }

    fn bad(&self, msg: String) -> XmlError {
        XmlError::new(
            Kind::Metadata,
            format!("qnet metadata: <{}>: {msg}", self.element),
        )
    }

    fn get(&self, key: &str) -> Option<String> {
        self.list
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim().to_string())
    }

    /// The attribute `key`, or an error saying what it should hold.
    fn require(&self, key: &str, what: &str) -> Result<String, XmlError> {
        self.get(key)
            .ok_or_else(|| self.bad(format!("missing attribute `{key}`{what}")))
    }

    /// Refuses an attribute not in `known` (a typo would silently do
    /// nothing otherwise).
    fn check_known(&self, known: &[&str]) -> Result<(), XmlError> {
        match self.list.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(self.bad(format!(
                "unknown attribute `{k}` (known: {})",
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

/// `<qnet:forward proto= host-port= [guest-port=] [host-addr=] [mac=] [network=]/>`.
fn forward_element(attrs: &Attrs) -> Result<RawForward, XmlError> {
    attrs.check_known(&[
        "proto",
        "host-port",
        "guest-port",
        "host-addr",
        "mac",
        "network",
    ])?;
    let bad = |msg: String| attrs.bad(msg);
    let proto: Proto = attrs
        .require("proto", " (tcp or udp)")?
        .parse()
        .map_err(|e: qnet_api::Invalid| bad(e.0))?;
    let host = attrs.require("host-port", " (a port or a range such as 9000-9009)")?;
    if host.contains(':') {
        return Err(bad(format!(
            "host-port `{host}`: give the guest port as guest-port"
        )));
    }
    let ports = match attrs.get("guest-port") {
        Some(guest) => format!("{host}:{guest}"),
        None => host,
    };
    let ports = PortMap::parse(&ports).map_err(|e| bad(e.0))?;
    let host_addr = attrs
        .get("host-addr")
        .map(|a| {
            a.parse::<IpAddr>()
                .map_err(|_| bad(format!("host-addr `{a}` is not an IP address")))
        })
        .transpose()?;
    let mac = attrs
        .get("mac")
        .map(|m| m.parse::<Mac>().map_err(|e| bad(e.0)))
        .transpose()?;
    Ok(RawForward {
        proto,
        ports,
        host_addr,
        mac,
        network: attrs.get("network").filter(|n| !n.is_empty()),
    })
}

/// `<qnet:address mac= ip=/>`.
fn address_element(attrs: &Attrs) -> Result<(Mac, Ipv4Addr), XmlError> {
    attrs.check_known(&["mac", "ip"])?;
    let mac: Mac = attrs
        .require("mac", "")?
        .parse()
        .map_err(|e: qnet_api::Invalid| attrs.bad(e.0))?;
    let ip = attrs.require("ip", "")?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| attrs.bad(format!("ip `{ip}` is not an IPv4 address")))?;
    Ok((mac, ip))
}
