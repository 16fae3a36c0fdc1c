//! systemd integration: the listening sockets qnet-hookd.socket passes
//! (`LISTEN_FDS`), and the service manager's notifications (`READY=1` once
//! every network is up, `STOPPING=1`). Outside systemd neither is set and
//! the daemon binds its sockets itself.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
use sd_notify::NotifyState;

use crate::error::DaemonError;

/// The listening sockets systemd passed, by what they are for.
#[derive(Debug, Default)]
pub struct PassedSockets {
    pub ctl: Option<UnixListener>,
    pub qmp: Option<UnixListener>,
}

/// Takes the sockets passed with `LISTEN_FDS` and removes the variables,
/// so dnsmasq and other children never see them. Call it before any
/// other thread runs (it changes the environment). A socket is the
/// control or QMP socket by its path, or else by its
/// `FileDescriptorName=` (`ctl`, `qmp`); anything else is refused, since serving the wrong
/// socket would give its clients the wrong rights. The path decides first:
/// FileDescriptorName= names every socket of a unit alike.
pub fn take_passed_sockets(ctl: &Path, qmp: &Path) -> Result<PassedSockets, DaemonError> {
    let refused = |what: String| {
        DaemonError::Refused(format!(
            "socket activation: {what}: check qnet-hookd.socket (ListenStream= must be {} and {})",
            ctl.display(),
            qmp.display()
        ))
    };
    let passed = sd_notify::listen_fds_with_names(true)
        .map_err(|e| refused(format!("bad LISTEN_FDS/LISTEN_FDNAMES: {e}")))?;
    let mut sockets = PassedSockets::default();
    for (fd, name) in passed {
        let (listener, path) = listening_unix_socket(fd).map_err(|e| refused(e.to_string()))?;
        let slot = match name.as_str() {
            _ if path.as_deref() == Some(ctl) => &mut sockets.ctl,
            _ if path.as_deref() == Some(qmp) => &mut sockets.qmp,
            "ctl" => &mut sockets.ctl,
            "qmp" => &mut sockets.qmp,
            _ => {
                return Err(refused(format!(
                    "socket `{name}` ({}) is neither the control nor the QMP socket",
                    show(path.as_deref())
                )))
            }
        };
        if slot.replace(listener).is_some() {
            return Err(refused(format!("two sockets for `{name}`")));
        }
    }
    Ok(sockets)
}

/// Why a passed descriptor cannot be served.
#[derive(Debug, thiserror::Error)]
enum BadSocket {
    #[error("descriptor {fd} is not {what}")]
    Not { fd: RawFd, what: &'static str },
    #[error("descriptor {fd}: {source}")]
    Io {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
}

/// Owns `fd` and checks that it is a listening unix stream socket;
/// returns it with its path.
fn listening_unix_socket(
    fd: RawFd,
) -> Result<(UnixListener, Option<std::path::PathBuf>), BadSocket> {
    // SAFETY: systemd passed fd to this process and nothing else owns it;
    // listen_fds_with_names yields each passed descriptor once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let not = |what| BadSocket::Not { fd, what };
    let kind = getsockopt(&owned, sockopt::SockType).map_err(|_| not("a socket"))?;
    let listening = getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false);
    let addr: UnixAddr =
        getsockname(std::os::fd::AsRawFd::as_raw_fd(&owned)).map_err(|_| not("a unix socket"))?;
    if kind != SockType::Stream || !listening {
        return Err(not("a listening stream socket (ListenStream=)"));
    }
    let path = addr.path().map(Path::to_path_buf);
    let listener = UnixListener::from(owned);
    listener
        .set_nonblocking(true)
        .map_err(|source| BadSocket::Io { fd, source })?;
    Ok((listener, path))
}

fn show(path: Option<&Path>) -> String {
    path.map_or_else(|| "no path".into(), |p| p.display().to_string())
}

/// Tells systemd the daemon is ready: every network is up and both
/// sockets are served. Nothing happens outside systemd.
pub fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("networks up")]);
}

/// Tells systemd the daemon is stopping (networks stay up).
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

fn notify(state: &[NotifyState]) {
    // `false`: the environment is not touched from a multi-threaded
    // process; children do not use NOTIFY_SOCKET, and systemd accepts
    // messages from the main pid only (NotifyAccess=main).
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!("cannot notify systemd ({state:?}): {e}");
    }
}
