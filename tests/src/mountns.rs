//! A private mount namespace for a test: a holder process (`sleep`) in
//! its own mount namespace, inside a test network namespace, where a test
//! mounts small tmpfs (a full disk) or remounts them read-only without the
//! host's visible tree ever changing. The daemon is started in it
//! ([`crate::hookd::Launch`]); the test reads its files through
//! `/proc/HOLDER/root`. Everything mounted goes with the holder (killed
//! and reaped on drop).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::NetNs;
use crate::require_tool;

pub struct MountNs {
    holder: Child,
}

impl MountNs {
    /// A new mount namespace (a private copy of the caller's, with the
    /// `/sys` of `netns`) whose holder is in `netns`.
    pub fn new(netns: &NetNs) -> MountNs {
        require_tool("unshare", "util-linux");
        require_tool("nsenter", "util-linux");
        // `ip netns exec` gives the namespace's /sys; unshare (no fork)
        // then execs sleep in a mount namespace of its own.
        let mut holder = Command::new("ip")
            .args(["netns", "exec", netns.name()])
            .args(["unshare", "--mount", "--propagation", "private"])
            .args(["sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the mount namespace holder");
        let pid = holder.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "sleep")
        {
            if Instant::now() > deadline || holder.try_wait().ok().flatten().is_some() {
                let _ = holder.kill();
                panic!("the mount namespace holder did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        MountNs { holder }
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// Runs `program ARGS` in the namespace (mount and network).
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let pid = self.pid().to_string();
        let mut argv = vec!["--target", &pid, "--mount", "--net", "--", program];
        argv.extend_from_slice(args);
        crate::netns::run("nsenter", &argv)
    }

    /// Mounts a tmpfs of `size` (e.g. `"16k"`) on `dir` (created on the
    /// host if missing; it stays empty there).
    pub fn mount_tmpfs(&self, dir: &Path, size: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let options = format!("size={size},mode=0755");
        self.run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &options,
                "qnet-test",
                &dir.to_string_lossy(),
            ],
        )
        .expect("mount a tmpfs");
    }

    /// Makes `dir` read-only (a read-only bind mount of itself), or
    /// writable again (`false`: the bind mount removed).
    pub fn set_read_only(&self, dir: &Path, read_only: bool) {
        let dir = dir.to_string_lossy();
        let steps: Vec<Vec<&str>> = if read_only {
            vec![
                vec!["--bind", &dir, &dir],
                vec!["-o", "remount,bind,ro", &dir],
            ]
        } else {
            vec![]
        };
        for args in steps {
            self.run("mount", &args).expect("bind mount read-only");
        }
        if !read_only {
            self.run("umount", &[&dir])
                .expect("umount the read-only bind");
        }
    }

    /// Where the host sees `path` of this namespace.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(relative)
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
