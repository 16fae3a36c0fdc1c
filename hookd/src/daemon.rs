//! The daemon's outer shell: sockets, tasks and signals around the
//! [`Reconciler`], which does the work.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use crate::config::ConfigFiles;
use crate::error::DaemonError;
use crate::follow::{self, SessionLimits, Sessions};
use crate::reconciler::{Input, Reconciler};
use crate::systemd::{self, PassedSockets};
use crate::{ctl, firewall, libvirt};

pub use crate::paths::Paths;

/// Runs the daemon until SIGTERM/SIGINT. Networks, rules and dnsmasq stay
/// up when it exits: running guests keep working, and the next start
/// adopts them. `passed` are the sockets systemd holds for us (see
/// [`systemd::take_passed_sockets`]); the others are bound here.
pub async fn run(paths: Paths, passed: PassedSockets) -> Result<(), DaemonError> {
    let nofile = raise_fd_limit();
    let files = ConfigFiles::read(&paths.config)?;
    let config = files.parse()?;
    for dir in [&paths.run_dir, &paths.state_dir] {
        std::fs::create_dir_all(dir).map_err(DaemonError::io(dir))?;
    }
    let (inputs, mut receiver) = mpsc::unbounded_channel();
    let (lease_watch, lease_bridges) = watch::channel(BTreeSet::new());
    let lease_inputs = inputs.clone();
    tokio::spawn(libvirt::watch_leases(
        PathBuf::from(libvirt::LEASE_DIR),
        lease_bridges,
        move |update| lease_inputs.send(Input::LibvirtLeases(update)).is_ok(),
    ));
    let sessions = Sessions::new(SessionLimits::for_fd_limit(
        nofile,
        config.limits.qmp_sessions_per_user,
    ));
    let reconciler = Reconciler::start(
        paths.clone(),
        files,
        config,
        inputs.clone(),
        lease_watch,
        sessions.clone(),
    )
    .await?;
    let peer_inputs = inputs.clone();
    firewall::peers::watch::spawn(move || peer_inputs.send(Input::PeersChanged).is_ok());

    let activated = (passed.ctl.is_some(), passed.qmp.is_some());
    let ctl_listener = listener(passed.ctl, &paths.ctl_socket, 0o660)?;
    tokio::spawn(ctl::keep_group(paths.ctl_socket.clone()));
    let qmp_listener = listener(passed.qmp, &paths.qmp_socket, 0o666)?;
    tokio::spawn(ctl::serve(ctl_listener, inputs.clone()));
    tokio::spawn(follow::accept_qmp(qmp_listener, inputs.clone(), sessions));
    tracing::info!(
        ctl = %paths.ctl_socket.display(),
        qmp = %paths.qmp_socket.display(),
        socket_activated = activated.0 || activated.1,
        "qnet-hookd ready"
    );
    systemd::notify_ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::io("SIGTERM handler"))?;
    spawn_reload_on_sighup(inputs.clone())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        systemd::notify_stopping();
    };
    reconciler.run(&mut receiver, stop).await;
    tracing::info!("stopping; networks, rules and dnsmasq stay up for running guests");
    // Sockets systemd passed stay: it keeps listening for the next start.
    if !activated.0 {
        let _ = std::fs::remove_file(&paths.ctl_socket);
    }
    if !activated.1 {
        let _ = std::fs::remove_file(&paths.qmp_socket);
    }
    Ok(())
}

/// `qnet-hookd --cleanup`: removes every trace of qnet from the host's
/// firewalls — the rules and zones it added to others' (see
/// [`firewall::peers`]), its own table, and a `doctor --trace` probe's
/// leftovers — for uninstall. Bridges and
/// dnsmasq are the running daemon's; stop it first.
pub async fn cleanup() -> Result<(), DaemonError> {
    let fw = firewall::Firewall::new();
    let mut failures = fw.cleanup_peers().await;
    if let Err(e) = fw.teardown().await {
        failures.push(e.to_string());
    }
    // What a `doctor --trace` interrupted by a kill left behind.
    if let Err(e) = crate::nftrace::probe::remove_leftovers().await {
        failures.push(e.to_string());
    }
    if failures.is_empty() {
        return Ok(());
    }
    Err(DaemonError::Refused(format!(
        "cleanup left traces behind: {}; fix the cause and run it again",
        failures.join("; ")
    )))
}

/// SIGHUP re-reads the configuration ([`Input::Reload`]), as systemd's
/// `ExecReload` and `qnetctl reload` ask; the reconciler logs the outcome.
fn spawn_reload_on_sighup(inputs: mpsc::UnboundedSender<Input>) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::io("SIGHUP handler"))?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            if inputs.send(Input::Reload).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// Raises the soft limit on open files to the hard one and returns it.
/// Every guest holds descriptors in the daemon (its QMP socket and a
/// pidfd), so the usual soft limit of 1024 (systemd's default for
/// services) would stop the daemon at about 500 guests. The daemon never
/// uses `select()`, which is why the soft limit is low by default.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(e) => {
            tracing::warn!(soft, "cannot raise the open files limit: {e}");
            soft
        }
    }
}

/// The socket systemd passed for `path`, or one bound here with `mode`.
fn listener(
    passed: Option<std::os::unix::net::UnixListener>,
    path: &Path,
    mode: u32,
) -> Result<UnixListener, DaemonError> {
    match passed {
        Some(listener) => UnixListener::from_std(listener).map_err(DaemonError::io(path)),
        None => bind(path, mode),
    }
}

fn bind(path: &Path, mode: u32) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(DaemonError::io(dir))?;
    }
    // A socket file left by a killed daemon.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(DaemonError::io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(DaemonError::io(path))?;
    Ok(listener)
}
