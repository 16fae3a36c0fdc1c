//! The domain XML parser over XML as libvirt 9.0 really hands it to the
//! hook (captured by tests/tests/libvirt_hook.rs into tests/data/), and
//! over hostile input.

use std::path::Path;

use qnet_libvirt_hook::{
    parse_domain, parse_domain_bytes, XmlErrorKind, MAX_XML_BYTES, QNET_XMLNS,
};

fn sample(op: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/libvirt-9.0")
        .join(format!("{op}.xml"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn real_libvirt_xml_of_every_operation_parses() {
    for op in [
        "prepare",
        "start",
        "started",
        "reconnect",
        "stopped",
        "release",
    ] {
        let d = parse_domain(&sample(op)).unwrap_or_else(|e| panic!("{op}: {e}"));
        assert!(d.name.starts_with("qnet-test-"), "{op}: {}", d.name);
        assert_eq!(d.uuid.len(), 36, "{op}");
        assert_eq!(d.interfaces.len(), 1, "{op}");
        let nic = &d.interfaces[0];
        assert_eq!(nic.kind, "bridge");
        assert_eq!(nic.source_bridge.as_deref(), Some("qnlvb"));
        assert!(nic.mac.to_string().starts_with("52:54:00:"), "{op}");
        assert!(d.has_qnet, "{op}");
        assert_eq!(d.forwards.len(), 1, "{op}");
        let f = &d.forwards[0];
        assert_eq!(f.guest, d.name);
        assert_eq!(
            ((f.ports.first(), f.ports.last()), f.ports.guest()),
            ((8088, 8088), 80)
        );
        // libvirt names the TAP once QEMU runs.
        if op == "started" || op == "reconnect" {
            assert_eq!(nic.target_dev.as_deref(), Some("vnet0"), "{op}");
        }
    }
}

fn domain(metadata: &str, devices: &str) -> String {
    format!(
        "<domain type='qemu'><name>vm1</name><uuid>6f0c7a1e-3b7e-4a55-9a55-111111111111</uuid>\
         <metadata>{metadata}</metadata><devices>{devices}</devices></domain>"
    )
}

const NICS: &str = "<interface type='bridge'><mac address='52:54:00:AA:00:01'/><source bridge='br0'/></interface>\
    <disk type='file'/>\
    <interface type='network'><mac address='52:54:00:aa:00:02'/><source network='default' bridge='virbr0'/><target dev='vnet3'/></interface>\
    <interface type='direct'><mac address='52:54:00:aa:00:03'/><source dev='eth0' mode='bridge'/></interface>";

fn qnet(inner: &str) -> String {
    format!("<q:qnet xmlns:q='{QNET_XMLNS}'>{inner}</q:qnet>")
}

#[test]
fn interfaces_of_every_type_and_interleaved() {
    let d = parse_domain(&domain("", NICS)).unwrap();
    assert!(!d.has_qnet);
    let kinds: Vec<&str> = d.interfaces.iter().map(|i| i.kind.as_str()).collect();
    assert_eq!(kinds, ["bridge", "network", "direct"]);
    assert_eq!(d.interfaces[0].mac.to_string(), "52:54:00:aa:00:01");
    assert_eq!(d.interfaces[1].source_network.as_deref(), Some("default"));
    assert_eq!(d.interfaces[1].source_bridge.as_deref(), Some("virbr0"));
    assert_eq!(d.interfaces[1].target_dev.as_deref(), Some("vnet3"));
    assert_eq!(d.interfaces[2].source_dev.as_deref(), Some("eth0"));
}

#[test]
fn qnet_block_with_any_prefix() {
    let meta = format!(
        "<x:other xmlns:x='https://other.example/'><x:forward proto='tcp' host-port='1'/></x:other>\
         <qn:cfg xmlns:qn='{QNET_XMLNS}'>\
           <qn:forward proto='tcp' host-port='8080' guest-port='80'/>\
           <qn:forward proto='udp' host-port='9000-9009' host-addr='10.0.0.1' mac='52:54:00:aa:00:02' network='lab'/>\
           <qn:address mac='52:54:00:aa:00:01' ip='10.77.0.50'/>\
           <qn:from-the-future x='1'><qn:forward proto='nonsense'/></qn:from-the-future>\
         </qn:cfg>"
    );
    let d = parse_domain(&domain(&meta, NICS)).unwrap();
    assert!(d.has_qnet);
    assert_eq!(d.forwards.len(), 2);
    assert_eq!(d.forwards[0].guest, "vm1");
    assert_eq!(d.forwards[1].guest, "52:54:00:aa:00:02");
    assert_eq!(
        (d.forwards[1].ports.first(), d.forwards[1].ports.last()),
        (9000, 9009)
    );
    assert_eq!(d.forwards[1].ports.guest(), 9000);
    assert_eq!(d.forwards[1].network.as_deref(), Some("lab"));
    let nics = d.nics();
    assert_eq!(nics[0].ip, Some("10.77.0.50".parse().unwrap()));
    assert_eq!(nics[1].ip, None);
}

#[test]
fn wrong_namespace_is_not_qnet() {
    let meta = "<q:qnet xmlns:q='https://qnet.example/xmlns/libvirt/2'><q:forward proto='bogus'/></q:qnet>";
    let d = parse_domain(&domain(meta, NICS)).unwrap();
    assert!(!d.has_qnet);
    assert!(d.forwards.is_empty());
    // Our element names without our namespace are someone else's.
    let d = parse_domain(&domain("<qnet><forward proto='bogus'/></qnet>", NICS)).unwrap();
    assert!(!d.has_qnet);
}

#[test]
fn malformed_qnet_block_names_the_element() {
    for (inner, wanted) in [
        (
            "<q:forward host-port='80'/>",
            "<forward>: missing attribute `proto`",
        ),
        (
            "<q:forward proto='sctp' host-port='80'/>",
            "<forward>: `sctp`",
        ),
        (
            "<q:forward proto='tcp'/>",
            "<forward>: missing attribute `host-port`",
        ),
        ("<q:forward proto='tcp' host-port='80-70'/>", "<forward>"),
        ("<q:forward proto='tcp' host-port='80:8'/>", "<forward>"),
        (
            "<q:forward proto='tcp' host-port='80' hostport='1'/>",
            "unknown attribute `hostport`",
        ),
        (
            "<q:forward proto='tcp' host-port='80' host-addr='nowhere'/>",
            "host-addr",
        ),
        (
            "<q:forward proto='tcp' host-port='80' mac='52:54:00:00:00:99'/>",
            "no interface",
        ),
        (
            "<q:address mac='52:54:00:aa:00:01'/>",
            "<address>: missing attribute `ip`",
        ),
        (
            "<q:address mac='52:54:00:aa:00:01' ip='fd00::1'/>",
            "<address>: ip",
        ),
        ("<q:address mac='zz' ip='10.0.0.1'/>", "<address>"),
    ] {
        let err = parse_domain(&domain(&qnet(inner), NICS)).unwrap_err();
        assert_eq!(err.kind(), XmlErrorKind::Metadata, "{inner}: {err}");
        let err = err.to_string();
        assert!(
            err.contains("qnet metadata") && err.contains(wanted),
            "{inner}: {err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }
    let two = format!("{}{}", qnet(""), qnet(""));
    assert_error(&domain(&two, NICS), XmlErrorKind::Metadata, "more than one");
}

/// Asserts that parsing `xml` fails with an error of `kind` whose message
/// holds `words`.
#[track_caller]
fn assert_error(xml: &str, kind: XmlErrorKind, words: &str) {
    let e = parse_domain(xml).unwrap_err();
    assert_eq!(e.kind(), kind, "{e}");
    assert!(e.to_string().contains(words), "{e}");
}

#[test]
fn missing_fields_are_errors() {
    let no_name = "<domain><uuid>u</uuid></domain>";
    assert_error(no_name, XmlErrorKind::Malformed, "name");
    let no_uuid = "<domain><name>a</name></domain>";
    assert_error(no_uuid, XmlErrorKind::Malformed, "uuid");
    let empty_name = "<domain><name> </name><uuid>u</uuid></domain>";
    assert!(parse_domain(empty_name).is_err());
    let bad_mac = domain(
        "",
        "<interface type='bridge'><mac address='nope'/></interface>",
    );
    assert_error(&bad_mac, XmlErrorKind::Invalid, "<interface> #1");
    // An interface without a MAC is skipped, not an error.
    let no_mac = domain("", "<interface type='user'/>");
    assert!(parse_domain(&no_mac).unwrap().interfaces.is_empty());
    assert!(parse_domain("").is_err());
    assert_error(
        "<network><name>a</name></network>",
        XmlErrorKind::Malformed,
        "root element",
    );
}

#[test]
fn hostile_input_is_refused() {
    // Entities: no DTD at all, so none can be defined.
    let billion =
        "<?xml version='1.0'?><!DOCTYPE domain [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]>\
                   <domain><name>&b;</name><uuid>u</uuid></domain>";
    assert_error(billion, XmlErrorKind::Refused, "DTD");
    let undefined = "<domain><name>&x;</name><uuid>u</uuid></domain>";
    assert!(parse_domain(undefined).is_err());
    let external = "<!DOCTYPE domain SYSTEM 'file:///etc/passwd'><domain/>";
    assert_error(external, XmlErrorKind::Refused, "DTD");
    // Deep nesting.
    let deep = format!(
        "<domain><name>a</name><uuid>u</uuid>{}{}</domain>",
        "<x>".repeat(100_000),
        "</x>".repeat(100_000)
    );
    assert_error(&deep, XmlErrorKind::Refused, "deeper");
    // Huge.
    let huge = format!(
        "<domain><name>a</name><uuid>u</uuid><description>{}</description></domain>",
        "a".repeat(MAX_XML_BYTES)
    );
    assert_error(&huge, XmlErrorKind::Refused, "longer");
    assert!(parse_domain_bytes(huge.as_bytes())
        .unwrap_err()
        .to_string()
        .contains("longer"));
    // Not UTF-8.
    let mut latin1 = b"<domain><name>caf".to_vec();
    latin1.extend_from_slice(&[0xe9]);
    latin1.extend_from_slice(b"</name><uuid>u</uuid></domain>");
    assert!(parse_domain_bytes(&latin1)
        .unwrap_err()
        .to_string()
        .contains("UTF-8"));
    // Not well-formed.
    assert!(parse_domain("<domain><name>a</name><uuid>u</uuid>").is_err());
    assert!(parse_domain("<domain><name>a</nam></domain>").is_err());
    // Two roots.
    assert!(parse_domain("<domain><name>a</name><uuid>u</uuid></domain><domain/>").is_err());
}

/// Reproducers of the domain_xml fuzz target: quick-xml quotes the text
/// after a mismatched end tag, and the qnet block's errors quote attribute
/// values, line breaks included; the error must stay one bounded line.
#[test]
fn errors_are_one_line() {
    let long = "x\n".repeat(100_000);
    for xml in [
        "<domain><name>a</name><currentMemory>1</currentMem1'/>\n  <vcpu placement='stface></domain>"
            .to_string(),
        format!("<domain><name>a</nam{long}>"),
        format!(
            "<domain><name>a</name><uuid>1</uuid><metadata><q:qnet xmlns:q=\"{QNET_XMLNS}\">\
             <q:forward proto=\"tcp\" host-port=\"80\" host-addr=\"1&#10;2\"/></q:qnet></metadata></domain>"
        ),
    ] {
        let err = parse_domain(&xml).unwrap_err().to_string();
        assert!(!err.chars().any(char::is_control), "{err:?}");
        assert!(err.len() <= 1100, "{}", err.len());
    }
}
