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

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use qnet_hookd::api::{self, ForwardSpec, LibvirtNic, Proto};
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
    /// Fixed addresses: MAC (normalised) → address.
    pub addresses: Vec<(String, Ipv4Addr)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `network`, `bridge`, `direct`, ...
    pub kind: String,
    /// Normalised MAC.
    pub mac: String,
    pub source_network: Option<String>,
    pub source_bridge: Option<String>,
    pub source_dev: Option<String>,
    pub target_dev: Option<String>,
}

impl DomainInfo {
    /// The NICs as the daemon takes them, with their fixed addresses.
    pub fn nics(&self) -> Vec<LibvirtNic> {
        self.interfaces
            .iter()
            .map(|i| LibvirtNic {
                mac: i.mac.clone(),
                network: i.source_network.clone(),
                bridge: i.source_bridge.clone(),
                device: i.target_dev.clone(),
                ip: self
                    .addresses
                    .iter()
                    .find(|(mac, _)| *mac == i.mac)
                    .map(|(_, ip)| *ip),
            })
            .collect()
    }
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
pub fn parse_domain_bytes(bytes: &[u8]) -> Result<DomainInfo, String> {
    if bytes.len() > MAX_XML_BYTES {
        return Err(format!(
            "domain XML longer than {} MiB: refused",
            MAX_XML_BYTES / (1024 * 1024)
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| format!("domain XML is not UTF-8 ({e})"))?;
    parse_domain(text)
}

/// Reads the domain XML.
pub fn parse_domain(text: &str) -> Result<DomainInfo, String> {
    if text.len() > MAX_XML_BYTES {
        return Err(format!(
            "domain XML longer than {} MiB: refused",
            MAX_XML_BYTES / (1024 * 1024)
        ));
    }
    let block = scan(text)?;
    let domain: XmlDomain =
        quick_xml::de::from_str(text).map_err(|e| format!("domain XML: {e}"))?;
    if domain.name.trim().is_empty() {
        return Err("domain XML: empty <name>".into());
    }
    if domain.uuid.trim().is_empty() {
        return Err("domain XML: empty <uuid>".into());
    }
    let mut interfaces = Vec::new();
    for (i, iface) in domain.devices.interfaces.into_iter().enumerate() {
        // libvirt always writes a MAC; one without cannot be reserved.
        let Some(mac) = iface.mac else { continue };
        let mac = api::normalize_mac(&mac.address)
            .map_err(|e| format!("domain XML: <interface> #{}: {e}", i + 1))?;
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
    let macs: BTreeSet<&str> = interfaces.iter().map(|i| i.mac.as_str()).collect();
    let mut forwards = Vec::new();
    for f in &block.forwards {
        if let Some(mac) = &f.mac {
            if !macs.contains(mac.as_str()) {
                return Err(format!(
                    "qnet metadata: <forward mac=\"{mac}\">: the domain has no interface with that MAC"
                ));
            }
        }
        forwards.push(ForwardSpec {
            guest: f.mac.clone().unwrap_or_else(|| name.clone()),
            proto: f.proto,
            host_ports: f.host_ports,
            guest_port: f.guest_port,
            host_addr: f.host_addr,
            network: f.network.clone(),
        });
    }
    for (mac, _) in &block.addresses {
        if !macs.contains(mac.as_str()) {
            return Err(format!(
                "qnet metadata: <address mac=\"{mac}\">: the domain has no interface with that MAC"
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
    addresses: Vec<(String, Ipv4Addr)>,
}

#[derive(Debug)]
struct RawForward {
    proto: Proto,
    host_ports: (u16, u16),
    guest_port: u16,
    host_addr: Option<IpAddr>,
    mac: Option<String>,
    network: Option<String>,
}

/// The checking pass: no DTD, bounded depth, well-formed, and the qnet
/// block of `<domain><metadata>` picked out by namespace.
fn scan(text: &str) -> Result<QnetBlock, String> {
    let mut reader = NsReader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut block = QnetBlock::default();
    // Local names of the open elements (and whether each is in our
    // namespace).
    let mut stack: Vec<(Vec<u8>, bool)> = Vec::new();
    let mut roots = 0;
    loop {
        let (ns, event) = reader
            .read_resolved_event()
            .map_err(|e| format!("domain XML is not well-formed: {e}"))?;
        let ours = matches!(ns, ResolveResult::Bound(n) if n.as_ref() == QNET_XMLNS.as_bytes());
        match event {
            Event::DocType(_) => {
                return Err("domain XML carries a DTD (<!DOCTYPE>): refused".into());
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                let local = e.local_name().as_ref().to_vec();
                if stack.is_empty() {
                    roots += 1;
                    if local != b"domain" || ns != ResolveResult::Unbound {
                        return Err(format!(
                            "not a libvirt domain XML: the root element is <{}>",
                            String::from_utf8_lossy(e.name().as_ref())
                        ));
                    }
                    if roots > 1 {
                        return Err("domain XML has more than one root element".into());
                    }
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(format!(
                        "domain XML nests deeper than {MAX_DEPTH} elements: refused"
                    ));
                }
                let in_metadata = stack.len() == 2 && stack[1].0 == b"metadata";
                let in_block = stack.len() == 3 && stack[1].0 == b"metadata" && stack[2].1;
                if ours && in_metadata {
                    if block.present {
                        return Err(format!(
                            "qnet metadata: more than one element in namespace {QNET_XMLNS}"
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
        return Err("domain XML is empty".into());
    }
    Ok(block)
}

/// One element of the qnet block.
fn qnet_element(
    reader: &NsReader<&[u8]>,
    e: &BytesStart<'_>,
    local: &[u8],
    block: &mut QnetBlock,
) -> Result<(), String> {
    let element = String::from_utf8_lossy(local).to_string();
    let bad = |msg: String| format!("qnet metadata: <{element}>: {msg}");
    let mut attrs: Vec<(String, String)> = Vec::new();
    for attr in e.attributes() {
        let attr = attr.map_err(|err| bad(err.to_string()))?;
        let key = String::from_utf8_lossy(attr.key.local_name().as_ref()).to_string();
        let value = attr
            .decode_and_unescape_value(reader.decoder())
            .map_err(|err| bad(format!("attribute `{key}`: {err}")))?
            .to_string();
        attrs.push((key, value));
    }
    let get = |key: &str| {
        attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim().to_string())
    };
    let check_known = |known: &[&str]| -> Result<(), String> {
        for (k, _) in &attrs {
            if !known.contains(&k.as_str()) {
                return Err(bad(format!(
                    "unknown attribute `{k}` (known: {})",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    };
    match local {
        b"forward" => {
            check_known(&[
                "proto",
                "host-port",
                "guest-port",
                "host-addr",
                "mac",
                "network",
            ])?;
            let proto: Proto = get("proto")
                .ok_or_else(|| bad("missing attribute `proto` (tcp or udp)".into()))?
                .parse()
                .map_err(bad)?;
            let host = get("host-port").ok_or_else(|| {
                bad("missing attribute `host-port` (a port or a range such as 9000-9009)".into())
            })?;
            if host.contains(':') {
                return Err(bad(format!(
                    "host-port `{host}`: give the guest port as guest-port"
                )));
            }
            let ports = match get("guest-port") {
                Some(guest) => format!("{host}:{guest}"),
                None => host,
            };
            let (host_ports, guest_port) = ForwardSpec::parse_ports(&ports).map_err(bad)?;
            let host_addr = get("host-addr")
                .map(|a| {
                    a.parse::<IpAddr>()
                        .map_err(|_| bad(format!("host-addr `{a}` is not an IP address")))
                })
                .transpose()?;
            let mac = get("mac")
                .map(|m| api::normalize_mac(&m).map_err(bad))
                .transpose()?;
            block.forwards.push(RawForward {
                proto,
                host_ports,
                guest_port,
                host_addr,
                mac,
                network: get("network").filter(|n| !n.is_empty()),
            });
        }
        b"address" => {
            check_known(&["mac", "ip"])?;
            let mac = get("mac").ok_or_else(|| bad("missing attribute `mac`".into()))?;
            let mac = api::normalize_mac(&mac).map_err(bad)?;
            let ip = get("ip").ok_or_else(|| bad("missing attribute `ip`".into()))?;
            let ip: Ipv4Addr = ip
                .parse()
                .map_err(|_| bad(format!("ip `{ip}` is not an IPv4 address")))?;
            if block.addresses.iter().any(|(m, _)| *m == mac) {
                return Err(bad(format!("{mac} has two addresses")));
            }
            block.addresses.push((mac, ip));
        }
        // Unknown elements are for newer versions: ignored.
        _ => {}
    }
    Ok(())
}
