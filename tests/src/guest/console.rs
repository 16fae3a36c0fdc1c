//! The guest's console protocol, and the parsers of its lines.
//!
//! `/init` reports on the serial console (`console=ttyS0`, which
//! [`GuestSpec::qemu_command`](super::GuestSpec::qemu_command) sends to a file), one line each, `\r\n` ended:
//!
//! ```text
//! QNET-GUEST-INIT uptime=<seconds>
//! QNET-GUEST-LEASE ip=<a.b.c.d> prefix=<n> router=<a.b.c.d|none> mac=<mac> uptime=<seconds>
//! QNET-GUEST-NOLEASE mac=<mac> uptime=<seconds>        (DHCP gave up: fatal)
//! QNET-GUEST-ERROR <message>                           (fatal)
//! QNET-GUEST-READY http=80 tcpecho=7 udpecho=<7|none> uptime=<seconds>
//! QNET-GUEST-PROBE ok target=<ip:port> tries=<n> body=<text> uptime=<seconds>
//! QNET-GUEST-PROBE fail target=<ip:port> tries=<n> uptime=<seconds>
//! QNET-GUEST-RESOLVE name=<name> ip=<a.b.c.d|none> uptime=<seconds>
//! ```
//!
//! Lines are `MARKER key=value...`; keys may be added later, so parsers
//! ignore keys they do not know. READY comes after LEASE, once the servers
//! listen. After NOLEASE or ERROR the guest idles until killed.
//!
//! RESOLVE comes after READY, only with `qnet.resolve=NAME`: NAME looked up
//! with the DNS server of the lease ([`RunningGuest::wait_for_resolve`](super::RunningGuest::wait_for_resolve)).
//!
//! PROBE lines come after READY (and RESOLVE), only when the kernel command
//! line has `qnet.probe=IP:PORT[,IP:PORT...]` (add it to
//! [`GuestSpec::extra_append`](super::GuestSpec::extra_append)): for each target in order the guest fetches
//! `http://IP:PORT/` (up to `qnet.probe_tries=N` tries, default 10) and
//! reports `ok` with the
//! first 64 bytes of the page (characters outside `[A-Za-z0-9._-]` replaced
//! by `_`; a token comes through unchanged), or `fail`. Tests use it to check
//! whether one guest reaches another; see [`RunningGuest::wait_for_probe`](super::RunningGuest::wait_for_probe).

use std::net::Ipv4Addr;

/// `/init` started (kernel boot is over).
pub const INIT_MARKER: &str = "QNET-GUEST-INIT";
/// `eth0` got a DHCP lease; see [`GuestLease`].
pub const LEASE_MARKER: &str = "QNET-GUEST-LEASE";
/// DHCP failed; the guest will not serve anything.
pub const NOLEASE_MARKER: &str = "QNET-GUEST-NOLEASE";
/// `/init` hit an error it cannot recover from.
pub const ERROR_MARKER: &str = "QNET-GUEST-ERROR";
/// The HTTP and echo servers listen.
pub const READY_MARKER: &str = "QNET-GUEST-READY";
/// The result of `qnet.probe=`; see [`ProbeOutcome`].
pub const PROBE_MARKER: &str = "QNET-GUEST-PROBE";
/// Result of `qnet.resolve=NAME`.
pub const RESOLVE_MARKER: &str = "QNET-GUEST-RESOLVE";

/// The lines of `text` that are complete (newline-ended: a line still being
/// written could be cut in the middle of an address), without `\r`.
pub(super) fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete.lines().map(|l| l.trim_end_matches('\r'))
}

/// `line` from `marker` on, if the marker is there as a whole word (kernel
/// messages may share the line; `QNET-GUEST-LEASE` must not match
/// `QNET-GUEST-LEASED`).
pub(super) fn find_marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.match_indices(marker)
        .map(|(at, _)| &line[at..])
        .find(|rest| {
            let after = &rest[marker.len()..];
            after.is_empty() || after.starts_with(' ')
        })
}

pub(super) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What the guest's LEASE line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLease {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub mac: String,
}

/// Parses a LEASE line (`QNET-GUEST-LEASE ip=... prefix=... router=... mac=...`).
pub fn parse_lease_line(line: &str) -> Result<GuestLease, String> {
    let fields = line
        .trim()
        .strip_prefix(LEASE_MARKER)
        .filter(|rest| rest.is_empty() || rest.starts_with(' '))
        .ok_or_else(|| format!("not a lease line: {line:?}"))?;
    let get = |key: &str| {
        fields
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .ok_or_else(|| format!("lease line without {key}=: {line:?}"))
    };
    let bad = |key: &str| format!("bad {key}= in lease line: {line:?}");
    let router = get("router")?;
    Ok(GuestLease {
        ip: get("ip")?.parse().map_err(|_| bad("ip"))?,
        prefix: get("prefix")?
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad("prefix"))?,
        router: match router {
            "none" | "" => None,
            r => Some(r.parse().map_err(|_| bad("router"))?),
        },
        mac: get("mac")?.to_string(),
    })
}

/// What a PROBE line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The page was fetched; `body` is its start (see the module docs).
    Reached { body: String },
    /// Every try failed.
    Failed,
}

/// Parses a PROBE line (`QNET-GUEST-PROBE ok ... body=...` or `... fail ...`).
pub fn parse_probe_line(line: &str) -> Result<ProbeOutcome, String> {
    let mut words = line
        .trim()
        .strip_prefix(PROBE_MARKER)
        .ok_or_else(|| format!("not a probe line: {line:?}"))?
        .split_whitespace();
    match words.next() {
        Some("ok") => Ok(ProbeOutcome::Reached {
            body: words
                .find_map(|kv| kv.strip_prefix("body="))
                .unwrap_or_default()
                .to_string(),
        }),
        Some("fail") => Ok(ProbeOutcome::Failed),
        _ => Err(format!("bad probe line: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lease_line() {
        let lease = parse_lease_line(
            "QNET-GUEST-LEASE ip=10.1.2.3 prefix=24 router=10.1.2.1 mac=52:54:00:aa:bb:cc uptime=2.1",
        )
        .unwrap();
        assert_eq!(
            lease,
            GuestLease {
                ip: Ipv4Addr::new(10, 1, 2, 3),
                prefix: 24,
                router: Some(Ipv4Addr::new(10, 1, 2, 1)),
                mac: "52:54:00:aa:bb:cc".into(),
            }
        );
        let no_router = parse_lease_line(
            "QNET-GUEST-LEASE ip=10.0.0.9 prefix=8 router=none mac=52:54:00:00:00:01",
        )
        .unwrap();
        assert_eq!(no_router.router, None);
    }

    #[test]
    fn rejects_bad_lease_lines() {
        assert!(parse_lease_line("QNET-GUEST-NOLEASE mac=52:54:00:00:00:01").is_err());
        assert!(parse_lease_line("QNET-GUEST-LEASE prefix=24 router=none mac=m").is_err());
        assert!(
            parse_lease_line("QNET-GUEST-LEASE ip=10.0.0.300 prefix=24 router=none mac=m").is_err()
        );
        assert!(
            parse_lease_line("QNET-GUEST-LEASE ip=10.0.0.3 prefix=33 router=none mac=m").is_err()
        );
    }

    #[test]
    fn finds_markers_as_whole_words_in_complete_lines() {
        let log = "[ 1.0] boot\r\nxx QNET-GUEST-LEASE ip=1.2.3.4\r\nQNET-GUEST-READY http=8";
        let lines: Vec<&str> = complete_lines(log).collect();
        assert_eq!(lines, ["[ 1.0] boot", "xx QNET-GUEST-LEASE ip=1.2.3.4"]);
        assert_eq!(
            find_marker(lines[1], LEASE_MARKER),
            Some("QNET-GUEST-LEASE ip=1.2.3.4")
        );
        assert_eq!(find_marker("QNET-GUEST-NOLEASE mac=x", LEASE_MARKER), None);
        assert_eq!(find_marker("QNET-GUEST-LEASED", LEASE_MARKER), None);
        assert_eq!(
            find_marker("QNET-GUEST-READY", READY_MARKER),
            Some("QNET-GUEST-READY")
        );
    }

    #[test]
    fn parses_probe_lines() {
        assert_eq!(
            parse_probe_line("QNET-GUEST-PROBE ok target=10.0.0.2:80 tries=1 body=abc uptime=3"),
            Ok(ProbeOutcome::Reached { body: "abc".into() })
        );
        assert_eq!(
            parse_probe_line("QNET-GUEST-PROBE fail target=10.0.0.2:80 tries=10"),
            Ok(ProbeOutcome::Failed)
        );
        assert!(parse_probe_line("QNET-GUEST-PROBE maybe").is_err());
        assert!(parse_probe_line("QNET-GUEST-READY http=80").is_err());
    }
}
