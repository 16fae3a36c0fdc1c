//! qnet-bridge-helper: QEMU's bridge helper protocol, done carefully.
//!
//! The main path reads top to bottom: drop privileges, parse argv, identify
//! QEMU, look the bridge up and check that device (every name it has)
//! against the ACL, create and attach the TAP, make the caller its owner,
//! mark it, leave a reaper behind, send the fd. Any error becomes one line
//! on stderr and exit status 1; the TAP is not persistent, so an error
//! after it exists removes it by closing the fd.

mod device;
mod error;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use qnet_hostnet::acl::{self, FsReader};
use qnet_hostnet::link::LinkSocket;
use qnet_hostnet::{privilege, protocol, CONFIG_DIR};

use crate::error::HelperError;
use qnet_bridge_helper::cli::Cli;

const USAGE: &str = "[--use-vnet] --br=BRIDGE --fd=N";
const PROGRAM: &str = "qnet-bridge-helper";

fn main() -> ExitCode {
    // Before anything the caller controls is looked at.
    let privileges = privilege::drop_to_net_admin();
    protocol::helper_main(PROGRAM, USAGE, privileges, |cli: &Cli| &cli.protocol, run)
}

fn run(cli: &Cli, privileges: privilege::Privileges) -> Result<(), HelperError> {
    tracing::debug!(
        ?privileges,
        bridge = cli.protocol.br,
        fd = cli.protocol.fd,
        "starting"
    );
    if cli.protocol.debug {
        tracing::debug!(credentials = privilege::describe_credentials());
    }
    let bridge = cli.protocol.device_name("bridge")?;
    let (socket, qemu) = cli.protocol.caller()?;

    let conf = PathBuf::from(CONFIG_DIR).join("bridge.conf");
    let rules = acl::load(&FsReader::default(), &conf)?;
    let mut netlink = LinkSocket::new().map_err(HelperError::Netlink)?;
    let found = netlink.link_by_name(bridge).map_err(HelperError::Netlink)?;
    rules
        .admit(bridge, found.as_ref())
        .map_err(HelperError::Denied)?;
    let bridge_link = found.ok_or_else(|| HelperError::NoSuchBridge {
        bridge: bridge.to_string(),
        conf: conf.clone(),
    })?;
    if !privileges.net_admin {
        return Err(HelperError::NoNetAdmin);
    }

    let tap = device::create_attached_tap(&mut netlink, &bridge_link, cli.protocol.use_vnet)?;
    let guarded = device::guard_tap(&mut netlink, &tap, qemu)?;
    protocol::hand_over(socket, tap.as_fd(), "TAP", tap.name())?;
    guarded.commit().map_err(|source| HelperError::Reaper {
        tap: tap.name().to_string(),
        source,
    })?;
    tracing::debug!(
        tap = tap.name(),
        vnet_hdr = tap.vnet_hdr(),
        "fd sent; the reaper deletes the TAP when QEMU exits"
    );
    Ok(())
}
