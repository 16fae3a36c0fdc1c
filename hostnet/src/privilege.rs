//! Dropping privileges in a setuid-root or file-capability helper.
//!
//! Called first thing in `main`, before argv, the environment or any file
//! is read. Afterwards the process runs as the calling user (real uid/gid)
//! holding CAP_NET_ADMIN alone, cannot regain anything through exec
//! (`no_new_privs`), and cannot be ptraced or core-dumped by that user.
//!
//! Capabilities are per thread: this must run while the process is still
//! single-threaded.

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{getresgid, getresuid, setresgid, setresuid, Gid, Uid};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("dropping privileges failed: {what}: {detail}")]
    Failed { what: &'static str, detail: String },
}

/// How the helper was started, as far as privileges go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Privileges {
    /// The kernel flagged this exec as secure (setuid/setgid or file
    /// capabilities): nothing from the environment may be trusted.
    pub secure_exec: bool,
    /// The process was setuid/setgid and has switched back to the caller.
    pub was_setuid: bool,
    /// CAP_NET_ADMIN is held (effective and permitted) after the drop.
    pub net_admin: bool,
}

/// Keeps only CAP_NET_ADMIN and returns to the real uid/gid.
///
/// Order matters: the bounding set can only be shrunk while CAP_SETPCAP is
/// effective, and capabilities survive the uid change only with
/// `PR_SET_KEEPCAPS`.
pub fn drop_to_net_admin() -> Result<Privileges, PrivilegeError> {
    drop_to_net_admin_keeping(&[])
}

/// Like [`drop_to_net_admin`], but those capabilities of `spare` that the
/// process holds stay in its *permitted* set (never in the effective one),
/// so that one short step can raise them with [`with_raised`] before
/// [`release_spare`] gives them up for good.
///
/// File access checks use the effective set only, so until a spare
/// capability is raised the process is exactly as privileged as with
/// [`drop_to_net_admin`].
pub fn drop_to_net_admin_keeping(spare: &[Capability]) -> Result<Privileges, PrivilegeError> {
    // SAFETY: getauxval has no preconditions.
    let secure_exec = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
    let uids = getresuid().map_err(|e| failed("getresuid", e))?;
    let gids = getresgid().map_err(|e| failed("getresgid", e))?;
    let was_setuid = uids.effective != uids.real || gids.effective != gids.real;

    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| failed("read caps", e))?;
    let net_admin = permitted.contains(&Capability::CAP_NET_ADMIN);

    set_no_dumpable()?;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        // With file capabilities alone (cap_net_admin+ep) there is no
        // CAP_SETPCAP and the bounding set cannot be touched; no_new_privs
        // below makes it irrelevant, as nothing can be gained by exec.
        caps::raise(None, CapSet::Effective, Capability::CAP_SETPCAP)
            .map_err(|e| failed("raise CAP_SETPCAP", e))?;
        clear_bounding_set()?;
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| failed("clear ambient set", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| failed("clear inheritable set", e))?;

    if was_setuid {
        prctl(libc::PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")?;
        // Supplementary groups are the caller's own (setuid does not
        // change them) and are kept, so group-readable ACL includes work.
        setresgid(gids.real, gids.real, gids.real).map_err(|e| failed("setresgid", e))?;
        setresuid(uids.real, uids.real, uids.real).map_err(|e| failed("setresuid", e))?;
        prctl(libc::PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")?;
    }

    let only_net_admin: CapsHashSet = if net_admin {
        [Capability::CAP_NET_ADMIN].into_iter().collect()
    } else {
        CapsHashSet::new()
    };
    let mut still_permitted = only_net_admin.clone();
    still_permitted.extend(spare.iter().filter(|cap| permitted.contains(cap)));
    caps::set(None, CapSet::Effective, &only_net_admin)
        .map_err(|e| failed("set effective set", e))?;
    caps::set(None, CapSet::Permitted, &still_permitted)
        .map_err(|e| failed("set permitted set", e))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")?;
    // Changing credentials resets the dumpable flag: set it again.
    set_no_dumpable()?;

    verify(uids.real, gids.real, &only_net_admin)?;
    verify_set(CapSet::Permitted, &still_permitted)?;
    Ok(Privileges {
        secure_exec,
        was_setuid,
        net_admin,
    })
}

/// Drops every capability the running kernel knows from the bounding set,
/// including ones newer than the `caps` crate's list.
fn clear_bounding_set() -> Result<(), PrivilegeError> {
    for cap in 0..64 {
        // SAFETY: plain prctl; EINVAL marks the end of the kernel's list.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(failed("clear bounding set", err));
        }
    }
    Ok(())
}

fn verify(uid: Uid, gid: Gid, wanted: &CapsHashSet) -> Result<(), PrivilegeError> {
    let uids = getresuid().map_err(|e| failed("getresuid", e))?;
    let gids = getresgid().map_err(|e| failed("getresgid", e))?;
    if [uids.real, uids.effective, uids.saved] != [uid; 3]
        || [gids.real, gids.effective, gids.saved] != [gid; 3]
    {
        return Err(failed("verify", "uid/gid still differ from the caller's"));
    }
    // The ambient set needs no check: it was cleared above, and the kernel
    // keeps it a subset of permitted ∩ inheritable, which is now empty.
    // The permitted set is checked by the caller (it may hold spares).
    verify_set(CapSet::Effective, wanted)
}

/// Fails if `set` holds anything beyond `wanted`.
fn verify_set(set: CapSet, wanted: &CapsHashSet) -> Result<(), PrivilegeError> {
    let held = caps::read(None, set).map_err(|e| failed("verify caps", e))?;
    let extra: Vec<_> = held.difference(wanted).collect();
    if !extra.is_empty() {
        return Err(failed(
            "verify",
            format!("{set:?} set still holds {extra:?}"),
        ));
    }
    Ok(())
}

/// Whether `cap` is in the permitted set (so [`with_raised`] can raise it).
pub fn holds(cap: Capability) -> bool {
    caps::has_cap(None, CapSet::Permitted, cap).unwrap_or(false)
}

/// Runs `f` with those of `wanted` that are permitted raised in the
/// effective set, and lowers them again afterwards (also when `f` fails).
/// Capabilities that are not permitted are skipped: `f` then runs with
/// less and fails with the kernel's EPERM/EACCES, which callers explain.
pub fn with_raised<T>(wanted: &[Capability], f: impl FnOnce() -> T) -> Result<T, PrivilegeError> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| failed("read caps", e))?;
    let effective = caps::read(None, CapSet::Effective).map_err(|e| failed("read caps", e))?;
    let raised: Vec<Capability> = wanted
        .iter()
        .copied()
        .filter(|cap| permitted.contains(cap) && !effective.contains(cap))
        .collect();
    for &cap in &raised {
        caps::raise(None, CapSet::Effective, cap).map_err(|e| failed("raise capability", e))?;
    }
    let result = f();
    caps::set(None, CapSet::Effective, &effective)
        .map_err(|e| failed("lower raised capabilities", e))?;
    Ok(result)
}

/// Gives up every spare capability kept by [`drop_to_net_admin_keeping`]
/// for good: afterwards the process holds CAP_NET_ADMIN (if it did) and
/// nothing else, in both the effective and the permitted set.
pub fn release_spare() -> Result<(), PrivilegeError> {
    let only_net_admin: CapsHashSet = if holds(Capability::CAP_NET_ADMIN) {
        [Capability::CAP_NET_ADMIN].into_iter().collect()
    } else {
        CapsHashSet::new()
    };
    caps::set(None, CapSet::Effective, &only_net_admin)
        .map_err(|e| failed("set effective set", e))?;
    caps::set(None, CapSet::Permitted, &only_net_admin)
        .map_err(|e| failed("set permitted set", e))?;
    verify_set(CapSet::Effective, &only_net_admin)?;
    verify_set(CapSet::Permitted, &only_net_admin)
}

fn set_no_dumpable() -> Result<(), PrivilegeError> {
    prctl(libc::PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")
}

fn prctl(
    option: libc::c_int,
    value: libc::c_ulong,
    what: &'static str,
) -> Result<(), PrivilegeError> {
    // SAFETY: the options used here take one integer argument.
    if unsafe { libc::prctl(option, value, 0, 0, 0) } < 0 {
        return Err(failed(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn failed(what: &'static str, detail: impl std::fmt::Display) -> PrivilegeError {
    PrivilegeError::Failed {
        what,
        detail: detail.to_string(),
    }
}

/// The credential lines of `/proc/self/status` (Uid, Gid, Groups, Cap*,
/// NoNewPrivs) on one line, for `--debug`: what the kernel says we hold,
/// not what we think we asked for.
pub fn describe_credentials() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|line| {
            ["Uid:", "Gid:", "Groups:", "Cap", "NoNewPrivs:"]
                .iter()
                .any(|prefix| line.starts_with(prefix))
        })
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("; ")
}
