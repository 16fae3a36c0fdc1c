//! Installed copies of a helper for unprivileged tests: setuid root, with
//! file capabilities, or plain, in a directory an ordinary user can reach.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use crate::netns::run;
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
        let dir = tempfile::Builder::new()
            .prefix("qnet-test-bin-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
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
