//! Where the daemon keeps things: a module of its own, since the daemon
//! (which makes them from its flags) and the reconciler (which works in
//! them) both need it, and the reconciler must not depend on the daemon.

use std::path::PathBuf;

/// Where the daemon keeps things; every path can be moved by a flag.
#[derive(Debug, Clone)]
pub struct Paths {
    pub config: PathBuf,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub ctl_socket: PathBuf,
    pub qmp_socket: PathBuf,
}
