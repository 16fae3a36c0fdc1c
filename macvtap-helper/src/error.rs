//! Every way the helper can fail, each worded as one line that says what
//! to do about it.

use std::path::PathBuf;

use qnet_hostnet::acl::{AclError, Denial};
use qnet_hostnet::devnode::DevNodeError;
use qnet_hostnet::link::{LinkError, MacvtapMode};
use qnet_hostnet::privilege::PrivilegeError;
use qnet_hostnet::protocol::ProtocolError;
use qnet_hostnet::reaper::ReaperError;
use qnet_hostnet::tap::TapError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HelperError {
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(
        "--mac is required in {mode} mode: a macvtap drops every frame that is not addressed \
         to its own MAC, so pass the guest NIC's MAC (the mac= of QEMU's -device), \
         e.g. --mac=52:54:00:12:34:56"
    )]
    MacRequired { mode: MacvtapMode },
    #[error("{}: {why}", path.display())]
    BadLimit { path: PathBuf, why: String },
    #[error(
        "uid {uid} already holds {held} qnet macvtaps and may hold at most {limit} \
         (macvtap-user-limit in the config directory sets it): stop a guest first"
    )]
    UserLimit { uid: u32, held: usize, limit: usize },
    /// An error of the reaper, which creates the device, as it reported it.
    #[error("{0}")]
    InReaper(String),
    #[error(
        "{} does not exist, so no lower device is allowed: create it with a line such as \
         `allow eth0` (see --help, ACL FILES)", path.display()
    )]
    MissingAcl { path: PathBuf },
    #[error(transparent)]
    Acl(AclError),
    #[error("{}", .0.message("lower device"))]
    Denied(Box<Denial>),
    #[error(
        "this helper lacks CAP_NET_ADMIN: install it setuid root (chown root; chmod 4755) \
         or with `setcap cap_net_admin,cap_dac_override,cap_mknod,cap_chown+ep`"
    )]
    NoNetAdmin,
    #[error(
        "lower device `{lower}` does not exist: name an existing host NIC \
         (ip link lists them) that {} allows", conf.display()
    )]
    NoSuchLower { lower: String, conf: PathBuf },
    #[error("`{lower}` cannot carry a macvtap: {why}")]
    UnsuitableLower { lower: String, why: String },
    #[error("netlink: {0}")]
    Netlink(LinkError),
    #[error(
        "no free qmvtapN name among the first {tried}: delete stale qmvtap devices \
         (ip -d link show type macvtap)"
    )]
    NoFreeName { tried: u32 },
    #[error(
        "lower device `{lower}` is held in passthru mode by {holder}: only one guest at a time \
         may use a device in passthru mode, and no other macvtap can share it; stop that guest \
         or use another device"
    )]
    HeldInPassthru { lower: String, holder: String },
    #[error(
        "passthru mode needs `{lower}` for itself, but it already carries {uppers}: \
         use bridge mode, or remove them first"
    )]
    SharedLower { lower: String, uppers: String },
    #[error(
        "MAC {mac} is already used by another macvtap on `{lower}`: is another guest running \
         with the same MAC? Give every guest NIC its own MAC"
    )]
    MacInUse { mac: String, lower: String },
    #[error("failed to create a {mode} macvtap on `{lower}`: {source}")]
    Create {
        lower: String,
        mode: MacvtapMode,
        source: LinkError,
    },
    #[error("macvtap `{name}` vanished right after it was created")]
    Vanished { name: String },
    #[error("failed to set up macvtap `{name}`: {source}")]
    Configure { name: String, source: LinkError },
    #[error("failed to put the guest MAC {mac} on `{lower}` (passthru): {source}")]
    PassthruMac {
        mac: String,
        lower: String,
        source: LinkError,
    },
    #[error("macvtap `{name}`: {source}")]
    DevNode { name: String, source: DevNodeError },
    #[error("macvtap `{name}`: {source}")]
    Tap { name: String, source: TapError },
    #[error("the character device opened for `{name}` belongs to `{found}`: refusing it")]
    WrongQueue { name: String, found: String },
    #[error("QEMU (pid {pid}) exited before its NIC was ready")]
    QemuGone { pid: u32 },
    #[error("cannot start the process that removes macvtap `{name}` when QEMU exits: {source}")]
    Reaper { name: String, source: ReaperError },
}
