//! The lease status files of libvirt's dnsmasq
//! (`/var/lib/libvirt/dnsmasq/BRIDGE.status`), which hookd follows; the
//! leases in them come from guests' DHCP requests (hostnames, client ids).
//!
//! Properties: parsing never panics; an error is one line; every lease
//! kept is a usable IPv4 address with a unicast MAC and a bounded
//! hostname, and there are no more leases than input; printing the leases
//! as libvirt does and parsing them again gives the same leases.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qnet_fuzz::{assert_bounded, assert_one_line};
use qnet_hookd::libvirt::{address_of, parse_status, Lease};
use serde_json::json;

fn print(leases: &[Lease]) -> String {
    let entries: Vec<serde_json::Value> = leases
        .iter()
        .map(|l| {
            let mut entry = json!({
                "ip-address": l.ip.to_string(),
                "mac-address": l.mac.to_string(),
                "expiry-time": l.expiry.unwrap_or(0),
            });
            if let Some(h) = &l.hostname {
                entry["hostname"] = json!(h);
            }
            entry
        })
        .collect();
    serde_json::to_string_pretty(&entries).expect("leases encode")
}

fuzz_target!(|data: &[u8]| {
    let path = "/var/lib/libvirt/dnsmasq/virbr0.status";
    let leases = match parse_status(path, data) {
        Ok(leases) => leases,
        Err(e) => return assert_one_line("status error", &e.to_string(), data.len()),
    };
    assert_bounded("leases", leases.len() * 16, data.len());
    for lease in &leases {
        let ip = lease.ip;
        assert!(
            !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
        );
        assert!(lease.mac.octets()[0] & 1 == 0);
        assert!(lease
            .hostname
            .as_ref()
            .is_none_or(|h| !h.is_empty() && h.len() <= 255));
        assert!(lease.expiry != Some(0));
        assert!(address_of(&leases, lease.mac).is_some());
    }
    let printed = print(&leases);
    let again = parse_status(path, printed.as_bytes())
        .unwrap_or_else(|e| panic!("the printed leases do not parse: {e}\n{printed}"));
    assert_eq!(leases, again, "{printed}");
});
