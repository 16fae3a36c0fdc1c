//! qnetctl: the command-line client of qnet-hookd.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use qnet_api::{client, ForwardSpec, Invalid, Reply, Request};
use qnet_hookd::cli::qnetctl::{
    Command, ForwardCommand, NetworkCommand, Qnetctl as Cli, ReserveCommand,
};

mod render;
mod settings;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match request(cli.command) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("qnetctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client::request(&cli.socket, &request, Duration::from_secs(cli.timeout)) {
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
/// same messages the daemon would give.
fn request(command: Command) -> Result<Request, Invalid> {
    Ok(match command {
        Command::Status => Request::Status,
        Command::Guests => Request::Guests,
        Command::Reserve(command) => reserve_request(command)?,
        Command::Network(command) => network_request(command)?,
        Command::Reload { force } => Request::Reload { force },
        Command::Forward(command) => forward_request(command)?,
        Command::Doctor { target } => Request::Doctor { target },
        Command::Attach { qmp } => {
            // The daemon dials the path itself, so it must be absolute.
            let qmp = std::path::absolute(&qmp).unwrap_or(qmp);
            Request::Attach { qmp }
        }
    })
}

fn reserve_request(command: ReserveCommand) -> Result<Request, Invalid> {
    Ok(match command {
        ReserveCommand::Add {
            network,
            mac,
            ip,
            name,
        } => Request::ReserveAdd {
            network: network.parse()?,
            mac: mac.parse()?,
            ip,
            name: name.map(|n| n.parse()).transpose()?,
        },
        ReserveCommand::Rm { network, mac } => Request::ReserveRm {
            network: network.parse()?,
            mac: mac.parse()?,
        },
        ReserveCommand::List { network } => Request::ReserveList {
            network: network.map(|n| n.parse()).transpose()?,
        },
    })
}

fn network_request(command: NetworkCommand) -> Result<Request, Invalid> {
    Ok(match command {
        NetworkCommand::Up { name } => Request::NetworkUp {
            name: name.parse()?,
        },
        NetworkCommand::Down { name } => Request::NetworkDown {
            name: name.parse()?,
        },
        NetworkCommand::Create { name, keys } => Request::NetworkCreate {
            name: name.parse()?,
            settings: settings::from_keys(keys)?,
        },
        NetworkCommand::Edit {
            name,
            keys,
            unset,
            force,
        } => Request::NetworkEdit {
            name: name.parse()?,
            set: settings::from_keys(keys)?,
            unset,
            force,
        },
        NetworkCommand::Delete { name, force } => Request::NetworkDelete {
            name: name.parse()?,
            force,
        },
        NetworkCommand::Show { name } => Request::NetworkShow {
            name: name.parse()?,
        },
        NetworkCommand::Link { from, to, one_way } => Request::NetworkLink {
            from: from.parse()?,
            to: to.parse()?,
            one_way,
            remove: false,
        },
        NetworkCommand::Unlink { from, to } => Request::NetworkLink {
            from: from.parse()?,
            to: to.parse()?,
            one_way: false,
            remove: true,
        },
    })
}

fn forward_request(command: ForwardCommand) -> Result<Request, Invalid> {
    Ok(match command {
        ForwardCommand::Add {
            guest,
            proto,
            ports,
            host_addr,
            network,
        } => Request::ForwardAdd {
            forward: ForwardSpec {
                guest: guest.parse()?,
                proto,
                ports: ports.parse()?,
                host_addr,
                network,
            },
        },
        ForwardCommand::Rm {
            proto,
            port,
            host_addr,
        } => Request::ForwardRm {
            proto,
            host_port: port,
            host_addr,
        },
        ForwardCommand::List => Request::ForwardList,
    })
}
