//! qnetctl: the command-line client of qnet-hookd.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use qnet_api::{client, ForwardSpec, Invalid, Proto, Reply, Request};

mod render;

/// Control qnet-hookd: networks, guests, DHCP reservations and port forwards.
///
/// qnetctl talks to the daemon over its control socket (root, or a member of group `qnet`).
/// root may do anything; other users see and act on their own guests only (those whose QEMU
/// runs under their uid). Output is a table for people, or JSON with --json.
#[derive(Debug, Parser)]
#[command(name = "qnetctl", version)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = qnet_api::DEFAULT_CTL_SOCKET)]
    socket: PathBuf,

    /// Print the daemon's reply as JSON (for scripts).
    #[arg(long, global = true)]
    json: bool,

    /// Seconds to wait for the daemon's reply before giving up.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    timeout: u64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Networks: mode, bridge, subnet, up/down, guests, traffic.
    Status,
    /// Running guests: name, uuid, pid, user, MAC, address, network.
    Guests,
    /// Sticky DHCP reservations (MAC → address + DNS name).
    #[command(subcommand)]
    Reserve(ReserveCommand),
    /// Bring a network up or down (down removes its bridge, rules and dnsmasq).
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Host-port forwards to guests (active while the guest runs).
    #[command(subcommand)]
    Forward(ForwardCommand),
    /// Check the path guests' packets take (every network, one NETWORK, or a
    /// GUEST's): one line per problem with its fix; exit status 1 if any.
    Doctor {
        /// A network or a running guest's name (default: everything).
        target: Option<String>,
    },
    /// Follow a QEMU started with `-qmp unix:PATH,server=on,wait=off`.
    Attach {
        /// QEMU's QMP server socket.
        #[arg(long, value_name = "PATH")]
        qmp: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ReserveCommand {
    /// Reserve an address (the next free one unless --ip) for a MAC, kept until `reserve rm`.
    Add {
        network: String,
        mac: String,
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// DNS name (without the network's domain).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a reservation.
    Rm { network: String, mac: String },
    /// List reservations (of one network, or all).
    List { network: Option<String> },
}

#[derive(Debug, Subcommand)]
enum ForwardCommand {
    /// Forward HOSTPORT[-HOSTPORT2][:GUESTPORT] of the host to GUEST (its -name or a NIC's MAC).
    Add {
        guest: String,
        /// tcp or udp.
        proto: Proto,
        /// HOSTPORT[-HOSTPORT2][:GUESTPORT], e.g. 8080:80 or 9000-9009.
        ports: String,
        /// Only this host address (default: every address of the host, and 127.0.0.1).
        #[arg(long)]
        host_addr: Option<IpAddr>,
        /// The network of the guest's NIC (default: its first qnet network).
        #[arg(long)]
        network: Option<String>,
    },
    /// Remove the forward of a host port.
    Rm {
        proto: Proto,
        port: u16,
        #[arg(long)]
        host_addr: Option<IpAddr>,
    },
    /// List forwards and whether they are active.
    List,
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    Up { name: String },
    Down { name: String },
}

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
    })
}
