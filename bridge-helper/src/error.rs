//! Every way the helper can fail, each worded as one line that says what
//! to do about it.

use std::path::PathBuf;

use qnet_hostnet::acl::{AclError, Denial};
use qnet_hostnet::link::LinkError;
use qnet_hostnet::protocol::ProtocolError;
use qnet_hostnet::reaper::ReaperError;
use qnet_hostnet::tap::TapError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HelperError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Acl(#[from] AclError),
    #[error("{}", .0.message("bridge"))]
    Denied(Box<Denial>),
    #[error(
        "this helper lacks CAP_NET_ADMIN: install it setuid root (chown root; chmod 4755) \
         or with `setcap cap_net_admin+ep`"
    )]
    NoNetAdmin,
    #[error(
        "bridge `{bridge}` does not exist: create it first (ip link add {bridge} type bridge) \
         or allow another bridge in {}", conf.display()
    )]
    NoSuchBridge { bridge: String, conf: PathBuf },
    #[error(
        "`{bridge}` is a {kind} device, not a Linux bridge: name a bridge \
         (ip -d link show type bridge lists them)"
    )]
    NotABridge { bridge: String, kind: String },
    #[error("netlink: {0}")]
    Netlink(LinkError),
    #[error("failed to create a TAP device: {0}")]
    Tap(TapError),
    #[error("TAP `{tap}` vanished right after it was created")]
    TapVanished { tap: String },
    #[error("failed to attach TAP `{tap}` to bridge `{bridge}`: {source}")]
    Attach {
        tap: String,
        bridge: String,
        source: LinkError,
    },
    #[error("cannot start the process that deletes TAP `{tap}` when QEMU exits: {source}")]
    Reaper { tap: String, source: ReaperError },
}
