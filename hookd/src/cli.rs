//! The command lines of `qnet-hookd` and `qnetctl`, in the library so that
//! `xtask` builds their man pages and shell completions from the same clap
//! definitions the binaries parse with.

use std::path::PathBuf;

use clap::Parser;
use qnet_api::{DEFAULT_CTL_SOCKET, DEFAULT_QMP_SOCKET};

use crate::config::DEFAULT_CONFIG;

const LONG_ABOUT: &str = "\
NAME
    qnet-hookd - networks, addresses and clean teardown for QEMU guests

DESCRIPTION
    Keeps the networks of CONFIG up: for each, a Linux bridge with a fixed
    MAC and the router address, one nftables table of its own (`inet qnet`:
    masquerade for nat networks, forwarding per mode, blocked outgoing
    ports), and a supervised dnsmasq for DHCP and DNS. Without a config
    file it brings up one NAT network `qnet0` on a free /24.

    Other firewalls of the host would drop the guests' traffic, so each
    network is opened in them the way they document (rules commented
    `qnet:NETWORK`): Docker's DOCKER-USER, iptables FORWARD/INPUT where
    they drop (nft and legacy backends), firewalld zones qnet-nat,
    qnet-routed, qnet-isolated and qnet-* policies (system D-Bus), libvirt's
    LIBVIRT_FWI for forwards into libvirt NAT networks; kept up when those
    firewalls change. `firewall-integration = false` in CONFIG turns this
    off; --cleanup removes every trace; `qnetctl doctor` explains drops.

    It follows each QEMU over QMP, either because QEMU dials it:
        -chardev socket,id=qnet,path=/run/qnet/qmp.sock,reconnect=1
        -mon chardev=qnet,mode=control
    or because `qnetctl attach --qmp PATH` names QEMU's own QMP socket. Each
    NIC on a qnet network gets a sticky address (the same one every time,
    kept across restarts and reboots) and the DNS name GUEST.DOMAIN, in
    dnsmasq before the guest asks. When the guest goes (QMP EOF, process
    exit, SHUTDOWN without -no-shutdown) its runtime state goes within a
    second.

    Networks can also be created, changed and deleted at run time
    (`qnetctl network create|edit|delete`): each is a file
    networks.d/NAME.toml next to CONFIG, with the keys of a [[network]]
    table. SIGHUP (or `qnetctl reload`) re-reads CONFIG and networks.d and
    applies what changed: networks that did not change are not touched; a
    configuration that does not validate is refused and the running one
    stays (the log says why).

    State lives in STATE_DIR and is on disk before anything is published:
    state.json (network-wide facts) and forwards/ (one file per forward
    added at run time), written atomically and fsynced, and
    reservations/NET.jsonl, each network's reservations as a journal of
    JSON lines (a change appends one). The guests it follows are
    RUN_DIR/guests/PID.json: a reboot ends them. SIGTERM leaves
    bridges, rules and dnsmasq running for the guests; the next start
    rebuilds the rules in one transaction and re-adopts running guests.

FILES
    /etc/qnet/hookd.toml   networks (qnet-hookd.toml(5) names every key)
    /etc/qnet/networks.d/  networks created at run time, one NAME.toml each
    /run/qnet/ctl.sock     control socket (root and group `qnet`)
    /run/qnet/qmp.sock     where QEMUs dial in
    /run/qnet/             dnsmasq configs and hosts files, followed guests
    /var/lib/qnet/         reservations, run-time forwards, dnsmasq leases";

#[derive(Debug, Parser)]
#[command(
    name = "qnet-hookd",
    version,
    about = "The qnet daemon: NAT networks, sticky DHCP reservations and clean teardown for QEMU guests",
    long_about = LONG_ABOUT
)]
pub struct Hookd {
    /// Networks to keep up (a missing file means the default network qnet0).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,

    /// Runtime files (tmpfs): dnsmasq configs, hosts files, pid files, the
    /// records of the guests followed (they end with a reboot).
    #[arg(long, value_name = "DIR", default_value = "/run/qnet")]
    pub run_dir: PathBuf,

    /// Persistent state (reservations, run-time forwards) and dnsmasq
    /// leases.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/qnet")]
    pub state_dir: PathBuf,

    /// The control socket qnetctl talks to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CTL_SOCKET)]
    pub ctl_socket: PathBuf,

    /// The socket QEMUs dial as QMP clients.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_QMP_SOCKET)]
    pub qmp_socket: PathBuf,

    /// Check the configuration (CONFIG and the run-time networks next to
    /// it) as a start or reload would, print what is wrong, and exit:
    /// nothing is touched. The unit's ExecReload runs it before SIGHUP.
    #[arg(long)]
    pub check: bool,

    /// Remove every rule, zone and table qnet added to this host's
    /// firewalls (its own and Docker's, iptables', firewalld's), then exit.
    #[arg(long)]
    pub cleanup: bool,

    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log: String,
}

/// `qnetctl`, the command-line client.
pub mod qnetctl {
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::PathBuf;

    use clap::{Parser, Subcommand};
    use qnet_api::{GuestRef, Mac, NetName, PortMap, Proto};

    /// Control qnet-hookd: networks, guests, DHCP reservations and port forwards.
    ///
    /// qnetctl talks to the daemon over its control socket (root, or a member of group `qnet`).
    /// root may do anything; other users see and act on their own guests only (those whose QEMU
    /// runs under their uid). Output is a table for people, or JSON with --json.
    #[derive(Debug, Parser)]
    #[command(name = "qnetctl", version)]
    pub struct Qnetctl {
        /// The daemon's control socket.
        #[arg(long, global = true, value_name = "PATH", default_value = qnet_api::DEFAULT_CTL_SOCKET)]
        pub socket: PathBuf,

        /// Print the daemon's reply as JSON (for scripts).
        #[arg(long, global = true)]
        pub json: bool,

        /// Seconds to wait for the daemon's reply before giving up; for `guest powerdown`,
        /// seconds the guest gets to power off before QEMU is told to quit (at most 600).
        #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
        pub timeout: u64,

        #[command(subcommand)]
        pub command: Command,
    }

    #[derive(Debug, Subcommand)]
    pub enum Command {
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
            /// Also trace synthetic guest packets (DHCP to the host, a new
            /// connection out) through the real ruleset (nftrace) and name
            /// the table, chain and rule that drops them, where reading the
            /// rules cannot tell. Root only; adds a veth port to the bridge
            /// and a table `inet qnet_probe` for about a second.
            #[arg(long)]
            trace: bool,
        },
        /// Re-read hookd.toml and the run-time networks and apply what changed
        /// (as SIGHUP does); a configuration that does not validate is refused.
        Reload {
            /// Allow moving the subnet of a network with reservations or guests.
            #[arg(long)]
            force: bool,
        },
        /// Follow a QEMU started with `-qmp unix:PATH,server=on,wait=off`.
        Attach {
            /// QEMU's QMP server socket.
            #[arg(long, value_name = "PATH")]
            qmp: PathBuf,
        },
        /// Stop or power down a running guest over the daemon's QMP session (root, or
        /// the user its QEMU runs as).
        #[command(subcommand)]
        Guest(GuestCommand),
    }

    #[derive(Debug, Subcommand)]
    pub enum GuestCommand {
        /// Quit QEMU now, like `virsh destroy`: the guest OS is not asked (QEMU itself
        /// exits cleanly, flushing its disk images).
        Stop {
            /// The guest's -name, or a NIC's MAC.
            guest: GuestRef,
        },
        /// Press the guest's ACPI power button, like `virsh shutdown`; if QEMU has not
        /// exited after --timeout seconds (default 30), quit it. A guest without an ACPI
        /// handler (acpid, systemd-logind) ignores the button.
        Powerdown {
            /// The guest's -name, or a NIC's MAC.
            guest: GuestRef,
        },
    }

    #[derive(Debug, Subcommand)]
    pub enum ReserveCommand {
        /// Reserve an address (the next free one unless --ip) for a MAC, kept until `reserve rm`.
        Add {
            network: NetName,
            mac: Mac,
            #[arg(long)]
            ip: Option<Ipv4Addr>,
            /// DNS name (without the network's domain).
            #[arg(long)]
            name: Option<GuestRef>,
        },
        /// Remove a reservation.
        Rm { network: NetName, mac: Mac },
        /// List reservations (of one network, or all).
        List { network: Option<NetName> },
    }

    #[derive(Debug, Subcommand)]
    pub enum ForwardCommand {
        /// Forward HOSTPORT[-HOSTPORT2][:GUESTPORT] of the host to GUEST (its -name or a NIC's MAC).
        Add {
            guest: GuestRef,
            /// tcp or udp.
            proto: Proto,
            /// HOSTPORT[-HOSTPORT2][:GUESTPORT], e.g. 8080:80 or 9000-9009.
            ports: PortMap,
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
    pub enum NetworkCommand {
        /// Bring a network up (its bridge, rules and dnsmasq).
        Up { name: NetName },
        /// Take a network down (its reservations are kept).
        Down { name: NetName },
        /// Create a network now, kept across restarts (networks.d/NAME.toml).
        Create {
            name: NetName,
            #[command(flatten)]
            keys: NetworkKeys,
        },
        /// Change keys of a network created at run time.
        Edit {
            name: NetName,
            #[command(flatten)]
            keys: NetworkKeys,
            /// Give KEY its default value again.
            #[arg(long, value_name = "KEY")]
            unset: Vec<String>,
            /// Allow moving the subnet of a network with reservations or guests.
            #[arg(long)]
            force: bool,
        },
        /// Delete a network created at run time, with its reservations.
        Delete {
            name: NetName,
            /// Delete it although guests run on it.
            #[arg(long)]
            force: bool,
        },
        /// A network's whole configuration, and where each value comes from.
        Show { name: NetName },
        /// Let guests of FROM connect to guests of TO, and back unless --one-way.
        Link {
            from: NetName,
            to: NetName,
            /// Only FROM's guests may open connections (TO's only answer).
            #[arg(long)]
            one_way: bool,
        },
        /// Take away the link from FROM to TO.
        Unlink { from: NetName, to: NetName },
    }

    /// The keys of a network, as in hookd.toml's [[network]] (see
    /// qnet-hookd.toml(5)); --set KEY=VALUE gives any key.
    #[derive(Debug, clap::Args)]
    pub struct NetworkKeys {
        /// nat, routed, isolated, or bridged (guests on the LAN of --uplink; root only).
        #[arg(long)]
        pub mode: Option<String>,
        /// IPv4 CIDR, or `auto` (a free /24; the default when creating).
        #[arg(long, value_name = "CIDR|auto")]
        pub subnet: Option<String>,
        /// First and last address DHCP hands out: A-B.
        #[arg(long, value_name = "A-B")]
        pub dhcp_range: Option<String>,
        /// DNS domain of the guests (default: NAME.qnet).
        #[arg(long)]
        pub domain: Option<String>,
        /// IPv6 CIDR (router: its first address).
        #[arg(long, value_name = "CIDR")]
        pub ipv6: Option<String>,
        /// Outgoing ports guests may not reach: tcp/25,udp/1900.
        #[arg(long, value_name = "PROTO/PORT,...")]
        pub blocked_ports: Option<String>,
        /// Masquerade and forward only via this device (bridged: the interface to share).
        #[arg(long, value_name = "DEV")]
        pub uplink: Option<String>,
        /// Any key: KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        pub set: Vec<String>,
    }
}
