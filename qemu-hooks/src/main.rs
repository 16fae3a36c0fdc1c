//! qnet-libvirt-hook: libvirt's qemu hook for qnet. libvirt runs it as
//! `qemu GUEST OPERATION SUB-OP EXTRA` with the domain XML on stdin; it
//! registers the guest with qnet-hookd (reservations, the port forwards of
//! the domain's qnet metadata) and unregisters it when it stops. It never
//! calls libvirt (libvirt waits for its hooks) and every request to hookd
//! has a short timeout.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use qnet_api::client::{self, ClientError};
use qnet_api::Request;
use qnet_libvirt_hook::cli::Cli;
use qnet_libvirt_hook::{
    check_length, find_libvirt_network, parse_domain_bytes, DomainInfo, HookError, MAX_XML_BYTES,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let guest = cli.guest.clone().unwrap_or_default();
    let operation = cli.operation.clone().unwrap_or_default();
    // libvirt writes the XML for every operation: read it (bounded) so it
    // never meets a closed pipe.
    let mut input = Vec::new();
    let read = std::io::stdin()
        .take(MAX_XML_BYTES as u64 + 1)
        .read_to_end(&mut input);
    let fail = |e: HookError| {
        eprintln!("qnet-libvirt-hook: guest `{guest}` ({operation}): {e}");
        ExitCode::FAILURE
    };
    match operation.as_str() {
        "migrate" | "restore" => {
            // A filter: the XML goes back unchanged.
            if let Err(e) = read {
                return fail(HookError::ReadXml(e));
            }
            if let Err(e) = check_length(input.len()) {
                return fail(e.into());
            }
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(&input).and_then(|()| out.flush()) {
                return fail(HookError::WriteXml(e));
            }
            ExitCode::SUCCESS
        }
        "prepare" | "start" | "started" | "reconnect" => {
            if let Err(e) = read {
                return fail(HookError::ReadXml(e));
            }
            let domain = match parse_domain_bytes(&input) {
                Ok(domain) => domain,
                Err(e) => return fail(e.into()),
            };
            let pid = match operation.as_str() {
                "started" | "reconnect" => read_pid(&cli.pid_dir, &domain.name),
                _ => None,
            };
            register(&cli, &domain, pid, &fail)
        }
        "stopped" | "release" => {
            // Teardown never fails the guest: report and go on.
            let uuid = match read
                .map_err(HookError::ReadXml)
                .and_then(|_| parse_domain_bytes(&input).map_err(HookError::from))
                .and_then(|domain| domain.uuid.parse().map_err(HookError::DomainUuid))
            {
                Ok(uuid) => uuid,
                Err(e) => {
                    let _ = fail(e);
                    return ExitCode::SUCCESS;
                }
            };
            let request = Request::GuestUnregister { uuid };
            match client::request(&cli.socket, &request, timeout(&cli)) {
                Ok(_) | Err(ClientError::NotRunning { .. }) => {}
                Err(e) => {
                    let _ = fail(HookError::Hookd(e));
                }
            }
            ExitCode::SUCCESS
        }
        // attach and operations of newer libvirt versions.
        _ => ExitCode::SUCCESS,
    }
}

fn timeout(cli: &Cli) -> Duration {
    Duration::from_millis(cli.timeout_ms.max(1))
}

/// QEMU's pid from libvirt's pid file, if it is there.
fn read_pid(dir: &Path, name: &str) -> Option<u32> {
    if name.contains('/') {
        return None;
    }
    std::fs::read_to_string(dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|pid| *pid > 0)
}

/// Registers the guest. A guest with qnet metadata fails to start when
/// hookd is unreachable or refuses; one without starts anyway.
fn register(
    cli: &Cli,
    domain: &DomainInfo,
    pid: Option<u32>,
    fail: &dyn Fn(HookError) -> ExitCode,
) -> ExitCode {
    if domain.interfaces.is_empty() && !domain.has_qnet {
        return ExitCode::SUCCESS;
    }
    // A NIC on a libvirt network we cannot read about just gets no
    // forwards: say so, and start the guest.
    let nics = domain.nics_on(|iface| {
        find_libvirt_network(&cli.libvirt_network_dir, iface).unwrap_or_else(|e| {
            eprintln!(
                "qnet-libvirt-hook: guest `{}`: interface {}: {e}",
                domain.name, iface.mac
            );
            None
        })
    });
    let name = match domain.name.parse() {
        Ok(name) => name,
        Err(e) => return fail(HookError::DomainName(e)),
    };
    let uuid = match domain.uuid.parse() {
        Ok(uuid) => uuid,
        Err(e) => return fail(HookError::DomainUuid(e)),
    };
    let request = Request::GuestRegister {
        name,
        uuid,
        nics,
        forwards: domain.forwards.clone(),
        pid,
    };
    match client::request(&cli.socket, &request, timeout(cli)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e @ ClientError::NotRunning { .. }) if domain.has_qnet => {
            fail(HookError::HookdNeeded(e))
        }
        Err(ClientError::NotRunning { .. }) => ExitCode::SUCCESS,
        Err(e) if domain.has_qnet => fail(HookError::Hookd(e)),
        Err(e) => {
            let _ = fail(HookError::HookdIgnored(e));
            ExitCode::SUCCESS
        }
    }
}
