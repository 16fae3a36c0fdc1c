//! qnet-macvtap-helper: QEMU's helper protocol, answered with a macvtap.
//!
//! The main path reads top to bottom: drop privileges, parse argv, check
//! the request and the ACL, create the macvtap, open its queue, leave a
//! reaper behind, send the fd. Any error becomes one line on stderr and
//! exit status 1; the macvtap outlives its fd, so a guard deletes it (and
//! restores a passthru MAC) on every error path.

mod device;
mod error;

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qnet_hostnet::acl::{self, AclError, Decision, FsReader, ReadError};
use qnet_hostnet::link::MacvtapMode;
use qnet_hostnet::{devnode, fdpass, privilege, protocol, reaper, CONFIG_DIR};

use crate::device::{Macvtap, Request};
use crate::error::HelperError;
use qnet_macvtap_helper::cli::Cli;

const USAGE: &str = "[--mode=MODE] [--mac=MAC] [--use-vnet] --br=LOWER --fd=N";
const PROGRAM: &str = "qnet-macvtap-helper";

fn main() -> ExitCode {
    // Before anything the caller controls is looked at. The capabilities
    // needed to open /dev/tapN stay permitted (not effective) until then.
    let privileges = privilege::drop_to_net_admin_keeping(&devnode::PRIVATE_NODE_CAPS);

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
    let lower = cli.protocol.br.as_str();
    let mode = MacvtapMode::from(cli.mode);
    let fd = cli.protocol.fd;
    tracing::debug!(?privileges, lower, %mode, fd, "starting");
    if cli.debug {
        tracing::debug!(credentials = privilege::describe_credentials(), "at start");
    }
    acl::check_name(lower).map_err(|source| HelperError::BadName {
        name: lower.to_string(),
        source,
    })?;
    let mac = cli.mac.map(|mac| mac.0);
    if mac.is_none() && mode != MacvtapMode::Passthru {
        return Err(HelperError::MacRequired { mode });
    }
    let socket =
        fdpass::borrow_unix_stream(fd).map_err(|source| HelperError::BadSocket { fd, source })?;
    let qemu_pid = qemu_pid(socket).map_err(|detail| HelperError::NoQemuPid { fd, detail })?;

    let conf = PathBuf::from(CONFIG_DIR).join("macvtap.conf");
    let rules = acl::load(&FsReader::default(), &conf).map_err(|err| match err {
        AclError::Read {
            path,
            cause: ReadError::NotFound,
        } => HelperError::MissingAcl { path },
        other => HelperError::Acl(other),
    })?;
    for skipped in rules.skipped_includes() {
        tracing::debug!(%skipped, "include skipped");
    }
    match rules.decide(lower) {
        Decision::Allowed { by } => tracing::debug!(rule = %by, "allowed"),
        Decision::Denied(denial) => return Err(HelperError::Denied(Box::new(denial))),
    }
    if !privileges.net_admin {
        return Err(HelperError::NoNetAdmin);
    }

    let request = Request {
        lower,
        mode,
        mac,
        qemu_pid,
        conf: &conf,
    };
    let macvtap = Macvtap::create(&request)?;
    let tap = macvtap.open_queue(cli.protocol.use_vnet)?;
    privilege::release_spare()?;
    if cli.debug {
        tracing::debug!(
            credentials = privilege::describe_credentials(),
            "after opening the device"
        );
    }

    // Opened before the fd is sent, so QEMU cannot exit unwatched; the
    // socket check catches a QEMU that died (and whose pid was reused)
    // before pidfd_open.
    let qemu = reaper::pidfd_open(qemu_pid).map_err(|source| HelperError::PidFd {
        pid: qemu_pid,
        source,
    })?;
    if reaper::peer_gone(socket).unwrap_or(true) {
        return Err(HelperError::QemuGone { pid: qemu_pid });
    }
    let reaper = macvtap.start_reaper(qemu)?;
    fdpass::send_fd(socket, tap.as_fd()).map_err(|source| HelperError::Send {
        name: macvtap.name().to_string(),
        source,
    })?;
    reaper.commit().map_err(|source| HelperError::Reaper {
        name: macvtap.name().to_string(),
        source,
    })?;
    tracing::debug!(
        name = macvtap.name(),
        vnet_hdr = tap.vnet_hdr(),
        qemu_pid,
        "fd sent; the reaper removes the device when QEMU exits"
    );
    macvtap.disarm();
    Ok(())
}

/// QEMU's pid. QEMU made the socketpair, so the peer credentials of the
/// helper's end name QEMU itself; the helper's parent may be a short-lived
/// `/bin/sh` (QEMU's form for a helper string with options).
fn qemu_pid(socket: BorrowedFd<'_>) -> Result<u32, String> {
    let pid = fdpass::peer_credentials(socket)
        .map_err(|e| e.to_string())?
        .pid();
    u32::try_from(pid)
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| "QEMU's pid is not visible in this pid namespace".to_string())
}
