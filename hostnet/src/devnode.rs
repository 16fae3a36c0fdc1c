//! Opening the character device of a macvtap (`/dev/tap<ifindex>`) without
//! ever opening somebody else's.
//!
//! Ifindexes are per network namespace, but devtmpfs is global: a macvtap
//! with ifindex 5 in one namespace and another with ifindex 5 in a second
//! namespace both want `/dev/tap5`. Whoever comes first gets the node, the
//! other gets none (devtmpfs does not replace an existing node). So the node
//! may be missing, late (a static `/dev` with udev), or belong to a
//! different device. Hence:
//!
//! 1. The device number of *our* macvtap is read from sysfs
//!    (`/sys/class/net/<name>/macvtap/tap<ifindex>/dev`), after checking
//!    that sysfs shows our device (same ifindex): sysfs shows the network
//!    namespace it was mounted in, which must be the helper's.
//! 2. `/dev/tap<ifindex>` is looked at (`lstat`) and opened only if it is a
//!    character device with exactly that device number; the open uses
//!    `O_NOFOLLOW` (and `O_NONBLOCK`, so a FIFO cannot block us) and is
//!    kept only if `fstat` agrees. A missing node is retried briefly; a
//!    node whose device vanished under the open (`ENODEV`: another
//!    namespace's macvtap being deleted) counts as somebody else's.
//! 3. Otherwise a private node is made: `mknod` in a fresh directory
//!    (`mkdtemp` semantics) inside [`PRIVATE_BASE`], which is root-owned
//!    and mode 0700, so the caller can never reach the node; it is opened,
//!    checked the same way, and unlinked together with its directory
//!    before anything else happens. It lives under `/dev` because `/run`
//!    is usually mounted `nodev`, where a device node cannot be opened.
//!
//! Opening a root-only node as the calling user needs CAP_DAC_OVERRIDE,
//! and step 3 also CAP_MKNOD and CAP_CHOWN: the caller keeps them as spare
//! capabilities ([`crate::privilege::drop_to_net_admin_keeping`]); they
//! are raised only around these system calls.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use caps::Capability;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use thiserror::Error;

use crate::privilege::{self, PrivilegeError};

/// Root-owned 0700 directory holding the private nodes of step 3 (only
/// while the helper opens them).
pub const PRIVATE_BASE: &str = "/dev/qnet-macvtap";

/// How long a missing `/dev/tap<ifindex>` is waited for: devtmpfs creates
/// nodes synchronously, so this only matters for a udev-managed static
/// `/dev`.
const NODE_WAIT: Duration = Duration::from_millis(500);
const NODE_POLL: Duration = Duration::from_millis(5);

/// Capabilities raised to open a root-only device node as the caller.
pub const OPEN_CAPS: [Capability; 1] = [Capability::CAP_DAC_OVERRIDE];
/// Capabilities raised to make, open and remove a private node.
pub const PRIVATE_NODE_CAPS: [Capability; 3] = [
    Capability::CAP_MKNOD,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_CHOWN,
];

#[derive(Debug, Error)]
pub enum DevNodeError {
    #[error(
        "cannot read {}: {source}: /sys must be the sysfs of the helper's network namespace \
         (`ip netns exec NS qemu ...` mounts one)", path.display()
    )]
    Sysfs { path: PathBuf, source: io::Error },
    #[error(
        "/sys/class/net/{name} is another device (ifindex {found}, ours is {expected}): /sys \
         belongs to another network namespace; run QEMU with `ip netns exec`, which mounts the \
         namespace's own sysfs"
    )]
    SysfsMismatch {
        name: String,
        found: String,
        expected: u32,
    },
    #[error("cannot open {}: {source}{hint}", path.display())]
    Open {
        path: PathBuf,
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "/dev/tap{index} {why}, and making a private node needs CAP_MKNOD, CAP_DAC_OVERRIDE and \
         CAP_CHOWN: install the helper setuid root (chmod 4755) or with \
         `setcap cap_net_admin,cap_dac_override,cap_mknod,cap_chown+ep`"
    )]
    CannotMakePrivateNode { index: u32, why: &'static str },
    #[error("{PRIVATE_BASE} is not a root-owned directory of mode 0700 (remove it, the helper recreates it)")]
    UnsafeBase,
    #[error("making a private device node in {PRIVATE_BASE}: {what}: {source}")]
    PrivateNode { what: &'static str, source: Errno },
    #[error("{} is not the character device of our macvtap (expected {expected}, found {found})", path.display())]
    WrongDevice {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(transparent)]
    Privilege(#[from] PrivilegeError),
}

/// Where the open descriptor came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeSource {
    /// `/dev/tap<ifindex>`, made by devtmpfs or udev.
    Dev,
    /// A private node made (and already removed) by [`open_macvtap_node`].
    Private,
}

/// The device number of macvtap `name` (ifindex `index`), from sysfs.
pub fn macvtap_devt(name: &str, index: u32) -> Result<libc::dev_t, DevNodeError> {
    let dir = Path::new("/sys/class/net").join(name);
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|source| DevNodeError::Sysfs { path, source })
    };
    let found = read(dir.join("ifindex"))?;
    if found.trim() != index.to_string() {
        return Err(DevNodeError::SysfsMismatch {
            name: name.to_string(),
            found: found.trim().to_string(),
            expected: index,
        });
    }
    let dev_path = dir.join(format!("macvtap/tap{index}/dev"));
    let text = read(dev_path.clone())?;
    parse_devt(&text).ok_or_else(|| DevNodeError::Sysfs {
        path: dev_path,
        source: io::Error::new(io::ErrorKind::InvalidData, format!("bad content {text:?}")),
    })
}

/// `MAJOR:MINOR\n` as sysfs writes it.
fn parse_devt(text: &str) -> Option<libc::dev_t> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
}

fn show_devt(devt: libc::dev_t) -> String {
    format!("{}:{}", libc::major(devt), libc::minor(devt))
}

/// Major number of a character device driver, from `/proc/devices`
/// (global, not namespaced).
pub fn char_major(driver: &str) -> Option<u32> {
    let devices = std::fs::read_to_string("/proc/devices").ok()?;
    devices
        .lines()
        .skip_while(|line| !line.starts_with("Character devices"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .find_map(|line| {
            let (major, name) = line.trim().split_once(' ')?;
            (name.trim() == driver).then(|| major.parse().ok())?
        })
}

/// Opens the character device of macvtap `name` (ifindex `index`) for
/// reading and writing, as described in the module documentation.
pub fn open_macvtap_node(name: &str, index: u32) -> Result<(File, NodeSource), DevNodeError> {
    let devt = macvtap_devt(name, index)?;
    let path = PathBuf::from(format!("/dev/tap{index}"));
    let deadline = Instant::now() + NODE_WAIT;
    let why = loop {
        let attempt = privilege::with_raised(&OPEN_CAPS, || open_checked(None, &path, devt))?;
        match attempt {
            Ok(file) => return Ok((file, NodeSource::Dev)),
            Err(Attempt::Wrong { found }) => {
                tracing::debug!(node = %path.display(), found, "not our device");
                break "belongs to another device (a macvtap with the same ifindex in another network namespace)";
            }
            Err(Attempt::Failed(Errno::ENOENT)) if Instant::now() < deadline => {
                thread::sleep(NODE_POLL)
            }
            Err(Attempt::Failed(Errno::ENOENT)) => break "did not appear",
            Err(Attempt::Failed(errno)) => {
                return Err(DevNodeError::Open {
                    hint: open_hint(errno),
                    path,
                    source: errno.into(),
                })
            }
        }
    };
    tracing::debug!(node = %path.display(), why, "making a private node");
    if !PRIVATE_NODE_CAPS.iter().all(|&cap| privilege::holds(cap)) {
        return Err(DevNodeError::CannotMakePrivateNode { index, why });
    }
    let file = privilege::with_raised(&PRIVATE_NODE_CAPS, || open_private_node(index, devt))??;
    Ok((file, NodeSource::Private))
}

fn open_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EACCES | Errno::EPERM => {
            " (the node is root-only: install the helper setuid root (chmod 4755) or with \
             `setcap cap_net_admin,cap_dac_override,cap_mknod,cap_chown+ep`)"
        }
        _ => "",
    }
}

enum Attempt {
    /// Open failed with this errno.
    Failed(Errno),
    /// Opened something that is not our device (closed again).
    Wrong { found: String },
}

/// Opens `path` (relative to `dir` if given) without following a symlink
/// or blocking, and keeps it only if it is the character device `devt`.
fn open_checked(dir: Option<&OwnedFd>, path: &Path, devt: libc::dev_t) -> Result<File, Attempt> {
    // Look before opening: a node of another namespace's macvtap is never
    // opened at all (opening a tap queue is not free of side effects).
    // The fstat below still decides; this only spares the open.
    let looked = match dir {
        Some(dir) => nix::sys::stat::fstatat(dir, path, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW),
        None => nix::sys::stat::lstat(path),
    };
    match looked {
        Ok(stat) => check_node(&stat, devt)?,
        Err(errno) => return Err(Attempt::Failed(errno)),
    }
    let flags =
        OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let opened = match dir {
        Some(dir) => nix::fcntl::openat(dir, path, flags, Mode::empty()),
        None => nix::fcntl::open(path, flags, Mode::empty()),
    };
    let fd = match opened {
        Ok(fd) => fd,
        // O_NOFOLLOW on a symlink.
        Err(Errno::ELOOP) => {
            return Err(Attempt::Wrong {
                found: "a symlink".into(),
            })
        }
        // The node was replaced between the look and the open by one
        // whose device is gone: a stale node of another namespace's
        // macvtap that devtmpfs is about to remove. Ours exists while we
        // hold it, so this node is not ours.
        Err(Errno::ENODEV | Errno::ENXIO) => {
            return Err(Attempt::Wrong {
                found: "a node of a device that no longer exists".into(),
            })
        }
        Err(errno) => return Err(Attempt::Failed(errno)),
    };
    let stat = fstat(&fd).map_err(Attempt::Failed)?;
    check_node(&stat, devt)?;
    // Blocking I/O, like a node opened by libvirt; QEMU sets O_NONBLOCK
    // itself where it wants it.
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::empty())).map_err(Attempt::Failed)?;
    Ok(File::from(fd))
}

/// Accepts only the character device `devt`.
fn check_node(stat: &libc::stat, devt: libc::dev_t) -> Result<(), Attempt> {
    let is_char = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR;
    if is_char && stat.st_rdev == devt {
        return Ok(());
    }
    let found = if is_char {
        format!("character device {}", show_devt(stat.st_rdev))
    } else {
        format!("file of mode {:o}", stat.st_mode)
    };
    Err(Attempt::Wrong { found })
}

/// Step 3 of the module documentation; runs with [`PRIVATE_NODE_CAPS`]
/// raised.
fn open_private_node(index: u32, devt: libc::dev_t) -> Result<File, DevNodeError> {
    // The caller's umask must not loosen (or break) the modes below.
    nix::sys::stat::umask(Mode::from_bits_truncate(0o077));
    let base = open_private_base()?;
    let dir_name = make_private_dir(&base, index)?;
    let dir = DirGuard {
        base: &base,
        name: &dir_name,
    };
    let dir_fd = nix::fcntl::openat(
        &base,
        dir_name.as_c_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| DevNodeError::PrivateNode {
        what: "open the private directory",
        source,
    })?;
    nix::sys::stat::mknodat(
        &dir_fd,
        "tap",
        SFlag::S_IFCHR,
        Mode::S_IRUSR | Mode::S_IWUSR,
        devt,
    )
    .map_err(|source| DevNodeError::PrivateNode {
        what: "mknod",
        source,
    })?;
    chown_to_root(&dir_fd, c"tap")?;
    let opened = open_checked(Some(&dir_fd), Path::new("tap"), devt);
    let unlinked = nix::unistd::unlinkat(&dir_fd, "tap", nix::unistd::UnlinkatFlags::NoRemoveDir);
    drop(dir);
    unlinked.map_err(|source| DevNodeError::PrivateNode {
        what: "unlink the node",
        source,
    })?;
    let path = PathBuf::from(PRIVATE_BASE).join(dir_name.to_string_lossy().as_ref());
    match opened {
        Ok(file) => Ok(file),
        Err(Attempt::Failed(errno)) => Err(DevNodeError::Open {
            path: path.join("tap"),
            source: errno.into(),
            hint: "",
        }),
        Err(Attempt::Wrong { found }) => Err(DevNodeError::WrongDevice {
            path: path.join("tap"),
            expected: show_devt(devt),
            found,
        }),
    }
}

/// Opens [`PRIVATE_BASE`], creating it if needed, and checks that it is a
/// root-owned directory nobody else can enter.
fn open_private_base() -> Result<OwnedFd, DevNodeError> {
    open_private_base_at(Path::new(PRIVATE_BASE))
}

/// [`open_private_base`] for any path (tests use their own).
///
/// An existing directory is used only if it already is root:root 0700: it
/// is never chowned, so a directory someone else made (or a helper killed
/// half-way left) can never be adopted with whatever was put in it. A new
/// one is made under a random temporary name next to it (as the caller,
/// in a setuid helper), handed to root there, and only then renamed into
/// place with `RENAME_NOREPLACE`: `path` never names a directory that is
/// not root's. A helper killed before the rename leaves at most an empty
/// temporary directory, which nothing ever uses.
pub fn open_private_base_at(path: &Path) -> Result<OwnedFd, DevNodeError> {
    let fail = |what| move |source| DevNodeError::PrivateNode { what, source };
    match open_dir(path) {
        Ok(base) => return check_root_only(base),
        Err(Errno::ENOENT) => {}
        Err(errno) => return Err(fail("open")(errno)),
    }
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => (parent, name.to_string_lossy()),
        _ => return Err(fail("mkdir")(Errno::EINVAL)),
    };
    let temp = parent.join(format!(".{name}-{:016x}", random_u64()));
    nix::unistd::mkdir(&temp, Mode::S_IRWXU).map_err(fail("mkdir"))?;
    let made = open_dir(&temp).map_err(fail("open")).and_then(|dir| {
        nix::unistd::fchown(
            &dir,
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(0)),
        )
        .map_err(fail("chown"))?;
        nix::sys::stat::fchmod(&dir, Mode::S_IRWXU).map_err(fail("chmod"))?;
        rename_noreplace(&temp, path).map_err(fail("rename"))
    });
    match made {
        Ok(()) => {}
        // Another helper made it meanwhile: use theirs (if it is root's).
        Err(DevNodeError::PrivateNode {
            source: Errno::EEXIST,
            ..
        }) => {
            let _ = nix::unistd::unlinkat(
                nix::fcntl::AT_FDCWD,
                &temp,
                nix::unistd::UnlinkatFlags::RemoveDir,
            );
        }
        Err(err) => {
            let _ = nix::unistd::unlinkat(
                nix::fcntl::AT_FDCWD,
                &temp,
                nix::unistd::UnlinkatFlags::RemoveDir,
            );
            return Err(err);
        }
    }
    check_root_only(open_dir(path).map_err(fail("open"))?)
}

fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Keeps `dir` only if it is a root:root directory of mode 0700.
fn check_root_only(dir: OwnedFd) -> Result<OwnedFd, DevNodeError> {
    let stat = fstat(&dir).map_err(|source| DevNodeError::PrivateNode {
        what: "stat",
        source,
    })?;
    let is_dir = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    if !is_dir || stat.st_uid != 0 || stat.st_gid != 0 || stat.st_mode & 0o7777 != 0o700 {
        return Err(DevNodeError::UnsafeBase);
    }
    Ok(dir)
}

/// `renameat2(RENAME_NOREPLACE)`: fails with `EEXIST` instead of
/// replacing (an empty directory could otherwise be replaced).
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), Errno> {
    let from = CString::new(from.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    let to = CString::new(to.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: two NUL-terminated paths relative to the working directory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Creates a fresh `tap<index>-<random>` directory (mode 0700) in `base`,
/// never reusing an existing one.
fn make_private_dir(base: &OwnedFd, index: u32) -> Result<CString, DevNodeError> {
    for _ in 0..16 {
        let name = CString::new(format!("tap{index}-{:016x}", random_u64()))
            .expect("no NUL in a formatted name");
        match nix::sys::stat::mkdirat(base, name.as_c_str(), Mode::S_IRWXU) {
            Ok(()) => {
                // Made as the caller in a setuid helper: root's at once, so
                // nothing the caller owns is ever left inside the base.
                chown_to_root(base, name.as_c_str())?;
                return Ok(name);
            }
            Err(Errno::EEXIST) => continue,
            Err(source) => {
                return Err(DevNodeError::PrivateNode {
                    what: "mkdir the private directory",
                    source,
                })
            }
        }
    }
    Err(DevNodeError::PrivateNode {
        what: "mkdir the private directory",
        source: Errno::EEXIST,
    })
}

/// Hands `name` in `dir` to root:root (without following a symlink).
fn chown_to_root(dir: &OwnedFd, name: &std::ffi::CStr) -> Result<(), DevNodeError> {
    nix::unistd::fchownat(
        dir,
        name,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(0)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|source| DevNodeError::PrivateNode {
        what: "chown",
        source,
    })
}

/// Removes the private directory (by then empty) on every path out.
struct DirGuard<'a> {
    base: &'a OwnedFd,
    name: &'a CString,
}

impl Drop for DirGuard<'_> {
    fn drop(&mut self) {
        // A leftover "tap" node is removed first in case an error came
        // between mknod and its unlink.
        if let Ok(dir) = nix::fcntl::openat(
            self.base,
            self.name.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            let _ = nix::unistd::unlinkat(&dir, "tap", nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
        if let Err(errno) = nix::unistd::unlinkat(
            self.base,
            self.name.as_c_str(),
            nix::unistd::UnlinkatFlags::RemoveDir,
        ) {
            tracing::debug!(%errno, "removing the private directory failed");
        }
    }
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // Uniqueness, not secrecy, is what matters (mkdirat refuses an
        // existing name); fall back to time and pid.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return nanos ^ u64::from(std::process::id()) << 32;
    }
    u64::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory owned by someone else (what a helper killed between
    /// mkdir and chown used to leave) is refused, not adopted: its owner
    /// and contents stay as they are.
    #[test]
    fn a_base_not_owned_by_root_is_never_adopted() {
        let parent = std::env::temp_dir().join(format!("qnet-devnode-{}", random_u64()));
        std::fs::create_dir(&parent).unwrap();
        let squatted = parent.join("squatted");
        std::fs::create_dir(&squatted).unwrap();
        std::fs::write(squatted.join("planted"), "x").unwrap();
        std::os::unix::fs::chown(&squatted, Some(4242), Some(4242)).unwrap();
        std::fs::set_permissions(
            &squatted,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let outcome = open_private_base_at(&squatted);
        let meta = std::fs::metadata(&squatted).unwrap();
        let owner = std::os::unix::fs::MetadataExt::uid(&meta);
        // A fresh base is made root:root 0700, with no temporary left.
        let fresh = parent.join("fresh");
        let made = open_private_base_at(&fresh).map(drop);
        let fresh_meta = std::fs::metadata(&fresh);
        let leftovers: Vec<_> = std::fs::read_dir(&parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        std::fs::remove_dir_all(&parent).unwrap();
        assert!(
            matches!(outcome, Err(DevNodeError::UnsafeBase)),
            "{outcome:?}"
        );
        assert_eq!(owner, 4242, "the squatted directory was chowned");
        made.unwrap();
        let fresh_meta = fresh_meta.unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((fresh_meta.uid(), fresh_meta.gid()), (0, 0));
        assert_eq!(fresh_meta.mode() & 0o7777, 0o700);
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }

    #[test]
    fn proc_devices_has_misc() {
        // misc (10) is built into every kernel; macvtap may not be.
        assert_eq!(char_major("misc"), Some(10));
        assert_eq!(char_major("no-such-driver"), None);
    }

    #[test]
    fn sysfs_dev_numbers_parse() {
        assert_eq!(parse_devt("246:1\n"), Some(libc::makedev(246, 1)));
        assert_eq!(show_devt(libc::makedev(246, 1)), "246:1");
        for bad in ["", "246", "x:1", "246:", "1:2:3"] {
            assert_eq!(parse_devt(bad), None, "{bad:?}");
        }
    }
}
