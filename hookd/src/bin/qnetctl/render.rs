//! Replies as tables for people (`--json` prints them as they came).

use qnet_api::{
    ForwardInfo, GuestNic, GuestStatus, NetworkInfo, NetworkStatus, Problem, Reply, Reservation,
};

pub fn reply(reply: &Reply) -> String {
    match reply {
        Reply::Done { message } => format!("{message}\n"),
        Reply::Status { networks } => status(networks),
        Reply::Guests { guests } => self::guests(guests),
        Reply::Forwards { forwards } => self::forwards(forwards),
        Reply::Reservations { reservations } => self::reservations(reservations),
        Reply::Doctor { problems } => doctor(problems),
        Reply::Network { network } => self::network(network),
    }
}

/// `network show`: one key per line as the file writes it, and where its
/// value comes from.
fn network(network: &NetworkInfo) -> String {
    let state = if network.up { "up" } else { "down" };
    let place = network.file.as_deref().unwrap_or("the default network");
    let mut out = format!(
        "# network {} ({state}), configured in {place}\n",
        network.name
    );
    let rows = network
        .settings
        .iter()
        .map(|s| {
            vec![
                format!("{} = {}", s.key, s.value),
                format!("# {}", s.source),
            ]
        })
        .collect();
    out.push_str(&table(&["KEY = VALUE", "# SOURCE"], rows));
    out
}

fn status(networks: &[NetworkStatus]) -> String {
    let rows = networks
        .iter()
        .map(|n| {
            let subnet = match &n.ipv6 {
                Some(v6) => format!("{} {v6}", n.subnet),
                None => n.subnet.clone(),
            };
            let state = match (&n.degraded, n.up) {
                (Some(why), true) => format!("degraded: {why}"),
                (None, true) => "up".into(),
                (_, false) => "down".into(),
            };
            let owner = n.owner.map_or("-".into(), |uid| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map_or(uid.to_string(), |u| u.name)
            });
            vec![
                n.name.clone(),
                owner,
                n.mode.to_string(),
                n.bridge.clone(),
                subnet,
                state,
                n.guests.to_string(),
                bytes(n.rx_bytes),
                bytes(n.tx_bytes),
            ]
        })
        .collect();
    table(
        &[
            "NETWORK", "OWNER", "MODE", "BRIDGE", "SUBNET", "STATE", "GUESTS", "RX", "TX",
        ],
        rows,
    )
}

fn guests(guests: &[GuestStatus]) -> String {
    let rows = guests
        .iter()
        .flat_map(|g| {
            let user = g.user.clone().unwrap_or_else(|| g.uid.to_string());
            let name = g.name.clone().unwrap_or_else(|| "-".into());
            let uuid = g.uuid.clone().unwrap_or_else(|| "-".into());
            let nics: Vec<Option<&GuestNic>> = if g.nics.is_empty() {
                vec![None]
            } else {
                g.nics.iter().map(Some).collect()
            };
            nics.into_iter()
                .map(|nic| {
                    vec![
                        name.clone(),
                        uuid.clone(),
                        g.pid.to_string(),
                        user.clone(),
                        nic.map_or("-".into(), |n| n.mac.to_string()),
                        nic.and_then(|n| n.ip)
                            .map_or("-".into(), |ip| ip.to_string()),
                        nic.and_then(|n| n.network.clone())
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect::<Vec<_>>()
        })
        .collect();
    table(
        &["GUEST", "UUID", "PID", "USER", "MAC", "IP", "NETWORK"],
        rows,
    )
}

fn forwards(forwards: &[ForwardInfo]) -> String {
    let rows = forwards
        .iter()
        .map(|f| {
            let spec = &f.forward;
            let (first, last) = (spec.ports.first(), spec.ports.last());
            let host = if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            };
            let target = match (f.guest_addr, &f.inactive) {
                (Some(addr), _) => addr.to_string(),
                (None, Some(why)) => format!("- ({why})"),
                (None, None) => "- (guest not running)".into(),
            };
            vec![
                spec.guest.to_string(),
                spec.proto.to_string(),
                host,
                spec.ports.guest().to_string(),
                spec.host_addr.map_or("*".into(), |a| a.to_string()),
                target,
                f.origin.clone(),
            ]
        })
        .collect();
    table(
        &[
            "GUEST",
            "PROTO",
            "HOST",
            "GUEST-PORT",
            "HOST-ADDR",
            "GUEST-ADDR",
            "ORIGIN",
        ],
        rows,
    )
}

fn reservations(reservations: &[Reservation]) -> String {
    let rows = reservations
        .iter()
        .map(|r| {
            vec![
                r.network.clone(),
                r.mac.to_string(),
                r.ip.to_string(),
                r.name.as_ref().map_or("-".into(), ToString::to_string),
                if r.explicit { "explicit" } else { "sticky" }.to_string(),
            ]
        })
        .collect();
    table(&["NETWORK", "MAC", "IP", "NAME", "KIND"], rows)
}

/// A left-aligned table with a header row.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// One line per problem, with its fix, in the helpers' style.
fn doctor(problems: &[Problem]) -> String {
    if problems.is_empty() {
        return "no problem found\n".into();
    }
    problems
        .iter()
        .map(|p| format!("{}: {}: {}\n", p.subject, p.problem, p.fix))
        .collect()
}
