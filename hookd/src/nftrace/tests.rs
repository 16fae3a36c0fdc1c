use super::*;
use crate::api::IfName;
use std::str::FromStr;

fn lab(mode: Mode) -> NetworkConfig {
    let mut net = NetworkConfig::with_defaults("lab", mode, "10.9.0.0/24".parse().unwrap());
    net.bridge = IfName::from_str("qnlab").unwrap();
    net.own_mut().dhcp_range = ("10.9.0.2".parse().unwrap(), "10.9.0.200".parse().unwrap());
    net
}

/// What `nft -a monitor trace` printed for an outbound probe dropped by a
/// hand-written table (nft 1.0.6): one trace id per hook.
const DROPPED: &str = "\
trace id b8bc3515 inet qnet_probe trace_on packet: iif \"qnlab\" ether saddr 02:71:6e:65:74:70 ether daddr 02:00:00:00:00:01 ip saddr 10.9.0.254 ip daddr 203.0.113.1 ip dscp cs0 ip ecn not-ect ip ttl 64 ip id 1 ip protocol tcp ip length 40 tcp sport 40404 tcp dport 80 tcp flags == syn tcp window 64240 
trace id b8bc3515 inet qnet_probe trace_on rule iifname \"qnlab\" ip saddr 10.9.0.254 meta nftrace set 1 # handle 3 (verdict continue)
trace id b8bc3515 inet qnet_probe trace_on policy accept 
trace id f43e5fbb ip filter FORWARD packet: iif \"qnlab\" oif \"up0\" ether saddr 02:71:6e:65:74:70 ether daddr 02:00:00:00:00:01 ip saddr 10.9.0.254 ip daddr 203.0.113.1 ip dscp cs0 ip ecn not-ect ip ttl 63 ip id 1 ip length 40 tcp sport 40404 tcp dport 80 tcp flags == syn tcp window 64240 
trace id f43e5fbb ip filter FORWARD policy accept 
trace id f43e5fbb inet custom forwarding packet: iif \"qnlab\" oif \"up0\" ip saddr 10.9.0.254 ip daddr 203.0.113.1 tcp sport 40404 tcp dport 80 
trace id f43e5fbb inet custom forwarding rule iifname \"qnlab\" tcp dport 80 counter packets 1 bytes 40 drop # handle 2 (verdict drop)
";

#[test]
fn probes_come_from_a_spare_address_and_isolated_networks_get_no_outbound_one() {
    let net = lab(Mode::Nat);
    assert_eq!(
        spare_address(net.own(), &[]),
        Some("10.9.0.254".parse().unwrap())
    );
    let taken = ["10.9.0.254".parse().unwrap()];
    assert_eq!(
        spare_address(net.own(), &taken),
        Some("10.9.0.253".parse().unwrap())
    );
    let src = "10.9.0.254".parse().unwrap();
    let p = probes(&net, net.own(), src);
    assert_eq!(p.len(), 2);
    assert_eq!(
        (p[0].path, p[0].dst, p[0].dport),
        (Path::Dhcp, net.own().router, 67)
    );
    assert_eq!(
        (p[1].path, p[1].dst, p[1].dport),
        (Path::Outbound, OUTSIDE, 80)
    );
    let isolated = lab(Mode::Isolated);
    assert_eq!(probes(&isolated, isolated.own(), src).len(), 1);
    // A /31 has no host address besides the router's.
    let mut tiny = lab(Mode::Nat);
    tiny.own_mut().subnet = "10.9.0.0/30".parse().unwrap();
    tiny.own_mut().router = "10.9.0.2".parse().unwrap();
    assert_eq!(
        spare_address(tiny.own(), &[]),
        Some("10.9.0.1".parse().unwrap())
    );
    assert_eq!(
        spare_address(tiny.own(), &["10.9.0.1".parse().unwrap()]),
        None
    );
}

#[test]
fn frames_carry_valid_checksums() {
    let net = lab(Mode::Nat);
    for probe in probes(&net, net.own(), "10.9.0.254".parse().unwrap()) {
        let f = frame(&probe, [2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[6..12], &PROBE_MAC);
        let ip = &f[14..34];
        // A correct header sums to zero (its checksum included).
        assert_eq!(checksum(ip), 0);
        let l4 = &f[34..];
        let mut pseudo = ip[12..20].to_vec();
        pseudo.extend_from_slice(&[0, ip[9]]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(l4);
        assert_eq!(checksum(&pseudo), 0, "{probe:?}");
        assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), probe.dport);
    }
}

#[test]
fn the_table_marks_and_ends_only_the_probes() {
    let t = probe_table("qnlab", "10.9.0.254".parse().unwrap());
    assert!(
        t.starts_with("table inet qnet_probe\ndelete table inet qnet_probe\n"),
        "{t}"
    );
    assert_eq!(
        t.matches("iifname \"qnlab\" ip saddr 10.9.0.254").count(),
        3,
        "{t}"
    );
    assert!(t.contains("hook prerouting priority -500;"), "{t}");
    assert!(t.contains("hook forward priority 2147483647;"), "{t}");
    assert!(t.contains("hook input priority 2147483647;"), "{t}");
}

#[test]
fn a_drop_by_someone_else_is_named_with_its_table_chain_rule_and_handle() {
    let net = lab(Mode::Nat);
    let p = probes(&net, net.own(), "10.9.0.254".parse().unwrap());
    let got = outcome(DROPPED, &p[1]);
    assert_eq!(
        got,
        Outcome::Dropped {
            family: "inet".into(),
            table: "custom".into(),
            chain: "forwarding".into(),
            what: "iifname \"qnlab\" tcp dport 80 counter drop".into(),
            handle: Some(2),
        }
    );
    let problem = problem("lab", "qnlab", &p[1], &got).unwrap();
    assert_eq!(
        problem.problem,
        "nftrace: a guest's new connection out (TCP 10.9.0.254:40404 -> 203.0.113.1:80) is dropped in table inet custom, \
         chain forwarding, by rule `iifname \"qnlab\" tcp dport 80 counter drop` (handle 2)"
    );
    assert!(
        problem
            .fix
            .starts_with("accept it ahead of that rule: `nft insert rule inet custom forwarding position 2 iifname \"qnlab\" accept`"),
        "{}",
        problem.fix
    );
    // The DHCP probe is not in this trace.
    assert_eq!(outcome(DROPPED, &p[0]), Outcome::Unseen);
}

#[test]
fn policies_our_end_and_no_route_are_told_apart() {
    let net = lab(Mode::Nat);
    let p = probes(&net, net.own(), "10.9.0.254".parse().unwrap());
    let head = DROPPED.lines().take(4).collect::<Vec<_>>().join("\n");
    let policy = format!("{head}\ntrace id f43e5fbb ip filter FORWARD policy drop \n");
    match outcome(&policy, &p[1]) {
        Outcome::Dropped {
            what,
            handle,
            chain,
            ..
        } => {
            assert_eq!(
                (what.as_str(), handle, chain.as_str()),
                ("policy drop", None, "FORWARD")
            )
        }
        other => panic!("{other:?}"),
    }
    let passed = format!(
        "{head}\ntrace id f43e5fbb ip filter FORWARD policy accept \n\
         trace id f43e5fbb inet qnet_probe forward_last rule iifname \"qnlab\" ip saddr 10.9.0.254 drop # handle 5 (verdict drop)\n"
    );
    assert_eq!(outcome(&passed, &p[1]), Outcome::Passed);
    assert_eq!(problem("lab", "qnlab", &p[1], &Outcome::Passed), None);
    let prerouting_only = DROPPED.lines().take(3).collect::<Vec<_>>().join("\n");
    assert_eq!(outcome(&prerouting_only, &p[1]), Outcome::NotRouted);
    assert!(problem("lab", "qnlab", &p[1], &Outcome::NotRouted)
        .unwrap()
        .problem
        .ends_with("the host has no route to 203.0.113.1"));
    assert_eq!(outcome("", &p[1]), Outcome::Unseen);
}
