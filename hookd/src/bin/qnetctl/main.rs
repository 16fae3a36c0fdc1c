//! qnetctl: the command-line client of qnet-hookd.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use qnet_api::{client, ForwardSpec, Grace, Invalid, Reply, Request};
use qnet_hookd::cli::qnetctl::{
    Command, ForwardCommand, GuestCommand, NetworkCommand, Qnetctl as Cli, ReserveCommand,
};

mod render;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match request(cli.command, cli.timeout) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("qnetctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A guest stop waits for QEMU to exit (after a power-down's grace).
    let wait = Duration::from_secs(cli.timeout) + request.answer_takes();
    match client::request(&cli.socket, &request, wait) {
        Ok(reply) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reply).expect("serialisable")
                );
            } else {
                print!("{}", render::reply(&reply));
            }
            match reply {
                // doctor: problems found is a failure, for scripts.
                Reply::Doctor { problems } if !problems.is_empty() => ExitCode::FAILURE,
                _ => ExitCode::SUCCESS,
            }
        }
        Err(err) => {
            eprintln!("qnetctl: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The request a command line asks for; values are checked here, with the
/// same messages the daemon would give. `timeout` is `--timeout`: a power-
/// down's grace.
fn request(command: Command, timeout: u64) -> Result<Request, Invalid> {
    Ok(match command {
        Command::Status => Request::Status,
        Command::Guests => Request::Guests,
        Command::Reserve(ReserveCommand::Add {
            network,
            mac,
            ip,
            name,
        }) => Request::ReserveAdd {
            network: network.parse()?,
            mac: mac.parse()?,
            ip,
            name: name.map(|n| n.parse()).transpose()?,
        },
        Command::Reserve(ReserveCommand::Rm { network, mac }) => Request::ReserveRm {
            network: network.parse()?,
            mac: mac.parse()?,
        },
        Command::Reserve(ReserveCommand::List { network }) => Request::ReserveList {
            network: network.map(|n| n.parse()).transpose()?,
        },
        Command::Network(NetworkCommand::Up { name }) => Request::NetworkUp {
            name: name.parse()?,
        },
        Command::Network(NetworkCommand::Down { name }) => Request::NetworkDown {
            name: name.parse()?,
        },
        Command::Forward(ForwardCommand::Add {
            guest,
            proto,
            ports,
            host_addr,
            network,
        }) => Request::ForwardAdd {
            forward: ForwardSpec {
                guest: guest.parse()?,
                proto,
                ports: ports.parse()?,
                host_addr,
                network,
            },
        },
        Command::Forward(ForwardCommand::Rm {
            proto,
            port,
            host_addr,
        }) => Request::ForwardRm {
            proto,
            host_port: port,
            host_addr,
        },
        Command::Forward(ForwardCommand::List) => Request::ForwardList,
        Command::Doctor { target } => Request::Doctor { target },
        Command::Attach { qmp } => {
            // The daemon dials the path itself, so it must be absolute.
            let qmp = std::path::absolute(&qmp).unwrap_or(qmp);
            Request::Attach { qmp }
        }
        Command::Guest(GuestCommand::Stop { guest }) => Request::GuestStop {
            guest: guest.parse()?,
            powerdown: None,
        },
        Command::Guest(GuestCommand::Powerdown { guest }) => Request::GuestStop {
            guest: guest.parse()?,
            powerdown: Some(Grace::from_secs(timeout)?),
        },
    })
}
