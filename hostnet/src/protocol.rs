//! The command line QEMU gives a network helper (`net/tap.c`).
//!
//! QEMU runs `HELPER --use-vnet --fd=N --br=BRIDGE`, or, when the helper
//! string holds a space or tab, `/bin/sh -c "HELPER ARGS --use-vnet --fd=N
//! [--br=BRIDGE]"` (it leaves `--br=` out when the string already has one).
//! Both helpers flatten [`ProtocolArgs`] into their own clap parser.

use std::os::fd::RawFd;

use clap::Args;

#[derive(Debug, Clone, Args, PartialEq, Eq)]
pub struct ProtocolArgs {
    /// Give the device a virtio-net header (IFF_VNET_HDR) if the kernel supports it. QEMU always passes this.
    #[arg(long = "use-vnet")]
    pub use_vnet: bool,

    /// The unix socket (inherited from QEMU) over which the new device's fd is sent.
    #[arg(long = "fd", value_name = "N", required = true)]
    pub fd: RawFd,

    /// The bridge (bridge helper) or lower device (macvtap helper) to attach to.
    #[arg(long = "br", value_name = "NAME", required = true)]
    pub br: String,
}
