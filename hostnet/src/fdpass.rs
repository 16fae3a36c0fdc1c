//! Passing file descriptors over the socket QEMU gives a network helper.
//!
//! QEMU creates an `AF_UNIX`/`SOCK_STREAM` socketpair, passes one end to
//! the helper as `--fd=N`, and reads exactly one byte carrying one
//! `SCM_RIGHTS` descriptor.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::cmsg_space;
use nix::errno::Errno;
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, AddressFamily, ControlMessage, ControlMessageOwned,
    MsgFlags, SockType, UnixCredentials,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum FdPassError {
    #[error("fd {fd} is not open")]
    NotOpen { fd: RawFd },
    #[error("fd {fd} is not a socket: {errno}")]
    NotSocket { fd: RawFd, errno: Errno },
    #[error("fd {fd} is not a unix stream socket")]
    WrongKind { fd: RawFd },
    #[error("sending the fd failed: {0}")]
    Send(Errno),
    #[error("receiving the fd failed: {0}")]
    Recv(Errno),
    #[error("the peer closed the socket without sending a file descriptor")]
    NoFd,
    #[error("SO_PEERCRED failed: {0}")]
    PeerCred(Errno),
}

/// Validates that `fd` (a number from the command line) is an open
/// `AF_UNIX` stream socket and borrows it.
///
/// Checking before any device exists means a bad `--fd` fails without
/// side effects.
pub fn borrow_unix_stream(fd: RawFd) -> Result<BorrowedFd<'static>, FdPassError> {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(FdPassError::NotOpen { fd });
    }
    // SAFETY: the fd is open (checked above) and the helper never closes
    // it before exiting, so the 'static borrow does not outlive it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let kind = getsockopt(&borrowed, sockopt::SockType)
        .map_err(|errno| FdPassError::NotSocket { fd, errno })?;
    let domain = socket_domain(fd).map_err(|errno| FdPassError::NotSocket { fd, errno })?;
    if kind != SockType::Stream || domain != AddressFamily::Unix as i32 {
        return Err(FdPassError::WrongKind { fd });
    }
    Ok(borrowed)
}

fn socket_domain(fd: RawFd) -> Result<i32, Errno> {
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_DOMAIN writes one int into `domain`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    Errno::result(rc).map(|_| domain)
}

/// Sends `fd` with a one-byte payload, as QEMU's `net_bridge_run_helper`
/// expects.
pub fn send_fd(socket: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> Result<(), FdPassError> {
    let payload = [0u8; 1];
    let iov = [IoSlice::new(&payload)];
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(FdPassError::Send(Errno::EIO)),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(FdPassError::Send(errno)),
        }
    }
}

/// Receives one descriptor the way QEMU does (one byte + `SCM_RIGHTS`).
pub fn recv_fd(socket: BorrowedFd<'_>) -> Result<OwnedFd, FdPassError> {
    let mut payload = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut payload)];
    let mut space = cmsg_space!([RawFd; 1]);
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(FdPassError::Recv)?,
        }
    };
    let mut received = None;
    for cmsg in msg.cmsgs().map_err(FdPassError::Recv)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if received.is_none() {
                    received = Some(owned);
                }
            }
        }
    }
    received.ok_or(FdPassError::NoFd)
}

/// Credentials of the process at the other end of a unix socket, as they
/// were when that process created or connected the socket.
pub fn peer_credentials(socket: BorrowedFd<'_>) -> Result<UnixCredentials, FdPassError> {
    getsockopt(&socket, sockopt::PeerCredentials).map_err(FdPassError::PeerCred)
}
