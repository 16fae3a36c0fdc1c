//! A real dnsmasq as the DHCP server of a test network, inside a network
//! namespace the test made.
//!
//! ```no_run
//! # use qnet_tests::dnsmasq::*;
//! # use std::net::Ipv4Addr;
//! let cfg = DnsmasqConfig::new("qnet-test-1", "qbr0",
//!         Ipv4Addr::new(10, 9, 0, 100), Ipv4Addr::new(10, 9, 0, 150), "/tmp/dnsmasq.log")
//!     .host("52:54:00:12:34:56", Ipv4Addr::new(10, 9, 0, 42), Some("guest1"));
//! let dnsmasq = Dnsmasq::start(&cfg).unwrap(); // killed when dropped
//! ```

use std::fs::{self, File};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::command_in_netns;

/// A fixed address for one MAC (`--dhcp-host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
}

/// What to start. [`DnsmasqConfig::new`] gives DHCP only (no DNS), one hour
/// leases, and dnsmasq's own defaults for the rest (it hands out its address
/// on `interface` as router).
#[derive(Debug, Clone)]
pub struct DnsmasqConfig {
    /// Network namespace (`ip netns` name) to run in.
    pub netns: String,
    /// Interface (usually a bridge) to serve DHCP on; it must exist and carry
    /// an address in the subnet of the range before [`Dnsmasq::start`].
    pub interface: String,
    /// First and last address of the dynamic range. Reserved addresses may
    /// lie outside it, as long as they are in the same subnet.
    pub range: (Ipv4Addr, Ipv4Addr),
    /// Lease time as dnsmasq writes it: `1h`, `10m`, `infinite`.
    pub lease_time: String,
    pub hosts: Vec<DhcpHost>,
    /// DNS port; 0 (the default) disables DNS.
    pub dns_port: u16,
    /// dnsmasq's log (its stderr, with every DHCP exchange).
    pub log_file: PathBuf,
    /// More options, passed as they are (e.g. `--dhcp-option=3` for no router).
    pub extra_args: Vec<String>,
}

impl DnsmasqConfig {
    pub fn new(
        netns: impl Into<String>,
        interface: impl Into<String>,
        range_start: Ipv4Addr,
        range_end: Ipv4Addr,
        log_file: impl Into<PathBuf>,
    ) -> Self {
        DnsmasqConfig {
            netns: netns.into(),
            interface: interface.into(),
            range: (range_start, range_end),
            lease_time: "1h".into(),
            hosts: Vec::new(),
            dns_port: 0,
            log_file: log_file.into(),
            extra_args: Vec::new(),
        }
    }

    /// Adds a reservation: `mac` always gets `ip` (and `hostname`).
    pub fn host(mut self, mac: impl Into<String>, ip: Ipv4Addr, hostname: Option<&str>) -> Self {
        self.hosts.push(DhcpHost {
            mac: mac.into(),
            ip,
            hostname: hostname.map(str::to_string),
        });
        self
    }

    /// dnsmasq's arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--no-daemon",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--except-interface=lo",
            "--leasefile-ro",
            "--user=root",
            "--pid-file=",      // none: the guard knows the pid
            "--log-facility=-", // stderr, which goes to log_file
            "--log-dhcp",
            // Answers a client that asks for an address this (new) server
            // never leased at once, instead of ignoring it.
            "--dhcp-authoritative",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--interface={}", self.interface));
        args.push(format!("--port={}", self.dns_port));
        args.push(format!(
            "--dhcp-range={},{},{}",
            self.range.0, self.range.1, self.lease_time
        ));
        for host in &self.hosts {
            let mut spec = format!("--dhcp-host={},{}", host.mac, host.ip);
            if let Some(name) = &host.hostname {
                spec.push(',');
                spec.push_str(name);
            }
            args.push(spec);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// A running dnsmasq; dropping it kills (SIGKILL) and reaps it.
pub struct Dnsmasq {
    child: Child,
    log_file: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq in `cfg.netns` and waits (up to 10 s) until it has
    /// bound its DHCP socket; fails with its log if it exits or never does.
    pub fn start(cfg: &DnsmasqConfig) -> Result<Self, String> {
        let log = File::create(&cfg.log_file)
            .map_err(|e| format!("create {}: {e}", cfg.log_file.display()))?;
        let mut cmd = Command::new("dnsmasq");
        cmd.args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        command_in_netns(&mut cmd, &cfg.netns)?;
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                "cannot start dnsmasq: not found (apt-get install dnsmasq-base)".to_string()
            }
            _ => format!("cannot start dnsmasq: {e}"),
        })?;
        let mut dnsmasq = Dnsmasq {
            child,
            log_file: cfg.log_file.clone(),
        };
        dnsmasq.wait_ready(Duration::from_secs(10))?;
        Ok(dnsmasq)
    }

    /// dnsmasq logs "DHCP, IP range ..." once its DHCP socket is open: that
    /// is the moment a guest may start asking.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self
                .child
                .try_wait()
                .map_err(|e| format!("waitpid dnsmasq: {e}"))?;
            let log = self.log();
            if log.lines().any(|l| l.contains("DHCP, IP range")) {
                return Ok(());
            }
            if let Some(status) = exited {
                return Err(format!("dnsmasq exited ({status}):\n{log}"));
            }
            if Instant::now() >= deadline {
                return Err(format!("dnsmasq not ready within {timeout:?}:\n{log}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_file)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many reservation files (`…/dhcp-hosts.d/MAC`) a dnsmasq log says
/// were read: one per new file it picks up through inotify, and every one
/// of them at each SIGHUP (dnsmasq logs `read PATH` for each).
pub fn reservation_reads(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" read ") && l.contains("/dhcp-hosts.d/"))
        .count()
}
