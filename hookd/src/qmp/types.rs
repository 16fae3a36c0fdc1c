//! What a QMP session reports and how it fails.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use qnet_api::{GuestName, GuestUuid, Mac};

/// Default bound on every wait for the peer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on the length of one QMP message (one line).
pub const DEFAULT_MAX_LINE: usize = 4 << 20;
/// Default bound on the events queued for the consumer
/// ([`SessionOptions::events`]).
pub const DEFAULT_EVENTS: usize = 16;

/// Tunables of a session; [`Default`] gives [`DEFAULT_TIMEOUT`],
/// [`DEFAULT_MAX_LINE`] and [`DEFAULT_EVENTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Bound on the greeting, each command's reply and each write.
    pub timeout: Duration,
    /// Longest accepted line in bytes, excluding the newline.
    pub max_line: usize,
    /// Most events queued for the consumer ([`super::QmpEvents`]); more
    /// are dropped and counted (at least 1).
    pub events: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            max_line: DEFAULT_MAX_LINE,
            events: DEFAULT_EVENTS,
        }
    }
}

/// Who is at the other end of the socket, from `SO_PEERCRED`: the process
/// that connected (client mode) or that created the listening socket
/// (server mode). Either way, the QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestIdentity {
    pub pid: u32,
    pub uid: u32,
}

/// The `{"QMP": {...}}` greeting QEMU opens every session with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// `(major, minor, micro)`; zeros if the greeting did not say.
    pub version: (u64, u64, u64),
    /// Distribution build string, e.g. `"Debian 1:7.2+dfsg-7+deb12u18"`.
    pub package: String,
    /// Capabilities offered, e.g. `["oob"]`; none are enabled by us.
    pub capabilities: Vec<String>,
}

/// What [`QmpSession::query_info`] learns about a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// `-name`, if given, made safe ([`qnet_api::kept_text`]).
    pub name: Option<GuestName>,
    /// `-uuid`, if given (QEMU reports the nil UUID when it was not; that
    /// is mapped to `None`).
    pub uuid: Option<GuestUuid>,
    /// QEMU's run state, e.g. `"prelaunch"`, `"running"`, `"paused"`,
    /// `"shutdown"`, `"guest-panicked"`.
    pub status: String,
    pub running: bool,
    /// The guest's NICs, see [`QmpSession::query_nics`].
    pub nics: Vec<NicInfo>,
}

/// Run state from `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStatus {
    pub status: String,
    pub running: bool,
}

/// One guest NIC as QEMU sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NicInfo {
    /// QEMU's net client name: the `-device` id if it had one, otherwise
    /// generated, e.g. `"virtio-net-pci.0"`.
    pub name: String,
    /// The guest's MAC address.
    pub mac: Mac,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    /// QEMU is shutting down (or, with `-no-shutdown`, has stopped the
    /// guest and stays alive). `guest` says whether the guest asked for it;
    /// `reason` is QEMU's `ShutdownCause`, e.g. `"guest-shutdown"`,
    /// `"host-qmp-quit"`, `"host-signal"`, `"guest-panic"`.
    Shutdown {
        guest: bool,
        reason: Option<String>,
    },
    /// `system_powerdown` was requested (ACPI power button).
    Powerdown,
    Reset,
    Stop,
    Resume,
    /// The guest changed a NIC's receive filter, typically its MAC:
    /// re-read it with [`QmpSession::query_nics`](super::QmpSession::query_nics).
    NicRxFilterChanged {
        name: Option<String>,
        path: String,
    },
    DeviceDeleted {
        device: Option<String>,
        path: String,
    },
    /// Any other event, by name.
    Other(String),
    /// Not from QEMU: this many events were dropped because the events
    /// queue was full; re-read whatever state matters.
    Lagged(u64),
    /// Not from QEMU: the session ended, always the last item. `error` is
    /// `None` for a clean end (the peer closed the connection between
    /// messages, or we closed the session), otherwise why (the
    /// [`QmpError`], rendered).
    Closed {
        error: Option<String>,
    },
}

/// A failed QMP operation. `peer` describes the socket, e.g.
/// `QMP peer pid 4242 on /run/qnet/qmp.sock`.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("connecting to QMP socket {}: timed out after {after:?}", path.display())]
    ConnectTimeout { path: PathBuf, after: Duration },

    #[error("{peer}: reading SO_PEERCRED: {detail}")]
    PeerCred { peer: String, detail: String },

    #[error("{peer}: timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        peer: String,
        waiting_for: String,
        after: Duration,
    },

    #[error("{peer}: {action}: {source}")]
    Io {
        peer: String,
        action: String,
        #[source]
        source: io::Error,
    },

    #[error("{peer}: connection closed {during}")]
    Eof { peer: String, during: String },

    #[error("{peer}: message longer than {limit} bytes")]
    LineTooLong { peer: String, limit: usize },

    #[error("{peer}: protocol error: {detail}")]
    Protocol { peer: String, detail: String },

    /// QEMU answered the command with an error. `class` is kept as a string
    /// (e.g. `"GenericError"`, `"CommandNotFound"`, `"DeviceNotFound"`):
    /// newer QEMUs may add classes.
    #[error("{peer}: {command} failed: {class}: {desc}")]
    Command {
        peer: String,
        command: String,
        class: String,
        desc: String,
    },

    #[error("{peer}: unexpected reply to {command}: {detail}")]
    Decode {
        peer: String,
        command: String,
        detail: String,
    },

    /// We ended the session because writing to the peer failed.
    #[error("{peer}: session aborted: {reason}")]
    Aborted { peer: String, reason: String },

    /// The session is over; `reason` says why it ended.
    #[error("{peer}: session closed ({reason}) before {command} was answered")]
    Closed {
        peer: String,
        command: String,
        reason: String,
    },
}
