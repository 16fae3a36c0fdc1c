//! The control protocol: one vocabulary for `qnetctl`, the libvirt hook and
//! the daemon, so a request means the same thing from every door.
//!
//! Wire format: the client connects to the control socket, writes one
//! [`Request`] as a JSON line, and reads one [`Response`] as a JSON line.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub const DEFAULT_CTL_SOCKET: &str = "/run/qnet/ctl.sock";
pub const DEFAULT_QMP_SOCKET: &str = "/run/qnet/qmp.sock";
/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How a network reaches the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Guests reach out through masquerade; nothing reaches in unless forwarded.
    Nat,
    /// Like nat without masquerade: the subnet is routed.
    Routed,
    /// Guests reach each other and the host only.
    Isolated,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Nat => "nat",
            Mode::Routed => "routed",
            Mode::Isolated => "isolated",
        })
    }
}

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
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("`{other}` is not a protocol: use tcp or udp")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Networks and their state.
    Status,
    /// Running guests the caller may see.
    Guests,
    /// Reserve `ip` (or the next free address) for `mac` on `network`.
    ReserveAdd {
        network: String,
        mac: String,
        #[serde(default)]
        ip: Option<Ipv4Addr>,
        #[serde(default)]
        name: Option<String>,
    },
    ReserveRm {
        network: String,
        mac: String,
    },
    ReserveList {
        #[serde(default)]
        network: Option<String>,
    },
    NetworkUp {
        name: String,
    },
    NetworkDown {
        name: String,
    },
    /// Dial a QEMU QMP server socket and follow that guest.
    Attach {
        qmp: PathBuf,
    },
    /// Forward host port(s) to a guest, while the guest runs.
    ForwardAdd {
        #[serde(flatten)]
        forward: ForwardSpec,
    },
    /// Remove the forward of `proto` `host_port` (on `host_addr`).
    ForwardRm {
        proto: Proto,
        host_port: u16,
        #[serde(default)]
        host_addr: Option<IpAddr>,
    },
    ForwardList,
    /// A libvirt guest (from the libvirt hook, root only): reservations for
    /// its NICs on qnet networks, the forwards its domain XML declares, and,
    /// once QEMU runs (`pid`), a guest record the daemon watches until the
    /// process exits. Sending it again is idempotent: it replaces the
    /// guest's forwards and record.
    GuestRegister {
        name: String,
        uuid: String,
        #[serde(default)]
        nics: Vec<LibvirtNic>,
        #[serde(default)]
        forwards: Vec<ForwardSpec>,
        #[serde(default)]
        pid: Option<u32>,
    },
    /// The libvirt guest stopped: drop its record and its forwards (its
    /// reservations stay, sticky).
    GuestUnregister {
        uuid: String,
    },
}

/// One `<interface>` of a libvirt domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtNic {
    pub mac: String,
    /// `<source network=...>`: used when a qnet network has that name.
    #[serde(default)]
    pub network: Option<String>,
    /// `<source bridge=...>`: the qnet network owning that bridge.
    #[serde(default)]
    pub bridge: Option<String>,
    /// `<target dev=...>`: the host device, when libvirt names it.
    #[serde(default)]
    pub device: Option<String>,
    /// A fixed address (`<qnet:address>`) instead of one from the pool
    /// (on a libvirt network: the address the guest has, instead of its
    /// lease).
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// The libvirt network (one of libvirt's own, from libvirt's live
    /// network status) that `network` or `bridge` names, if any. Used when
    /// neither names a qnet network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_network: Option<LibvirtNetwork>,
}

/// One of libvirt's own networks, as its live status file describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtNetwork {
    pub name: String,
    /// Its bridge: libvirt's dnsmasq keeps the leases of the network in
    /// `/var/lib/libvirt/dnsmasq/BRIDGE.status`.
    pub bridge: String,
    /// `<forward mode=...>`: `nat`, `route`, `open`, ...; `None`: no
    /// `<forward>`, an isolated network.
    #[serde(default)]
    pub forward_mode: Option<String>,
    /// Its IPv4 subnets (`<ip address=... netmask|prefix=...>`).
    #[serde(default)]
    pub subnets: Vec<ipnet::Ipv4Net>,
}

impl LibvirtNetwork {
    /// Whether libvirt's own firewall rules let new connections from
    /// outside the host into the network. libvirt 9.0 rejects them in its
    /// iptables chain `LIBVIRT_FWI` for `nat` and isolated networks (only
    /// replies pass); `route` accepts them, `open` adds no rules, and the
    /// `bridge`/`hostdev`/macvtap modes do not route through the host.
    pub fn admits_inbound(&self) -> bool {
        !matches!(self.forward_mode.as_deref(), None | Some("nat"))
    }
}

/// A port forward as a user declares it: host port(s) → a guest's port(s).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    /// The guest's name (`-name`) or the MAC of one of its NICs.
    pub guest: String,
    pub proto: Proto,
    /// First and last host port (equal for a single port).
    pub host_ports: (u16, u16),
    /// The guest port the first host port goes to; the rest follow in order.
    pub guest_port: u16,
    /// Only this host address; `None`: every address of the host (and
    /// 127.0.0.1).
    #[serde(default)]
    pub host_addr: Option<IpAddr>,
    /// The network of the guest NIC to forward to; `None`: the guest's
    /// first NIC on a qnet network.
    #[serde(default)]
    pub network: Option<String>,
}

impl ForwardSpec {
    /// Parses `HOSTPORT[-HOSTPORT2][:GUESTPORT]` (the guest port defaults to
    /// the first host port; a range keeps its offsets).
    pub fn parse_ports(text: &str) -> Result<((u16, u16), u16), String> {
        let bad = || {
            format!("`{text}` is not HOSTPORT[-HOSTPORT2][:GUESTPORT], e.g. 8080 or 8080:80 or 9000-9009:9000")
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        let (hosts, guest) = match text.split_once(':') {
            Some((hosts, guest)) => (hosts, Some(port(guest)?)),
            None => (text, None),
        };
        let (start, end) = match hosts.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(hosts)?, port(hosts)?),
        };
        if end < start {
            return Err(format!("`{text}`: the range ends before it starts"));
        }
        let guest = guest.unwrap_or(start);
        if u32::from(guest) + u32::from(end - start) > 65535 {
            return Err(format!("`{text}`: the guest ports would run past 65535"));
        }
        Ok(((start, end), guest))
    }

    /// `tcp 8080-8081:80` as people write it.
    pub fn ports_text(&self) -> String {
        let (start, end) = self.host_ports;
        let hosts = if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        };
        format!("{} {hosts}:{}", self.proto, self.guest_port)
    }

    /// Whether two forwards claim a common host address + port + protocol.
    pub fn overlaps(&self, other: &ForwardSpec) -> bool {
        let addrs_meet = match (self.host_addr, other.host_addr) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        self.proto == other.proto
            && addrs_meet
            && self.host_ports.0 <= other.host_ports.1
            && other.host_ports.0 <= self.host_ports.1
    }
}

/// A forward and whether it is in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardInfo {
    #[serde(flatten)]
    pub forward: ForwardSpec,
    /// `config` (hookd.toml) or `runtime` (qnetctl, the libvirt hook).
    pub origin: String,
    /// The guest's address while the guest runs (the forward is active).
    pub guest_addr: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Ok(Reply),
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    Done { message: String },
    Status { networks: Vec<NetworkStatus> },
    Guests { guests: Vec<GuestStatus> },
    Reservations { reservations: Vec<Reservation> },
    Forwards { forwards: Vec<ForwardInfo> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub name: String,
    pub mode: Mode,
    pub bridge: String,
    pub subnet: String,
    pub router: Ipv4Addr,
    pub ipv6: Option<String>,
    pub up: bool,
    pub guests: usize,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub pid: u32,
    pub uid: u32,
    pub user: Option<String>,
    pub status: String,
    pub nics: Vec<GuestNic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNic {
    pub mac: String,
    /// The host device (TAP or macvtap) backing the NIC, when known.
    pub device: Option<String>,
    pub network: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// The bridge of the libvirt network the NIC is on, when `network` is
    /// one of libvirt's own networks rather than a qnet network: `ip` is
    /// then the address libvirt's dnsmasq leased (or the metadata's fixed
    /// address), and no qnet reservation exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_bridge: Option<String>,
}

impl GuestNic {
    /// Whether the NIC is on the qnet network `name` (a NIC on a libvirt
    /// network of the same name is not).
    pub fn is_on_qnet_network(&self, name: &str) -> bool {
        self.libvirt_bridge.is_none() && self.network.as_deref() == Some(name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub network: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    /// DNS name (without domain).
    pub name: Option<String>,
    /// Made by `reserve add` (kept until `reserve rm`), rather than
    /// assigned automatically when the guest first appeared.
    pub explicit: bool,
}

/// Normalises a MAC address to lower-case `aa:bb:cc:dd:ee:ff`.
pub fn normalize_mac(mac: &str) -> Result<String, String> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    let valid = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !valid {
        return Err(format!(
            "`{mac}` is not a MAC address such as 52:54:00:12:34:56"
        ));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
    if first & 1 == 1 {
        return Err(format!("`{mac}` is a multicast address, not a NIC's MAC"));
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let req = Request::ReserveAdd {
            network: "qnet0".into(),
            mac: "52:54:00:00:00:01".into(),
            ip: Some(Ipv4Addr::new(10, 0, 0, 5)),
            name: None,
        };
        let line = serde_json::to_string(&req).unwrap();
        assert!(line.contains("\"op\":\"reserve-add\""), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), req);
        let status: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(status, Request::Status);
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"network-up","name":"a","x":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
    }

    #[test]
    fn responses_are_ok_or_error() {
        let ok = Response::Ok(Reply::Done {
            message: "done".into(),
        });
        let line = serde_json::to_string(&ok).unwrap();
        assert_eq!(line, r#"{"ok":{"kind":"done","message":"done"}}"#);
        let err: Response = serde_json::from_str(r#"{"error":"no such network"}"#).unwrap();
        assert_eq!(err, Response::Error("no such network".into()));
    }

    #[test]
    fn forward_ports_parse() {
        assert_eq!(ForwardSpec::parse_ports("8080"), Ok(((8080, 8080), 8080)));
        assert_eq!(ForwardSpec::parse_ports("8080:80"), Ok(((8080, 8080), 80)));
        assert_eq!(
            ForwardSpec::parse_ports("9000-9009:100"),
            Ok(((9000, 9009), 100))
        );
        assert_eq!(
            ForwardSpec::parse_ports("9000-9009"),
            Ok(((9000, 9009), 9000))
        );
        for bad in [
            "",
            "0",
            "x",
            "80-79",
            "65535-65535:0",
            "100-200:65500",
            "1:2:3",
            "80-",
        ] {
            assert!(ForwardSpec::parse_ports(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwards_overlap_on_proto_address_and_ports() {
        let spec = |proto, (a, b), addr: Option<&str>| ForwardSpec {
            guest: "g".into(),
            proto,
            host_ports: (a, b),
            guest_port: a,
            host_addr: addr.map(|a| a.parse().unwrap()),
            network: None,
        };
        let web = spec(Proto::Tcp, (8080, 8090), None);
        assert!(web.overlaps(&spec(Proto::Tcp, (8090, 8095), None)));
        assert!(web.overlaps(&spec(Proto::Tcp, (8085, 8085), Some("10.0.0.1"))));
        assert!(!web.overlaps(&spec(Proto::Udp, (8085, 8085), None)));
        assert!(!web.overlaps(&spec(Proto::Tcp, (8091, 8099), None)));
        let a = spec(Proto::Tcp, (80, 80), Some("10.0.0.1"));
        assert!(!a.overlaps(&spec(Proto::Tcp, (80, 80), Some("10.0.0.2"))));
        assert_eq!(web.ports_text(), "tcp 8080-8090:8080");
    }

    #[test]
    fn macs_are_normalised() {
        assert_eq!(
            normalize_mac("52:54:00:AB:cd:0F").unwrap(),
            "52:54:00:ab:cd:0f"
        );
        assert_eq!(
            normalize_mac("52-54-00-ab-cd-0f").unwrap(),
            "52:54:00:ab:cd:0f"
        );
        assert!(normalize_mac("52:54:00:ab:cd").is_err());
        assert!(normalize_mac("01:00:5e:00:00:01").is_err());
        assert!(normalize_mac("zz:54:00:ab:cd:0f").is_err());
    }
}
