//! Running the probes of [`super`]: the veth pair on the bridge, our
//! table, `nft -a monitor trace`, the frames, and removing it all again.

use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use rtnetlink::{LinkUnspec, LinkVeth};
use tokio::io::AsyncReadExt;

use super::{frame, probe_table, Probe, TABLE, VETH};
use crate::netlink::Netlink;
use crate::programs::find_program;

/// How long `nft monitor` gets to subscribe before the frames go, and how
/// long the trace is read after.
const SETTLE: Duration = Duration::from_millis(300);
const READ: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the bridge `{0}` does not exist")]
    NoBridge(String),
    #[error("{0}")]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error("nft: {0}")]
    Nft(String),
    #[error("sending the probe: {0}")]
    Send(#[source] std::io::Error),
}

/// Sends `probes` into `bridge` and returns what `nft -a monitor trace`
/// printed meanwhile. The veth pair and our table are removed before
/// (leftovers) and after, whatever happens.
pub async fn run(bridge: &str, probes: &[Probe]) -> Result<String, ProbeError> {
    let netlink = Netlink::open()?;
    remove(&netlink).await;
    let traced = traced(&netlink, bridge, probes).await;
    remove(&netlink).await;
    traced
}

async fn traced(netlink: &Netlink, bridge: &str, probes: &[Probe]) -> Result<String, ProbeError> {
    let br = netlink
        .link_by_name(bridge)
        .await?
        .ok_or_else(|| ProbeError::NoBridge(bridge.to_owned()))?;
    let bridge_mac: [u8; 6] = br
        .mac
        .as_deref()
        .and_then(|m| m.try_into().ok())
        .ok_or_else(|| ProbeError::NoBridge(bridge.to_owned()))?;
    let inject = add_veth(netlink, br.index).await?;
    let Some(src) = probes.first().map(|p| p.src) else {
        return Ok(String::new());
    };
    nft("adding the probe table", &probe_table(bridge, src)).await?;
    let mut monitor = tokio::process::Command::new(find_program("nft"))
        .args(["-a", "monitor", "trace"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ProbeError::Nft(e.to_string()))?;
    tokio::time::sleep(SETTLE).await;
    let sent = send(inject, probes.iter().map(|p| frame(p, bridge_mac)));
    let mut out = Vec::new();
    if let Some(mut stdout) = monitor.stdout.take() {
        // nft monitor never ends by itself: read what it prints in time.
        let deadline = tokio::time::Instant::now() + READ;
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout_at(deadline, stdout.read(&mut buf)).await {
            out.extend_from_slice(&buf[..n]);
        }
    }
    let _ = monitor.kill().await;
    sent?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Creates the veth pair, its second end a port of bridge `master`, both
/// up; returns the index of the first, where frames are written.
async fn add_veth(netlink: &Netlink, master: u32) -> Result<u32, ProbeError> {
    let refused =
        |what: &str| crate::netlink::NetlinkError::refused(format!("{what} {}/{}", VETH.0, VETH.1));
    let h = netlink.handle();
    h.link()
        .add(LinkVeth::new(VETH.0, VETH.1).build())
        .execute()
        .await
        .map_err(refused("creating"))?;
    let index = |name: &'static str| async move {
        netlink
            .link_by_name(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| ProbeError::NoBridge(name.to_owned()))
    };
    let (inject, port) = (index(VETH.0).await?, index(VETH.1).await?);
    h.link()
        .set(
            LinkUnspec::new_with_index(port)
                .controller(master)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(refused("attaching"))?;
    h.link()
        .set(LinkUnspec::new_with_index(inject).up().build())
        .execute()
        .await
        .map_err(refused("bringing up"))?;
    Ok(inject)
}

/// Removes what an interrupted probe left (for `qnet-hookd --cleanup`).
pub async fn remove_leftovers() -> Result<(), ProbeError> {
    remove(&Netlink::open()?).await;
    Ok(())
}

/// Removes the veth pair (deleting one end deletes both) and our table,
/// if they exist.
async fn remove(netlink: &Netlink) {
    if let Ok(Some(link)) = netlink.link_by_name(VETH.0).await {
        let _ = netlink.handle().link().del(link.index).execute().await;
    }
    let script = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    let _ = nft("removing the probe table", &script).await;
}

/// Writes each frame out of device `ifindex` (AF_PACKET).
fn send(ifindex: u32, frames: impl Iterator<Item = Vec<u8>>) -> Result<(), ProbeError> {
    let socket = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| ProbeError::Send(e.into()))?;
    // sendto stays libc's: nix builds a link-layer address only from a
    // raw sockaddr_ll anyway.
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    for frame in frames {
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and the address are valid for their lengths.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(ProbeError::Send(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Runs `script` with `nft -f -`.
async fn nft(action: &'static str, script: &str) -> Result<(), ProbeError> {
    crate::firewall::run_script(action, script)
        .await
        .map_err(|e| ProbeError::Nft(e.to_string()))
}
