//! qnet-macvtap-helper: QEMU's helper protocol, answered with a macvtap.
//!
//! The main path reads top to bottom: drop privileges, parse argv, identify
//! QEMU, look the lower device up and check that device (every name it
//! has) against the ACL, have a reaper create the macvtap, open its queue,
//! send the fd. Any error becomes one line on stderr and exit status 1;
//! the macvtap outlives its fd, so the reaper deletes it (and restores a
//! passthru MAC) on every error path, before the helper exits.

mod device;
mod error;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qnet_hostnet::acl::{self, AclError, FsReader, ReadError};
use qnet_hostnet::link::{Link, LinkSocket, MacvtapMode};
use qnet_hostnet::{devnode, privilege, protocol, reaper, CONFIG_DIR};

use crate::device::{Guarded, Request};
use crate::error::HelperError;
use qnet_macvtap_helper::cli::Cli;

const USAGE: &str = "[--mode=MODE] [--mac=MAC] [--use-vnet] --br=LOWER --fd=N";
const PROGRAM: &str = "qnet-macvtap-helper";

fn main() -> ExitCode {
    // Before anything the caller controls is looked at. The capabilities
    // needed to open /dev/tapN stay permitted (not effective) until then.
    let privileges = privilege::drop_to_net_admin_keeping(&devnode::PRIVATE_NODE_CAPS);
    protocol::helper_main(PROGRAM, USAGE, privileges, |cli: &Cli| &cli.protocol, run)
}

fn run(cli: &Cli, privileges: privilege::Privileges) -> Result<(), HelperError> {
    let mode = MacvtapMode::from(cli.mode);
    tracing::debug!(?privileges, lower = cli.protocol.br, %mode, fd = cli.protocol.fd, "starting");
    log_credentials(cli.protocol.debug, "at start");
    let lower = cli.protocol.device_name("lower device")?;
    let mac = guest_mac(mode, cli)?;
    let (socket, qemu) = cli.protocol.caller()?;
    let lower_link = allowed_lower(lower)?;
    if !privileges.net_admin {
        return Err(HelperError::NoNetAdmin);
    }

    let request = Request {
        lower: lower_link,
        mode,
        mac,
        owner: qemu.owner,
        limit: device::user_limit(Path::new(CONFIG_DIR))?,
    };
    let qemu_pid = request.owner.pid;
    let macvtap = Guarded::create(request, qemu.pidfd)?;
    let tap = macvtap.open_queue(cli.protocol.use_vnet)?;
    privilege::release_spare()?;
    log_credentials(cli.protocol.debug, "after opening the device");
    // A QEMU that died meanwhile (and whose pid might be reused) has
    // closed its end of the socket.
    if reaper::peer_gone(socket).unwrap_or(true) {
        return Err(HelperError::QemuGone { pid: qemu_pid });
    }
    protocol::hand_over(socket, tap.as_fd(), "macvtap", macvtap.name())?;
    let name = macvtap.name().to_string();
    macvtap.commit()?;
    tracing::debug!(
        name,
        vnet_hdr = tap.vnet_hdr(),
        qemu_pid,
        "fd sent; the reaper removes the device when QEMU exits"
    );
    Ok(())
}

fn log_credentials(debug: bool, when: &str) {
    if debug {
        tracing::debug!(credentials = privilege::describe_credentials(), "{when}");
    }
}

/// The guest's MAC, which every mode but passthru needs (a macvtap drops
/// frames to others).
fn guest_mac(mode: MacvtapMode, cli: &Cli) -> Result<Option<[u8; 6]>, HelperError> {
    let mac = cli.mac.map(|mac| mac.0);
    if mac.is_none() && mode != MacvtapMode::Passthru {
        return Err(HelperError::MacRequired { mode });
    }
    Ok(mac)
}

/// The lower device, once `macvtap.conf` allows it under every name it has.
fn allowed_lower(lower: &str) -> Result<Link, HelperError> {
    let conf = PathBuf::from(CONFIG_DIR).join("macvtap.conf");
    let rules = acl::load(&FsReader::default(), &conf).map_err(|err| match err {
        AclError::Read {
            path,
            cause: ReadError::NotFound,
        } => HelperError::MissingAcl { path },
        other => HelperError::Acl(other),
    })?;
    let found = LinkSocket::new()
        .and_then(|mut netlink| netlink.link_by_name(lower))
        .map_err(HelperError::Netlink)?;
    rules
        .admit(lower, found.as_ref())
        .map_err(HelperError::Denied)?;
    found.ok_or_else(|| HelperError::NoSuchLower {
        lower: lower.to_string(),
        conf,
    })
}
