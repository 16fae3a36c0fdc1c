//! qnetctl: the command-line client of qnet-hookd.

use std::process::ExitCode;
use std::time::Duration;

use std::error::Error as _;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Parser;
use qnet_api::{client, ForwardSpec, Grace, Invalid, Reply, Request};
use qnet_hookd::cli::qnetctl::{
    Command, ForwardCommand, GuestCommand, NetworkCommand, Qnetctl as Cli, ReserveCommand,
};

mod render;
mod settings;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.kind() == ErrorKind::ValueValidation => {
            eprintln!("qnetctl: {}", invalid_value(&e));
            return ExitCode::FAILURE;
        }
        Err(e) => e.exit(),
    };
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

/// A value refused by one of the daemon's types, in the daemon's words
/// (which quote the value), after the argument it was given for.
fn invalid_value(e: &clap::Error) -> String {
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => format!("{arg}: "),
        _ => String::new(),
    };
    match e.source() {
        Some(why) => format!("{arg}{why}"),
        None => e.to_string(),
    }
}

/// The request a command line asks for. clap has already parsed names,
/// MACs and port maps with the types the daemon checks them with (so a bad
/// one gets the daemon's message before anything is sent); network keys
/// are shaped here and checked by the daemon. `timeout` is `--timeout`: a
/// power-down's grace.
fn request(command: Command, timeout: u64) -> Result<Request, Invalid> {
    Ok(match command {
        Command::Status => Request::Status,
        Command::Guests => Request::Guests,
        Command::Reserve(command) => reserve_request(command)?,
        Command::Network(command) => network_request(command)?,
        Command::Reload { force } => Request::Reload { force },
        Command::Forward(command) => forward_request(command)?,
        Command::Doctor { target, trace } => Request::Doctor { target, trace },
        Command::Attach { qmp } => {
            // The daemon dials the path itself, so it must be absolute.
            let qmp = std::path::absolute(&qmp).unwrap_or(qmp);
            Request::Attach { qmp }
        }
        Command::Guest(GuestCommand::Stop { guest }) => Request::GuestStop {
            guest,
            powerdown: None,
        },
        Command::Guest(GuestCommand::Powerdown { guest }) => Request::GuestStop {
            guest,
            powerdown: Some(Grace::from_secs(timeout)?),
        },
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
            network,
            mac,
            ip,
            name,
        },
        ReserveCommand::Rm { network, mac } => Request::ReserveRm { network, mac },
        ReserveCommand::List { network } => Request::ReserveList { network },
    })
}

fn network_request(command: NetworkCommand) -> Result<Request, Invalid> {
    Ok(match command {
        NetworkCommand::Up { name } => Request::NetworkUp { name },
        NetworkCommand::Down { name } => Request::NetworkDown { name },
        NetworkCommand::Create { name, keys } => Request::NetworkCreate {
            name,
            settings: settings::from_keys(keys)?,
        },
        NetworkCommand::Edit {
            name,
            keys,
            unset,
            force,
        } => Request::NetworkEdit {
            name,
            set: settings::from_keys(keys)?,
            unset,
            force,
        },
        NetworkCommand::Delete { name, force } => Request::NetworkDelete { name, force },
        NetworkCommand::Show { name } => Request::NetworkShow { name },
        NetworkCommand::Link { from, to, one_way } => Request::NetworkLink {
            from,
            to,
            one_way,
            remove: false,
        },
        NetworkCommand::Unlink { from, to } => Request::NetworkLink {
            from,
            to,
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
                guest,
                proto,
                ports,
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
