//! Running a program the way a test needs it: inside a test network
//! namespace, in a private mount namespace whose `/etc/qemu` is a per-test
//! directory (so the host's `/etc/qemu` is never read or touched), and
//! optionally as an unprivileged user.
//!
//! `/etc/qemu` may not exist on the host, so the child first lays an
//! overlay over `/etc` (the host's files stay untouched below it; the
//! overlay's upper layer is a throwaway directory holding an empty `qemu/`
//! mount point) and then bind-mounts the test's config directory there.
//! It also mounts a fresh sysfs on `/sys`, so that `/sys/class/net` shows
//! the test's namespace (as `ip netns exec` does).

use std::ffi::CString;
use std::fs;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use crate::netns::NetNs;

/// The config directory mounted over `/etc/qemu`.
pub struct ConfigDir {
    root: tempfile::TempDir,
}

impl ConfigDir {
    pub fn new() -> ConfigDir {
        let root = tempfile::Builder::new()
            .prefix("qnet-test-etc-")
            .tempdir()
            .expect("tempdir");
        fs::create_dir(root.path().join("config")).unwrap();
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(
            root.path().join("config"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        make_world_usable_tun(&root.path().join("tun"));
        ConfigDir { root }
    }

    /// The directory that appears as `/etc/qemu` in the sandbox.
    pub fn path(&self) -> PathBuf {
        self.root.path().join("config")
    }

    /// Writes `/etc/qemu/<name>` (root:root 0644).
    pub fn write(&self, name: &str, text: &str) -> &Self {
        self.write_owned(name, text, 0, 0, 0o644)
    }

    /// Writes `/etc/qemu/<name>` with the given owner and mode.
    pub fn write_owned(&self, name: &str, text: &str, uid: u32, gid: u32, mode: u32) -> &Self {
        let path = self.path().join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, text).unwrap();
        chown(&path, Some(uid), Some(gid)).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    /// Creates a fresh overlay upper/work pair for one child: overlayfs
    /// refuses to share a work directory between mounts.
    fn overlay_layers(&self) -> (PathBuf, PathBuf) {
        let base = tempfile::Builder::new()
            .prefix("overlay-")
            .tempdir_in(self.root.path())
            .expect("tempdir")
            .keep();
        let upper = base.join("upper");
        let work = base.join("work");
        fs::create_dir_all(upper.join("qemu")).unwrap();
        fs::create_dir_all(&work).unwrap();
        (upper, work)
    }
}

impl Default for ConfigDir {
    fn default() -> Self {
        Self::new()
    }
}

/// Distributions make `/dev/net/tun` mode 0666 (a udev rule); a machine
/// without udev may have 0600, which no unprivileged helper can open. The
/// sandbox mounts a private 0666 node of the same device over it instead of
/// changing the host's node.
fn make_world_usable_tun(path: &Path) {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(10, 200),
    )
    .expect("mknod tun");
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).unwrap();
}

/// Who the sandboxed program runs as.
#[derive(Clone, Copy, Debug)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Everything a process needs to enter the sandbox, prepared up front so
/// that entering makes system calls only (safe between fork and exec).
struct Entry {
    netns_path: CString,
    overlay_opts: CString,
    config_path: CString,
    tun_path: CString,
    run_as: Option<RunAs>,
}

impl Entry {
    fn new(netns: &NetNs, config: &ConfigDir, run_as: Option<RunAs>) -> Entry {
        let (upper, work) = config.overlay_layers();
        let c_path =
            |path: PathBuf| CString::new(path.into_os_string().into_encoded_bytes()).unwrap();
        Entry {
            netns_path: CString::new(netns.path()).unwrap(),
            overlay_opts: CString::new(format!(
                "lowerdir=/etc,upperdir={},workdir={}",
                upper.display(),
                work.display()
            ))
            .unwrap(),
            config_path: c_path(config.path()),
            tun_path: c_path(config.root.path().join("tun")),
            run_as,
        }
    }

    /// Joins the network namespace, makes a private mount namespace with the
    /// test's `/etc/qemu`, `/dev/net/tun` and a sysfs of the namespace, then
    /// drops to `run_as`.
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY: open(2) of a NUL-terminated path; the fd is owned below.
        let raw = unsafe { libc::open(self.netns_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` was just opened and is owned by nothing else.
        let ns = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        setns(ns, CloneFlags::CLONE_NEWNET)?;
        unshare(CloneFlags::CLONE_NEWNS)?;
        let none = None::<&str>;
        mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)?;
        mount(
            Some("overlay"),
            "/etc",
            Some("overlay"),
            MsFlags::empty(),
            Some(self.overlay_opts.as_c_str()),
        )?;
        mount(
            Some(self.config_path.as_c_str()),
            "/etc/qemu",
            none,
            MsFlags::MS_BIND,
            none,
        )?;
        mount(
            Some(self.tun_path.as_c_str()),
            "/dev/net/tun",
            none,
            MsFlags::MS_BIND,
            none,
        )?;
        // sysfs shows the network namespace of whoever mounted it: a fresh
        // one makes /sys/class/net this namespace's, as `ip netns exec`
        // does (the macvtap helper reads its device number there).
        mount(
            Some("sysfs"),
            "/sys",
            Some("sysfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            none,
        )?;
        if let Some(user) = self.run_as {
            let gid = Gid::from_raw(user.gid);
            let uid = Uid::from_raw(user.uid);
            setgroups(&[gid])?;
            setresgid(gid, gid, gid)?;
            setresuid(uid, uid, uid)?;
        }
        Ok(())
    }
}

/// Builds a `Command` for `program` that runs inside `netns` with
/// `config` as `/etc/qemu`, as `run_as` when given (root otherwise).
pub fn sandboxed(
    program: impl AsRef<Path>,
    netns: &NetNs,
    config: &ConfigDir,
    run_as: Option<RunAs>,
) -> Command {
    let entry = Entry::new(netns, config, run_as);
    let mut cmd = Command::new(program.as_ref());
    // SAFETY: `enter` only makes system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || entry.enter());
    }
    cmd
}

/// A uid/gid pair that no account on this machine uses: a throwaway
/// "system user" that needs no entry in /etc/passwd, so nothing on the
/// host has to be created or cleaned up.
pub fn unused_user() -> RunAs {
    let base = 0x5151_0000 + (std::process::id() % 0x1000) * 16;
    for id in base..base + 16 {
        let free = nix::unistd::User::from_uid(Uid::from_raw(id))
            .ok()
            .flatten()
            .is_none()
            && nix::unistd::Group::from_gid(Gid::from_raw(id))
                .ok()
                .flatten()
                .is_none();
        if free {
            return RunAs { uid: id, gid: id };
        }
    }
    panic!("no unused uid near {base}");
}

/// A namespace and a config directory to run a helper in as root, as its
/// tests do.
pub struct HelperSandbox {
    pub netns: NetNs,
    pub config: ConfigDir,
    /// The workspace binary.
    program: &'static str,
}

impl HelperSandbox {
    /// `program` in `netns`, with `acl` as the config directory's
    /// `acl_file`.
    pub fn new(netns: NetNs, program: &'static str, acl_file: &str, acl: &str) -> HelperSandbox {
        let config = ConfigDir::new();
        config.write(acl_file, acl);
        HelperSandbox {
            netns,
            config,
            program,
        }
    }

    /// The helper, sandboxed.
    pub fn helper(&self) -> Command {
        sandboxed(
            crate::workspace_binary(self.program),
            &self.netns,
            &self.config,
            None,
        )
    }

    /// Runs the helper with `args` plus QEMU's `--use-vnet --fd=N
    /// --br=DEVICE`.
    pub fn run(&self, args: &[&str], device: &str) -> crate::fake_qemu::HelperOutcome {
        let mut cmd = self.helper();
        cmd.args(args);
        crate::fake_qemu::run_helper(cmd, Some(device))
    }

    /// [`HelperSandbox::run`], expecting a refusal: checks that no link
    /// was left behind and that the one line names the program; returns
    /// the line.
    pub fn refused(&self, args: &[&str], device: &str) -> String {
        let before = self.netns.link_names();
        let message = self.run(args, device).expect_refusal();
        assert_eq!(
            self.netns.link_names(),
            before,
            "a refusal left a device behind"
        );
        let program = self.program;
        assert!(message.starts_with(&format!("{program}: ")), "{message}");
        message
    }
}
