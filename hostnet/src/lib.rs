//! Host networking primitives shared by the qnet binaries.
//!
//! Everything here is synchronous and free of async runtimes: it is linked
//! into setuid/file-capability helpers, where every dependency is attack
//! surface and every millisecond of start-up is paid per guest NIC.

pub mod acl;
pub mod devnode;
pub mod fdpass;
pub mod link;
pub mod macvtap;
pub mod owner;
pub mod privilege;
pub mod protocol;
pub mod reaper;
pub mod tap;

/// Directory holding `bridge.conf` and `macvtap.conf`.
///
/// Fixed when the binary is built (`QNET_CONFIG_DIR=/etc/qemu cargo build`)
/// and never taken from argv or the environment at run time: a privileged
/// helper must not let its caller choose which ACL applies.
pub const CONFIG_DIR: &str = match option_env!("QNET_CONFIG_DIR") {
    Some(dir) => dir,
    None => "/etc/qemu",
};
