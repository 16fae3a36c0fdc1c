//! Every binary of the workspace answers `--help` and `--version` with exit
//! status 0, on stdout, and says what it is.

use std::process::Command;

use qnet_tests::workspace_binary;

const BINARIES: [&str; 5] = [
    "qnet-bridge-helper",
    "qnet-macvtap-helper",
    "qnet-hookd",
    "qnetctl",
    "qnet-libvirt-hook",
];

#[test]
fn help_and_version_work_for_every_binary() {
    for name in BINARIES {
        let path = workspace_binary(name);
        let help = Command::new(&path).arg("--help").output().unwrap();
        assert!(help.status.success(), "{name} --help: {}", help.status);
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(
            text.contains(name),
            "{name} --help does not name itself:\n{text}"
        );
        assert!(
            text.lines().count() > 5,
            "{name} --help says too little:\n{text}"
        );

        let version = Command::new(&path).arg("--version").output().unwrap();
        assert!(
            version.status.success(),
            "{name} --version: {}",
            version.status
        );
        let text = String::from_utf8_lossy(&version.stdout);
        assert!(
            text.starts_with(&format!("{name} {}", env!("CARGO_PKG_VERSION"))),
            "{name} --version: {text}"
        );
    }
}
