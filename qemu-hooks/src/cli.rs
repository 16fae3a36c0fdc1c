//! The hook's command line, in the library so that `xtask` builds its man
//! page and shell completions from the same clap definition.

use std::path::PathBuf;

use clap::Parser;
use qnet_api::DEFAULT_CTL_SOCKET;

use crate::LIBVIRT_NETWORK_DIR;

/// libvirt qemu hook: gives libvirt guests qnet reservations and port forwards.
///
/// Install as /etc/libvirt/hooks/qemu.d/qnet (or /etc/libvirt/hooks/qemu);
/// libvirt runs it as `qemu GUEST OPERATION SUB-OP EXTRA` with the domain
/// XML on stdin. prepare/start register the guest with qnet-hookd,
/// started/reconnect confirm it with QEMU's pid, stopped/release
/// unregister it, migrate/restore print the XML unchanged; anything else
/// does nothing.
#[derive(Debug, Parser)]
#[command(name = "qnet-libvirt-hook", version)]
pub struct Cli {
    /// qnet-hookd's control socket.
    #[arg(long, default_value = DEFAULT_CTL_SOCKET)]
    pub socket: PathBuf,
    /// Where libvirt keeps the pid files of running QEMUs (NAME.pid).
    #[arg(long, default_value = "/run/libvirt/qemu")]
    pub pid_dir: PathBuf,
    /// Where libvirt keeps the live status of its networks (NAME.xml): a
    /// NIC on one of libvirt's own networks gets its forwards there.
    #[arg(long, default_value = LIBVIRT_NETWORK_DIR)]
    pub libvirt_network_dir: PathBuf,
    /// Timeout of each request to qnet-hookd, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// The domain's name.
    pub guest: Option<String>,
    /// prepare, start, started, stopped, release, migrate, restore,
    /// reconnect, attach.
    pub operation: Option<String>,
    /// libvirt's sub-operation and extra argument (ignored).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}
