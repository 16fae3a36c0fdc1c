//! qnetctl: the client of qnet-hookd. Not implemented yet: this binary only
//! describes itself.

use std::process::ExitCode;

use clap::Parser;

/// Control qnet-hookd: networks, guests, reservations and port forwards.
///
/// It will talk to the daemon over /run/qnet/ctl.sock: `status`, `guests`, `reserve`,
/// `forward`, `network up|down` and `attach --qmp PATH`. Not implemented yet.
#[derive(Debug, Parser)]
#[command(name = "qnetctl", version)]
struct Cli {}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!("qnetctl: not implemented yet");
    ExitCode::FAILURE
}
