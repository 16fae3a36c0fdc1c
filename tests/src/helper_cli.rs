//! The command-line contract both helpers keep, checked the same way for
//! each (`tests/tests/bridge_helper.rs`, `tests/tests/macvtap_helper.rs`):
//! QEMU runs them with `--br=NAME --fd=N [--use-vnet]`, reads one line of
//! stderr when they fail, and must find no device left behind.

use std::process::Command;

use crate::netns::NetNs;

/// Bad command lines (a missing `--fd` or `--br`, an unknown flag, an fd
/// that is no number) exit 1 with one line naming the usage, and create
/// nothing in `netns`. `helper` makes the sandboxed helper command;
/// `device` is a name the ACL allows.
pub fn bad_arguments_are_a_usage_error(helper: impl Fn() -> Command, netns: &NetNs, device: &str) {
    let br = format!("--br={device}");
    for args in [
        vec![br.as_str()],
        vec!["--fd=3"],
        vec!["--bogus", br.as_str(), "--fd=3"],
        vec!["--fd=x", br.as_str()],
    ] {
        let before = netns.link_names();
        let out = helper().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("usage:"), "{args:?}: {stderr}");
        assert_eq!(netns.link_names(), before);
    }
}

/// `--help` prints every one of `sections` on stdout and `--version` the
/// config directory, both exit 0, and neither creates anything.
pub fn help_and_version_print_and_touch_nothing(
    helper: impl Fn() -> Command,
    netns: &NetNs,
    sections: &[&str],
) {
    let before = netns.link_names();
    let help = helper().arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for section in sections {
        assert!(text.contains(section), "--help lacks {section}");
    }
    let version = helper().arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains("config dir /etc/qemu"));
    assert_eq!(netns.link_names(), before);
}
