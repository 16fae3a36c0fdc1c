//! libvirt's network status files (`/run/libvirt/network/NET.xml`):
//! which bridge and subnet a libvirt network has, for guests on it.

use super::*;

#[derive(Debug, Deserialize)]
struct XmlNetworkStatus {
    /// `<networkstatus><network>...` (the live status file).
    #[serde(default)]
    network: Option<XmlNetwork>,
}

#[derive(Debug, Deserialize)]
struct XmlNetwork {
    name: String,
    #[serde(default)]
    forward: Option<XmlForward>,
    #[serde(default)]
    bridge: Option<XmlBridge>,
    #[serde(default, rename = "ip")]
    ips: Vec<XmlIp>,
}

#[derive(Debug, Deserialize)]
struct XmlForward {
    #[serde(default, rename = "@mode")]
    mode: Option<String>,
}

#[derive(Debug, Deserialize)]
struct XmlBridge {
    #[serde(default, rename = "@name")]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct XmlIp {
    #[serde(default, rename = "@family")]
    family: Option<String>,
    #[serde(default, rename = "@address")]
    address: Option<String>,
    #[serde(default, rename = "@netmask")]
    netmask: Option<String>,
    #[serde(default, rename = "@prefix")]
    prefix: Option<String>,
}

/// Reads a libvirt network's status (`/run/libvirt/network/NAME.xml`,
/// root `<networkstatus>` around `<network>`) or definition (root
/// `<network>`): name, bridge, forward mode, IPv4 subnets. `None` when the
/// network has no bridge of its own (`<forward mode='hostdev'>` and
/// friends): there is nothing hookd could follow.
pub fn parse_network_status(text: &str) -> Result<Option<LibvirtNetwork>, XmlError> {
    if text.len() as u64 > MAX_NETWORK_XML_BYTES {
        return Err(XmlError::new(Kind::Refused, "network XML too long"));
    }
    if text.contains("<!DOCTYPE") {
        return Err(XmlError::new(
            Kind::Refused,
            "network XML carries a DTD (<!DOCTYPE>): refused",
        ));
    }
    let malformed =
        |e: quick_xml::DeError| XmlError::new(Kind::Malformed, format!("network XML: {e}"));
    let status: XmlNetworkStatus = quick_xml::de::from_str(text).map_err(malformed)?;
    let network = match status.network {
        Some(network) => network,
        None => quick_xml::de::from_str::<XmlNetwork>(text).map_err(malformed)?,
    };
    let Some(bridge) = network
        .bridge
        .and_then(|b| b.name)
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
    else {
        return Ok(None);
    };
    let bridge: IfName = bridge
        .parse()
        .map_err(|e| XmlError::new(Kind::Invalid, format!("network XML: bridge {e}")))?;
    let mut subnets = Vec::new();
    for ip in &network.ips {
        if ip.family.as_deref().is_some_and(|f| f != "ipv4") {
            continue;
        }
        let Some(address) = ip.address.as_deref().and_then(|a| a.trim().parse().ok()) else {
            continue;
        };
        let prefix = match (&ip.prefix, &ip.netmask) {
            (Some(p), _) => p.trim().parse::<u8>().ok(),
            (None, Some(mask)) => mask
                .trim()
                .parse::<Ipv4Addr>()
                .ok()
                .and_then(|m| ipnet::ipv4_mask_to_prefix(m).ok()),
            (None, None) => None,
        };
        if let Some(net) = prefix.and_then(|p| Ipv4Net::new(address, p).ok()) {
            subnets.push(net);
        }
    }
    Ok(Some(LibvirtNetwork {
        name: network.name.trim().to_string(),
        bridge,
        // A `<forward>` without a mode is NAT.
        forward_mode: network
            .forward
            .map(|f| f.mode.unwrap_or_else(|| "nat".to_string())),
        subnets,
    }))
}

/// Reads one status file, bounded.
pub(crate) fn read_network_file(path: &Path) -> Result<Option<LibvirtNetwork>, XmlError> {
    let shown = path.display();
    let io = |e: std::io::Error| XmlError::new(Kind::Io, format!("{shown}: {e}"));
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(MAX_NETWORK_XML_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    parse_network_status(&text).map_err(|e| e.within(shown))
}

/// The running libvirt network an interface is on, from libvirt's status
/// files in `dir`: by name for `<source network=...>`, else the network
/// whose bridge `<source bridge=...>` names. `Ok(None)`: not on a running
/// libvirt network (a qnet network, a host bridge, ...).
pub fn find_libvirt_network(
    dir: &Path,
    iface: &Interface,
) -> Result<Option<LibvirtNetwork>, XmlError> {
    if let Some(name) = &iface.source_network {
        // A name, not a path.
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Ok(None);
        }
        let path = dir.join(format!("{name}.xml"));
        if !path.exists() {
            return Ok(None);
        }
        let mut network = read_network_file(&path)?;
        if let (Some(net), Some(bridge)) = (network.as_mut(), &iface.source_bridge) {
            // libvirt's live domain XML names the bridge it attached to.
            if let Ok(bridge) = bridge.parse() {
                net.bridge = bridge;
            }
        }
        return Ok(network);
    }
    let Some(bridge) = &iface.source_bridge else {
        return Ok(None);
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(XmlError::new(Kind::Io, format!("{}: {e}", dir.display()))),
    };
    for entry in entries.flatten().take(MAX_NETWORK_FILES) {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("xml") {
            continue;
        }
        // One broken file must not hide the others.
        if let Ok(Some(net)) = read_network_file(&path) {
            if net.bridge == bridge.as_str() {
                return Ok(Some(net));
            }
        }
    }
    Ok(None)
}
