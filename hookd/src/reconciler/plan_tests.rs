use crate::state::NicNetwork;
use std::net::Ipv4Addr;

use qnet_api::{GuestName, PortMap, Proto};

use super::*;
use crate::config::Config;
use crate::procfs::Process;
use crate::state::alloc::ReservationTable as _;
use crate::state::{Nic, Reservation};

fn mac(n: u8) -> Mac {
    Mac::from_octets([0x52, 0x54, 0, 0, 0, n])
}

fn nic_info(name: &str, n: u8) -> NicInfo {
    NicInfo {
        name: name.into(),
        mac: mac(n),
    }
}

fn tap(name: &str, bridge: Option<&str>, fd: u32) -> GuestPort {
    GuestPort {
        kind: PortKind::Tap,
        ifname: name.parse().unwrap(),
        ifindex: fd,
        mac: Some(Mac::from_octets([0xfe, 0, 0, 0, 0, fd as u8])),
        master: bridge.map(|b| b.parse().unwrap()),
        lower: None,
        fd,
    }
}

fn lab_of(bridge: &str) -> Option<NetName> {
    match bridge {
        "qnlab" => Some("lab".parse().unwrap()),
        "qniso" => Some("iso".parse().unwrap()),
        _ => None,
    }
}

#[test]
fn taps_pair_with_nics_in_order() {
    let nics = [nic_info("net0", 1), nic_info("net1", 2)];
    let ports = [tap("tap0", Some("qnlab"), 5), tap("tap1", Some("qniso"), 6)];
    let placed = place_nics(&nics, &ports, lab_of);
    assert_eq!(placed[0].network.as_deref(), Some("lab"));
    assert_eq!(placed[1].network.as_deref(), Some("iso"));
    assert_eq!(placed[1].device.as_deref(), Some("tap1"));
    assert_eq!(placed[0].qemu_name, "net0");
}

#[test]
fn unpaired_nics_go_to_the_only_network_of_the_taps() {
    // Two NICs, one TAP (the other NIC on user networking, say).
    let nics = [nic_info("net0", 1), nic_info("net1", 2)];
    let one = [tap("tap0", Some("qnlab"), 5)];
    let placed = place_nics(&nics, &one, lab_of);
    assert!(placed.iter().all(|p| p.network.as_deref() == Some("lab")));
    assert!(placed.iter().all(|p| p.device.is_none()));
    // Taps on two networks: nobody can tell.
    let nics = [nic_info("a", 1), nic_info("b", 2), nic_info("c", 3)];
    let two = [tap("tap0", Some("qnlab"), 5), tap("tap1", Some("qniso"), 6)];
    assert!(place_nics(&nics, &two, lab_of)
        .iter()
        .all(|p| p.network.is_none()));
}

#[test]
fn a_macvtap_matches_its_nic_by_mac() {
    let nics = [nic_info("net0", 1)];
    let macvtap = GuestPort {
        kind: PortKind::Macvtap,
        ifname: "qmvtap0".parse().unwrap(),
        ifindex: 9,
        mac: Some(mac(1)),
        master: None,
        lower: Some("eth0".parse().unwrap()),
        fd: 4,
    };
    let placed = place_nics(&nics, &[macvtap], lab_of);
    assert_eq!(placed[0].device.as_deref(), Some("qmvtap0"));
    assert_eq!(placed[0].network, None);
}

fn guest(name: &str, n: u8, ip: [u8; 4]) -> Guest {
    Guest {
        process: Process {
            pid: u32::from(n),
            start_time: 1,
        },
        uid: 1000,
        name: Some(GuestName::kept(name)),
        uuid: None,
        qmp_server: None,
        nics: vec![Nic {
            mac: mac(n),
            qemu_name: Some("net0".into()),
            device: None,
            network: Some(NicNetwork::Qnet("qnet0".parse().unwrap())),
            ip: Some(Ipv4Addr::from(ip)),
        }],
    }
}

fn reservation(ip: [u8; 4], name: Option<&str>, explicit: bool) -> Reservation {
    Reservation {
        ip: Ipv4Addr::from(ip),
        name: name.map(|n| n.parse().unwrap()),
        explicit,
        owner_uid: None,
        nic: None,
        last_seen: 0,
    }
}

#[test]
fn dns_names_are_for_running_guests_and_explicit_reservations() {
    let mut state = State::default();
    let net: NetName = "qnet0".parse().unwrap();
    let mut table = state.reservations.table_mut(&net);
    table.insert(mac(1), reservation([10, 0, 0, 2], Some("web"), false));
    table.insert(mac(2), reservation([10, 0, 0, 3], Some("old"), false));
    table.insert(mac(3), reservation([10, 0, 0, 4], Some("db"), true));
    state.guests.insert(1, guest("web", 1, [10, 0, 0, 2]));
    let (dhcp, dns) = dnsmasq_hosts(&state, &net);
    assert_eq!(dhcp.len(), 3, "every reservation is served");
    let names: Vec<&str> = dns.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["web", "db"]);
}

fn spec(guest: &str, first: u16, last: u16) -> ForwardSpec {
    ForwardSpec {
        guest: guest.parse().unwrap(),
        proto: Proto::Tcp,
        ports: PortMap::new(first, last, first).unwrap(),
        host_addr: None,
        network: None,
    }
}

#[test]
fn elements_exist_only_for_guests_on_networks_that_are_up() {
    let net = Config::default_network("10.0.0.0/24".parse().unwrap());
    let web = guest("web", 1, [10, 0, 0, 2]);
    let elsewhere = guest("far", 2, [192, 168, 9, 9]);
    let specs = [spec("web", 8080, 8081), spec("far", 9000, 9000)];
    let elements = desired_elements(&specs, &[&web, &elsewhere], &[&net]);
    let ports: Vec<u16> = elements.iter().map(|e| e.host_port).collect();
    assert_eq!(ports, [8080, 8081]);
    assert!(
        desired_elements(&specs, &[&web], &[]).is_empty(),
        "network down"
    );
}

#[test]
fn the_config_file_wins_over_run_time_forwards_and_earlier_wins_among_those() {
    let config = [spec("a", 8080, 8080)];
    let runtime = [
        spec("b", 8080, 8080),
        spec("c", 9000, 9010),
        spec("d", 9005, 9005),
        spec("e", 7000, 7000),
    ];
    let lost = clashes(&config, &runtime);
    let losers: Vec<usize> = lost.keys().copied().collect();
    assert_eq!(losers, [0, 2]);
    assert_eq!(lost[&0].guest, "a");
    assert_eq!(lost[&2].guest, "c");
    assert!(clashes(&config, &runtime[3..]).is_empty());
}
