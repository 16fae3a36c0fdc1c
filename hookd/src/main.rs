//! qnet-hookd: the qnet daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qnet_api::{DEFAULT_CTL_SOCKET, DEFAULT_QMP_SOCKET};
use qnet_hookd::config::DEFAULT_CONFIG;
use qnet_hookd::daemon::{self, Paths};

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

    State lives in STATE_DIR/state.json and STATE_DIR/forwards/ (one file
    per forward added at run time), written atomically. SIGTERM leaves
    bridges, rules and dnsmasq running for the guests; the next start
    rebuilds the rules in one transaction and re-adopts running guests.

FILES
    /etc/qnet/hookd.toml   networks (see README.md for every key)
    /run/qnet/ctl.sock     control socket (root and group `qnet`)
    /run/qnet/qmp.sock     where QEMUs dial in
    /var/lib/qnet/         state, run-time forwards, dnsmasq lease files";

#[derive(Debug, Parser)]
#[command(
    name = "qnet-hookd",
    version,
    about = "The qnet daemon: NAT networks, sticky DHCP reservations and clean teardown for QEMU guests",
    long_about = LONG_ABOUT
)]
struct Cli {
    /// Networks to keep up (a missing file means the default network qnet0).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,

    /// Runtime files: dnsmasq configs, hosts files, pid files.
    #[arg(long, value_name = "DIR", default_value = "/run/qnet")]
    run_dir: PathBuf,

    /// Persistent state and dnsmasq leases.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/qnet")]
    state_dir: PathBuf,

    /// The control socket qnetctl talks to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CTL_SOCKET)]
    ctl_socket: PathBuf,

    /// The socket QEMUs dial as QMP clients.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_QMP_SOCKET)]
    qmp_socket: PathBuf,

    /// Remove every rule, zone and table qnet added to this host's
    /// firewalls (its own and Docker's, iptables', firewalld's), then exit.
    #[arg(long)]
    cleanup: bool,

    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .init();

    let paths = Paths {
        config: cli.config,
        run_dir: cli.run_dir,
        state_dir: cli.state_dir,
        ctl_socket: cli.ctl_socket,
        qmp_socket: cli.qmp_socket,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qnet-hookd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = async {
        if cli.cleanup {
            daemon::cleanup().await
        } else {
            daemon::run(paths).await
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qnet-hookd: {e}");
            ExitCode::FAILURE
        }
    }
}
