//! qnet-api: what every door of qnet-hookd shares.
//!
//! - [`types`]: the vocabulary (MAC, interface and network names, DNS
//!   labels, port maps), checked once where a value enters;
//! - [`wire`]: the control protocol's requests, replies and errors;
//! - [`client`]: a blocking client of the control socket.
//!
//! It has no async runtime and no daemon code: `qnetctl` and the libvirt
//! hook link this crate, not the daemon.

pub mod client;
pub mod reply;
pub mod types;
pub mod wire;

pub use reply::*;
pub use types::{
    DnsLabel, DomainName, GuestName, GuestUuid, IfName, Invalid, Mac, NetName, PortMap, Proto,
};
pub use wire::*;
