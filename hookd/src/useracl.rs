//! The bridge helper's ACL for users' own networks, so a user's QEMU can
//! attach to their bridge through `qnet-bridge-helper` without root
//! editing bridge.conf for every network. The admin adds one line, once,
//! to /etc/qemu/bridge.conf:
//!
//! ```text
//! include /run/qnet/users/bridge.conf
//! ```
//!
//! That file (root 0644) includes one file per user who owns networks,
//! `users/UID.conf`, holding `allow BRIDGE` for each of their bridges,
//! root:GROUP 0640 where GROUP is the user's private primary group. The
//! helper reads includes as its caller and skips those it may not read,
//! so each user's helper sees only their own bridges. A user whose
//! primary group is shared gets no file (the others in the group would
//! read it); the reply to `network create` says so.
//!
//! Rendering is pure ([`render`]); [`write`] puts it on disk.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};
use thiserror::Error;

use crate::fsutil;

/// The file the admin includes, in `dir`.
pub const TOP_FILE: &str = "bridge.conf";

/// What goes into the users' ACL directory: the top file and one file
/// per user, each with its text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AclFiles {
    pub top: String,
    pub per_user: BTreeMap<u32, String>,
}

/// The ACL files for `bridges` (owner uid, bridge) in `dir`.
pub fn render(dir: &Path, bridges: &[(u32, String)]) -> AclFiles {
    let mut per_user: BTreeMap<u32, String> = BTreeMap::new();
    for (uid, bridge) in bridges {
        per_user
            .entry(*uid)
            .or_insert_with(|| {
                "# Written by qnet-hookd: the bridges of this user's networks.\n".into()
            })
            .push_str(&format!("allow {bridge}\n"));
    }
    let mut top = String::from(
        "# Written by qnet-hookd: include this file from /etc/qemu/bridge.conf.\n\
         # Each user reads only their own file (root:GROUP 0640).\n",
    );
    for uid in per_user.keys() {
        top.push_str(&format!("include {}\n", user_file(dir, *uid).display()));
    }
    AclFiles { top, per_user }
}

fn user_file(dir: &Path, uid: u32) -> PathBuf {
    dir.join(format!("{uid}.conf"))
}

/// Writes `files` into `dir` and removes the files of users who own no
/// network any more. Returns the users whose file could not be written
/// for them alone, with why (one line each).
pub fn write(dir: &Path, files: &AclFiles) -> io::Result<Vec<(u32, String)>> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let mut refused = Vec::new();
    for (uid, text) in &files.per_user {
        let path = user_file(dir, *uid);
        match private_group(*uid) {
            Ok(gid) => {
                // Root's only until the group is set: never readable by
                // anyone else in between.
                fsutil::write_atomic(&path, text.as_bytes(), 0o600)?;
                nix::unistd::chown(&path, Some(Uid::from_raw(0)), Some(Gid::from_raw(gid)))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640))?;
            }
            Err(why) => {
                fsutil::remove_durably(&path)?;
                refused.push((*uid, why.to_string()));
            }
        }
    }
    fsutil::write_atomic(&dir.join(TOP_FILE), files.top.as_bytes(), 0o644)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let uid = name
            .strip_suffix(".conf")
            .and_then(|u| u.parse::<u32>().ok());
        if uid.is_some_and(|uid| !files.per_user.contains_key(&uid)) {
            fsutil::remove_durably(&entry.path())?;
        }
    }
    Ok(refused)
}

/// The primary group of `uid` if no one else is in it (the usual "user
/// private group"), so a file of that group is the user's alone. A uid
/// without a passwd entry counts as having the group of its own number,
/// which then must not exist or be empty.
pub fn private_group(uid: u32) -> Result<u32, NotPrivate> {
    let user = User::from_uid(Uid::from_raw(uid)).map_err(|source| NotPrivate::Lookup {
        what: "uid",
        id: uid,
        source,
    })?;
    let gid = user.as_ref().map_or(uid, |u| u.gid.as_raw());
    let name = user.as_ref().map(|u| u.name.clone());
    let group = Group::from_gid(Gid::from_raw(gid)).map_err(|source| NotPrivate::Lookup {
        what: "gid",
        id: gid,
        source,
    })?;
    if let Some(group) = group {
        if let Some(other) = group.mem.iter().find(|m| Some(*m) != name.as_ref()) {
            return Err(NotPrivate::Member {
                group: group.name,
                uid,
                other: other.clone(),
            });
        }
    }
    if let Some(other) = other_user_with_group(uid, gid) {
        return Err(NotPrivate::Primary { gid, uid, other });
    }
    Ok(gid)
}

/// Why a user's primary group is not theirs alone (or cannot be told).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NotPrivate {
    #[error("looking up {what} {id}: {source}")]
    Lookup {
        what: &'static str,
        id: u32,
        source: nix::Error,
    },
    #[error("the primary group `{group}` of uid {uid} also holds `{other}`")]
    Member {
        group: String,
        uid: u32,
        other: String,
    },
    #[error("gid {gid}, the primary group of uid {uid}, is also the primary group of `{other}`")]
    Primary { gid: u32, uid: u32, other: String },
}

/// Whether user `uid` is a member of group `group` (primary or
/// supplementary, per the group database); `None` if there is no such
/// group, so nobody's membership can be told. A uid without a passwd
/// entry (a removed user) is no member.
pub fn is_member(uid: u32, group: &str) -> Option<bool> {
    let group = Group::from_name(group).ok().flatten()?;
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Some(false);
    };
    Some(user.gid == group.gid || group.mem.contains(&user.name))
}

/// Another passwd entry whose primary group is `gid`.
fn other_user_with_group(uid: u32, gid: u32) -> Option<String> {
    let mut found = None;
    // libc's, since nix reads one entry by uid or name but cannot walk
    // them all. SAFETY: getpwent's static buffer is read before the next
    // call; the daemon calls the *pwent family from this one function
    // only, on the reconciler's task.
    unsafe {
        libc::setpwent();
        loop {
            let entry = libc::getpwent();
            if entry.is_null() {
                break;
            }
            if (*entry).pw_gid == gid && (*entry).pw_uid != uid {
                found = Some(
                    std::ffi::CStr::from_ptr((*entry).pw_name)
                        .to_string_lossy()
                        .into_owned(),
                );
                break;
            }
        }
        libc::endpwent();
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_gets_a_file_of_their_bridges_and_the_top_file_includes_them() {
        let dir = Path::new("/run/qnet/users");
        let files = render(
            dir,
            &[
                (1000, "qua".into()),
                (1001, "qub".into()),
                (1000, "quc".into()),
            ],
        );
        assert_eq!(files.per_user.len(), 2);
        assert!(files.per_user[&1000].ends_with("allow qua\nallow quc\n"));
        assert!(files.per_user[&1001].ends_with("allow qub\n"));
        assert!(files
            .top
            .ends_with("include /run/qnet/users/1000.conf\ninclude /run/qnet/users/1001.conf\n"));
        assert_eq!(render(dir, &[]).per_user.len(), 0);
    }

    #[test]
    fn a_uid_without_entries_has_a_private_group() {
        // No passwd entry, no group of its number: nobody else can be in it.
        assert_eq!(private_group(0x7fff_fff0), Ok(0x7fff_fff0));
    }

    #[test]
    fn files_are_written_and_stale_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let uid = 0x7fff_fff1;
        write(dir.path(), &render(dir.path(), &[(uid, "qux".into())])).unwrap();
        let file = dir.path().join(format!("{uid}.conf"));
        let meta = std::fs::metadata(&file).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o777),
            (0, uid, 0o640)
        );
        write(dir.path(), &render(dir.path(), &[])).unwrap();
        assert!(!file.exists());
        assert!(dir.path().join(TOP_FILE).exists());
    }
}
