//! Stopping a guest over the QMP session the daemon holds (`qnetctl guest
//! stop|powerdown`): the daemon's monitor is often the QEMU's only one, so
//! without this its user has no clean way to end it.
//!
//! A power-down presses the guest's ACPI power button (`system_powerdown`)
//! and waits, up to its grace, for QEMU to exit; a guest that ignores the
//! button (no acpid, a paused guest) is then quit. A guest that powered off
//! under `-no-shutdown` (QEMU stays, its run state `shutdown`) is quit at
//! once. A stop is `quit` right away. Either way the answer comes once the
//! process is gone; the guest's teardown follows as for any exit (its
//! follower reports it).
//!
//! Runs as a task of its own: a guest that takes its time, or a QEMU that
//! does not answer, never holds up the reconciler.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use qnet_api::{ApiError, QUIT_WAIT};
use tokio::time::{timeout, Instant};

use crate::error::failed;
use crate::procfs::Process;
use crate::qmp::{QmpError, QmpSession};

/// How often a powering-down guest's run state is read.
const POLL: Duration = Duration::from_millis(250);

/// The QEMU to stop.
#[derive(Debug, Clone)]
pub struct Target {
    pub process: Process,
    /// How replies name it: `web1` (pid 123).
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// `quit` at once.
    Quit,
    /// `system_powerdown`, then `quit` after this long.
    Powerdown(Duration),
}

/// How a power-down ended.
#[derive(Debug, PartialEq, Eq)]
enum Off {
    /// QEMU exited by itself.
    Exited,
    /// The guest powered off, QEMU stays (`-no-shutdown`).
    Halted,
    /// The grace ran out.
    Ignored,
}

/// Stops `target` as `how` says; the reply says what happened.
pub async fn run(qmp: QmpSession, target: Target, how: How) -> Result<String, ApiError> {
    let started = Instant::now();
    let mut exited = pin!(crate::follow::process_exit(target.process));
    let How::Powerdown(grace) = how else {
        quit(&qmp, &target, exited).await?;
        return Ok(format!("{}: QEMU quit", target.label));
    };
    qmp.execute_raw("system_powerdown", None)
        .await
        .map_err(|e| failed(format!("{}: system_powerdown: {e}", target.label)))?;
    let off = match timeout(grace, powered_off(&qmp, exited.as_mut())).await {
        Ok(off) => off,
        Err(_) => Off::Ignored,
    };
    let took = started.elapsed().as_secs();
    match off {
        Off::Exited => Ok(format!("{} powered down cleanly in {took} s", target.label)),
        Off::Halted => {
            quit(&qmp, &target, exited).await?;
            Ok(format!(
                "{} powered down cleanly in {took} s; QEMU (-no-shutdown) was told to quit and exited",
                target.label
            ))
        }
        Off::Ignored => {
            quit(&qmp, &target, exited).await?;
            Ok(format!(
                "{} did not power down within {} s (does it handle the ACPI power button?): QEMU was told to quit and exited",
                target.label,
                grace.as_secs()
            ))
        }
    }
}

/// Waits until QEMU exits or the guest is off with QEMU kept.
async fn powered_off(qmp: &QmpSession, mut exited: impl Future<Output = ()> + Unpin) -> Off {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            () = &mut exited => return Off::Exited,
            _ = tick.tick() => {
                if qmp.query_status().await.is_ok_and(|s| s.status == "shutdown") {
                    return Off::Halted;
                }
            }
        }
    }
}

/// `quit`, then waits (at most [`QUIT_WAIT`] in all) for the process to
/// be gone. QEMU may close the connection before it answers: that is fine.
async fn quit(
    qmp: &QmpSession,
    target: &Target,
    exited: impl Future<Output = ()>,
) -> Result<(), ApiError> {
    let deadline = Instant::now() + QUIT_WAIT;
    let said = match qmp.execute_raw("quit", None).await {
        Ok(_) | Err(QmpError::Closed { .. }) => String::new(),
        Err(e) => format!(" (quit: {e})"),
    };
    if tokio::time::timeout_at(deadline, exited).await.is_ok() {
        return Ok(());
    }
    Err(failed(format!(
        "{}: QEMU did not exit within {} s of `quit`{said}: kill it (kill -9 {})",
        target.label,
        QUIT_WAIT.as_secs(),
        target.process.pid
    )))
}
