//! The external programs the daemon runs (nft, dnsmasq), found the same
//! way for all of them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where `name` is: the first match on `$PATH`, then `/usr/sbin`, `/sbin`
/// (a daemon started with a minimal `PATH`, as by a service manager,
/// still finds nft and dnsmasq). Just `name` when nothing matches, so the
/// spawn error names what is missing.
pub fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
