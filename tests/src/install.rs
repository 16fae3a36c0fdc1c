//! Installed copies of a helper for unprivileged tests: setuid root, with
//! file capabilities, or plain, in a directory an ordinary user can reach.

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fake_qemu::{run_helper, HeldFd};
use crate::netns::{run, NetNs};
use crate::sandbox::{sandboxed, unused_user, ConfigDir, RunAs};
use crate::{require_tool, workspace_binary};

/// How a copy is installed.
#[derive(Clone, Copy, Debug)]
pub enum Install {
    FileCaps,
    Setuid,
}

/// The two ways users install a helper.
pub const INSTALLS: [Install; 2] = [Install::FileCaps, Install::Setuid];

/// A directory of installed copies, removed on drop.
pub struct Installed {
    dir: tempfile::TempDir,
}

impl Installed {
    /// Copies workspace binary `binary` under each name of `copies`:
    /// `(name, mode, file capabilities for setcap or None)`. The copies
    /// named `caps` and `setuid` are what [`Installed::path`] returns.
    pub fn new(binary: &str, copies: &[(&str, u32, Option<&str>)]) -> Installed {
        require_tool("setcap", "libcap2-bin");
        let dir = crate::tempdir_with_mode("qnet-test-bin-", 0o755);
        let built = workspace_binary(binary);
        for (name, mode, caps) in copies {
            let path = dir.path().join(name);
            std::fs::copy(&built, &path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).unwrap();
            if let Some(caps) = caps {
                run("setcap", &[caps, path.to_str().unwrap()]).unwrap();
            }
        }
        Installed { dir }
    }

    pub fn path(&self, install: Install) -> PathBuf {
        self.copy(match install {
            Install::FileCaps => "caps",
            Install::Setuid => "setuid",
        })
    }

    pub fn copy(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// What a helper's unprivileged tests run it in: a namespace, a config
/// directory, the installed copies and a throwaway user no account uses.
pub struct AsUser {
    pub netns: NetNs,
    pub config: ConfigDir,
    pub installed: Installed,
    pub user: RunAs,
    nic_args: fn() -> Vec<String>,
}

impl AsUser {
    pub fn new(netns: NetNs, installed: Installed) -> AsUser {
        AsUser {
            netns,
            config: ConfigDir::new(),
            installed,
            user: unused_user(),
            nic_args: Vec::new,
        }
    }

    /// `args` makes the helper's arguments for one guest NIC (the
    /// macvtap helper's `--mac`), afresh for every [`AsUser::helper`].
    pub fn with_nic_args(self, args: fn() -> Vec<String>) -> AsUser {
        AsUser {
            nic_args: args,
            ..self
        }
    }

    /// The helper installed as `install`, for one guest NIC, run as the
    /// user (see [`AsUser::command`]).
    pub fn helper(&self, install: Install) -> Command {
        let mut cmd = self.command(&self.installed.path(install));
        cmd.args((self.nic_args)());
        cmd
    }

    /// Runs the uninstalled ("plain") copy for `device`: it must refuse,
    /// leave no link behind, and say that it lacks CAP_NET_ADMIN and
    /// `how_to_install` it. Returns what it said.
    pub fn plain_copy_refused(&self, device: &str, how_to_install: &str) -> String {
        let before = self.netns.link_names();
        let mut cmd = self.command(&self.installed.copy("plain"));
        cmd.args((self.nic_args)());
        let message = run_helper(cmd, Some(device)).expect_refusal();
        assert_eq!(self.netns.link_names(), before, "{message}");
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");
        assert!(message.contains(how_to_install), "{message}");
        message
    }

    /// Runs [`AsUser::helper`] with `--debug` for `device`: it must
    /// succeed. Returns the fd it sent and its log.
    pub fn debug_run(&self, install: Install, device: &str) -> (OwnedFd, String) {
        let mut cmd = self.helper(install);
        cmd.arg("--debug");
        let outcome = run_helper(cmd, Some(device));
        let log = outcome.stderr.clone();
        (outcome.expect_fd(), log)
    }

    /// `qnet-fake-qemu OPTIONS HELPER NIC-ARGS --br=DEVICE` as the user
    /// (`options`: the fake QEMU's own, as `--persist`; the helper: the
    /// copy installed as `install`), holding the fd the helper sent like a
    /// running guest; Err says why it sent none.
    pub fn guest(
        &self,
        options: &[&str],
        install: Install,
        device: &str,
    ) -> Result<HeldFd, String> {
        let mut cmd = self.command(&workspace_binary("qnet-fake-qemu"));
        cmd.args(options)
            .arg(self.installed.path(install))
            .args((self.nic_args)())
            .arg(format!("--br={device}"));
        HeldFd::start(cmd)
    }

    /// Issue 11, finding 1: `acl_file` allows all but `device`, which the
    /// kernel also knows as `prodalt`: the name to try the helper with.
    pub fn deny_under_an_altname(&self, acl_file: &str, device: &str) {
        self.config
            .write(acl_file, &format!("allow all\ndeny {device}\n"));
        self.netns.add_altname(device, "prodalt");
    }

    /// Runs [`AsUser::helper`] for `device`: it must refuse, saying
    /// `expected`. Returns all it said.
    pub fn refused(&self, install: Install, device: &str, expected: &str) -> String {
        self.refused_by(self.helper(install), install, device, expected)
    }

    /// [`AsUser::refused`] with `cmd`, the helper installed as `install`
    /// run as [`AsUser::helper`] and then changed by the test.
    pub fn refused_by(
        &self,
        cmd: Command,
        install: Install,
        device: &str,
        expected: &str,
    ) -> String {
        let message = run_helper(cmd, Some(device)).expect_refusal();
        assert!(message.contains(expected), "{install:?}: {message}");
        message
    }

    /// [`AsUser::refused`] for each of [`INSTALLS`].
    pub fn refused_by_every_install(&self, device: &str, expected: &str) {
        for install in INSTALLS {
            self.refused(install, device, expected);
        }
    }

    /// `program` in the namespace, with the config directory, as the user,
    /// with nothing in its environment but `PATH`.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = sandboxed(program, &self.netns, &self.config, Some(self.user));
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        cmd
    }
}

/// A `--debug` credentials line (`log` of the helper of `install`) shows
/// that the helper runs as `user` (real, effective, saved and fs ids), with
/// at most CAP_NET_ADMIN (bit 12) effective, `permitted` (hex, as in
/// /proc) permitted, nothing inheritable or ambient, and no_new_privs;
/// with `check_bounding_set`, a setuid install also an empty bounding set.
pub fn assert_runs_as(
    log: &str,
    user: RunAs,
    install: Install,
    permitted: &str,
    check_bounding_set: bool,
) {
    let (uid, gid) = (user.uid, user.gid);
    for expected in [
        format!("Uid: {uid} {uid} {uid} {uid}"),
        format!("Gid: {gid} {gid} {gid} {gid}"),
        "CapEff: 0000000000001000".into(),
        format!("CapPrm: {permitted}"),
        "CapInh: 0000000000000000".into(),
        "CapAmb: 0000000000000000".into(),
        "NoNewPrivs: 1".into(),
    ] {
        assert!(log.contains(&expected), "{install:?}: {log}");
    }
    if matches!(install, Install::Setuid) && check_bounding_set {
        assert!(
            log.contains("CapBnd: 0000000000000000"),
            "{install:?}: {log}"
        );
    }
}
