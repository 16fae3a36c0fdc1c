//! The firewall's one error type, with a [`ErrorKind`] a caller can act on.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use super::element::InvalidElement;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An element no table can hold (port 0, families mixed, one key with
    /// two guests in one request): the caller's to fix, nothing changed.
    Invalid,
    /// Our table or its maps are not there (`ENOENT`): apply the ruleset.
    TableMissing,
    /// A host port is forwarded to another guest already (`EEXIST`).
    KeyTaken,
    /// The kernel did not answer in time: another process holds the
    /// nftables commit lock.
    Busy,
    /// Not allowed (`EPERM`): the daemon lacks `CAP_NET_ADMIN`.
    Denied,
    /// `nft` could not be run (not installed?).
    Unavailable,
    /// nft or the kernel refused for another reason (see the message).
    Failed,
}

impl ErrorKind {
    /// The kind of a kernel error number.
    pub fn of_errno(errno: Option<i32>) -> ErrorKind {
        match errno {
            Some(libc::ENOENT) => ErrorKind::TableMissing,
            Some(libc::EEXIST) => ErrorKind::KeyTaken,
            Some(libc::EPERM | libc::EACCES) => ErrorKind::Denied,
            Some(libc::ETIMEDOUT | libc::EAGAIN) => ErrorKind::Busy,
            _ => ErrorKind::Failed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run {} (is nftables installed?): {source}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    /// nft ran and failed; `message` is the first relevant line of its
    /// stderr (with the offending script line), `stderr` all of it.
    #[error("{action}: nft failed ({status}): {message}")]
    Failed {
        action: &'static str,
        status: ExitStatus,
        message: String,
        stderr: String,
    },
    /// The kernel refused a whole element change sent over nfnetlink, or
    /// could not be asked; nothing changed.
    #[error("{action}: {source}")]
    Kernel {
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// An element that cannot be installed (checked before the kernel or
    /// nft see it).
    #[error(transparent)]
    InvalidElement(#[from] InvalidElement),
}

impl FirewallError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FirewallError::Spawn { .. } => ErrorKind::Unavailable,
            FirewallError::Failed { .. } => ErrorKind::Failed,
            FirewallError::Kernel { source, .. } => ErrorKind::of_errno(errno(source)),
            FirewallError::InvalidElement(_) => ErrorKind::Invalid,
        }
    }

    /// The kernel's error number, for a [`FirewallError::Kernel`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            FirewallError::Kernel { source, .. } => errno(source),
            _ => None,
        }
    }
}

/// The error number of `e`; a timeout waiting for the kernel counts as
/// `ETIMEDOUT`.
pub(super) fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
        .or_else(|| (e.kind() == io::ErrorKind::TimedOut).then_some(libc::ETIMEDOUT))
}
