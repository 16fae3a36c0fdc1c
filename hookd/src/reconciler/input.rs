//! What changes the desired state: the reconciler's inputs, and who sends
//! them. The control socket and the QMP followers depend on this module
//! only, never on the reconciler itself.

use std::path::PathBuf;

use qnet_api::{Request, Response};
use tokio::sync::oneshot;

use crate::discover::GuestPort;
use crate::libvirt::LeaseUpdate;
use crate::procfs::Process;
use crate::qmp::{GuestIdentity, GuestInfo, NicInfo, QmpSession};

/// Identifies one QMP connection (a guest may reconnect with a new one).
pub type ConnId = u64;

/// Who sent a control request (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
}

impl Peer {
    /// The daemon itself, acting with root's rights.
    pub const ROOT: Peer = Peer { pid: 0, uid: 0 };

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

pub enum Input {
    Ctl {
        request: Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    },
    GuestUp(Box<GuestUp>),
    GuestNics {
        conn: ConnId,
        nics: Vec<NicInfo>,
        ports: Vec<GuestPort>,
    },
    GuestGone {
        conn: ConnId,
        why: String,
    },
    /// A guest recorded before a restart (or registered by the libvirt
    /// hook) exited.
    StaleGuestExited {
        pid: u32,
    },
    /// The lease status file of a libvirt network's bridge changed.
    LibvirtLeases(LeaseUpdate),
    /// Another firewall of the host changed (Docker, iptables,
    /// firewalld): open our networks in it again.
    PeersChanged,
    /// Time to try again what could not be saved.
    Retry,
    /// SIGHUP: re-read the configuration and apply what changed.
    Reload,
}

impl Input {
    /// Events whose syncing the reconciler may batch with others.
    pub fn is_guest_event(&self) -> bool {
        matches!(
            self,
            Input::GuestUp(_)
                | Input::GuestNics { .. }
                | Input::GuestGone { .. }
                | Input::StaleGuestExited { .. }
                | Input::Retry
        )
    }
}

/// A QEMU that finished its QMP handshake and queries.
pub struct GuestUp {
    pub conn: ConnId,
    pub identity: GuestIdentity,
    /// The process, with its start time (`None`: it has already exited).
    pub process: Option<Process>,
    pub info: GuestInfo,
    pub ports: Vec<GuestPort>,
    pub qmp_server: Option<PathBuf>,
    /// A handle on the session, for commands the reconciler sends the
    /// guest (`qnetctl guest stop`): the follower keeps reading it.
    pub qmp: QmpSession,
    /// Keeps the QMP session alive: the follower ends (closing its socket
    /// and pidfd) as soon as the reconciler drops this, e.g. because a
    /// newer session of the same QEMU replaced it.
    pub keepalive: oneshot::Sender<()>,
}
