//! qnetctl: the command-line client of qnet-hookd.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use qnet_hookd::api::{self, ForwardSpec, Proto, Reply, Request};
use qnet_hookd::client;

/// Control qnet-hookd: networks, guests, DHCP reservations and port forwards.
///
/// qnetctl talks to the daemon over its control socket (root, or a member of group `qnet`).
/// root may do anything; other users see and act on their own guests only (those whose QEMU
/// runs under their uid). Output is a table for people, or JSON with --json.
#[derive(Debug, Parser)]
#[command(name = "qnetctl", version)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = api::DEFAULT_CTL_SOCKET)]
    socket: PathBuf,

    /// Print the daemon's reply as JSON (for scripts).
    #[arg(long, global = true)]
    json: bool,

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
    let request = match cli.command {
        Command::Status => Request::Status,
        Command::Guests => Request::Guests,
        Command::Reserve(ReserveCommand::Add {
            network,
            mac,
            ip,
            name,
        }) => Request::ReserveAdd {
            network,
            mac,
            ip,
            name,
        },
        Command::Reserve(ReserveCommand::Rm { network, mac }) => {
            Request::ReserveRm { network, mac }
        }
        Command::Reserve(ReserveCommand::List { network }) => Request::ReserveList { network },
        Command::Network(NetworkCommand::Up { name }) => Request::NetworkUp { name },
        Command::Network(NetworkCommand::Down { name }) => Request::NetworkDown { name },
        Command::Forward(ForwardCommand::Add {
            guest,
            proto,
            ports,
            host_addr,
            network,
        }) => match ForwardSpec::parse_ports(&ports) {
            Ok((host_ports, guest_port)) => Request::ForwardAdd {
                forward: ForwardSpec {
                    guest,
                    proto,
                    host_ports,
                    guest_port,
                    host_addr,
                    network,
                },
            },
            Err(e) => {
                eprintln!("qnetctl: {e}");
                return ExitCode::FAILURE;
            }
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
        Command::Attach { qmp } => {
            // The daemon dials the path itself, so it must be absolute.
            let qmp = std::path::absolute(&qmp).unwrap_or(qmp);
            Request::Attach { qmp }
        }
    };
    match client::request(&cli.socket, &request, Duration::from_secs(30)) {
        Ok(reply) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reply).expect("serialisable")
                );
            } else {
                print!("{}", render(&reply));
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("qnetctl: {err}");
            ExitCode::FAILURE
        }
    }
}

fn render(reply: &Reply) -> String {
    match reply {
        Reply::Done { message } => format!("{message}\n"),
        Reply::Status { networks } => table(
            &[
                "NETWORK", "MODE", "BRIDGE", "SUBNET", "STATE", "GUESTS", "RX", "TX",
            ],
            networks
                .iter()
                .map(|n| {
                    let subnet = match &n.ipv6 {
                        Some(v6) => format!("{} {v6}", n.subnet),
                        None => n.subnet.clone(),
                    };
                    vec![
                        n.name.clone(),
                        n.mode.to_string(),
                        n.bridge.clone(),
                        subnet,
                        if n.up { "up" } else { "down" }.to_string(),
                        n.guests.to_string(),
                        bytes(n.rx_bytes),
                        bytes(n.tx_bytes),
                    ]
                })
                .collect(),
        ),
        Reply::Guests { guests } => table(
            &["GUEST", "UUID", "PID", "USER", "MAC", "IP", "NETWORK"],
            guests
                .iter()
                .flat_map(|g| {
                    let user = g.user.clone().unwrap_or_else(|| g.uid.to_string());
                    let name = g.name.clone().unwrap_or_else(|| "-".into());
                    let uuid = g.uuid.clone().unwrap_or_else(|| "-".into());
                    let nics: Vec<Option<&api::GuestNic>> = if g.nics.is_empty() {
                        vec![None]
                    } else {
                        g.nics.iter().map(Some).collect()
                    };
                    nics.into_iter()
                        .map(|nic| {
                            vec![
                                name.clone(),
                                uuid.clone(),
                                g.pid.to_string(),
                                user.clone(),
                                nic.map_or("-".into(), |n| n.mac.clone()),
                                nic.and_then(|n| n.ip)
                                    .map_or("-".into(), |ip| ip.to_string()),
                                nic.and_then(|n| n.network.clone())
                                    .unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
        ),
        Reply::Forwards { forwards } => table(
            &[
                "GUEST",
                "PROTO",
                "HOST",
                "GUEST-PORT",
                "HOST-ADDR",
                "GUEST-ADDR",
                "ORIGIN",
            ],
            forwards
                .iter()
                .map(|f| {
                    let spec = &f.forward;
                    let (start, end) = spec.host_ports;
                    let host = if start == end {
                        start.to_string()
                    } else {
                        format!("{start}-{end}")
                    };
                    vec![
                        spec.guest.clone(),
                        spec.proto.to_string(),
                        host,
                        spec.guest_port.to_string(),
                        spec.host_addr.map_or("*".into(), |a| a.to_string()),
                        f.guest_addr
                            .map_or("- (guest not running)".into(), |a| a.to_string()),
                        f.origin.clone(),
                    ]
                })
                .collect(),
        ),
        Reply::Reservations { reservations } => table(
            &["NETWORK", "MAC", "IP", "NAME", "KIND"],
            reservations
                .iter()
                .map(|r| {
                    vec![
                        r.network.clone(),
                        r.mac.clone(),
                        r.ip.to_string(),
                        r.name.clone().unwrap_or_else(|| "-".into()),
                        if r.explicit { "explicit" } else { "sticky" }.to_string(),
                    ]
                })
                .collect(),
        ),
    }
}

/// A left-aligned table with a header row.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
