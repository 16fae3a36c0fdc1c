//! LAN networks (`mode = "bridged"`, see `config::lan`): the network's
//! bridge takes over a physical interface (the uplink), so guests sit on
//! the LAN the host is on, and the host keeps its connectivity.
//!
//! The switch-over ([`bring_up`]):
//! 1. snapshot the uplink: MAC, MTU, up state, addresses (with flags,
//!    labels, lifetimes) and the routes through it (every table);
//! 2. persist it (`record`: `STATE/lan/NETWORK.json`, durably) before
//!    anything is touched;
//! 3. run the steps `plan::switch_over` orders, each with its undo; a
//!    step that fails undoes the steps done, in reverse, and the record
//!    goes only once the uplink is as it was;
//! 4. mark the record complete.
//!
//! [`bring_down`] (and the network's removal, and a start that finds a
//! record of a switch-over a crash interrupted) restores the uplink from
//! the record (`plan::restore`: from whatever state the system is in) and
//! then removes the record. A daemon restart with the switch-over complete
//! adopts it without touching anything: the host's connectivity does not
//! flap. A record from before a reboot (another boot id) is void: the
//! kernel holds none of it.
//!
//! Debug builds only: `QNET_TEST_LAN_PAUSE_AT=N` makes the switch-over
//! stop for good before step N (N = the number of steps: after the last,
//! before the record is marked complete), after logging so; the tests
//! kill -9 the daemon there. `QNET_TEST_LAN_FAIL_AT=N` makes step N fail,
//! so the tests see the rollback. Release builds have no such hooks.

mod kernel;
pub mod plan;
pub mod record;

use std::path::Path;

use thiserror::Error;

use crate::config::NetworkConfig;
use crate::netlink::NetlinkError;
use kernel::Kernel;
use plan::Action;
use record::{Phase, Record};

#[derive(Debug, Error)]
pub enum LanError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("uplink `{uplink}`: {problem}")]
    Uplink { uplink: String, problem: String },
    /// Creating or deleting the bridge (`network`'s code, shared).
    #[error(transparent)]
    Bridge(#[from] Box<crate::network::NetworkError>),
    /// The record cannot be written: nothing was touched.
    #[error("cannot save what uplink `{uplink}` has before taking it over, so it was left alone: {source}; fix the state directory and retry")]
    Persist {
        uplink: String,
        #[source]
        source: std::io::Error,
    },
    /// The record cannot be read: we do not know what the uplink had.
    #[error("{0}; {BY_HAND}")]
    Record(#[from] record::RecordError),
    /// The record of an uplink given back cannot be removed.
    #[error("{0}; {BY_HAND}")]
    RemoveRecord(#[source] std::io::Error),
    /// The uplink is the bridge's port, but no record says what it had.
    #[error("no record of what `{uplink}` had before `{bridge}` took it over; {BY_HAND}")]
    NoRecord { uplink: String, bridge: String },
    /// A failed switch-over or restore left something undone (logged).
    #[error("{what}: {first}; {left} (the record stays, so the next start, `network down` or removing the network retries)")]
    Incomplete {
        what: String,
        first: Box<LanError>,
        left: String,
    },
}

/// What a record that cannot be trusted leaves to the admin.
const BY_HAND: &str =
    "the uplink may need its addresses and routes back by hand: then delete the file and retry";

/// The boot id: a record from another boot means nothing.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Brings LAN network `net` up; idempotent. A complete switch-over of the
/// same uplink and bridge is adopted as it is; one a crash interrupted, or
/// of another uplink, is undone first.
pub async fn bring_up(net: &NetworkConfig, state_dir: &Path) -> Result<(), LanError> {
    let uplink = net.uplink.as_ref().ok_or_else(|| LanError::Uplink {
        uplink: String::new(),
        problem: "a bridged network needs one".into(),
    })?;
    let kernel = Kernel::open(uplink, &net.bridge)?;
    if let Some(rec) = current_record(state_dir, &net.name)? {
        let snap = &rec.snapshot;
        let same = snap.uplink == *uplink && snap.bridge == net.bridge;
        if same && rec.phase == Phase::Complete && kernel.switched().await? {
            tracing::debug!(network = %net.name, "LAN switch-over in place: adopted");
            return Ok(());
        }
        tracing::info!(network = %net.name, "undoing an earlier switch-over of `{}` first", snap.uplink);
        restore(state_dir, &rec).await?;
    }
    if kernel.switched().await? {
        return Err(LanError::Uplink {
            uplink: uplink.to_string(),
            problem: format!(
                "is a port of `{}` already, and no record says what it had before: take it out of the bridge and give it its addresses back, then retry",
                net.bridge
            ),
        });
    }
    let snap = kernel.snapshot(crate::state::now()).await?;
    let mut rec = Record::new(net.name.clone(), boot_id(), snap);
    record::save(state_dir, &rec).map_err(|source| LanError::Persist {
        uplink: uplink.to_string(),
        source,
    })?;
    switch_over(&kernel, state_dir, &rec).await?;
    rec.phase = Phase::Complete;
    if let Err(e) = record::save(state_dir, &rec) {
        // The switch-over is done; the record still says "switching",
        // which a restart undoes and does again: correct, only slower.
        tracing::warn!(network = %net.name, "marking the LAN switch-over complete: {e}");
    }
    tracing::info!(network = %net.name, bridge = %net.bridge, uplink = %uplink, "LAN bridge has taken the uplink over");
    Ok(())
}

/// Takes LAN network `net` down: the uplink gets back exactly what it
/// had, and the bridge goes.
pub async fn bring_down(net: &NetworkConfig, state_dir: &Path) -> Result<(), LanError> {
    if let Some(rec) = current_record(state_dir, &net.name)? {
        return restore(state_dir, &rec).await;
    }
    let Some(uplink) = &net.uplink else {
        return Ok(());
    };
    // No record: nothing of ours to give back. The bridge goes only when
    // the uplink is not its port (deleting it would cut the host off).
    let kernel = Kernel::open(uplink, &net.bridge)?;
    if kernel.switched().await? {
        return Err(LanError::NoRecord {
            uplink: uplink.to_string(),
            bridge: net.bridge.to_string(),
        });
    }
    kernel.apply(&Action::DeleteBridge).await
}

/// At start: gives back the uplinks of LAN networks with a record that
/// will not be up (removed from the config, or taken down). Failures are
/// logged; their records stay for the next try.
pub async fn restore_unwanted(state_dir: &Path, wanted: impl Fn(&str) -> bool) {
    for network in record::networks(state_dir) {
        if wanted(&network) {
            continue;
        }
        let result = match current_record(state_dir, &network) {
            Ok(Some(rec)) => {
                tracing::info!(%network, "LAN network no longer up: giving `{}` back", rec.snapshot.uplink);
                restore(state_dir, &rec).await
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::error!(%network, "{e}");
        }
    }
}

/// The record of `network` if it belongs to this boot; one of an earlier
/// boot is removed.
fn current_record(state_dir: &Path, network: &str) -> Result<Option<Record>, LanError> {
    let Some(rec) = record::load(state_dir, network)? else {
        return Ok(None);
    };
    if rec.boot_id == boot_id() {
        return Ok(Some(rec));
    }
    tracing::info!(
        network,
        "LAN record of an earlier boot: the kernel holds none of it, dropping it"
    );
    record::remove(state_dir, network).map_err(LanError::RemoveRecord)?;
    Ok(None)
}

/// Gives the uplink back what `rec` says it had, from any state, and
/// removes the record once that worked. Every action is tried (one that
/// fails does not stop the others); the first failure is returned.
async fn restore(state_dir: &Path, rec: &Record) -> Result<(), LanError> {
    let snap = &rec.snapshot;
    let kernel = Kernel::open(&snap.uplink, &snap.bridge)?;
    let seen = kernel.observe().await?;
    if seen.uplink.is_none() {
        return Err(LanError::Uplink {
            uplink: snap.uplink.to_string(),
            problem: "is gone, so it cannot get its addresses and routes back".into(),
        });
    }
    let elapsed = crate::state::now().saturating_sub(snap.taken_at);
    let actions = plan::restore(snap, &seen, elapsed);
    let failures = run_all(&kernel, &actions).await;
    if let Some((first, count)) = failures {
        return Err(LanError::Incomplete {
            what: format!("giving `{}` its addresses and routes back", snap.uplink),
            first: Box::new(first),
            left: format!("{count} step(s) failed"),
        });
    }
    record::remove(state_dir, &rec.network).map_err(LanError::RemoveRecord)?;
    tracing::info!(network = %rec.network, uplink = %snap.uplink, "uplink restored");
    Ok(())
}

/// Runs every action, logging each failure; the first and how many.
async fn run_all(kernel: &Kernel, actions: &[Action]) -> Option<(LanError, usize)> {
    let mut first = None;
    let mut count = 0;
    for action in actions {
        if let Err(e) = kernel.apply(action).await {
            tracing::warn!("{action:?}: {e}");
            count += 1;
            if first.is_none() {
                first = Some(e);
            }
        }
    }
    first.map(|e| (e, count))
}

/// The switch-over's steps; on a failure the steps done are undone in
/// reverse and the record removed if that worked.
async fn switch_over(kernel: &Kernel, state_dir: &Path, rec: &Record) -> Result<(), LanError> {
    let steps = plan::switch_over(&rec.snapshot);
    let mut undo: Vec<Action> = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        test_hooks::pause(index, steps.len()).await;
        let done = match test_hooks::failure(index, steps.len()) {
            Some(e) => Err(e),
            None => kernel.apply(&step.action).await,
        };
        if let Err(e) = done {
            tracing::warn!(network = %rec.network, "LAN switch-over step {index} ({:?}) failed: {e}; undoing", step.action);
            undo.reverse();
            return match run_all(kernel, &undo).await {
                None => {
                    record::remove(state_dir, &rec.network).map_err(LanError::RemoveRecord)?;
                    Err(e)
                }
                Some((_, count)) => Err(LanError::Incomplete {
                    what: format!("taking `{}` over", rec.snapshot.uplink),
                    first: Box::new(e),
                    left: format!("undoing it, {count} step(s) failed"),
                }),
            };
        }
        undo.extend(step.undo.iter().cloned());
    }
    test_hooks::pause(steps.len(), steps.len()).await;
    Ok(())
}

/// The test hooks of the module documentation (debug builds only).
#[cfg(debug_assertions)]
mod test_hooks {
    use super::LanError;

    fn wanted(var: &str) -> Option<usize> {
        std::env::var(var).ok().and_then(|v| v.parse().ok())
    }

    /// `QNET_TEST_LAN_PAUSE_AT=N`: stop for good before step N.
    pub async fn pause(index: usize, total: usize) {
        if wanted("QNET_TEST_LAN_PAUSE_AT") == Some(index) {
            tracing::warn!(
                "LAN test pause before step {index} of {total} (QNET_TEST_LAN_PAUSE_AT)"
            );
            std::future::pending::<()>().await;
        }
    }

    /// `QNET_TEST_LAN_FAIL_AT=N`: step N fails instead of running.
    pub fn failure(index: usize, total: usize) -> Option<LanError> {
        (wanted("QNET_TEST_LAN_FAIL_AT") == Some(index)).then(|| LanError::Uplink {
            uplink: "(test)".into(),
            problem: format!("step {index} of {total} failed on purpose (QNET_TEST_LAN_FAIL_AT)"),
        })
    }
}

#[cfg(not(debug_assertions))]
mod test_hooks {
    use super::LanError;

    pub async fn pause(_index: usize, _total: usize) {}

    pub fn failure(_index: usize, _total: usize) -> Option<LanError> {
        None
    }
}
