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
    // No IPv6 addresses of its own: a port's would carry nothing.
    let details = setup.netns.ip(&["-d", "-o", "link", "show", "dev", &name]);
    assert!(details.contains("addrgenmode none"), "{details}");

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

/// A request the helper must refuse: in a namespace tagged `tag` with
/// `acl` as bridge.conf, changed by `prepare`, the helper for `device`
/// must refuse (leaving no device, see `HelperSandbox::refused`) in one
/// line saying each of `says`.
struct Refusal {
    what: &'static str,
    tag: &'static str,
    acl: &'static str,
    prepare: fn(&HelperSandbox),
    device: &'static str,
    says: &'static [&'static str],
}

fn nothing_more(_: &HelperSandbox) {}

const REFUSALS: &[Refusal] = &[
    Refusal {
        what: "deny wins over allow in any order, and the message names the rule",
        tag: "br-deny",
        acl: "deny qbr0\nallow all\n",
        prepare: nothing_more,
        device: BRIDGE,
        says: &["bridge.conf:1"],
    },
    Refusal {
        what: "a bridge without an allow is refused with what to write",
        tag: "br-noallow",
        acl: "allow other0\n",
        prepare: nothing_more,
        device: BRIDGE,
        says: &["`allow qbr0`", "/etc/qemu/bridge.conf"],
    },
    Refusal {
        what: "a missing bridge is refused with a hint",
        tag: "br-missing",
        acl: "allow all\n",
        prepare: nothing_more,
        device: "br9",
        says: &["bridge `br9` does not exist: create it first"],
    },
    Refusal {
        what: "a device that is not a bridge is refused",
        tag: "br-veth",
        acl: "allow all\n",
        prepare: |setup| {
            setup
                .netns
                .ip(&["link", "add", "qv0", "type", "veth", "peer", "name", "qv1"]);
        },
        device: "qv0",
        says: &["not a Linux bridge"],
    },
    Refusal {
        what: "a missing ACL file is refused",
        tag: "br-noacl",
        acl: "allow all\n",
        prepare: |setup| std::fs::remove_file(setup.config.path().join("bridge.conf")).unwrap(),
        device: BRIDGE,
        says: &["/etc/qemu/bridge.conf"],
    },
    Refusal {
        // qemu-bridge-helper once truncated long names after the ACL check.
        what: "over-long names are refused (CVE-2019-13164)",
        tag: "br-long",
        acl: "allow qbr0\n",
        prepare: nothing_more,
        device: "qbr0xxxxxxxxxxxx",
        says: &["qbr0xxxxxxxxxxxx"],
    },
    Refusal {
        what: "a malformed ACL line names file and line",
        tag: "br-bad",
        acl: "allow qbr0\nalow qbr1\n",
        prepare: nothing_more,
        device: BRIDGE,
        says: &["/etc/qemu/bridge.conf:2"],
    },
    Refusal {
        what: "an include cycle is refused, not a crash",
        tag: "br-cycle",
        acl: "allow qbr0\ninclude /etc/qemu/a.conf\n",
        prepare: |setup| {
            setup
                .config
                .write("a.conf", "include /etc/qemu/bridge.conf\n");
        },
        device: BRIDGE,
        says: &["cycle"],
    },
];

#[test]
fn bad_acls_and_devices_are_refused_saying_what_is_wrong() {
    for case in REFUSALS {
        let setup = setup(case.tag, case.acl);
        (case.prepare)(&setup);
        let message = setup.refused(&[], case.device);
        for expected in case.says {
            assert!(
                message.contains(expected),
                "{}: {expected:?} in: {message}",
                case.what
            );
        }
    }
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
