//! libvirt's network status files as the hook reads them (a real one of
//! libvirt 9.0 in tests/data/), finding the libvirt network of an
//! interface, and hostile files.

use std::path::Path;

use qnet_api::LibvirtNetwork;
use qnet_libvirt_hook::{find_libvirt_network, parse_domain, parse_network_status, Interface};

fn real_nat() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/libvirt-9.0/network-nat.xml"),
    )
    .unwrap()
}

fn network(forward: &str, bridge: &str, ips: &str) -> String {
    format!(
        "<networkstatus><network><name>n1</name>{forward}{bridge}{ips}</network></networkstatus>"
    )
}

#[test]
fn libvirt_9_status_file_parses() {
    let net = parse_network_status(&real_nat()).unwrap().unwrap();
    assert_eq!(
        net,
        LibvirtNetwork {
            name: "qnet-exp".into(),
            bridge: "qnexp0".parse().unwrap(),
            forward_mode: Some("nat".into()),
            subnets: vec!["10.79.3.1/24".parse().unwrap()],
        }
    );
    assert!(!net.admits_inbound(), "libvirt rejects inbound into nat");
}

#[test]
fn modes_subnets_and_definitions() {
    let route = parse_network_status(&network(
        "<forward mode='route'/>",
        "<bridge name='virbr5'/>",
        "<ip address='10.5.0.1' prefix='24'/><ip family='ipv6' address='fd00::1' prefix='64'/>\
         <ip address='10.6.0.1' netmask='255.255.0.0'/><ip address='bad' prefix='8'/>",
    ))
    .unwrap()
    .unwrap();
    assert_eq!(route.forward_mode.as_deref(), Some("route"));
    assert!(route.admits_inbound());
    assert_eq!(
        route.subnets,
        vec![
            "10.5.0.1/24".parse().unwrap(),
            "10.6.0.1/16".parse().unwrap()
        ]
    );
    let isolated = parse_network_status(&network("", "<bridge name='virbr6'/>", ""))
        .unwrap()
        .unwrap();
    assert_eq!(isolated.forward_mode, None);
    assert!(!isolated.admits_inbound());
    // <forward/> without a mode is NAT; a definition (root <network>) too.
    let plain =
        parse_network_status("<network><name>d</name><forward/><bridge name='virbr7'/></network>")
            .unwrap()
            .unwrap();
    assert_eq!(plain.forward_mode.as_deref(), Some("nat"));
    assert_eq!(plain.bridge, "virbr7");
    let open = parse_network_status(&network("<forward mode='open'/>", "<bridge name='v'/>", ""))
        .unwrap()
        .unwrap();
    assert!(open.admits_inbound());
    // No bridge of its own: nothing to follow.
    assert_eq!(
        parse_network_status(&network("<forward mode='hostdev'/>", "", "")).unwrap(),
        None
    );
}

#[test]
fn hostile_network_files_are_errors() {
    for bad in [
        "",
        "<networkstatus><network></network></networkstatus>",
        "<network><name>x</name>",
        "<!DOCTYPE x [<!ENTITY a 'b'>]><network><name>&a;</name><bridge name='b'/></network>",
        "not xml at all",
    ] {
        assert!(parse_network_status(bad).is_err(), "{bad:?}");
    }
    let huge = format!(
        "<network><name>x</name><bridge name='b'/>{}</network>",
        "<mac address='52:54:00:00:00:01'/>".repeat(40_000)
    );
    assert!(parse_network_status(&huge).is_err());
}

fn iface(xml_devices: &str) -> Interface {
    let xml =
        format!("<domain><name>g</name><uuid>u</uuid><devices>{xml_devices}</devices></domain>");
    parse_domain(&xml).unwrap().interfaces.remove(0)
}

#[test]
fn interfaces_find_their_network_by_name_or_bridge() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("qnet-exp.xml"), real_nat()).unwrap();
    std::fs::write(dir.path().join("broken.xml"), "<networkstatus>").unwrap();
    std::fs::write(dir.path().join("qnet-exp.pid"), "123").unwrap();
    let by_name = iface(
        "<interface type='network'><mac address='52:54:00:00:00:01'/>\
         <source network='qnet-exp'/></interface>",
    );
    let found = find_libvirt_network(dir.path(), &by_name).unwrap().unwrap();
    assert_eq!(found.bridge, "qnexp0");
    // The live domain XML's bridge wins (it is where libvirt attached).
    let live = iface(
        "<interface type='network'><mac address='52:54:00:00:00:01'/>\
         <source network='qnet-exp' portid='5f9c' bridge='qnexp9'/></interface>",
    );
    assert_eq!(
        find_libvirt_network(dir.path(), &live)
            .unwrap()
            .unwrap()
            .bridge,
        "qnexp9"
    );
    let by_bridge = iface(
        "<interface type='bridge'><mac address='52:54:00:00:00:01'/>\
         <source bridge='qnexp0'/></interface>",
    );
    assert_eq!(
        find_libvirt_network(dir.path(), &by_bridge)
            .unwrap()
            .unwrap()
            .name,
        "qnet-exp"
    );
    for other in [
        "<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/></interface>",
        "<interface type='network'><mac address='52:54:00:00:00:01'/><source network='lab'/></interface>",
        "<interface type='network'><mac address='52:54:00:00:00:01'/><source network='../etc/x'/></interface>",
        "<interface type='network'><mac address='52:54:00:00:00:01'/><source network='.hidden'/></interface>",
        "<interface type='user'><mac address='52:54:00:00:00:01'/></interface>",
    ] {
        assert_eq!(find_libvirt_network(dir.path(), &iface(other)).unwrap(), None, "{other}");
    }
    // A missing directory (libvirt's network driver not running) is no network.
    assert_eq!(
        find_libvirt_network(&dir.path().join("nope"), &by_bridge).unwrap(),
        None
    );
    // An unreadable status file of the named network is an error.
    std::fs::write(dir.path().join("bad.xml"), "<network>").unwrap();
    let bad = iface(
        "<interface type='network'><mac address='52:54:00:00:00:01'/><source network='bad'/></interface>",
    );
    assert!(find_libvirt_network(dir.path(), &bad).is_err());
}

#[test]
fn live_domain_xml_of_type_network_names_the_bridge_from_start_on() {
    // libvirt 9.0: `prepare` has only the network's name; `start` and
    // `started` add the port id and the bridge it attached the TAP to.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/libvirt-9.0");
    for (op, bridge) in [
        ("prepare", None),
        ("start", Some("qnlvn30b5b4")),
        ("started", Some("qnlvn30b5b4")),
    ] {
        let xml = std::fs::read_to_string(dir.join(format!("type-network-{op}.xml"))).unwrap();
        let domain = parse_domain(&xml).unwrap();
        let iface = &domain.interfaces[0];
        assert_eq!(iface.kind, "network", "{op}");
        assert_eq!(
            iface.source_network.as_deref(),
            Some("qnet-test-nat-30b5b4"),
            "{op}"
        );
        assert_eq!(iface.source_bridge.as_deref(), bridge, "{op}");
        assert_eq!(domain.forwards.len(), 1, "{op}");
    }
}

/// Reproducer of the network_xml fuzz target: quick-xml quoted the
/// mismatched end tag raw (control characters included) in the error.
#[test]
fn errors_are_one_line() {
    for xml in [
        "<network><name>d</d</name></net\u{4}\u{4}\u{4}work>".to_string(),
        format!("<network><name>d</name></net{}>", "\n".repeat(10_000)),
    ] {
        let err = parse_network_status(&xml).unwrap_err().to_string();
        assert!(!err.chars().any(char::is_control), "{err:?}");
        assert!(err.len() <= 1100, "{}", err.len());
    }
}
