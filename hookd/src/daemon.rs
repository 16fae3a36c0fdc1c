//! The reconciler: one task owns the desired state (networks, guests,
//! reservations) and makes the world match it through small appliers
//! (`network`, `nft`, `dnsmasq`). Inputs arrive on one channel: control
//! requests, guests found over QMP, their events and their exits.
//!
//! Each QMP connection is a task of its own (`follow_guest`) that only
//! reads events and sends them on, and does any QMP round trip itself, so a
//! slow or hostile QEMU, nft or dnsmasq never stalls another guest's
//! reader. The same start-up path rebuilds everything from the persisted
//! state, which is what makes a restart after kill -9 exact.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::api::{
    self, ForwardInfo, ForwardSpec, GuestNic, GuestStatus, NetworkStatus, Proto, Reply, Request,
    Response,
};
use crate::config::{Config, NetworkConfig};
use crate::discover::{self, GuestPort, PortKind};
use crate::dnsmasq::{self, DhcpHost, DnsHost, DnsmasqHandle};
use crate::firewall::{Firewall, ForwardElement};
use crate::libvirt::{self, LeaseUpdate};
use crate::qmp::{self, GuestIdentity, GuestInfo, NicInfo, QmpEvent, QmpSession};
use crate::state::{self, GuestRecord, LibvirtAddress, State, StoredForward, StoredReservation};
use crate::{ctl, forwards, network, orphans, procfs, subnet};

/// Where the daemon keeps things; every path can be moved by a flag.
#[derive(Debug, Clone)]
pub struct Paths {
    pub config: PathBuf,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub ctl_socket: PathBuf,
    pub qmp_socket: PathBuf,
}

/// Identifies one QMP connection (a guest may reconnect with a new one).
type ConnId = u64;

/// Who sent a control request (SO_PEERCRED).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
}

impl Peer {
    fn is_root(&self) -> bool {
        self.uid == 0
    }
}

pub enum Input {
    Ctl {
        request: Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    },
    GuestUp(Box<GuestUp>),
    GuestNics {
        conn: ConnId,
        nics: Vec<NicInfo>,
        ports: Vec<GuestPort>,
    },
    GuestGone {
        conn: ConnId,
        why: String,
    },
    /// A guest recorded before a restart that never came back.
    StaleGuestExited {
        pid: u32,
    },
    /// The lease status file of a libvirt network's bridge changed.
    LibvirtLeases(LeaseUpdate),
}

impl Input {
    /// Events whose syncing [`Daemon::coalesce`] may batch.
    fn is_guest_event(&self) -> bool {
        matches!(
            self,
            Input::GuestUp(_)
                | Input::GuestNics { .. }
                | Input::GuestGone { .. }
                | Input::StaleGuestExited { .. }
        )
    }
}

/// Most guest events applied before one sync: bounds how long the first
/// of them waits for its hosts file (each takes microseconds to apply).
const COALESCE_LIMIT: usize = 256;

pub struct GuestUp {
    conn: ConnId,
    identity: GuestIdentity,
    info: GuestInfo,
    ports: Vec<GuestPort>,
    qmp_server: Option<PathBuf>,
}

struct NetworkRuntime {
    config: NetworkConfig,
    up: bool,
    dnsmasq: Option<DnsmasqHandle>,
}

struct GuestRuntime {
    pid: u32,
}

pub struct Daemon {
    paths: Paths,
    state: State,
    /// Forwards of hookd.toml.
    config_forwards: Vec<ForwardSpec>,
    /// Our nftables table: rules, and forwards as map elements.
    firewall: Firewall,
    /// The forward map elements installed now.
    installed_forwards: BTreeSet<ForwardElement>,
    networks: BTreeMap<String, NetworkRuntime>,
    guests: HashMap<ConnId, GuestRuntime>,
    inputs: mpsc::UnboundedSender<Input>,
    next_conn: ConnId,
    /// The bridges whose libvirt lease files the watcher follows.
    lease_watch: watch::Sender<BTreeSet<String>>,
    /// (guest UUID, libvirt network) pairs already warned about: a forward
    /// into a libvirt network whose firewall rejects inbound connections.
    libvirt_warned: BTreeSet<(String, String)>,
    /// Guest events changed the state; dnsmasq, forwards and the state
    /// file have not followed yet ([`Daemon::flush`]).
    pending_sync: bool,
    /// What the state directory holds, so a save writes only what changed.
    on_disk: state::OnDisk,
}

/// Runs the daemon until SIGTERM/SIGINT. Networks, rules and dnsmasq stay
/// up when it exits: running guests keep working, and the next start
/// adopts them.
pub async fn run(paths: Paths) -> Result<(), String> {
    raise_fd_limit();
    let config = Config::load(&paths.config).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&paths.run_dir)
        .map_err(|e| format!("{}: {e}", paths.run_dir.display()))?;
    std::fs::create_dir_all(&paths.state_dir)
        .map_err(|e| format!("{}: {e}", paths.state_dir.display()))?;
    let (state, on_disk) = State::load_with_files(&paths.state_dir).map_err(|e| e.to_string())?;

    let (inputs, mut receiver) = mpsc::unbounded_channel();
    let (lease_watch, lease_bridges) = watch::channel(BTreeSet::new());
    let lease_inputs = inputs.clone();
    tokio::spawn(libvirt::watch_leases(
        PathBuf::from(libvirt::LEASE_DIR),
        lease_bridges,
        move |update| lease_inputs.send(Input::LibvirtLeases(update)).is_ok(),
    ));
    let mut daemon = Daemon {
        paths: paths.clone(),
        state,
        config_forwards: Vec::new(),
        firewall: Firewall::new(),
        installed_forwards: BTreeSet::new(),
        networks: BTreeMap::new(),
        guests: HashMap::new(),
        inputs: inputs.clone(),
        next_conn: 1,
        lease_watch,
        libvirt_warned: BTreeSet::new(),
        pending_sync: false,
        on_disk,
    };
    daemon.start(config).await?;

    let ctl_listener = bind(&paths.ctl_socket, 0o660)?;
    ctl::set_group(&paths.ctl_socket);
    let qmp_listener = bind(&paths.qmp_socket, 0o666)?;
    tokio::spawn(ctl::serve(ctl_listener, inputs.clone()));
    tokio::spawn(accept_qmp(qmp_listener, inputs.clone()));
    tracing::info!(
        ctl = %paths.ctl_socket.display(),
        qmp = %paths.qmp_socket.display(),
        "qnet-hookd ready"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            input = receiver.recv() => match input {
                Some(input) => {
                    daemon.handle(input).await;
                    daemon.coalesce(&mut receiver).await;
                }
                None => break,
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("stopping; networks, rules and dnsmasq stay up for running guests");
    let _ = std::fs::remove_file(&paths.ctl_socket);
    let _ = std::fs::remove_file(&paths.qmp_socket);
    Ok(())
}

/// Raises the soft limit on open files to the hard one. Every guest holds
/// two descriptors in the daemon (its QMP socket and a pidfd), so the usual
/// soft limit of 1024 (systemd's default for services) would stop the
/// daemon at about 500 guests: `accept` on both sockets, the hosts files and
/// the state file then all fail with EMFILE. The daemon never uses
/// `select()`, which is why the soft limit is low by default.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills one struct rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads one struct rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            tracing::warn!(
                soft = limit.rlim_cur,
                "cannot raise the open files limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn bind(path: &Path, mode: u32) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // A socket file left by a killed daemon.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

impl Daemon {
    /// Brings the world to the persisted + configured state: networks up
    /// (or down), one nft transaction, dnsmasq with every reservation,
    /// guests that are gone dropped, server-mode guests re-dialed.
    async fn start(&mut self, config: Config) -> Result<(), String> {
        self.config_forwards = config.forwards;
        if let Err(e) = self.firewall.enable_localhost_forwards() {
            tracing::warn!("enabling forwards to 127.0.0.1 (route_localnet): {e}");
        }
        let mut wanted = config.networks;
        if config.use_default_network {
            let subnet = match self.state.default_subnet {
                Some(subnet) => subnet,
                None => {
                    let subnet = subnet::pick_free_subnet()
                        .await
                        .map_err(|e| e.to_string())?;
                    tracing::info!(%subnet, "no config file: default network qnet0 on a free /24");
                    self.state.default_subnet = Some(subnet);
                    subnet
                }
            };
            wanted.push(Config::default_network(subnet));
        }

        // Networks we brought up before that the config no longer has.
        let wanted_names: Vec<&str> = wanted.iter().map(|n| n.name.as_str()).collect();
        let vanished: Vec<NetworkConfig> = self
            .state
            .known_networks
            .values()
            .filter(|n| !wanted_names.contains(&n.name.as_str()))
            .cloned()
            .collect();
        for net in vanished {
            tracing::info!(network = %net.name, "no longer configured: removing it");
            if let Err(e) = network::bring_down(&net).await {
                tracing::warn!(network = %net.name, "removing: {e}");
            }
            self.state.known_networks.remove(&net.name);
        }

        for net in wanted {
            let name = net.name.clone();
            let up = !self.state.networks_down.contains(&name);
            self.networks.insert(
                name.clone(),
                NetworkRuntime {
                    config: net,
                    up: false,
                    dnsmasq: None,
                },
            );
            if up {
                self.network_up(&name).await?;
            }
        }
        self.apply_rules().await?;

        // Guests from before the restart: drop the dead, watch the living.
        let records: Vec<GuestRecord> = self.state.guests.values().cloned().collect();
        for record in records {
            if !state::still_running(&record) {
                tracing::info!(pid = record.pid, "guest gone while the daemon was down");
                self.state.guests.remove(&record.pid);
                continue;
            }
            watch_stale_guest(record.pid, self.inputs.clone());
            if let Some(path) = record.qmp_server.clone() {
                let conn = self.new_conn();
                tokio::spawn(follow_guest(
                    Origin::Server(path),
                    conn,
                    self.inputs.clone(),
                    None,
                ));
            }
        }
        for path in self.state.attached.clone() {
            let known = self
                .state
                .guests
                .values()
                .any(|g| g.qmp_server.as_ref() == Some(&path));
            if !known {
                self.state.attached.remove(&path);
            }
        }
        self.remove_orphan_macvtaps().await;
        self.sync_dnsmasq().await;
        self.sync_forwards().await;
        self.save();
        Ok(())
    }

    /// Guest events (connect, NIC change, exit) only change the state and
    /// set `pending_sync`; the hosts files, forwards and state file follow
    /// here, once for every guest event already queued (at most
    /// [`COALESCE_LIMIT`]). 1000 guests exiting at once (a host shutting
    /// down) then cost a handful of rewrites, fsyncs and SIGHUPs instead of
    /// 1000 each. Any other input waits until the sync is done, so a ctl
    /// request still sees every earlier event applied.
    async fn coalesce(&mut self, receiver: &mut mpsc::UnboundedReceiver<Input>) {
        let mut applied = 1;
        while self.pending_sync && applied < COALESCE_LIMIT {
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

    /// Makes dnsmasq, the forwards and the state file follow the state
    /// after guest events.
    async fn flush(&mut self) {
        if std::mem::take(&mut self.pending_sync) {
            self.sync_dnsmasq().await;
            self.sync_forwards().await;
            self.save();
        }
    }

    fn new_conn(&mut self) -> ConnId {
        self.next_conn += 1;
        self.next_conn
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Ctl {
                request,
                peer,
                reply,
            } => self.request(request, peer, reply).await,
            Input::GuestUp(up) => self.guest_up(*up).await,
            Input::GuestNics { conn, nics, ports } => {
                if let Some(pid) = self.guests.get(&conn).map(|g| g.pid) {
                    self.assign_nics(pid, &nics, &ports);
                    self.pending_sync = true;
                }
            }
            Input::GuestGone { conn, why } => {
                if let Some(guest) = self.guests.remove(&conn) {
                    // A guest that reconnected has a newer connection.
                    if self.guests.values().any(|g| g.pid == guest.pid) {
                        return;
                    }
                    tracing::info!(pid = guest.pid, %why, "guest gone: tearing down");
                    if let Some(record) = self.state.guests.remove(&guest.pid) {
                        if let Some(path) = record.qmp_server {
                            self.state.attached.remove(&path);
                        }
                    }
                    self.pending_sync = true;
                }
            }
            Input::StaleGuestExited { pid } => {
                let followed = self.guests.values().any(|g| g.pid == pid);
                if !followed && self.state.guests.remove(&pid).is_some() {
                    tracing::info!(pid, "guest from before the restart exited");
                    self.pending_sync = true;
                }
            }
            Input::LibvirtLeases(update) => self.libvirt_leases(update).await,
        }
    }

    /// Handles a control request; the reply goes out on `reply` (possibly
    /// later, from a task, for `attach`).
    async fn request(&mut self, request: Request, peer: Peer, reply: oneshot::Sender<Response>) {
        let result = match request {
            Request::Status => Ok(self.status()),
            Request::Guests => Ok(self.guest_list(peer)),
            Request::ReserveList { network } => self.reserve_list(network.as_deref(), peer),
            Request::ReserveAdd {
                network,
                mac,
                ip,
                name,
            } => self.reserve_add(&network, &mac, ip, name, peer).await,
            Request::ReserveRm { network, mac } => self.reserve_rm(&network, &mac, peer).await,
            Request::NetworkUp { name } => self.ctl_network_up(&name, peer).await,
            Request::NetworkDown { name } => self.ctl_network_down(&name, peer).await,
            Request::ForwardAdd { forward } => self.forward_add(forward, peer).await,
            Request::ForwardRm {
                proto,
                host_port,
                host_addr,
            } => self.forward_rm(proto, host_port, host_addr, peer).await,
            Request::ForwardList => Ok(self.forward_list(peer)),
            Request::GuestRegister {
                name,
                uuid,
                nics,
                forwards,
                pid,
            } => {
                self.guest_register(name, uuid, nics, forwards, pid, peer)
                    .await
            }
            Request::GuestUnregister { uuid } => self.guest_unregister(&uuid, peer).await,
            Request::Attach { qmp } => {
                let conn = self.new_conn();
                tokio::spawn(follow_guest(
                    Origin::Server(qmp),
                    conn,
                    self.inputs.clone(),
                    Some((peer, reply)),
                ));
                return;
            }
        };
        let _ = reply.send(match result {
            Ok(r) => Response::Ok(r),
            Err(e) => Response::Error(e),
        });
    }

    // ----- networks --------------------------------------------------------

    async fn network_up(&mut self, name: &str) -> Result<(), String> {
        let runtime = self
            .networks
            .get_mut(name)
            .ok_or_else(|| format!("no network `{name}`"))?;
        let net = runtime.config.clone();
        network::bring_up(&net)
            .await
            .map_err(|e| format!("network `{name}`: {e}"))?;
        let paths = self.dnsmasq_paths();
        let handle = dnsmasq::spawn(&net, &paths).map_err(|e| format!("network `{name}`: {e}"))?;
        let runtime = self.networks.get_mut(name).expect("checked above");
        runtime.dnsmasq = Some(handle);
        runtime.up = true;
        self.state.known_networks.insert(name.to_string(), net);
        Ok(())
    }

    async fn network_down(&mut self, name: &str) -> Result<(), String> {
        let runtime = self
            .networks
            .get_mut(name)
            .ok_or_else(|| format!("no network `{name}`"))?;
        if let Some(handle) = runtime.dnsmasq.take() {
            handle.stop().await;
        }
        runtime.up = false;
        let net = runtime.config.clone();
        network::bring_down(&net)
            .await
            .map_err(|e| format!("network `{name}`: {e}"))?;
        self.state.known_networks.remove(name);
        Ok(())
    }

    async fn ctl_network_up(&mut self, name: &str, peer: Peer) -> Result<Reply, String> {
        require_root(peer, "bring networks up")?;
        let runtime = self
            .networks
            .get(name)
            .ok_or_else(|| self.no_such_network(name))?;
        if runtime.up {
            return Ok(done(format!("network `{name}` is already up")));
        }
        self.state.networks_down.remove(name);
        self.network_up(name).await?;
        self.apply_rules().await?;
        self.sync_dnsmasq().await;
        self.sync_forwards().await;
        self.save();
        Ok(done(format!("network `{name}` is up")))
    }

    async fn ctl_network_down(&mut self, name: &str, peer: Peer) -> Result<Reply, String> {
        require_root(peer, "take networks down")?;
        let runtime = self
            .networks
            .get(name)
            .ok_or_else(|| self.no_such_network(name))?;
        if !runtime.up {
            return Ok(done(format!("network `{name}` is already down")));
        }
        self.state.networks_down.insert(name.to_string());
        self.network_down(name).await?;
        self.apply_rules().await?;
        self.save();
        Ok(done(format!(
            "network `{name}` is down: bridge, rules and dnsmasq removed (reservations kept)"
        )))
    }

    fn no_such_network(&self, name: &str) -> String {
        let known: Vec<&str> = self.networks.keys().map(String::as_str).collect();
        format!("no network `{name}` (networks: {})", known.join(", "))
    }

    /// Replaces our nft table with the rules of every network that is up,
    /// in one transaction.
    async fn apply_rules(&mut self) -> Result<(), String> {
        let up: Vec<NetworkConfig> = self
            .networks
            .values()
            .filter(|n| n.up)
            .map(|n| n.config.clone())
            .collect();
        let forwards = self.desired_forwards();
        let rules: Vec<ForwardElement> = forwards.iter().copied().collect();
        self.firewall
            .apply_ruleset(&up, &rules)
            .await
            .map_err(|e| format!("nftables: {e}"))?;
        self.installed_forwards = forwards;
        Ok(())
    }

    /// Every forward declared, from the file and from requests.
    fn forward_specs(&self) -> impl Iterator<Item = Declared<'_>> {
        self.config_forwards
            .iter()
            .map(|spec| Declared {
                spec,
                origin: "config",
                owner_uid: None,
                libvirt: None,
            })
            .chain(self.state.forwards.iter().map(|f| Declared {
                spec: &f.spec,
                origin: if f.libvirt.is_some() {
                    "libvirt"
                } else {
                    "runtime"
                },
                owner_uid: Some(f.owner_uid),
                libvirt: f.libvirt.as_deref(),
            }))
    }

    /// The forward map elements that must exist now: forwards of running
    /// guests on networks that are up.
    fn desired_forwards(&self) -> BTreeSet<ForwardElement> {
        self.desired_forwards_of(self.forward_specs().map(|d| d.spec))
    }

    /// The elements `specs` need now (a subset of [`Self::desired_forwards`]).
    fn desired_forwards_of<'a>(
        &self,
        specs: impl IntoIterator<Item = &'a ForwardSpec>,
    ) -> BTreeSet<ForwardElement> {
        let guests: Vec<&GuestRecord> = self.state.guests.values().collect();
        let networks: Vec<&NetworkConfig> = self
            .networks
            .values()
            .filter(|n| n.up)
            .map(|n| &n.config)
            .collect();
        // Addresses of guests on libvirt's own networks: libvirt keeps
        // those networks up, not us.
        let on_libvirt: BTreeSet<IpAddr> = guests
            .iter()
            .flat_map(|g| g.nics.iter())
            .filter(|nic| nic.libvirt_bridge.is_some())
            .filter_map(|nic| nic.ip.map(IpAddr::V4))
            .collect();
        let mut rules = forwards::desired(specs, &guests, &networks);
        rules.retain(|r| {
            let guest_net_up = networks.iter().any(|n| match r.guest_addr {
                IpAddr::V4(a) => n.subnet.contains(&a),
                IpAddr::V6(a) => n.ipv6.is_some_and(|v6| v6.subnet.contains(&a)),
            });
            guest_net_up || on_libvirt.contains(&r.guest_addr)
        });
        rules
    }

    /// Brings the installed forward elements to the desired set, changing
    /// only the difference (one small transaction each way).
    async fn sync_forwards(&mut self) {
        // Forwards to guests on libvirt networks follow their leases: the
        // set of lease files to watch changes with the same events.
        self.update_lease_watch();
        let desired = self.desired_forwards();
        let stale: BTreeSet<ForwardElement> = self
            .installed_forwards
            .difference(&desired)
            .copied()
            .collect();
        self.uninstall_forwards(stale).await;
        self.install_forwards(desired).await;
    }

    /// Adds the elements of `rules` that are not installed yet.
    async fn install_forwards(&mut self, rules: BTreeSet<ForwardElement>) {
        let new: Vec<ForwardElement> = rules
            .difference(&self.installed_forwards)
            .copied()
            .collect();
        if new.is_empty() {
            return;
        }
        match self.firewall.add_elements(&new).await {
            Ok(report) => {
                // A refused element (its host port forwarded to another
                // guest) stays out; the others are installed.
                for refused in &report.refused {
                    tracing::warn!("{refused}");
                }
                self.installed_forwards.extend(report.changed);
            }
            Err(e) => tracing::warn!("adding {} forward(s): {e}", new.len()),
        }
    }

    /// Removes the installed elements of `rules`.
    async fn uninstall_forwards(&mut self, rules: BTreeSet<ForwardElement>) {
        let stale: Vec<ForwardElement> = rules
            .intersection(&self.installed_forwards)
            .copied()
            .collect();
        if stale.is_empty() {
            return;
        }
        match self.firewall.remove_elements(&stale).await {
            Ok(report) => {
                for refused in &report.refused {
                    tracing::warn!("{refused}");
                }
                for removed in &report.changed {
                    self.installed_forwards.remove(removed);
                }
            }
            Err(e) => tracing::warn!("removing {} forward(s): {e}", stale.len()),
        }
    }

    fn dnsmasq_paths(&self) -> dnsmasq::Paths {
        dnsmasq::Paths {
            run_dir: self.paths.run_dir.clone(),
            state_dir: self.paths.state_dir.clone(),
        }
    }

    /// Rewrites every running dnsmasq's hosts files from the state: DHCP
    /// for every reservation, DNS names for running guests and for explicit
    /// reservations with a name. dnsmasq gets SIGHUP only on change.
    async fn sync_dnsmasq(&self) {
        for runtime in self.networks.values() {
            let Some(handle) = &runtime.dnsmasq else {
                continue;
            };
            let net = &runtime.config;
            // A set: it is looked up once per reservation, and a Vec made
            // this O(guests x reservations) on every guest event.
            let running_macs: BTreeSet<&str> = self
                .state
                .guests
                .values()
                .flat_map(|g| g.nics.iter())
                .filter(|nic| nic.is_on_qnet_network(&net.name))
                .map(|nic| nic.mac.as_str())
                .collect();
            let mut dhcp = Vec::new();
            let mut dns = Vec::new();
            for (mac, r) in self.state.reservations.get(&net.name).into_iter().flatten() {
                dhcp.push(DhcpHost {
                    mac: mac.clone(),
                    ip: r.ip,
                    name: r.name.clone(),
                });
                if let Some(name) = &r.name {
                    if r.explicit || running_macs.contains(&mac.as_str()) {
                        dns.push(DnsHost {
                            ip: r.ip,
                            name: name.clone(),
                        });
                    }
                }
            }
            if let Err(e) = handle.set_hosts(dhcp, dns).await {
                tracing::warn!(network = %net.name, "updating dnsmasq hosts: {e}");
            }
        }
    }

    // ----- guests ----------------------------------------------------------

    async fn guest_up(&mut self, up: GuestUp) {
        let GuestUp {
            conn,
            identity,
            info,
            ports,
            qmp_server,
        } = up;
        let pid = identity.pid;
        let start_time = procfs::start_time(pid).unwrap_or(0);
        tracing::info!(
            pid,
            name = info.name.as_deref().unwrap_or("-"),
            nics = info.nics.len(),
            "guest connected"
        );
        self.guests.retain(|_, g| g.pid != pid);
        self.guests.insert(conn, GuestRuntime { pid });
        if let Some(path) = &qmp_server {
            self.state.attached.insert(path.clone());
        }
        self.state.guests.insert(
            pid,
            GuestRecord {
                pid,
                start_time,
                uid: identity.uid,
                name: info.name.clone(),
                uuid: info.uuid.clone(),
                qmp_server,
                nics: Vec::new(),
            },
        );
        self.assign_nics(pid, &info.nics, &ports);
        self.pending_sync = true;
    }

    /// Works out which network each NIC is on and gives it its sticky
    /// reservation there.
    ///
    /// QMP names NICs and MACs; `/proc` names the host devices. A macvtap
    /// carries the guest's MAC, so it matches exactly. TAPs carry their own
    /// MACs: they are paired with the NICs in order (QEMU opens the netdevs
    /// and creates the NICs in command-line order), or, when the counts
    /// differ, every NIC is reserved on the one qnet network the guest's
    /// TAPs are on, if there is exactly one.
    fn assign_nics(&mut self, pid: u32, nics: &[NicInfo], ports: &[GuestPort]) {
        let taps: Vec<&GuestPort> = ports.iter().filter(|p| p.kind == PortKind::Tap).collect();
        let tap_networks: Vec<Option<String>> = taps
            .iter()
            .map(|p| p.master.as_deref().and_then(|b| self.network_of_bridge(b)))
            .collect();
        let mut single: Vec<&String> = tap_networks.iter().flatten().collect();
        single.dedup();
        let only_network = if single.len() == 1 {
            Some(single[0].clone())
        } else {
            None
        };
        let name = self
            .state
            .guests
            .get(&pid)
            .and_then(|g| g.name.as_deref())
            .and_then(dns_label);

        let mut assigned = Vec::new();
        for (i, nic) in nics.iter().enumerate() {
            let macvtap = ports.iter().find(|p| {
                p.kind == PortKind::Macvtap && p.mac.map(mac_string).as_deref() == Some(&nic.mac)
            });
            let (device, network) = if let Some(port) = macvtap {
                (Some(port.ifname.clone()), None)
            } else if taps.len() == nics.len() {
                (Some(taps[i].ifname.clone()), tap_networks[i].clone())
            } else {
                (None, only_network.clone())
            };
            let ip = network.as_ref().and_then(|net_name| {
                let net = &self.networks.get(net_name)?.config;
                let ip = self.state.reserve(net, &nic.mac, name.as_deref());
                if ip.is_none() {
                    tracing::warn!(network = %net_name, mac = %nic.mac, "address pool exhausted");
                }
                ip
            });
            assigned.push(GuestNic {
                mac: nic.mac.clone(),
                device,
                network,
                ip,
                libvirt_bridge: None,
            });
        }
        if let Some(record) = self.state.guests.get_mut(&pid) {
            record.nics = assigned;
        }
    }

    fn network_of_bridge(&self, bridge: &str) -> Option<String> {
        self.networks
            .values()
            .find(|n| n.config.bridge == bridge)
            .map(|n| n.config.name.clone())
    }

    /// Deletes qnet macvtaps whose QEMU is gone (left by a host crash or a
    /// killed reaper).
    async fn remove_orphan_macvtaps(&self) {
        match tokio::task::spawn_blocking(orphans::remove_orphan_macvtaps).await {
            Ok(Ok(removed)) => {
                for name in removed {
                    tracing::info!(macvtap = %name, "removed orphaned qnet macvtap");
                }
            }
            Ok(Err(e)) => tracing::warn!("looking for orphaned macvtaps: {e}"),
            Err(e) => tracing::warn!("looking for orphaned macvtaps: {e}"),
        }
    }

    // ----- control requests -------------------------------------------------

    fn status(&self) -> Reply {
        let networks = self
            .networks
            .values()
            .map(|n| {
                let (rx_bytes, tx_bytes) = if n.up {
                    network::bridge_counters(&n.config.bridge).unwrap_or((0, 0))
                } else {
                    (0, 0)
                };
                NetworkStatus {
                    name: n.config.name.clone(),
                    mode: n.config.mode,
                    bridge: n.config.bridge.clone(),
                    subnet: n.config.subnet.to_string(),
                    router: n.config.router,
                    ipv6: n.config.ipv6.map(|v6| v6.subnet.to_string()),
                    up: n.up,
                    guests: self
                        .state
                        .guests
                        .values()
                        .filter(|g| {
                            g.nics
                                .iter()
                                .any(|nic| nic.is_on_qnet_network(&n.config.name))
                        })
                        .count(),
                    rx_bytes,
                    tx_bytes,
                }
            })
            .collect();
        Reply::Status { networks }
    }

    fn guest_list(&self, peer: Peer) -> Reply {
        let guests = self
            .state
            .guests
            .values()
            .filter(|g| peer.is_root() || g.uid == peer.uid)
            .map(|g| GuestStatus {
                name: g.name.clone(),
                uuid: g.uuid.clone(),
                pid: g.pid,
                uid: g.uid,
                user: user_name(g.uid),
                status: if state::still_running(g) {
                    "running".into()
                } else {
                    "gone".into()
                },
                nics: g.nics.clone(),
            })
            .collect();
        Reply::Guests { guests }
    }

    /// MACs of the running guests of `uid`.
    fn macs_of(&self, uid: u32) -> Vec<&str> {
        self.state
            .guests
            .values()
            .filter(|g| g.uid == uid)
            .flat_map(|g| g.nics.iter().map(|n| n.mac.as_str()))
            .collect()
    }

    fn reserve_list(&self, network: Option<&str>, peer: Peer) -> Result<Reply, String> {
        if let Some(name) = network {
            if !self.networks.contains_key(name) {
                return Err(self.no_such_network(name));
            }
        }
        let own = self.macs_of(peer.uid);
        let reservations = self
            .networks
            .keys()
            .filter(|name| network.is_none_or(|n| n == name.as_str()))
            .flat_map(|name| self.state.reservations_of(name))
            .filter(|r| peer.is_root() || own.contains(&r.mac.as_str()))
            .collect();
        Ok(Reply::Reservations { reservations })
    }

    async fn reserve_add(
        &mut self,
        network: &str,
        mac: &str,
        ip: Option<Ipv4Addr>,
        name: Option<String>,
        peer: Peer,
    ) -> Result<Reply, String> {
        let mac = api::normalize_mac(mac)?;
        if !peer.is_root() && !self.macs_of(peer.uid).contains(&mac.as_str()) {
            return Err(format!(
                "{mac} is not a NIC of one of your running guests: only root may reserve other MACs"
            ));
        }
        let net = self
            .networks
            .get(network)
            .ok_or_else(|| self.no_such_network(network))?
            .config
            .clone();
        let name =
            match name {
                Some(n) => Some(dns_label(&n).ok_or_else(|| {
                    format!("`{n}` is not a DNS name: use letters, digits and `-`")
                })?),
                None => None,
            };
        let table = self.state.reservations.entry(net.name.clone()).or_default();
        let ip = match ip {
            Some(ip) => {
                if !net.subnet.contains(&ip)
                    || ip == net.router
                    || ip == net.subnet.network()
                    || ip == net.subnet.broadcast()
                {
                    return Err(format!(
                        "{ip} is not a guest address of {} ({})",
                        net.name, net.subnet
                    ));
                }
                if let Some((other, _)) = table.iter().find(|(m, r)| r.ip == ip && **m != mac) {
                    return Err(format!(
                        "{ip} is already reserved for {other} on {}",
                        net.name
                    ));
                }
                ip
            }
            None => match table.get(&mac) {
                Some(existing) => existing.ip,
                None => state::free_address(&net, table)
                    .ok_or_else(|| format!("network `{}` has no free address left", net.name))?,
            },
        };
        table.insert(
            mac.clone(),
            StoredReservation {
                ip,
                name: name.clone(),
                explicit: true,
            },
        );
        self.sync_dnsmasq().await;
        self.sync_forwards().await;
        self.save();
        let named = name
            .map(|n| format!(" ({n}.{})", net.domain))
            .unwrap_or_default();
        Ok(done(format!("reserved {ip}{named} for {mac} on {network}")))
    }

    async fn reserve_rm(&mut self, network: &str, mac: &str, peer: Peer) -> Result<Reply, String> {
        let mac = api::normalize_mac(mac)?;
        if !peer.is_root() && !self.macs_of(peer.uid).contains(&mac.as_str()) {
            return Err(format!("{mac} is not a NIC of one of your running guests"));
        }
        if !self.networks.contains_key(network) {
            return Err(self.no_such_network(network));
        }
        let removed = self
            .state
            .reservations
            .get_mut(network)
            .and_then(|t| t.remove(&mac));
        match removed {
            Some(r) => {
                self.sync_dnsmasq().await;
                self.sync_forwards().await;
                self.save();
                Ok(done(format!(
                    "removed the reservation of {} for {mac} on {network}",
                    r.ip
                )))
            }
            None => Err(format!("{mac} has no reservation on {network}")),
        }
    }

    // ----- port forwards -----------------------------------------------------

    async fn forward_add(&mut self, spec: ForwardSpec, peer: Peer) -> Result<Reply, String> {
        if let Some(net) = &spec.network {
            if !self.networks.contains_key(net) && !self.is_libvirt_network(net) {
                return Err(self.no_such_network(net));
            }
        }
        if !peer.is_root() {
            if spec.host_ports.0 < 1024 {
                return Err(format!(
                    "host port {} is privileged: only root may forward ports below 1024",
                    spec.host_ports.0
                ));
            }
            let own: Vec<&GuestRecord> = self
                .state
                .guests
                .values()
                .filter(|g| g.uid == peer.uid)
                .collect();
            if forwards::target_nic(&spec, own.iter().copied()).is_none() {
                return Err(format!(
                    "`{}` is not one of your running guests: only root may forward to other guests",
                    spec.guest
                ));
            }
        }
        if let Some(Declared {
            spec: other,
            origin,
            ..
        }) = self.forward_specs().find(|d| d.spec.overlaps(&spec))
        {
            if other == &spec {
                return Ok(done(format!(
                    "{} to {} is already forwarded",
                    spec.ports_text(),
                    spec.guest
                )));
            }
            return Err(format!(
                "{} is taken by guest `{}` ({origin} forward {})",
                spec.ports_text(),
                other.guest,
                other.ports_text()
            ));
        }
        for port in spec.host_ports.0..=spec.host_ports.1 {
            if let Some(owner) = forwards::host_listener(spec.proto, port) {
                return Err(format!(
                    "{}/{port} is taken by a host socket of {owner}: stop it or pick another port",
                    spec.proto
                ));
            }
        }
        let text = format!("{} to {}", spec.ports_text(), spec.guest);
        let stored = StoredForward {
            spec,
            owner_uid: peer.uid,
            libvirt: None,
        };
        self.state.forwards.push(stored.clone());
        // Only this forward's file and elements: the cost does not depend
        // on how many forwards exist.
        self.save_forward(&stored, true);
        let rules = self.desired_forwards_of([&stored.spec]);
        self.install_forwards(rules).await;
        Ok(done(format!("forwarding {text}")))
    }

    async fn forward_rm(
        &mut self,
        proto: Proto,
        host_port: u16,
        host_addr: Option<IpAddr>,
        peer: Peer,
    ) -> Result<Reply, String> {
        let found = self.state.forwards.iter().position(|f| {
            f.spec.proto == proto
                && (f.spec.host_ports.0..=f.spec.host_ports.1).contains(&host_port)
                && (host_addr.is_none() || f.spec.host_addr == host_addr)
        });
        let Some(index) = found else {
            let in_config = self.config_forwards.iter().any(|f| {
                f.proto == proto && (f.host_ports.0..=f.host_ports.1).contains(&host_port)
            });
            return Err(if in_config {
                format!(
                    "{proto}/{host_port} is forwarded by {}: remove it there",
                    self.paths.config.display()
                )
            } else {
                format!("no forward of {proto}/{host_port}")
            });
        };
        if !peer.is_root() && self.state.forwards[index].owner_uid != peer.uid {
            return Err(
                "that forward is not yours: only root may remove other users' forwards".into(),
            );
        }
        // Its elements, worked out while it is still declared (no other
        // forward can map the same keys: overlaps are refused).
        let rules = self.desired_forwards_of([&self.state.forwards[index].spec]);
        let removed = self.state.forwards.remove(index);
        self.save_forward(&removed, false);
        self.uninstall_forwards(rules).await;
        Ok(done(format!(
            "removed the forward of {} to {}",
            removed.spec.ports_text(),
            removed.spec.guest
        )))
    }

    // ----- libvirt guests ----------------------------------------------------

    /// Registers a libvirt guest (the libvirt hook): reservations first,
    /// then the forwards of its domain XML (replacing those it declared
    /// before), then, with a pid, the guest record the daemon watches.
    ///
    /// A NIC on one of libvirt's own networks gets no reservation (libvirt's
    /// dnsmasq hands out its address): its address is the fixed one of the
    /// metadata, else the lease in libvirt's status file, else the last one
    /// remembered for its MAC; the lease watcher updates it later.
    async fn guest_register(
        &mut self,
        name: String,
        uuid: String,
        nics: Vec<api::LibvirtNic>,
        specs: Vec<ForwardSpec>,
        pid: Option<u32>,
        peer: Peer,
    ) -> Result<Reply, String> {
        require_root(peer, "register libvirt guests")?;
        if uuid.is_empty() || name.is_empty() {
            return Err("a libvirt guest needs a name and a UUID".into());
        }
        let start_time = match pid {
            Some(pid) => Some(
                procfs::start_time(pid)
                    .ok_or_else(|| format!("guest `{name}`: no process {pid}"))?,
            ),
            None => None,
        };
        // Work out every NIC's network and check fixed addresses before
        // changing anything.
        let mut placed = Vec::new();
        for nic in &nics {
            let mac = api::normalize_mac(&nic.mac)?;
            let qnet = nic
                .network
                .as_deref()
                .filter(|n| self.networks.contains_key(*n))
                .map(str::to_string)
                .or_else(|| {
                    nic.bridge
                        .as_deref()
                        .and_then(|b| self.network_of_bridge(b))
                });
            let place = match (qnet, &nic.libvirt_network) {
                (Some(net_name), _) => Place::Qnet(net_name),
                (None, Some(lv)) => {
                    libvirt::status_path(Path::new(libvirt::LEASE_DIR), &lv.bridge).map_err(
                        |e| format!("guest `{name}`: libvirt network `{}`: {e}", lv.name),
                    )?;
                    Place::Libvirt(lv.clone())
                }
                (None, None) => Place::Elsewhere,
            };
            match (&place, nic.ip) {
                (Place::Qnet(net_name), Some(ip)) => {
                    let net = &self.networks[net_name].config;
                    if !net.subnet.contains(&ip)
                        || ip == net.router
                        || ip == net.subnet.network()
                        || ip == net.subnet.broadcast()
                    {
                        return Err(format!(
                            "guest `{name}`: {ip} is not a guest address of {} ({})",
                            net.name, net.subnet
                        ));
                    }
                    let taken = self
                        .state
                        .reservations
                        .get(net_name)
                        .and_then(|t| t.iter().find(|(m, r)| r.ip == ip && **m != mac));
                    if let Some((other, _)) = taken {
                        return Err(format!(
                            "guest `{name}`: {ip} is already reserved for {other} on {net_name}"
                        ));
                    }
                }
                (Place::Libvirt(lv), Some(ip)) => {
                    let inside = lv.subnets.iter().any(|s| {
                        s.contains(&ip)
                            && ip != s.network()
                            && ip != s.broadcast()
                            && ip != s.addr()
                    });
                    if !lv.subnets.is_empty() && !inside {
                        let subnets: Vec<String> =
                            lv.subnets.iter().map(|s| s.trunc().to_string()).collect();
                        return Err(format!(
                            "guest `{name}`: {ip} is not a guest address of libvirt network `{}` ({})",
                            lv.name,
                            subnets.join(", ")
                        ));
                    }
                }
                _ => {}
            }
            placed.push((mac, place, nic));
        }
        let libvirt_names: BTreeSet<&str> = placed
            .iter()
            .filter_map(|(_, place, _)| match place {
                Place::Libvirt(lv) => Some(lv.name.as_str()),
                _ => None,
            })
            .collect();
        for spec in &specs {
            if let Some(net) = &spec.network {
                if !self.networks.contains_key(net) && !libvirt_names.contains(net.as_str()) {
                    return Err(self.no_such_network(net));
                }
            }
            let clash = self
                .forward_specs()
                .find(|d| d.spec.overlaps(spec) && d.libvirt != Some(uuid.as_str()));
            if let Some(Declared {
                spec: other,
                origin,
                ..
            }) = clash
            {
                return Err(format!(
                    "guest `{name}`: {} is taken by guest `{}` ({origin} forward {})",
                    spec.ports_text(),
                    other.guest,
                    other.ports_text()
                ));
            }
        }

        // Reservations, and addresses on libvirt networks.
        let label = dns_label(&name);
        let mut guest_nics = Vec::new();
        let mut libvirt_nets = Vec::new();
        for (mac, place, nic) in placed {
            let (network, ip, libvirt_bridge) = match place {
                Place::Qnet(net_name) => {
                    let net = self.networks[&net_name].config.clone();
                    let ip = match nic.ip {
                        Some(ip) => {
                            let table = self.state.reservations.entry(net.name).or_default();
                            let explicit = table.get(&mac).is_some_and(|r| r.explicit);
                            table.insert(
                                mac.clone(),
                                StoredReservation {
                                    ip,
                                    name: label.clone(),
                                    explicit,
                                },
                            );
                            ip
                        }
                        None => self
                            .state
                            .reserve(&net, &mac, label.as_deref())
                            .ok_or_else(|| {
                                format!("network `{net_name}` has no free address left")
                            })?,
                    };
                    (Some(net_name), Some(ip), None)
                }
                Place::Libvirt(lv) => {
                    let ip = self.libvirt_address(&mac, &lv, nic.ip).await;
                    let entry = (Some(lv.name.clone()), ip, Some(lv.bridge.clone()));
                    libvirt_nets.push(lv);
                    entry
                }
                Place::Elsewhere => (None, None, None),
            };
            guest_nics.push(GuestNic {
                mac,
                device: nic.device.clone(),
                network,
                ip,
                libvirt_bridge,
            });
        }
        if !specs.is_empty() {
            self.warn_libvirt_inbound(&name, &uuid, &libvirt_nets);
        }

        // Forwards: exactly those of the domain XML.
        self.state
            .forwards
            .retain(|f| f.libvirt.as_deref() != Some(uuid.as_str()));
        let forward_count = specs.len();
        for spec in specs {
            self.state.forwards.push(StoredForward {
                spec,
                owner_uid: peer.uid,
                libvirt: Some(uuid.clone()),
            });
        }

        // The guest record, once QEMU runs.
        if let (Some(pid), Some(start_time)) = (pid, start_time) {
            let known = self
                .state
                .guests
                .get(&pid)
                .is_some_and(|g| g.start_time == start_time);
            self.state
                .guests
                .retain(|p, g| *p == pid || g.uuid.as_deref() != Some(uuid.as_str()));
            let uid = procfs::uid_of(pid).unwrap_or(0);
            self.state.guests.insert(
                pid,
                GuestRecord {
                    pid,
                    start_time,
                    uid,
                    name: Some(name.clone()),
                    uuid: Some(uuid.clone()),
                    qmp_server: None,
                    nics: guest_nics.clone(),
                },
            );
            if !known {
                watch_stale_guest(pid, self.inputs.clone());
            }
        }
        self.sync_dnsmasq().await;
        self.sync_forwards().await;
        self.save();
        let addresses: Vec<String> = guest_nics
            .iter()
            .map(|n| match (&n.network, n.ip, &n.libvirt_bridge) {
                (Some(net), Some(ip), None) => format!("{} {ip} on {net}", n.mac),
                (Some(net), Some(ip), Some(_)) => {
                    format!("{} {ip} on libvirt network {net}", n.mac)
                }
                (Some(net), None, Some(_)) => {
                    format!("{} on libvirt network {net}, waiting for its lease", n.mac)
                }
                _ => format!("{} not on a qnet or libvirt network", n.mac),
            })
            .collect();
        tracing::info!(guest = %name, %uuid, ?pid, "libvirt guest registered");
        Ok(done(format!(
            "registered libvirt guest `{name}`{}: {}; {forward_count} forward(s)",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            if addresses.is_empty() {
                "no NICs".to_string()
            } else {
                addresses.join(", ")
            }
        )))
    }

    /// The address of `mac` on libvirt network `lv`: `fixed` (the
    /// metadata's), else its lease in libvirt's status file, else the last
    /// one remembered for it on that bridge. Remembers what it finds.
    async fn libvirt_address(
        &mut self,
        mac: &str,
        lv: &api::LibvirtNetwork,
        fixed: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        let leased = match fixed {
            Some(_) => None,
            None => {
                let path = libvirt::status_path(Path::new(libvirt::LEASE_DIR), &lv.bridge).ok()?;
                match tokio::task::spawn_blocking(move || libvirt::read_status(&path)).await {
                    Ok(Ok(leases)) => libvirt::address_of(&leases, mac),
                    Ok(Err(e)) => {
                        tracing::warn!("libvirt leases: {e}");
                        None
                    }
                    Err(_) => None,
                }
            }
        };
        let remembered = self
            .state
            .libvirt_addresses
            .get(mac)
            .filter(|a| a.bridge == lv.bridge && !a.fixed)
            .map(|a| a.ip);
        let ip = fixed.or(leased).or(remembered)?;
        self.state.libvirt_addresses.insert(
            mac.to_string(),
            LibvirtAddress {
                network: lv.name.clone(),
                bridge: lv.bridge.clone(),
                ip,
                fixed: fixed.is_some(),
            },
        );
        Some(ip)
    }

    /// Warns, once per guest and network, that forwards into a libvirt
    /// network whose own firewall rejects inbound connections work from
    /// the host only. We never edit libvirt's rules (they are not ours).
    fn warn_libvirt_inbound(&mut self, name: &str, uuid: &str, nets: &[api::LibvirtNetwork]) {
        for lv in nets.iter().filter(|lv| !lv.admits_inbound()) {
            if self
                .libvirt_warned
                .insert((uuid.to_string(), lv.name.clone()))
            {
                tracing::warn!(
                    guest = %name,
                    network = %lv.name,
                    mode = lv.forward_mode.as_deref().unwrap_or("isolated"),
                    "forwards to this guest work from the host only: libvirt's firewall \
                     (iptables chain LIBVIRT_FWI) rejects new connections from outside into \
                     {} networks; use <forward mode='route'/> or 'open' for the libvirt \
                     network, or accept them in your own FORWARD rules",
                    lv.forward_mode.as_deref().unwrap_or("isolated")
                );
            }
        }
    }

    /// libvirt's dnsmasq changed the leases of `update.bridge`: guests on
    /// that bridge whose lease is new or moved get their forwards (re)made.
    async fn libvirt_leases(&mut self, update: LeaseUpdate) {
        let mut changed = Vec::new();
        for guest in self.state.guests.values_mut() {
            for nic in guest.nics.iter_mut() {
                if nic.libvirt_bridge.as_deref() != Some(update.bridge.as_str()) {
                    continue;
                }
                let fixed = self
                    .state
                    .libvirt_addresses
                    .get(&nic.mac)
                    .is_some_and(|a| a.fixed && a.bridge == update.bridge);
                if fixed {
                    continue;
                }
                let Some(ip) = libvirt::address_of(&update.leases, &nic.mac) else {
                    continue;
                };
                if nic.ip != Some(ip) {
                    tracing::info!(
                        guest = guest.name.as_deref().unwrap_or("-"),
                        mac = %nic.mac,
                        %ip,
                        bridge = %update.bridge,
                        "libvirt lease"
                    );
                    nic.ip = Some(ip);
                    changed.push((nic.mac.clone(), nic.network.clone().unwrap_or_default(), ip));
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        for (mac, network, ip) in changed {
            self.state.libvirt_addresses.insert(
                mac,
                LibvirtAddress {
                    network,
                    bridge: update.bridge.clone(),
                    ip,
                    fixed: false,
                },
            );
        }
        self.sync_forwards().await;
        self.save();
    }

    /// Tells the lease watcher which bridges matter now: those of running
    /// libvirt guests' NICs whose address comes from a lease.
    fn update_lease_watch(&self) {
        let bridges: BTreeSet<String> = self
            .state
            .guests
            .values()
            .flat_map(|g| g.nics.iter())
            .filter(|nic| {
                !self
                    .state
                    .libvirt_addresses
                    .get(&nic.mac)
                    .is_some_and(|a| a.fixed)
            })
            .filter_map(|nic| nic.libvirt_bridge.clone())
            .collect();
        self.lease_watch.send_if_modified(|current| {
            if *current == bridges {
                false
            } else {
                *current = bridges;
                true
            }
        });
    }

    /// Whether a running guest has a NIC on the libvirt network `name`.
    fn is_libvirt_network(&self, name: &str) -> bool {
        self.state
            .guests
            .values()
            .flat_map(|g| g.nics.iter())
            .any(|nic| nic.libvirt_bridge.is_some() && nic.network.as_deref() == Some(name))
    }

    /// The libvirt guest `uuid` stopped: its record and forwards go; its
    /// reservations stay (sticky).
    async fn guest_unregister(&mut self, uuid: &str, peer: Peer) -> Result<Reply, String> {
        require_root(peer, "unregister libvirt guests")?;
        let guests_before = self.state.guests.len();
        self.state
            .guests
            .retain(|_, g| g.qmp_server.is_some() || g.uuid.as_deref() != Some(uuid));
        let forwards_before = self.state.forwards.len();
        self.state
            .forwards
            .retain(|f| f.libvirt.as_deref() != Some(uuid));
        // Its next start warns again.
        self.libvirt_warned.retain(|(u, _)| u != uuid);
        let guests = guests_before - self.state.guests.len();
        let forwards = forwards_before - self.state.forwards.len();
        self.sync_dnsmasq().await;
        self.sync_forwards().await;
        self.save();
        tracing::info!(%uuid, guests, forwards, "libvirt guest unregistered");
        Ok(done(format!(
            "unregistered libvirt guest {uuid}: {forwards} forward(s) removed"
        )))
    }

    fn forward_list(&self, peer: Peer) -> Reply {
        let guests: Vec<&GuestRecord> = self.state.guests.values().collect();
        let forwards = self
            .forward_specs()
            .filter(|d| peer.is_root() || d.owner_uid == Some(peer.uid))
            .map(|d| ForwardInfo {
                forward: d.spec.clone(),
                origin: d.origin.to_string(),
                guest_addr: forwards::target_nic(d.spec, guests.iter().copied())
                    .and_then(|nic| nic.ip)
                    .map(IpAddr::V4),
            })
            .collect();
        Reply::Forwards { forwards }
    }

    /// Persists one forward just added to (`present`) or removed from the
    /// state.
    fn save_forward(&mut self, forward: &StoredForward, present: bool) {
        if let Err(e) =
            self.state
                .save_forward(&self.paths.state_dir, &mut self.on_disk, forward, present)
        {
            tracing::error!("saving state: {e}");
        }
    }

    fn save(&mut self) {
        if let Err(e) = self.state.save(&self.paths.state_dir, &mut self.on_disk) {
            tracing::error!("saving state: {e}");
        }
    }
}

/// A declared forward, wherever it was declared.
struct Declared<'a> {
    spec: &'a ForwardSpec,
    /// `config`, `runtime` or `libvirt`, as `forward list` shows it.
    origin: &'static str,
    /// Who added it at run time; `None` for hookd.toml's.
    owner_uid: Option<u32>,
    /// The UUID of the libvirt domain that declares it.
    libvirt: Option<&'a str>,
}

/// Where a libvirt guest's NIC is.
enum Place {
    /// On this qnet network.
    Qnet(String),
    /// On one of libvirt's own networks.
    Libvirt(api::LibvirtNetwork),
    /// Neither (a host bridge, macvtap, user networking...).
    Elsewhere,
}

fn done(message: String) -> Reply {
    Reply::Done { message }
}

fn require_root(peer: Peer, what: &str) -> Result<(), String> {
    if peer.is_root() {
        Ok(())
    } else {
        Err(format!("only root may {what}"))
    }
}

/// A guest name as a DNS label: lower-case letters, digits and `-`.
fn dns_label(name: &str) -> Option<String> {
    let label: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            '_' | '.' | ' ' => '-',
            _ => '\0',
        })
        .filter(|&c| c != '\0')
        .collect();
    let label = label.trim_matches('-').to_string();
    (!label.is_empty() && label.len() <= 63).then_some(label)
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

// ----- QMP connections --------------------------------------------------------

/// How the daemon reached a QEMU.
#[derive(Debug)]
pub enum Origin {
    /// QEMU dialed the daemon's QMP socket.
    Client(UnixStream),
    /// The daemon dials QEMU's QMP server socket.
    Server(PathBuf),
}

async fn accept_qmp(listener: UnixListener, inputs: mpsc::UnboundedSender<Input>) {
    // Connection ids for client-mode guests count down from the top so they
    // never meet the reconciler's own counter.
    let mut conn: ConnId = u64::MAX;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                conn -= 1;
                tokio::spawn(follow_guest(
                    Origin::Client(stream),
                    conn,
                    inputs.clone(),
                    None,
                ));
            }
            Err(e) => {
                tracing::warn!("accepting a QMP connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Follows one QEMU: handshake and queries, then forwards its events and
/// reports its end (QMP EOF, process exit, or SHUTDOWN when QEMU will exit).
/// `attach` carries the control request to answer (server mode).
async fn follow_guest(
    origin: Origin,
    conn: ConnId,
    inputs: mpsc::UnboundedSender<Input>,
    attach: Option<(Peer, oneshot::Sender<Response>)>,
) {
    let (stream, qmp_server) = match origin {
        Origin::Client(stream) => (Ok(stream), None),
        Origin::Server(path) => (
            qmp::dial(&path).await.map_err(|e| e.to_string()),
            Some(path),
        ),
    };
    let answer = |attach: Option<(Peer, oneshot::Sender<Response>)>, response: Response| {
        if let Some((_, reply)) = attach {
            let _ = reply.send(response);
        }
    };
    let stream = match stream {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!("QMP: {e}");
            answer(attach, Response::Error(e));
            return;
        }
    };
    let (events_tx, mut events) = mpsc::channel(256);
    let (session, identity) = match QmpSession::start(stream, events_tx).await {
        Ok(started) => started,
        Err(e) => {
            tracing::warn!("QMP handshake: {e}");
            answer(attach, Response::Error(format!("QMP handshake: {e}")));
            return;
        }
    };
    if let Some((peer, _)) = &attach {
        if !peer.is_root() && peer.uid != identity.uid {
            answer(
                attach,
                Response::Error(
                    "that QEMU does not run under your uid: only root may attach it".into(),
                ),
            );
            return;
        }
    }
    let info = match session.query_info().await {
        Ok(info) => info,
        Err(e) => {
            tracing::warn!(pid = identity.pid, "QMP queries: {e}");
            answer(attach, Response::Error(format!("QMP queries: {e}")));
            return;
        }
    };
    let pid = identity.pid;
    let ports = ports_of(pid).await;
    let name = info.name.clone();
    let _ = inputs.send(Input::GuestUp(Box::new(GuestUp {
        conn,
        identity,
        info,
        ports,
        qmp_server,
    })));
    answer(
        attach,
        Response::Ok(done(format!(
            "following QEMU pid {pid}{}",
            name.map(|n| format!(" ({n})")).unwrap_or_default()
        ))),
    );

    let no_shutdown = procfs::has_arg(pid, "-no-shutdown");
    let exited = process_exit(pid);
    tokio::pin!(exited);
    let why = loop {
        tokio::select! {
            event = events.recv() => match event {
                None => break "QMP connection closed".to_string(),
                Some(QmpEvent::Closed { error }) => {
                    break match error {
                        Some(e) => format!("QMP connection closed: {e}"),
                        None => "QMP connection closed".to_string(),
                    };
                }
                Some(QmpEvent::Shutdown { guest, reason }) if !no_shutdown => {
                    break format!("SHUTDOWN (guest: {guest}, reason: {})", reason.unwrap_or_default());
                }
                Some(QmpEvent::NicRxFilterChanged { .. })
                | Some(QmpEvent::DeviceDeleted { .. })
                | Some(QmpEvent::Lagged(_)) => {
                    match session.query_nics().await {
                        Ok(nics) => {
                            let ports = ports_of(pid).await;
                            let _ = inputs.send(Input::GuestNics { conn, nics, ports });
                        }
                        Err(e) => tracing::warn!(pid, "query-rx-filter: {e}"),
                    }
                }
                Some(other) => tracing::debug!(pid, event = ?other, "QMP event"),
            },
            _ = &mut exited => break "QEMU exited".to_string(),
        }
    };
    let _ = inputs.send(Input::GuestGone { conn, why });
}

async fn ports_of(pid: u32) -> Vec<GuestPort> {
    match tokio::task::spawn_blocking(move || discover::guest_ports(pid)).await {
        Ok(Ok(ports)) => ports,
        Ok(Err(e)) => {
            tracing::warn!(pid, "finding the guest's devices: {e}");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(pid, "finding the guest's devices: {e}");
            Vec::new()
        }
    }
}

/// Resolves when process `pid` exits (pidfd); never, if it cannot be
/// watched (the QMP connection's EOF then reports the exit).
async fn process_exit(pid: u32) {
    let Ok(fd) = qnet_hostnet::reaper::pidfd_open(pid) else {
        return std::future::pending().await;
    };
    // SAFETY: the OwnedFd is moved into the AsyncFd and stays open, the
    // same descriptor, for the AsyncFd's whole life.
    match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
        // A pidfd becomes readable when the process exits.
        Ok(async_fd) => drop(async_fd.readable().await),
        Err(_) => std::future::pending().await,
    }
}

/// A guest recorded before a restart: report its exit unless it reconnects.
fn watch_stale_guest(pid: u32, inputs: mpsc::UnboundedSender<Input>) {
    tokio::spawn(async move {
        process_exit(pid).await;
        let _ = inputs.send(Input::StaleGuestExited { pid });
    });
}
