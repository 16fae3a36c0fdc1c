//! Real-kernel tests of `qnet_hostnet::link`.
//!
//! Each test creates its own network namespace (the test kit's `NetNs`) and
//! runs its body on a fresh thread that has joined that namespace (the network
//! namespace is per thread), so neither the host nor the other tests see any
//! of the devices. The namespace is deleted when the test ends, including
//! after a failed assertion. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).

use std::time::Duration;

use nix::errno::Errno;
use qnet_hostnet::link::{LinkError, LinkSocket, MacvtapMode, PortChange};
use qnet_tests::netns::NetNs;

/// Runs `test` with a link socket in a namespace of its own, once the
/// `ip` commands `setup` have run there.
fn with_socket(setup: &[&[&str]], test: impl FnOnce(&mut LinkSocket) + Send) {
    let ns = NetNs::new("link");
    for args in setup {
        ns.ip(args);
    }
    ns.run_in(|| test(&mut LinkSocket::new().unwrap()));
}

/// [`with_socket`] in a namespace that holds TAP `t0` (down).
fn with_tap(test: impl FnOnce(&mut LinkSocket) + Send) {
    with_socket(&[&["tuntap", "add", "t0", "mode", "tap"]], test);
}

fn index_of(socket: &mut LinkSocket, name: &str) -> u32 {
    socket
        .link_by_name(name)
        .expect("lookup")
        .unwrap_or_else(|| panic!("{name} missing"))
        .index
}

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

#[test]
fn missing_device_is_none() {
    with_socket(&[], |socket| {
        assert_eq!(socket.link_by_name("nosuchdev0").unwrap(), None);
        assert_eq!(socket.link_by_index(999_999).unwrap(), None);
        assert!(matches!(
            socket.link_by_name("much-too-long-name"),
            Err(LinkError::InvalidName(_))
        ));
    });
}

#[test]
fn loopback_by_name_and_index_agree() {
    with_socket(&[], |socket| {
        let by_name = socket.link_by_name("lo").unwrap().unwrap();
        assert_eq!(by_name.name, "lo");
        assert_eq!(by_name.kind, None);
        assert_eq!(by_name.master, None);
        let by_index = socket.link_by_index(by_name.index).unwrap().unwrap();
        assert_eq!(by_index, by_name);
    });
}

#[test]
fn bridge_is_created_and_read_back() {
    with_socket(&[], |socket| {
        socket.create_bridge("qbr0", Some(MAC)).unwrap();
        let bridge = socket.link_by_name("qbr0").unwrap().unwrap();
        assert_eq!(bridge.name, "qbr0");
        assert_eq!(bridge.kind.as_deref(), Some("bridge"));
        assert_eq!(bridge.mac, Some(MAC));
        assert_eq!(bridge.mtu, 1500);
        assert!(!bridge.up);
        assert_eq!(bridge.master, None);
        assert_eq!(bridge.macvtap_mode, None);

        let again = socket.create_bridge("qbr0", None).unwrap_err();
        assert!(matches!(again, LinkError::Exists { .. }), "{again:?}");

        // Without a MAC the kernel picks one.
        socket.create_bridge("qbr1", None).unwrap();
        let random = socket.link_by_name("qbr1").unwrap().unwrap();
        assert!(random.mac.is_some());
        assert_ne!(random.index, bridge.index);
    });
}

#[test]
fn macvtap_in_every_mode() {
    let ns = NetNs::new("link");
    let modes = [
        MacvtapMode::Bridge,
        MacvtapMode::Vepa,
        MacvtapMode::Private,
        MacvtapMode::Passthru,
    ];
    // One veth pair per mode: passthru insists on having its lower device
    // to itself.
    for i in 0..modes.len() {
        let (a, b) = (format!("va{i}"), format!("vb{i}"));
        ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    }
    ns.run_in(|| {
        let mut socket = LinkSocket::new().unwrap();
        for (i, mode) in modes.into_iter().enumerate() {
            let lower = socket.link_by_name(&format!("va{i}")).unwrap().unwrap();
            assert_eq!(lower.kind.as_deref(), Some("veth"));
            let name = format!("mvt{i}");
            let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, i as u8];
            socket
                .create_macvtap(&name, lower.index, mac, mode, Some(1400))
                .unwrap_or_else(|e| panic!("{mode}: {e}"));

            let tap = socket.link_by_name(&name).unwrap().unwrap();
            assert_eq!(tap.kind.as_deref(), Some("macvtap"), "{mode}");
            assert_eq!(tap.macvtap_mode, Some(mode));
            assert_eq!(tap.mtu, 1400, "{mode}");
            // Passthru takes the lower device's address, whatever we ask.
            let expected_mac = match mode {
                MacvtapMode::Passthru => lower.mac,
                _ => Some(mac),
            };
            assert_eq!(tap.mac, expected_mac, "{mode}");

            let again = socket
                .create_macvtap(&name, lower.index, mac, mode, None)
                .unwrap_err();
            assert!(matches!(again, LinkError::Exists { .. }), "{again:?}");
            assert_eq!(again.errno(), Some(Errno::EEXIST));
        }
    });
}

#[test]
fn macvtap_on_missing_lower_fails_with_errno() {
    with_socket(&[], |socket| {
        let error = socket
            .create_macvtap("mvt0", 999_999, MAC, MacvtapMode::Bridge, None)
            .unwrap_err();
        assert!(matches!(error, LinkError::Kernel { .. }), "{error:?}");
        assert!(error.errno().is_some(), "{error:?}");
        assert!(matches!(
            socket.create_macvtap("mvt%d", 1, MAC, MacvtapMode::Bridge, None),
            Err(LinkError::InvalidName(_))
        ));
    });
}

/// `no_ipv6_addresses` keeps the port free of the link-local address the
/// kernel gives every other link once it has a carrier: here the other end
/// of a veth pair, brought up after the port, which shows one was due.
#[test]
fn a_port_gets_no_ipv6_addresses() {
    let ns = NetNs::new("link");
    ns.ip(&["link", "add", "p0", "type", "veth", "peer", "name", "p1"]);
    ns.run_in(|| {
        let mut socket = LinkSocket::new().unwrap();
        socket.create_bridge("qbr0", None).unwrap();
        let change = PortChange {
            master: Some(index_of(&mut socket, "qbr0")),
            up: true,
            no_ipv6_addresses: true,
            ..PortChange::default()
        };
        let port = index_of(&mut socket, "p0");
        socket.configure_port(port, change).unwrap();
    });
    ns.ip(&["link", "set", "p1", "up"]);
    let addresses = |dev: &str| ns.ip(&["-6", "-o", "addr", "show", "dev", dev]);
    qnet_tests::wait_until("p1's link-local address", Duration::from_secs(10), || {
        addresses("p1").contains("fe80::")
    });
    assert!(ns.ip(&["-o", "link", "show", "p0"]).contains("LOWER_UP"));
    assert_eq!(addresses("p0").trim(), "", "the port has IPv6 addresses");
}

/// A link too small for IPv6 (MTU below 1280) has no IPv6 state, so the
/// kernel refuses to turn its addresses off (`EAFNOSUPPORT`): that is no
/// failure. Once the link is large enough, the same call takes.
#[test]
fn a_link_without_ipv6_needs_no_turning_off() {
    let ns = NetNs::new("link");
    ns.ip(&["tuntap", "add", "t0", "mode", "tap"]);
    ns.ip(&["link", "set", "t0", "mtu", "1000"]);
    let gen_mode = || ns.ip(&["-d", "-o", "link", "show", "dev", "t0"]);
    let turn_off = || {
        ns.run_in(|| {
            let mut socket = LinkSocket::new().unwrap();
            let tap = index_of(&mut socket, "t0");
            socket.no_ipv6_addresses(tap).unwrap();
        })
    };
    turn_off();
    assert!(!gen_mode().contains("addrgenmode"), "{}", gen_mode());
    ns.ip(&["link", "set", "t0", "mtu", "1500"]);
    turn_off();
    assert!(gen_mode().contains("addrgenmode none"), "{}", gen_mode());
}

#[test]
fn configure_port_in_one_request() {
    with_tap(|socket| {
        socket.create_bridge("qbr0", None).unwrap();
        let bridge = index_of(socket, "qbr0");
        let before = socket.link_by_name("t0").unwrap().unwrap();
        assert_eq!(before.kind.as_deref(), Some("tun"));
        assert!(!before.up);

        let change = PortChange {
            mtu: Some(1400),
            mac: Some(MAC),
            master: Some(bridge),
            up: true,
            no_ipv6_addresses: false,
        };
        socket.configure_port(before.index, change).unwrap();

        let after = socket.link_by_index(before.index).unwrap().unwrap();
        assert_eq!(after.mtu, 1400);
        assert_eq!(after.mac, Some(MAC));
        assert_eq!(after.master, Some(bridge));
        assert!(after.up);
    });
}

#[test]
fn configure_port_reports_kernel_errors() {
    with_tap(|socket| {
        let tap = index_of(socket, "t0");
        let change = PortChange {
            mtu: Some(10),
            ..PortChange::default()
        };
        let error = socket.configure_port(tap, change).unwrap_err();
        assert_eq!(error.errno(), Some(Errno::EINVAL), "{error}");
        // The error says what was being done.
        assert!(
            error.to_string().contains(&format!("ifindex {tap}")),
            "{error}"
        );

        let error = socket.set_up(999_999).unwrap_err();
        assert_eq!(error.errno(), Some(Errno::ENODEV), "{error}");
    });
}

#[test]
fn single_setters() {
    with_tap(|socket| {
        let tap = index_of(socket, "t0");

        socket.set_mac(tap, MAC).unwrap();
        socket.set_alias(tap, "guest vm1 net0").unwrap();
        socket.set_up(tap).unwrap();
        let link = socket.link_by_index(tap).unwrap().unwrap();
        assert_eq!(link.mac, Some(MAC));
        assert_eq!(link.alias.as_deref(), Some("guest vm1 net0"));
        assert!(link.up);

        // An empty alias removes it.
        socket.set_alias(tap, "").unwrap();
        assert_eq!(socket.link_by_index(tap).unwrap().unwrap().alias, None);
    });
}

#[test]
fn delete_removes_the_link() {
    with_tap(|socket| {
        socket.create_bridge("qbr0", None).unwrap();
        for name in ["qbr0", "t0"] {
            let index = index_of(socket, name);
            socket.delete(index).unwrap();
            assert_eq!(socket.link_by_name(name).unwrap(), None);
            assert_eq!(socket.link_by_index(index).unwrap(), None);
            let error = socket.delete(index).unwrap_err();
            assert_eq!(error.errno(), Some(Errno::ENODEV), "{error}");
        }
    });
}

#[test]
fn devices_stay_in_their_namespace() {
    let ns = NetNs::new("link");
    let name = format!("qnt{}", std::process::id() % 100_000);
    ns.run_in(|| {
        LinkSocket::new()
            .unwrap()
            .create_bridge(&name, None)
            .unwrap()
    });
    // This thread is still in the host namespace.
    assert_eq!(
        LinkSocket::new().unwrap().link_by_name(&name).unwrap(),
        None
    );
}

#[test]
fn links_lists_every_device_of_the_namespace() {
    with_socket(&[], |socket| {
        socket.create_bridge("qbrlist0", None).unwrap();
        socket.create_bridge("qbrlist1", Some(MAC)).unwrap();
        let mut names: Vec<String> = socket
            .links()
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        names.sort();
        assert_eq!(names, ["lo", "qbrlist0", "qbrlist1"]);
        // The socket still works for ordinary requests after a dump.
        assert!(socket.link_by_name("qbrlist1").unwrap().is_some());
    });
}
