//! qnet-macvtap-helper: attach a QEMU guest directly to a host NIC through
//! a new macvtap device (QEMU's helper protocol). Not implemented yet: this
//! binary only describes itself.

use std::process::ExitCode;

use clap::Parser;

/// Attach a QEMU guest directly to a host NIC through a new macvtap device.
///
/// QEMU runs it like a bridge helper (`-netdev tap,br=eth0,helper="qnet-macvtap-helper
/// --mode=bridge --mac=52:54:00:12:34:56"`). It will create a macvtap on the lower device
/// allowed by /etc/qemu/macvtap.conf, open /dev/tapN, send the fd to QEMU and remove the
/// macvtap when QEMU exits. Not implemented yet.
#[derive(Debug, Parser)]
#[command(name = "qnet-macvtap-helper", version)]
struct Cli {}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!("qnet-macvtap-helper: not implemented yet");
    ExitCode::FAILURE
}
