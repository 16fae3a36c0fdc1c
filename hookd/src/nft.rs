//! Our one nftables table, `table inet qnet`: masquerade, forwarding policy
//! for our bridges, blocked outgoing ports.
//!
//! We never list, flush or edit any other table: libvirt, Docker,
//! firewalld keep theirs. The table is replaced as a whole in one
//! transaction (`nft -f -`):
//!
//! ```text
//! add table inet qnet        # so that the delete cannot fail
//! delete table inet qnet     # drop the old contents...
//! table inet qnet { ... }    # ...and declare the new ones
//! ```
//!
//! nft commits the script atomically: packets see either the old table or
//! the new one, and a script with an error changes nothing.
//!
//! Our chains only ever *accept* or *drop/reject* traffic of our own
//! bridges, with policy accept: a verdict of accept in our table does not
//! override a drop in someone else's base chain on the same hook (nftables
//! evaluates every base chain), so everything else keeps working exactly as
//! it did — but note that a host firewall dropping forwarded traffic (e.g.
//! Docker's `FORWARD` policy drop) also drops our guests' traffic.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use thiserror::Error;
use tokio::io::AsyncWriteExt;

use crate::api::{Mode, Proto};
use crate::config::NetworkConfig;

pub const TABLE_FAMILY: &str = "inet";
pub const TABLE_NAME: &str = "qnet";

#[derive(Debug, Error)]
pub enum NftError {
    #[error("cannot run {}: {source}", program.display())]
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
}

/// Where `name` is: the first match on `$PATH`, then `/usr/sbin`, `/sbin`
/// (a daemon started with a minimal `PATH` still finds nft and dnsmasq).
pub(crate) fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The name of network `name`'s chain for traffic forwarded into (`in`) or
/// out of (`out`) its bridge. Network names are `[A-Za-z0-9_-]{1,32}`, so
/// with the `net_` prefix this is always a valid nft identifier.
fn chain(name: &str, dir: &str) -> String {
    format!("net_{name}_{dir}")
}

/// `"a"`, or `{ "a", "b" }` for more than one element (nft's own spelling,
/// so that the listing looks like what we wrote).
fn set<T: AsRef<str>>(items: &[T]) -> String {
    match items {
        [one] => one.as_ref().to_owned(),
        many => format!(
            "{{ {} }}",
            many.iter()
                .map(AsRef::as_ref)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn quoted(s: &str) -> String {
    // Interface names are validated by the config (no quotes, no spaces);
    // this keeps a bad one from breaking out of the string regardless.
    format!("\"{}\"", s.replace(['"', '\\'], ""))
}

/// The complete `table inet qnet { ... }` for `networks`, without the
/// add/delete preamble (see [`script`]). Pure and deterministic: networks
/// are emitted sorted by name.
///
/// Layout:
/// - `postrouting` (nat, srcnat): one masquerade rule per `nat` network
///   (IPv4, and IPv6 when configured): from its subnet, not to its subnet,
///   out of any interface but its bridge — or only out of `uplink`.
/// - `forward` (filter, policy accept), in order:
///   1. traffic that stays on one of our bridges (seen here only with
///      br_netfilter loaded, e.g. by Docker): accept;
///   2. `isolated` bridges: drop whatever is forwarded into or out of them;
///   3. `ct state established,related accept`;
///   4. traffic into a bridge jumps to `net_<name>_in`: `nat` accepts only
///      DNAT'ed connections (port forwards) and drops the rest; `routed`
///      accepts (only from `uplink` when set);
///   5. traffic out of a bridge jumps to `net_<name>_out`: drop spoofed
///      sources, reject blocked ports (TCP with a reset, UDP with ICMP port
///      unreachable, so clients fail at once), drop anything not leaving
///      via `uplink` when set, accept.
///
/// "In" is checked before "out", so one `nat` network cannot open
/// connections into another. Port forwards (DNAT) can later be added as a
/// `prerouting` chain and a map without changing this layout.
pub fn render(networks: &[NetworkConfig]) -> String {
    let mut nets: Vec<&NetworkConfig> = networks.iter().collect();
    nets.sort_by(|a, b| a.name.cmp(&b.name));

    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "table {TABLE_FAMILY} {TABLE_NAME} {{");

    // --- postrouting: masquerade ---
    let _ = writeln!(w, "\tchain postrouting {{");
    let _ = writeln!(
        w,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    );
    for net in nets.iter().filter(|n| n.mode == Mode::Nat) {
        let via = match &net.uplink {
            Some(uplink) => format!("oifname {}", quoted(uplink)),
            None => format!("oifname != {}", quoted(&net.bridge)),
        };
        let _ = writeln!(
            w,
            "\t\tip saddr {s} ip daddr != {s} {via} masquerade comment {c}",
            s = net.subnet.trunc(),
            c = quoted(&net.name)
        );
        if let Some(v6) = &net.ipv6 {
            let _ = writeln!(
                w,
                "\t\tip6 saddr {s} ip6 daddr != {s} {via} masquerade comment {c}",
                s = v6.subnet.trunc(),
                c = quoted(&net.name)
            );
        }
    }
    let _ = writeln!(w, "\t}}");

    // --- forward: the policy for our bridges ---
    let _ = writeln!(w);
    let _ = writeln!(w, "\tchain forward {{");
    let _ = writeln!(
        w,
        "\t\ttype filter hook forward priority filter; policy accept;"
    );
    if !nets.is_empty() {
        let same: Vec<String> = nets
            .iter()
            .map(|n| format!("{b} . {b}", b = quoted(&n.bridge)))
            .collect();
        // nft lists a concatenated set in braces even with one element.
        let _ = writeln!(w, "\t\tiifname . oifname {{ {} }} accept", same.join(", "));
    }
    let isolated: Vec<String> = nets
        .iter()
        .filter(|n| n.mode == Mode::Isolated)
        .map(|n| quoted(&n.bridge))
        .collect();
    if !isolated.is_empty() {
        let _ = writeln!(w, "\t\tiifname {} drop", set(&isolated));
        let _ = writeln!(w, "\t\toifname {} drop", set(&isolated));
    }
    let _ = writeln!(w, "\t\tct state established,related accept");
    let connected: Vec<&&NetworkConfig> =
        nets.iter().filter(|n| n.mode != Mode::Isolated).collect();
    if !connected.is_empty() {
        let jumps = |dir: &str| {
            let items: Vec<String> = connected
                .iter()
                .map(|n| format!("{} : jump {}", quoted(&n.bridge), chain(&n.name, dir)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        };
        let _ = writeln!(w, "\t\toifname vmap {}", jumps("in"));
        let _ = writeln!(w, "\t\tiifname vmap {}", jumps("out"));
    }
    let _ = writeln!(w, "\t}}");

    // --- per network chains ---
    for net in connected {
        let _ = writeln!(w);
        let _ = writeln!(w, "\tchain {} {{", chain(&net.name, "in"));
        match net.mode {
            Mode::Nat => {
                let _ = writeln!(w, "\t\tct status dnat accept");
                let _ = writeln!(w, "\t\tdrop");
            }
            _ => {
                if let Some(uplink) = &net.uplink {
                    let _ = writeln!(w, "\t\tiifname != {} drop", quoted(uplink));
                }
                let _ = writeln!(w, "\t\taccept");
            }
        }
        let _ = writeln!(w, "\t}}");

        let _ = writeln!(w);
        let _ = writeln!(w, "\tchain {} {{", chain(&net.name, "out"));
        let _ = writeln!(w, "\t\tip saddr != {} drop", net.subnet.trunc());
        match &net.ipv6 {
            Some(v6) => {
                let _ = writeln!(w, "\t\tip6 saddr != {} drop", v6.subnet.trunc());
            }
            None => {
                let _ = writeln!(w, "\t\tmeta nfproto ipv6 drop");
            }
        }
        for (proto, verdict) in [
            (Proto::Tcp, "reject with tcp reset"),
            (Proto::Udp, "reject"),
        ] {
            let ports: Vec<String> = net
                .blocked_ports
                .iter()
                .filter(|p| p.proto == proto)
                .map(|p| p.port.to_string())
                .collect();
            if !ports.is_empty() {
                let _ = writeln!(w, "\t\t{proto} dport {} {verdict}", set(&ports));
            }
        }
        if let Some(uplink) = &net.uplink {
            let _ = writeln!(w, "\t\toifname != {} drop", quoted(uplink));
        }
        let _ = writeln!(w, "\t\taccept");
        let _ = writeln!(w, "\t}}");
    }
    let _ = writeln!(w, "}}");
    out
}

/// The transaction that replaces our table with the one for `networks`.
pub fn script(networks: &[NetworkConfig]) -> String {
    format!(
        "add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n{}",
        render(networks)
    )
}

/// Installs our table for `networks`, replacing the previous one
/// atomically. With no networks our table is removed.
pub async fn apply(networks: &[NetworkConfig]) -> Result<(), NftError> {
    if networks.is_empty() {
        return remove().await;
    }
    run_nft(
        "applying table inet qnet",
        &["-f", "-"],
        Some(&script(networks)),
    )
    .await?;
    tracing::debug!(networks = networks.len(), "applied table inet qnet");
    Ok(())
}

/// Removes our table, if it exists. Nothing else is touched.
pub async fn remove() -> Result<(), NftError> {
    let script = format!(
        "add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"
    );
    run_nft("removing table inet qnet", &["-f", "-"], Some(&script)).await?;
    Ok(())
}

/// Our table as nft lists it, normalised for comparison (trailing
/// whitespace and blank lines removed); empty if the table does not exist.
pub async fn list() -> Result<String, NftError> {
    match run_nft(
        "listing table inet qnet",
        &["list", "table", TABLE_FAMILY, TABLE_NAME],
        None,
    )
    .await
    {
        Ok(stdout) => Ok(normalize(&stdout)),
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
            Ok(String::new())
        }
        Err(e) => Err(e),
    }
}

/// Trailing whitespace and blank lines removed, one `\n` after each line.
pub fn normalize(listing: &str) -> String {
    listing
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

async fn run_nft(
    action: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NftError> {
    let program = find_program("nft");
    let spawn_err = |source| NftError::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = tokio::process::Command::new(&program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(text.as_bytes()).await.map_err(spawn_err)?;
        drop(pipe);
    }
    let output = child.wait_with_output().await.map_err(spawn_err)?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(NftError::Failed {
            action,
            status: output.status,
            message: relevant_error(&stderr),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// nft prints `FILE:LINE:COLS: Error: WHAT` followed by the offending line
/// and a line of carets; we keep the error and the offending line.
pub fn relevant_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    let Some(i) = lines.iter().position(|l| l.contains("Error")) else {
        return lines
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.is_empty())
            .unwrap_or("(no error message)")
            .to_owned();
    };
    let error = lines[i].trim();
    match lines.get(i + 1).map(|l| l.trim()) {
        Some(src) if !src.is_empty() && !src.chars().all(|c| c == '^' || c == '~') => {
            format!("{error}: `{src}`")
        }
        _ => error.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BlockedPort, Ipv6Config};

    fn net(name: &str, mode: Mode, subnet: &str) -> NetworkConfig {
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        let first = u32::from(subnet.network());
        NetworkConfig {
            name: name.into(),
            bridge: format!("br-{name}"),
            mode,
            subnet,
            router: (first + 1).into(),
            dhcp_range: ((first + 2).into(), (first + 200).into()),
            domain: format!("{name}.qnet"),
            uplink: None,
            blocked_ports: Vec::new(),
            ipv6: None,
        }
    }

    #[test]
    fn nat_network_with_blocked_ports() {
        let mut lab = net("lab", Mode::Nat, "10.42.0.0/24");
        lab.blocked_ports = vec![
            BlockedPort {
                proto: Proto::Tcp,
                port: 25,
            },
            BlockedPort {
                proto: Proto::Tcp,
                port: 465,
            },
            BlockedPort {
                proto: Proto::Udp,
                port: 1900,
            },
        ];
        let expected = r#"table inet qnet {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.42.0.0/24 ip daddr != 10.42.0.0/24 oifname != "br-lab" masquerade comment "lab"
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname . oifname { "br-lab" . "br-lab" } accept
		ct state established,related accept
		oifname vmap { "br-lab" : jump net_lab_in }
		iifname vmap { "br-lab" : jump net_lab_out }
	}

	chain net_lab_in {
		ct status dnat accept
		drop
	}

	chain net_lab_out {
		ip saddr != 10.42.0.0/24 drop
		meta nfproto ipv6 drop
		tcp dport { 25, 465 } reject with tcp reset
		udp dport 1900 reject
		accept
	}
}
"#;
        assert_eq!(render(&[lab]), expected);
    }

    #[test]
    fn isolated_network_only_drops() {
        let iso = net("iso", Mode::Isolated, "10.43.0.0/24");
        let expected = r#"table inet qnet {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname . oifname { "br-iso" . "br-iso" } accept
		iifname "br-iso" drop
		oifname "br-iso" drop
		ct state established,related accept
	}
}
"#;
        assert_eq!(render(&[iso]), expected);
    }

    #[test]
    fn routed_with_uplink_and_ipv6() {
        let mut r = net("r-1", Mode::Routed, "10.44.0.0/24");
        r.uplink = Some("eth0".into());
        r.ipv6 = Some(Ipv6Config {
            subnet: "fd44::/64".parse().unwrap(),
            router: "fd44::1".parse().unwrap(),
        });
        let text = render(&[r]);
        assert!(!text.contains("masquerade"), "{text}");
        assert!(
            text.contains("\tchain net_r-1_in {\n\t\tiifname != \"eth0\" drop\n\t\taccept\n\t}\n"),
            "{text}"
        );
        assert!(text.contains("\t\tip6 saddr != fd44::/64 drop\n"), "{text}");
        assert!(
            text.contains("\t\toifname != \"eth0\" drop\n\t\taccept\n"),
            "{text}"
        );
    }

    #[test]
    fn nat_with_uplink_and_ipv6_masquerades_both_families_via_uplink() {
        let mut n = net("six", Mode::Nat, "10.45.0.0/24");
        n.uplink = Some("up0".into());
        n.ipv6 = Some(Ipv6Config {
            subnet: "fd45::/64".parse().unwrap(),
            router: "fd45::1".parse().unwrap(),
        });
        let text = render(&[n]);
        assert!(text.contains(
            "\t\tip saddr 10.45.0.0/24 ip daddr != 10.45.0.0/24 oifname \"up0\" masquerade comment \"six\"\n"
        ), "{text}");
        assert!(text.contains(
            "\t\tip6 saddr fd45::/64 ip6 daddr != fd45::/64 oifname \"up0\" masquerade comment \"six\"\n"
        ), "{text}");
        assert!(!text.contains("nfproto ipv6 drop"), "{text}");
    }

    #[test]
    fn several_networks_are_sorted_and_use_sets() {
        let a = net("a", Mode::Nat, "10.1.0.0/24");
        let b = net("b", Mode::Isolated, "10.2.0.0/24");
        let c = net("c", Mode::Isolated, "10.3.0.0/24");
        let d = net("d", Mode::Routed, "10.4.0.0/24");
        let one = render(&[d.clone(), c.clone(), b.clone(), a.clone()]);
        assert_eq!(one, render(&[a, b, c, d]));
        assert!(
            one.contains("\t\tiifname { \"br-b\", \"br-c\" } drop\n"),
            "{one}"
        );
        assert!(
            one.contains(
                "\t\toifname vmap { \"br-a\" : jump net_a_in, \"br-d\" : jump net_d_in }\n"
            ),
            "{one}"
        );
        assert!(one.contains(
            "iifname . oifname { \"br-a\" . \"br-a\", \"br-b\" . \"br-b\", \"br-c\" . \"br-c\", \"br-d\" . \"br-d\" } accept"
        ), "{one}");
        assert!(script(&[])
            .starts_with("add table inet qnet\ndelete table inet qnet\ntable inet qnet {"));
    }

    #[test]
    fn relevant_error_keeps_the_error_and_the_offending_line() {
        let stderr = "/dev/stdin:6:20-25: Error: Could not process rule: No such file or directory\n  iifname \"x\" jump nosuch\n                   ^^^^^^\n";
        assert_eq!(
            relevant_error(stderr),
            "/dev/stdin:6:20-25: Error: Could not process rule: No such file or directory: `iifname \"x\" jump nosuch`"
        );
        assert_eq!(relevant_error("\nsomething odd\n"), "something odd");
        assert_eq!(relevant_error(""), "(no error message)");
    }

    #[test]
    fn normalize_drops_blank_lines_and_trailing_space() {
        assert_eq!(normalize("a  \n\n\tb\n"), "a\n\tb\n");
    }
}
