//! qnet-bridge-helper: QEMU's bridge helper protocol, done carefully.
//!
//! The main path reads top to bottom: drop privileges, parse argv, check
//! the request against the ACL, create and attach the TAP, send the fd.
//! Any error becomes one line on stderr and exit status 1; the TAP is not
//! persistent, so an error after it exists removes it by closing the fd.

mod device;
mod error;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qnet_hostnet::acl::{self, Decision, FsReader};
use qnet_hostnet::{fdpass, privilege, protocol, CONFIG_DIR};

use crate::error::HelperError;
use qnet_bridge_helper::cli::Cli;

const USAGE: &str = "[--use-vnet] --br=BRIDGE --fd=N";
const PROGRAM: &str = "qnet-bridge-helper";

fn main() -> ExitCode {
    // Before anything the caller controls is looked at.
    let privileges = privilege::drop_to_net_admin();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return protocol::exit_for_cli_error(PROGRAM, USAGE, err),
    };
    protocol::init_debug_logging(cli.debug);

    match privileges
        .map_err(HelperError::from)
        .and_then(|p| run(&cli, p))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{PROGRAM}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli, privileges: privilege::Privileges) -> Result<(), HelperError> {
    let bridge = cli.protocol.br.as_str();
    tracing::debug!(?privileges, bridge, fd = cli.protocol.fd, "starting");
    if cli.debug {
        tracing::debug!(credentials = privilege::describe_credentials());
    }
    acl::check_name(bridge).map_err(|source| HelperError::BadName {
        name: bridge.to_string(),
        source,
    })?;
    let socket =
        fdpass::borrow_unix_stream(cli.protocol.fd).map_err(|source| HelperError::BadSocket {
            fd: cli.protocol.fd,
            source,
        })?;

    let conf = PathBuf::from(CONFIG_DIR).join("bridge.conf");
    let rules = acl::load(&FsReader::default(), &conf)?;
    for skipped in rules.skipped_includes() {
        tracing::debug!(%skipped, "include skipped");
    }
    match rules.decide(bridge) {
        Decision::Allowed { by } => tracing::debug!(rule = %by, "allowed"),
        Decision::Denied(denial) => return Err(HelperError::Denied(Box::new(denial))),
    }
    if !privileges.net_admin {
        return Err(HelperError::NoNetAdmin);
    }

    let tap = device::create_attached_tap(bridge, cli.protocol.use_vnet, &conf)?;
    fdpass::send_fd(socket, tap.as_fd()).map_err(|source| HelperError::Send {
        tap: tap.name().to_string(),
        source,
    })?;
    tracing::debug!(tap = tap.name(), vnet_hdr = tap.vnet_hdr(), "fd sent");
    Ok(())
}
