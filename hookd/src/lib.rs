//! qnet-hookd: the daemon that gives QEMU guests networks, addresses,
//! names and a clean exit.
//!
//! The daemon is a reconciler (`reconciler`): inputs from the control
//! socket (`ctl`) and from the QMP followers (`follow`) change the desired
//! state (`state`), and small appliers make the world match it:
//! [`network`] (bridge, addresses, sysctls; [`lan`] for a bridge that
//! takes over a physical interface), [`firewall`] (our one
//! nftables table), [`dnsmasq`] (one supervised dnsmasq per network). [`qmp`] and
//! [`discover`] find out what each guest is and where its NICs are.
//!
//! The control protocol itself is the `qnet-api` crate, re-exported here
//! as [`api`].

pub use qnet_api as api;

pub mod cli;
pub mod config;
pub mod daemon;
pub mod discover;
pub mod dnsmasq;
pub mod doctor;
pub mod error;
pub mod firewall;
pub mod lan;
pub mod libvirt;
pub mod netlink;
pub mod network;
pub mod nftrace;
pub mod qmp;
pub mod subnet;

mod ctl;
mod follow;
mod forwards;
mod fsutil;
mod guest_stop;
mod hostports;
mod logrelay;
mod orphans;
mod paths;
mod procfs;
mod programs;
mod ratelimit;
mod reconciler;
mod state;
pub mod systemd;
mod useracl;
