//! qnet-hookd: the qnet daemon. Not implemented yet: this binary only
//! describes itself.

use std::process::ExitCode;

use clap::Parser;

/// The qnet daemon: NAT networks, sticky DHCP reservations and port forwards for QEMU guests.
///
/// It will follow each QEMU over QMP, bring up NAT/routed/isolated networks (bridge,
/// nftables table `inet qnet`, a supervised dnsmasq), keep sticky MAC->IP reservations,
/// install host-port forwards and tear down a guest's state when it stops. Not implemented yet.
#[derive(Debug, Parser)]
#[command(name = "qnet-hookd", version)]
struct Cli {}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!("qnet-hookd: not implemented yet");
    ExitCode::FAILURE
}
