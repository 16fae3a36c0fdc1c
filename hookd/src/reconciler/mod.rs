//! The reconciler: one task owns the desired state (networks, guests,
//! reservations, forwards) and makes the world match it through small
//! appliers (`network`, `nft`, `dnsmasq`). Inputs arrive on one channel
//! ([`Input`]): control requests, guests found over QMP, their events and
//! their exits.
//!
//! Handlers only change the state and mark what must follow ([`Dirty`]);
//! [`Reconciler::flush`] then makes it follow, once per burst of events:
//! first what was promised (durably), then dnsmasq, then the guests'
//! records, then the forwards. Persist first, publish after: a guest never
//! gets an address from dnsmasq that a crash could make the daemon forget.
//! A control request that changes something is answered only once its
//! change is durable; if it cannot be saved, it is undone and refused
//! ([`Reconciler::commit`]).
//!
//! | module | handles |
//! |---|---|
//! | `requests` | control requests: one authorisation check, dispatch |
//! | `guests` | QEMUs connecting, changing NICs, leaving |
//! | `networks` | bringing networks up and down, the nft ruleset |
//! | `forwards` | declared forwards and the installed map elements |
//! | `libvirt` | libvirt guests (the hook) and libvirt's leases |
//! | `stop` | `qnetctl guest stop`/`powerdown`: whose guest, then a task |
//! | `views` | read-only replies: status, guests, reservations |
//! | `doctor` | the facts `qnetctl doctor` diagnoses |
//! | `plan` | pure planning, unit-tested |

mod doctor;
mod forwards;
mod guests;
pub mod input;
mod libvirt;
mod live;
mod netverbs;
mod networks;
mod plan;
mod requests;
mod reservations;
mod stop;
mod users;
mod views;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use qnet_api::{ApiError, ForwardSpec, GuestUuid, NetName};
use tokio::sync::{mpsc, oneshot, watch};

pub use input::{ConnId, GuestUp, Input, Peer};

use crate::config::{Config, ConfigFiles, Integration, Limits, NetworkConfig, Origin, UserPolicy};
use crate::dnsmasq::DnsmasqHandle;
use crate::error::{storage, DaemonError};
use crate::firewall::peers::Openings;
use crate::firewall::{Firewall, ForwardElement};
use crate::follow::Sessions;
use crate::paths::Paths;
use crate::qmp::QmpSession;
use crate::state::{State, Store};

/// Most guest events applied before one flush: bounds how long the first
/// of them waits for its hosts file (each takes microseconds to apply).
const COALESCE_LIMIT: usize = 256;
/// How soon a failed save is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

struct NetworkRuntime {
    config: NetworkConfig,
    up: bool,
    dnsmasq: Option<DnsmasqHandle>,
}

/// A live QMP session of a guest: dropping it ends the session.
struct Session {
    pid: u32,
    qmp: QmpSession,
    /// A `qnetctl guest powerdown` waiting for the guest to power off.
    powerdown: Option<tokio::task::JoinHandle<()>>,
    _keepalive: oneshot::Sender<()>,
}

/// What must follow the state at the next flush.
#[derive(Debug, Default, Clone, Copy)]
struct Dirty {
    state: bool,
    dnsmasq: bool,
    forwards: bool,
}

impl Dirty {
    fn all(&mut self) {
        *self = Dirty {
            state: true,
            dnsmasq: true,
            forwards: true,
        };
    }
}

pub struct Reconciler {
    paths: Paths,
    /// The config files of the running configuration: a run-time change
    /// replaces one file of these, so what hookd.toml says is applied
    /// only on reload.
    files: ConfigFiles,
    /// Where each configured network comes from.
    origins: BTreeMap<NetName, Origin>,
    /// What members of group qnet may create.
    user_policy: UserPolicy,
    /// The QMP accept loop's session counts, whose per-user limit a
    /// reload changes.
    qmp_sessions: Arc<Sessions>,
    /// Users whose bridge ACL file could not be theirs alone, and why.
    acl_refused: BTreeMap<u32, String>,
    state: State,
    store: Store,
    /// Forwards of hookd.toml.
    config_forwards: Vec<ForwardSpec>,
    limits: Limits,
    networks: BTreeMap<NetName, NetworkRuntime>,
    sessions: HashMap<ConnId, Session>,
    /// The forward map elements installed now, and those the kernel
    /// refused, with why.
    installed: BTreeSet<ForwardElement>,
    refused: BTreeMap<ForwardElement, String>,
    firewall: Firewall,
    /// Which networks are opened in the host's other firewalls.
    integration: Integration,
    /// What failed the last time they were (one line each).
    peer_failures: Vec<String>,
    /// What was opened in them last.
    peers_opened: Openings,
    inputs: mpsc::UnboundedSender<Input>,
    next_conn: ConnId,
    /// The bridges whose libvirt lease files the watcher follows.
    lease_watch: watch::Sender<BTreeSet<String>>,
    /// (guest UUID, libvirt network) pairs already warned about.
    libvirt_warned: BTreeSet<(GuestUuid, String)>,
    dirty: Dirty,
    /// Saves are failing (logged once per streak).
    save_failing: bool,
    /// An [`Input::Retry`] is on its way.
    retry_pending: bool,
    /// Guests forgotten since the allocator last gave memory back.
    gone_since_trim: usize,
}

impl Reconciler {
    /// Loads the state and brings the world to it and to `config`:
    /// networks up (or down), one nft transaction, dnsmasq with every
    /// reservation, guests that are gone dropped, server-mode guests
    /// re-dialed.
    pub async fn start(
        paths: Paths,
        files: ConfigFiles,
        config: Config,
        inputs: mpsc::UnboundedSender<Input>,
        lease_watch: watch::Sender<BTreeSet<String>>,
        qmp_sessions: Arc<Sessions>,
    ) -> Result<Reconciler, DaemonError> {
        let (store, state) = Store::open(&paths.state_dir, &paths.run_dir)?;
        let mut reconciler = Reconciler {
            paths,
            files,
            origins: config.origins.clone(),
            user_policy: config.user_networks.clone(),
            qmp_sessions,
            acl_refused: BTreeMap::new(),
            state,
            store,
            config_forwards: config.forwards.clone(),
            limits: config.limits,
            networks: BTreeMap::new(),
            sessions: HashMap::new(),
            installed: BTreeSet::new(),
            refused: BTreeMap::new(),
            firewall: Firewall::new(),
            integration: config.integration.clone(),
            peer_failures: Vec::new(),
            peers_opened: Openings::default(),
            inputs,
            next_conn: 1,
            lease_watch,
            libvirt_warned: BTreeSet::new(),
            dirty: Dirty::default(),
            save_failing: false,
            retry_pending: false,
            gone_since_trim: 0,
        };
        reconciler.start_networks(config).await?;
        reconciler.sync_user_acls();
        reconciler.set_aside_clashing_forwards();
        reconciler.apply_rules().await?;
        reconciler.adopt_guests();
        reconciler.remove_orphan_devices();
        reconciler.dirty.all();
        reconciler.flush().await;
        Ok(reconciler)
    }

    /// Handles inputs until the channel closes or `stop` fires.
    pub async fn run(
        mut self,
        receiver: &mut mpsc::UnboundedReceiver<Input>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                input = receiver.recv() => match input {
                    Some(input) => {
                        self.handle(input).await;
                        self.coalesce(receiver).await;
                    }
                    None => break,
                },
                _ = &mut stop => break,
            }
        }
    }

    /// Guest events (connect, NIC change, exit) only change the state and
    /// mark it dirty; dnsmasq, the forwards and the state directory follow
    /// in [`Self::flush`], once for every guest event already queued (at
    /// most [`COALESCE_LIMIT`]). 1000 guests exiting at once (a host
    /// shutting down) then cost a handful of writes and SIGHUPs instead of
    /// 1000 each. Any other input waits until the flush is done, so a ctl
    /// request still sees every earlier event applied.
    async fn coalesce(&mut self, receiver: &mut mpsc::UnboundedReceiver<Input>) {
        let mut applied = 1;
        while applied < COALESCE_LIMIT {
            match receiver.try_recv() {
                Ok(next) if next.is_guest_event() => {
                    self.handle(next).await;
                    applied += 1;
                }
                Ok(next) => {
                    self.flush().await;
                    self.handle(next).await;
                }
                Err(_) => break,
            }
        }
        self.flush().await;
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Ctl {
                request,
                peer,
                reply,
            } => self.request(request, peer, reply).await,
            Input::GuestUp(up) => self.guest_up(*up),
            Input::GuestNics { conn, nics, ports } => self.guest_nics(conn, &nics, &ports),
            Input::GuestGone { conn, why } => self.guest_gone(conn, &why),
            Input::StaleGuestExited { pid } => self.stale_guest_exited(pid),
            Input::LibvirtLeases(update) => self.libvirt_leases(update),
            Input::PeersChanged => self.sync_peers().await,
            Input::Reload => {
                let _ = self.reload(false).await;
            }
            Input::Retry => {
                self.retry_pending = false;
                self.dirty.state = true;
            }
        }
    }

    /// Makes the world follow the state: what was promised is made durable
    /// first, then dnsmasq gets its hosts, then the guests' records are
    /// saved, then the forwards are published. While the state cannot be
    /// saved nothing more is published (see the module documentation); a
    /// retry is scheduled.
    ///
    /// Why the guests' records wait for dnsmasq: a connect then has one
    /// durable write (its reservation) before its address is served, not
    /// two, and each is a millisecond of waiting for the disk. A crash in
    /// between forgets only that the guest connected, which its next
    /// connect (or its exit) settles; its address is already durable.
    async fn flush(&mut self) {
        if self.dirty.state {
            if let Err(e) = self.store.save_promises(&mut self.state) {
                self.save_failed(&e);
                return;
            }
        }
        if std::mem::take(&mut self.dirty.dnsmasq) {
            self.sync_dnsmasq().await;
        }
        if self.dirty.state {
            if let Err(e) = self.store.save_guests(&mut self.state) {
                self.save_failed(&e);
                return;
            }
            self.dirty.state = false;
            if std::mem::take(&mut self.save_failing) {
                tracing::info!("state saved again");
            }
        }
        if std::mem::take(&mut self.dirty.forwards) {
            self.sync_forwards().await;
        }
        self.trim_after_exits();
    }

    /// After many guests left (a host shutting its guests down, say),
    /// hands the memory their sessions used back to the system: glibc
    /// keeps freed memory in its arenas otherwise, and the daemon's RSS
    /// would stay at its peak for good.
    fn trim_after_exits(&mut self) {
        const AFTER: usize = 32;
        if self.gone_since_trim < AFTER {
            return;
        }
        self.gone_since_trim = 0;
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free memory of the arenas.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// Makes a control request's change durable before it is answered: on
    /// failure `undo` reverts the state, the files are brought back to it
    /// as far as possible, and the client gets a storage error.
    fn commit(&mut self, undo: impl FnOnce(&mut State)) -> Result<(), ApiError> {
        match self.store.save(&mut self.state) {
            Ok(()) => {
                self.dirty.state = false;
                Ok(())
            }
            Err(e) => {
                undo(&mut self.state);
                if self.store.save(&mut self.state).is_err() {
                    self.dirty.state = true;
                    self.schedule_retry();
                }
                tracing::error!("{e}: the change was refused");
                Err(storage(format!("cannot save the change, so it was not made: {e}; free space in (or fix) the state directory and retry")))
            }
        }
    }

    fn save_failed(&mut self, e: &crate::state::StateError) {
        if !std::mem::replace(&mut self.save_failing, true) {
            tracing::error!("saving state: {e}: retrying every {RETRY_AFTER:?}; dnsmasq and forwards wait until it is saved");
        }
        self.schedule_retry();
    }

    fn schedule_retry(&mut self) {
        if std::mem::replace(&mut self.retry_pending, true) {
            return;
        }
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RETRY_AFTER).await;
            let _ = inputs.send(Input::Retry);
        });
    }

    fn new_conn(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    fn paths(&self) -> &Paths {
        &self.paths
    }
}
