//! Whether a host port is taken by a host process: a forward of it would
//! steal that process' traffic, so adding one is refused with its owner's
//! name. The only code that probes sockets and reads `/proc/net`.

use std::net::Ipv6Addr;
use std::os::fd::AsRawFd;

use qnet_api::Proto;

/// A host process listening on `proto` `port` (any address), named as
/// "pid PID (COMMAND)" when it can be found: a forward would steal its
/// traffic.
///
/// First the cheap question ([`port_may_be_held`], two `bind` calls);
/// only when that says yes are `/proc/net/{tcp,udp}[6]` read, which walks
/// every socket of the host (~5 ms here, per port).
pub fn host_listener(proto: Proto, port: u16) -> Option<String> {
    if !port_may_be_held(proto, port) {
        return None;
    }
    listener_in_proc(proto, port)
}

/// Whether some socket may hold `port`: binding a fresh socket to the
/// wildcard address (IPv4, then IPv6-only) fails with `EADDRINUSE`. For
/// TCP with `SO_REUSEADDR`, which only a listener (or a bound socket
/// without `SO_REUSEADDR`) makes fail: connections and TIME_WAIT do not.
/// For UDP any bound socket. The socket is closed at once, never used.
fn port_may_be_held(proto: Proto, port: u16) -> bool {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
        SockaddrIn6,
    };
    let kind = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let Ok(fd) = socket(family, kind, SockFlag::SOCK_CLOEXEC, None) else {
            // No IPv6 in this kernel, say: nothing can listen there.
            continue;
        };
        if proto == Proto::Tcp && setsockopt(&fd, sockopt::ReuseAddr, &true).is_err() {
            return true;
        }
        let bound = match family {
            AddressFamily::Inet => bind(
                fd.as_raw_fd(),
                &SockaddrIn::from(std::net::SocketAddrV4::new(
                    std::net::Ipv4Addr::UNSPECIFIED,
                    port,
                )),
            ),
            _ => {
                if setsockopt(&fd, sockopt::Ipv6V6Only, &true).is_err() {
                    return true;
                }
                bind(
                    fd.as_raw_fd(),
                    &SockaddrIn6::from(std::net::SocketAddrV6::new(
                        Ipv6Addr::UNSPECIFIED,
                        port,
                        0,
                        0,
                    )),
                )
            }
        };
        // Any failure but "free" sends us to /proc for the answer.
        if bound.is_err() {
            return true;
        }
    }
    false
}

/// The listener on `proto` `port` from `/proc/net`, with its owner.
fn listener_in_proc(proto: Proto, port: u16) -> Option<String> {
    let tables: &[&str] = match proto {
        Proto::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Proto::Udp => &["/proc/net/udp", "/proc/net/udp6"],
    };
    for table in tables {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // TCP state 0A = LISTEN; for UDP any bound socket counts (07).
            let listening = match proto {
                Proto::Tcp => fields[3] == "0A",
                Proto::Udp => fields[3] == "07",
            };
            if local_port == Some(port) && listening {
                let owner = socket_owner(fields[9]).unwrap_or_else(|| "a host process".into());
                return Some(owner);
            }
        }
    }
    None
}

/// "pid PID (COMMAND)" of the process holding socket inode `inode`.
fn socket_owner(inode: &str) -> Option<String> {
    let wanted = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == wanted) {
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_found_with_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let owner = host_listener(Proto::Tcp, port).expect("our listener");
        assert!(owner.contains(&std::process::id().to_string()), "{owner}");
        drop(listener);
        assert_eq!(host_listener(Proto::Tcp, port), None, "closed");
    }

    #[test]
    fn ipv6_and_udp_holders_are_found_and_connections_do_not_count() {
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let port = v6.local_addr().unwrap().port();
        assert!(host_listener(Proto::Tcp, port).is_some(), "IPv6 listener");
        assert_eq!(host_listener(Proto::Udp, port), None, "TCP only");
        // A connection to the listener: its client port is not held.
        let client = std::net::TcpStream::connect(v6.local_addr().unwrap()).unwrap();
        let client_port = client.local_addr().unwrap().port();
        assert_eq!(host_listener(Proto::Tcp, client_port), None);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_port = udp.local_addr().unwrap().port();
        assert!(host_listener(Proto::Udp, udp_port).is_some(), "bound UDP");
    }
}
