//! qnet-hookd: the daemon that gives QEMU guests networks, addresses,
//! names and a clean exit, and the pieces `qnetctl` and the libvirt hook
//! share with it (the control protocol in [`api`], its [`client`]).
//!
//! The daemon is a reconciler ([`daemon`]); its appliers are [`network`]
//! (bridge, addresses, sysctls), [`firewall`] (our one nftables table) and
//! [`dnsmasq`] (one supervised dnsmasq per network). [`qmp`] and
//! [`discover`] find out what each guest is and where its NICs are.

pub mod api;
pub mod client;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod discover;
pub mod dnsmasq;
pub mod firewall;
pub mod forwards;
pub mod fsutil;
pub mod libvirt;
pub mod network;
pub mod orphans;
pub mod procfs;
pub mod programs;
pub mod qmp;
pub mod state;
pub mod subnet;
