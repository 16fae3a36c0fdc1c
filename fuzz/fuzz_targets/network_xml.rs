//! libvirt's network status files (`/run/libvirt/network/NAME.xml`), which
//! the libvirt hook reads to tell hookd which NICs are on libvirt's own
//! networks.
//!
//! Properties: parsing never panics; an error is one line; the bridge is a
//! valid interface name; subnets are bounded by the input; printing the
//! parsed network and parsing it again gives the same network.
#![no_main]

use std::fmt::Write;

use libfuzzer_sys::fuzz_target;
use qnet_api::LibvirtNetwork;
use qnet_fuzz::{assert_bounded, assert_one_line};
use qnet_libvirt_hook::parse_network_status;
use quick_xml::escape::escape;

fn print(n: &LibvirtNetwork) -> String {
    let mut out = format!(
        "<networkstatus>\n<network>\n  <name>{}</name>\n",
        escape(&n.name)
    );
    if let Some(mode) = &n.forward_mode {
        let _ = writeln!(out, "  <forward mode=\"{}\"/>", escape(mode));
    }
    let _ = writeln!(
        out,
        "  <bridge name=\"{}\" stp='on'/>",
        escape(n.bridge.as_str())
    );
    for net in &n.subnets {
        let _ = writeln!(
            out,
            "  <ip family='ipv4' address=\"{}\" prefix=\"{}\"/>",
            net.addr(),
            net.prefix_len()
        );
    }
    out.push_str("</network>\n</networkstatus>\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let network = match parse_network_status(text) {
        Ok(Some(network)) => network,
        Ok(None) => return,
        Err(e) => return assert_one_line("network error", &e.to_string(), data.len()),
    };
    assert_bounded("subnets", network.subnets.len() * 8, data.len());
    assert!(network.bridge.parse::<qnet_api::IfName>().is_ok());
    let printed = print(&network);
    let again = parse_network_status(&printed)
        .unwrap_or_else(|e| panic!("the printed network does not parse: {e}\n{printed}"))
        .expect("it has a bridge");
    assert_eq!(network, again, "{printed}");
});
