//! qnet-bridge-helper against the real kernel, run as QEMU runs it, as root.
//! Each test has its own network namespace with a bridge and its own
//! `/etc/qemu` (see `sandbox`).

use std::os::fd::AsFd;

use qnet_hostnet::tap::tap_info;
use qnet_tests::fake_qemu::{assert_vnet_hdr_tap, helper_socketpair, run_with_socket};
use qnet_tests::helper_cli;
use qnet_tests::netns::NetNs;
use qnet_tests::sandbox::{sandboxed, HelperSandbox};
use qnet_tests::workspace_binary;

const BRIDGE: &str = "qbr0";

/// A namespace with bridge `qbr0` (MTU 1400, so copying it is visible)
/// and a config dir holding `acl` as bridge.conf.
fn setup(tag: &str, acl: &str) -> HelperSandbox {
    let netns = NetNs::new(tag);
    netns.add_bridge(BRIDGE, None);
    netns.ip(&["link", "set", BRIDGE, "mtu", "1400"]);
    HelperSandbox::new(netns, "qnet-bridge-helper", "bridge.conf", acl)
}

/// `ip -o link show dev NAME` as one line.
fn link_line(netns: &NetNs, name: &str) -> String {
    netns.ip(&["-o", "link", "show", "dev", name])
}

#[test]
fn allowed_bridge_gets_an_attached_tap_with_vnet_hdr() {
    let setup = setup("br-ok", "allow qbr0\n");
    let fd = setup.run(&[], BRIDGE).expect_fd();

    let name = assert_vnet_hdr_tap(&fd);

    let line = link_line(&setup.netns, &name);
    assert!(line.contains(&format!("master {BRIDGE}")), "{line}");
    assert!(
        line.contains("mtu 1400"),
        "MTU not copied from the bridge: {line}"
    );
    assert!(
        line.contains("link/ether fe:"),
        "MAC must start with fe: {line}"
    );
    let flags_field = line.split('<').nth(1).unwrap().split('>').next().unwrap();
    assert!(flags_field.split(',').any(|f| f == "UP"), "not up: {line}");

    // Not persistent: the device goes away with QEMU's fd.
    drop(fd);
    assert!(
        !setup.netns.link_names().contains(&name),
        "{name} outlived its fd"
    );
}

#[test]
fn without_use_vnet_there_is_no_vnet_hdr() {
    let setup = setup("br-novnet", "allow qbr0\n");
    let (ours, theirs) = helper_socketpair();
    let mut cmd = setup.helper();
    cmd.arg(format!("--fd={}", std::os::fd::AsRawFd::as_raw_fd(&theirs)))
        .arg("--br=qbr0");
    let fd = run_with_socket(cmd, ours, theirs).expect_fd();
    let (_, flags) = tap_info(fd.as_fd()).unwrap();
    assert_eq!(
        flags & libc::IFF_VNET_HDR,
        0,
        "vnet_hdr set without --use-vnet"
    );
}

#[test]
fn qemu_sh_c_form_with_extra_arguments_works() {
    // QEMU runs `/bin/sh -c "HELPER ARGS --use-vnet --fd=N"` when the
    // helper string has a space; here the bridge comes from the string.
    let setup = setup("br-shc", "allow qbr0\n");
    let (ours, theirs) = helper_socketpair();
    let helper = workspace_binary("qnet-bridge-helper");
    let script = format!(
        "{} --br=qbr0 --use-vnet --fd={} ",
        helper.display(),
        std::os::fd::AsRawFd::as_raw_fd(&theirs)
    );
    let mut cmd = sandboxed("/bin/sh", &setup.netns, &setup.config, None);
    cmd.arg("-c").arg(script);
    let fd = run_with_socket(cmd, ours, theirs).expect_fd();
    let (name, _) = tap_info(fd.as_fd()).unwrap();
    assert!(link_line(&setup.netns, &name).contains("master qbr0"));
}

#[test]
fn deny_wins_over_allow_in_any_order() {
    let setup = setup("br-deny", "deny qbr0\nallow all\n");
    let message = setup.refused(&[], BRIDGE);
    assert!(
        message.contains("bridge.conf:1"),
        "should name the rule: {message}"
    );
}

#[test]
fn bridge_without_an_allow_is_refused_with_what_to_write() {
    let setup = setup("br-noallow", "allow other0\n");
    let message = setup.refused(&[], BRIDGE);
    assert!(message.contains("`allow qbr0`"), "{message}");
    assert!(message.contains("/etc/qemu/bridge.conf"), "{message}");
}

#[test]
fn missing_bridge_is_refused_with_a_hint() {
    let setup = setup("br-missing", "allow all\n");
    let message = setup.refused(&[], "br9");
    assert!(
        message.contains("bridge `br9` does not exist: create it first"),
        "{message}"
    );
}

#[test]
fn a_device_that_is_not_a_bridge_is_refused() {
    let setup = setup("br-veth", "allow all\n");
    setup
        .netns
        .ip(&["link", "add", "qv0", "type", "veth", "peer", "name", "qv1"]);
    let message = setup.refused(&[], "qv0");
    assert!(message.contains("not a Linux bridge"), "{message}");
}

#[test]
fn missing_acl_file_is_refused() {
    let setup = setup("br-noacl", "allow all\n");
    std::fs::remove_file(setup.config.path().join("bridge.conf")).unwrap();
    let message = setup.refused(&[], BRIDGE);
    assert!(message.contains("/etc/qemu/bridge.conf"), "{message}");
}

#[test]
fn over_long_names_are_refused_cve_2019_13164() {
    // qemu-bridge-helper once truncated long names after the ACL check.
    let setup = setup("br-long", "allow qbr0\n");
    let message = setup.refused(&[], "qbr0xxxxxxxxxxxx");
    assert!(message.contains("qbr0xxxxxxxxxxxx"), "{message}");
}

#[test]
fn malformed_acl_line_names_file_and_line() {
    let setup = setup("br-bad", "allow qbr0\nalow qbr1\n");
    let message = setup.refused(&[], BRIDGE);
    assert!(message.contains("/etc/qemu/bridge.conf:2"), "{message}");
}

#[test]
fn include_cycle_is_refused_not_a_crash() {
    let setup = setup("br-cycle", "allow qbr0\ninclude /etc/qemu/a.conf\n");
    setup
        .config
        .write("a.conf", "include /etc/qemu/bridge.conf\n");
    let message = setup.refused(&[], BRIDGE);
    assert!(message.contains("cycle"), "{message}");
}

#[test]
fn bad_arguments_are_a_usage_error() {
    let setup = setup("br-argv", "allow all\n");
    helper_cli::bad_arguments_are_a_usage_error(|| setup.helper(), &setup.netns, "qbr0");
}

#[test]
fn fd_that_is_not_a_unix_socket_is_refused_before_any_device_exists() {
    let setup = setup("br-fd", "allow all\n");
    let before = setup.netns.link_names();
    // fd 0 is /dev/null here.
    let out = setup
        .helper()
        .args(["--use-vnet", "--fd=0", "--br=qbr0"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--fd=0"), "{stderr}");
    assert_eq!(setup.netns.link_names(), before);
}

#[test]
fn help_and_version_print_and_touch_nothing() {
    let setup = setup("br-help", "allow all\n");
    helper_cli::help_and_version_print_and_touch_nothing(
        || setup.helper(),
        &setup.netns,
        &[
            "SYNOPSIS",
            "ACL FILES",
            "EXIT STATUS",
            "--use-vnet",
            "--br",
            "--fd",
        ],
    );
}
