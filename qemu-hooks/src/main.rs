//! qnet-libvirt-hook: libvirt's qemu hook for qnet. Not implemented yet:
//! this binary only describes itself.

use std::process::ExitCode;

use clap::Parser;

/// libvirt qemu hook: gives libvirt guests qnet reservations and port forwards.
///
/// Installed as /etc/libvirt/hooks/qemu.d/qnet, libvirt will run it as
/// `qemu GUEST OPERATION SUB-OP EXTRA` with the domain XML on stdin; it will read qnet's
/// <metadata> block and ask qnet-hookd to set up or tear down the guest. Not implemented yet.
#[derive(Debug, Parser)]
#[command(name = "qnet-libvirt-hook", version)]
struct Cli {}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!("qnet-libvirt-hook: not implemented yet");
    ExitCode::FAILURE
}
