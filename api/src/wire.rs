//! The control protocol: one vocabulary for `qnetctl`, the libvirt hook
//! and the daemon, so a request means the same thing from every door.
//!
//! Wire format: the client connects to the control socket, writes one
//! [`Request`] as a JSON line, and reads one
//! [`Response`](crate::reply::Response) as a JSON line.
//! Every field is a typed value ([`crate::types`]): a request that names a
//! bad MAC, port range or network is refused while it is decoded, before
//! the daemon acts on any of it.
//!
//! These are wire types only: the daemon keeps its own domain types and
//! its own saved-state types, and converts at its edges.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::{one_line, preview, GuestUuid, IfName, Invalid, Mac, NetName, PortMap, Proto};

pub const DEFAULT_CTL_SOCKET: &str = "/run/qnet/ctl.sock";
pub const DEFAULT_QMP_SOCKET: &str = "/run/qnet/qmp.sock";
/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
pub use crate::types::{kept_text, MAX_GUEST_NAME};

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
    /// Guests sit on the LAN of a physical interface (`uplink`): the
    /// network's bridge takes over the uplink's MAC, addresses and routes
    /// and enslaves it; the LAN's own DHCP serves the guests.
    Bridged,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Nat => "nat",
            Mode::Routed => "routed",
            Mode::Isolated => "isolated",
            Mode::Bridged => "bridged",
        })
    }
}

/// A guest as users name it: its name (`-name`, the libvirt domain name)
/// or the MAC of one of its NICs. 1-255 bytes, no control characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestRef(String);

impl GuestRef {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The MAC this names, if it is one.
    pub fn mac(&self) -> Option<Mac> {
        self.0.parse().ok()
    }
}

impl FromStr for GuestRef {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<GuestRef, Invalid> {
        if text.trim().is_empty() {
            return Err(Invalid("name a guest (its -name) or a NIC's MAC".into()));
        }
        if text.len() > MAX_GUEST_NAME || text.chars().any(char::is_control) {
            return Err(Invalid(format!(
                "`{}` is not a guest name: at most {MAX_GUEST_NAME} bytes, no control characters",
                preview(text)
            )));
        }
        Ok(GuestRef(text.to_owned()))
    }
}

impl PartialEq<str> for GuestRef {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for GuestRef {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for GuestRef {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl fmt::Display for GuestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GuestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for GuestRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for GuestRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
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
        network: NetName,
        mac: Mac,
        #[serde(default)]
        ip: Option<Ipv4Addr>,
        /// A DNS name; made into a label the way guest names are
        /// ([`DnsLabel::from_guest_name`]).
        #[serde(default)]
        name: Option<GuestRef>,
    },
    ReserveRm {
        network: NetName,
        mac: Mac,
    },
    ReserveList {
        #[serde(default)]
        network: Option<NetName>,
    },
    NetworkUp {
        name: NetName,
    },
    NetworkDown {
        name: NetName,
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
        name: GuestRef,
        uuid: GuestUuid,
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
        uuid: GuestUuid,
    },
    /// Check the path a guest's packets take on every network (or on one
    /// network, or on the networks of one guest): one [`Problem`] per
    /// thing that would drop them, each with its fix.
    Doctor {
        #[serde(default)]
        target: Option<String>,
        /// Also send synthetic guest packets through the real ruleset
        /// with nftrace on and report where they are dropped (root only:
        /// it adds a veth port to the bridge and a table for a second).
        #[serde(default)]
        trace: bool,
    },
    /// Create a network at run time. `settings` are hookd.toml's
    /// `[[network]]` keys (`mode`, `subnet`, `dhcp-range`, ...), checked
    /// by the daemon exactly as in the file; a missing `subnet`, or
    /// `"auto"`, picks a free one.
    NetworkCreate {
        name: NetName,
        #[serde(default)]
        settings: Settings,
    },
    /// Change keys of a run-time network (`unset` ones take their
    /// default). A new subnet for a network with reservations or running
    /// guests needs `force`.
    NetworkEdit {
        name: NetName,
        #[serde(default)]
        set: Settings,
        #[serde(default)]
        unset: Vec<String>,
        #[serde(default)]
        force: bool,
    },
    /// Delete a run-time network, with its reservations and the forwards
    /// that name it; one with running guests needs `force`.
    NetworkDelete {
        name: NetName,
        #[serde(default)]
        force: bool,
    },
    /// A network's whole configuration, and where each value came from.
    NetworkShow {
        name: NetName,
    },
    /// Let guests of `from` open connections to guests of `to` (and back,
    /// unless `one_way`); with `remove`, take that link away. Kept in the
    /// run-time file of `from` (`connect-to`, `connect-to-one-way`).
    NetworkLink {
        from: NetName,
        to: NetName,
        #[serde(default)]
        one_way: bool,
        #[serde(default)]
        remove: bool,
    },
    /// Re-read hookd.toml and the run-time networks and apply what
    /// changed (as SIGHUP does); `force` as for [`Request::NetworkEdit`].
    Reload {
        #[serde(default)]
        force: bool,
    },
    /// Stop a running guest through the QMP session the daemon holds
    /// (root, or the user its QEMU runs as): with `powerdown`, press its
    /// ACPI power button (`system_powerdown`) and wait that long for QEMU
    /// to exit first; then, or at once without it, tell QEMU to `quit`.
    GuestStop {
        guest: GuestRef,
        #[serde(default)]
        powerdown: Option<Grace>,
    },
}

/// Network keys and their values, as JSON values that map one to one onto
/// TOML's (strings, booleans, integers, arrays, tables).
pub type Settings = std::collections::BTreeMap<String, serde_json::Value>;

impl Request {
    /// Decodes one request line as the daemon's control socket receives
    /// it (the caller reads at most [`MAX_REQUEST_BYTES`] + 1 bytes). The
    /// error is the one line the client gets back.
    pub fn from_line(line: &str) -> Result<Request, BadRequest> {
        if line.len() > MAX_REQUEST_BYTES {
            return Err(BadRequest::TooLong);
        }
        if line.trim().is_empty() {
            return Err(BadRequest::Empty);
        }
        // serde's messages quote the offending variant or field name as
        // the client wrote it.
        serde_json::from_str(line)
            .map_err(|e| BadRequest::Malformed(one_line(&e.to_string(), 1024)))
    }

    /// How much longer than an ordinary request this one may take to be
    /// answered: a guest stop waits for QEMU to exit (after the power-down
    /// grace, if any). Client and daemon both add it to their timeouts.
    pub fn answer_takes(&self) -> Duration {
        match self {
            Request::GuestStop { powerdown, .. } => {
                QUIT_WAIT + powerdown.map(Grace::duration).unwrap_or_default()
            }
            _ => Duration::ZERO,
        }
    }
}

/// Why a control request line was refused; the client gets it back as an
/// [`ErrorKind::Invalid`] error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("request longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("empty request: send one JSON object such as {{\"op\":\"status\"}}")]
    Empty,
    /// serde's message, made one line and bounded.
    #[error("bad request: {0}")]
    Malformed(String),
}

/// How long the daemon waits for QEMU to exit after `quit`.
pub const QUIT_WAIT: Duration = Duration::from_secs(10);

/// How long a guest gets to power off before QEMU is told to quit: 0 to
/// [`Grace::MAX_SECS`] seconds. Bounded because the request holds a
/// control connection while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Grace(u16);

impl Grace {
    pub const MAX_SECS: u64 = 600;

    pub fn from_secs(secs: u64) -> Result<Grace, Invalid> {
        u16::try_from(secs)
            .ok()
            .filter(|&s| u64::from(s) <= Grace::MAX_SECS)
            .map(Grace)
            .ok_or_else(|| {
                Invalid(format!(
                    "a guest gets at most {} s to power down, not {secs}",
                    Grace::MAX_SECS
                ))
            })
    }

    pub fn duration(self) -> Duration {
        Duration::from_secs(self.0.into())
    }
}

impl TryFrom<u64> for Grace {
    type Error = Invalid;

    fn try_from(secs: u64) -> Result<Grace, Invalid> {
        Grace::from_secs(secs)
    }
}

impl From<Grace> for u64 {
    fn from(grace: Grace) -> u64 {
        grace.0.into()
    }
}

/// One `<interface>` of a libvirt domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtNic {
    pub mac: Mac,
    /// `<source network=...>`: used when a qnet network has that name.
    #[serde(default)]
    pub network: Option<String>,
    /// `<source bridge=...>`: the qnet network owning that bridge.
    #[serde(default)]
    pub bridge: Option<IfName>,
    /// `<target dev=...>`: the host device, when libvirt names it.
    #[serde(default)]
    pub device: Option<IfName>,
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
    pub bridge: IfName,
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
/// Always valid: it is decoded through [`PortMap::new`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "WireForward", into = "WireForward")]
pub struct ForwardSpec {
    /// The guest's name (`-name`) or the MAC of one of its NICs.
    pub guest: GuestRef,
    pub proto: Proto,
    pub ports: PortMap,
    /// Only this host address; `None`: every address of the host (and
    /// 127.0.0.1).
    pub host_addr: Option<IpAddr>,
    /// The network of the guest NIC to forward to; `None`: the guest's
    /// first NIC on a qnet network.
    pub network: Option<String>,
}

/// [`ForwardSpec`] as it travels: `host_ports` and `guest_port` as plain
/// numbers, checked into a [`PortMap`] on the way in.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireForward {
    guest: GuestRef,
    proto: Proto,
    host_ports: (u16, u16),
    guest_port: u16,
    #[serde(default)]
    host_addr: Option<IpAddr>,
    #[serde(default)]
    network: Option<String>,
}

impl TryFrom<WireForward> for ForwardSpec {
    type Error = Invalid;

    fn try_from(w: WireForward) -> Result<ForwardSpec, Invalid> {
        Ok(ForwardSpec {
            guest: w.guest,
            proto: w.proto,
            ports: PortMap::new(w.host_ports.0, w.host_ports.1, w.guest_port)?,
            host_addr: w.host_addr,
            network: w.network,
        })
    }
}

impl From<ForwardSpec> for WireForward {
    fn from(f: ForwardSpec) -> WireForward {
        WireForward {
            guest: f.guest,
            proto: f.proto,
            host_ports: (f.ports.first(), f.ports.last()),
            guest_port: f.ports.guest(),
            host_addr: f.host_addr,
            network: f.network,
        }
    }
}

impl ForwardSpec {
    /// `tcp 8080-8081:80` as people write it.
    pub fn ports_text(&self) -> String {
        format!("{} {}", self.proto, self.ports)
    }

    /// Whether two forwards claim a common host address + port + protocol.
    pub fn overlaps(&self, other: &ForwardSpec) -> bool {
        let addrs_meet = match (self.host_addr, other.host_addr) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        self.proto == other.proto && addrs_meet && self.ports.meets(&other.ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{ApiError, ErrorKind, Reply, Response};

    /// Reproducer of the ctl_request fuzz target: serde quoted the unknown
    /// variant raw, so a DEL or a line break reached the client's terminal.
    #[test]
    fn refused_requests_get_one_line() {
        for line in [
            "{\"op\":\"for\u{7f}ard-rm\",\"proto\":\"udp\"*,\"host_port\":\"forward-rm\",",
            "{\"op\":\"status\",\"x\ny\":1}",
            "{\"op\":\"network-up\",\"name\":\"a\\nb\"}",
            "",
            &"x".repeat(MAX_REQUEST_BYTES + 1),
        ] {
            let err = Request::from_line(line).unwrap_err().to_string();
            assert!(!err.chars().any(char::is_control), "{err:?}");
            assert!(err.len() < 2048, "{}", err.len());
        }
        assert_eq!(
            Request::from_line("{\"op\":\"status\"}\n"),
            Ok(Request::Status)
        );
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let req = Request::ReserveAdd {
            network: "qnet0".parse().unwrap(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
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
    fn responses_are_ok_or_an_error_with_a_kind() {
        let ok = Response::Ok(Reply::Done {
            message: "done".into(),
        });
        let line = serde_json::to_string(&ok).unwrap();
        assert_eq!(line, r#"{"ok":{"kind":"done","message":"done"}}"#);
        let err: Response =
            serde_json::from_str(r#"{"error":{"kind":"not-found","message":"no such network"}}"#)
                .unwrap();
        assert_eq!(
            err,
            Response::Error(ApiError::new(ErrorKind::NotFound, "no such network"))
        );
        assert_eq!(ErrorKind::NotFound.to_string(), "not-found");
    }

    #[test]
    fn forwards_are_checked_while_decoded() {
        let forward = |ports: &str, guest_port: u32| {
            serde_json::from_str::<Request>(&format!(
                r#"{{"op":"forward-add","guest":"web","proto":"tcp","host_ports":{ports},"guest_port":{guest_port}}}"#
            ))
        };
        let good = forward("[8080,8081]", 80).unwrap();
        let Request::ForwardAdd { forward: spec } = &good else {
            panic!("{good:?}")
        };
        assert_eq!(spec.ports_text(), "tcp 8080-8081:80");
        let line = serde_json::to_string(&good).unwrap();
        assert!(line.contains(r#""host_ports":[8080,8081]"#), "{line}");
        for (ports, guest) in [
            ("[60000,60010]", 65530),
            ("[9000,8000]", 80),
            ("[0,0]", 80),
            ("[80,80]", 0),
            ("[80,80]", 70000),
        ] {
            let err = forward(ports, guest).unwrap_err().to_string();
            assert!(!err.is_empty(), "{ports} {guest}");
        }
        let long = format!(
            r#"{{"op":"forward-add","guest":"{}","proto":"tcp","host_ports":[1,1],"guest_port":1}}"#,
            "g".repeat(300)
        );
        assert!(serde_json::from_str::<Request>(&long).is_err());
    }

    #[test]
    fn forwards_overlap_on_proto_address_and_ports() {
        let spec = |proto, (a, b), addr: Option<&str>| ForwardSpec {
            guest: "g".parse().unwrap(),
            proto,
            ports: PortMap::new(a, b, a).unwrap(),
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
    fn guest_stops_are_bounded_and_say_how_long_they_take() {
        let powerdown: Request =
            serde_json::from_str(r#"{"op":"guest-stop","guest":"web1","powerdown":30}"#).unwrap();
        assert_eq!(
            powerdown,
            Request::GuestStop {
                guest: "web1".parse().unwrap(),
                powerdown: Some(Grace::from_secs(30).unwrap()),
            }
        );
        assert_eq!(
            powerdown.answer_takes(),
            Duration::from_secs(30) + QUIT_WAIT
        );
        let stop = Request::from_line(r#"{"op":"guest-stop","guest":"web1"}"#).unwrap();
        assert_eq!(stop.answer_takes(), QUIT_WAIT);
        assert_eq!(Request::Status.answer_takes(), Duration::ZERO);
        for secs in ["601", "70000", "-1"] {
            let line = format!(r#"{{"op":"guest-stop","guest":"web1","powerdown":{secs}}}"#);
            assert!(Request::from_line(&line).is_err(), "{secs}");
        }
    }
}
