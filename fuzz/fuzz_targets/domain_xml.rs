//! The libvirt domain XML with qnet's `<metadata>` block, as the libvirt
//! hook reads it from stdin (written by whoever defined the domain).
//!
//! Properties: parsing never panics; an error is one line; what is kept is
//! bounded by the input; every forward and fixed address names a MAC of
//! the domain; printing the parsed domain as XML (qnet block included) and
//! parsing it again gives the same domain.
#![no_main]

use std::fmt::Write;

use libfuzzer_sys::fuzz_target;
use qnet_fuzz::{assert_bounded, assert_one_line};
use qnet_libvirt_hook::{parse_domain_bytes, DomainInfo, QNET_XMLNS};
use quick_xml::escape::escape;

fn attr(out: &mut String, key: &str, value: Option<&str>) {
    if let Some(value) = value {
        let _ = write!(out, " {key}=\"{}\"", escape(value));
    }
}

fn print(d: &DomainInfo) -> String {
    let mut out = format!(
        "<domain type='kvm'>\n  <name>{}</name>\n  <uuid>{}</uuid>\n",
        escape(&d.name),
        escape(&d.uuid)
    );
    if d.has_qnet {
        let _ = writeln!(out, "  <metadata>\n    <q:qnet xmlns:q=\"{QNET_XMLNS}\">");
        for f in &d.forwards {
            out.push_str("      <q:forward");
            attr(&mut out, "proto", Some(&f.proto.to_string()));
            let (first, last) = (f.ports.first(), f.ports.last());
            let host = if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            };
            attr(&mut out, "host-port", Some(&host));
            attr(&mut out, "guest-port", Some(&f.ports.guest().to_string()));
            attr(
                &mut out,
                "host-addr",
                f.host_addr.map(|a| a.to_string()).as_deref(),
            );
            // A forward names the guest by MAC only when it said so.
            let by_mac = f.guest.as_str() != d.name;
            attr(&mut out, "mac", by_mac.then(|| f.guest.as_str()));
            attr(&mut out, "network", f.network.as_deref());
            out.push_str("/>\n");
        }
        for (mac, ip) in &d.addresses {
            let _ = writeln!(out, "      <q:address mac=\"{mac}\" ip=\"{ip}\"/>");
        }
        out.push_str("    </q:qnet>\n  </metadata>\n");
    }
    out.push_str("  <devices>\n");
    for i in &d.interfaces {
        out.push_str("    <interface");
        attr(&mut out, "type", Some(&i.kind));
        let _ = write!(out, ">\n      <mac address=\"{}\"/>\n", i.mac);
        if i.source_network.is_some() || i.source_bridge.is_some() || i.source_dev.is_some() {
            out.push_str("      <source");
            attr(&mut out, "network", i.source_network.as_deref());
            attr(&mut out, "bridge", i.source_bridge.as_deref());
            attr(&mut out, "dev", i.source_dev.as_deref());
            out.push_str("/>\n");
        }
        if let Some(dev) = &i.target_dev {
            out.push_str("      <target");
            attr(&mut out, "dev", Some(dev));
            out.push_str("/>\n");
        }
        out.push_str("    </interface>\n");
    }
    out.push_str("  </devices>\n</domain>\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let domain = match parse_domain_bytes(data) {
        Ok(domain) => domain,
        Err(e) => return assert_one_line("domain error", &e.to_string(), data.len()),
    };
    assert_bounded("interfaces", domain.interfaces.len() * 8, data.len());
    assert_bounded(
        "forwards",
        (domain.forwards.len() + domain.addresses.len()) * 8,
        data.len(),
    );
    assert!(!domain.name.is_empty() && domain.name.trim() == domain.name);
    assert!(!domain.uuid.is_empty() && domain.uuid.trim() == domain.uuid);
    let has = |mac| domain.interfaces.iter().any(|i| i.mac == mac);
    for (i, (mac, _)) in domain.addresses.iter().enumerate() {
        assert!(has(*mac));
        assert!(domain.addresses[i + 1..].iter().all(|(m, _)| m != mac));
    }
    for f in &domain.forwards {
        assert!(f.guest.as_str() == domain.name || f.guest.mac().is_some_and(has));
    }
    let nics = domain.nics();
    assert_eq!(nics.len(), domain.interfaces.len());

    let printed = print(&domain);
    let again = parse_domain_bytes(printed.as_bytes())
        .unwrap_or_else(|e| panic!("the printed domain does not parse: {e}\n{printed}"));
    assert_eq!(domain, again, "{printed}");
});
