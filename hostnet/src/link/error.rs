//! The link layer's errors: [`LinkError`] for callers, and the
//! [`Failure`] a request meets before it is known which operation it
//! belongs to.

use std::io;

use netlink_packet_core::DecodeError;
use nix::errno::Errno;

/// A failed link operation. `action` says what was being attempted, e.g.
/// `creating macvtap "mvt0" on ifindex 3`.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The kernel refused to create a device because one with that name
    /// already exists (`EEXIST`). Callers that pick names may retry with
    /// another one.
    #[error("{action}: a device with that name already exists")]
    Exists { action: String },

    /// The kernel rejected the request with `errno`; `message` is its
    /// extended-ack explanation, when it gave one.
    #[error("{action}: {errno}{}", kernel_message(.message))]
    Kernel {
        action: String,
        errno: Errno,
        message: Option<String>,
    },

    /// Sending to or receiving from the netlink socket failed.
    #[error("{action}: netlink socket I/O failed")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },

    /// The kernel's reply could not be understood.
    #[error("{action}: malformed netlink reply: {detail}")]
    Protocol { action: String, detail: String },

    /// The caller passed a name the kernel would reject (see
    /// [`valid_ifname`](super::valid_ifname)); nothing was sent.
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
}

impl LinkError {
    /// The errno behind this error, if it came from the kernel or the socket.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Exists { .. } => Some(Errno::EEXIST),
            Self::Kernel { errno, .. } => Some(*errno),
            Self::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
            Self::Protocol { .. } | Self::InvalidName(_) => None,
        }
    }
}

fn kernel_message(message: &Option<String>) -> String {
    match message {
        Some(text) => format!(" ({text})"),
        None => String::new(),
    }
}

/// A failure before we know which public operation it belongs to; turned
/// into a [`LinkError`] by [`Failure::during`].
#[derive(Debug)]
pub(super) enum Failure {
    Kernel {
        errno: Errno,
        message: Option<String>,
    },
    Io(io::Error),
    Protocol(String),
}

impl Failure {
    pub(super) fn during(self, action: impl FnOnce() -> String) -> LinkError {
        let action = action();
        match self {
            Self::Kernel {
                errno: Errno::EEXIST,
                ..
            } => LinkError::Exists { action },
            Self::Kernel { errno, message } => LinkError::Kernel {
                action,
                errno,
                message,
            },
            Self::Io(source) => LinkError::Io { action, source },
            Self::Protocol(detail) => LinkError::Protocol { action, detail },
        }
    }
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Self {
        Self::Protocol(e.to_string())
    }
}
