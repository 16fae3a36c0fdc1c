use std::net::Ipv4Addr;

use qnet_api::{GuestName, GuestUuid};

use super::*;
use crate::procfs::Process;
use crate::state::journal;
use crate::state::saved::SavedReservation;
use crate::state::{GuestKey, LibvirtAddress, Nic, NicNetwork, NicOwner};

fn reservation(ip: [u8; 4]) -> Reservation {
    Reservation {
        ip: Ipv4Addr::from(ip),
        name: Some("a".parse().unwrap()),
        explicit: false,
        owner_uid: Some(1000),
        nic: Some(NicOwner {
            guest: "name:a".parse().unwrap(),
            nic: "net0".into(),
        }),
        last_seen: 7,
    }
}

fn mac(n: u8) -> Mac {
    Mac::from_octets([0x52, 0x54, 0, 0, 0, n])
}

fn forward(port: u16) -> Forward {
    Forward {
        spec: serde_json::from_value(serde_json::json!({
            "guest": "web", "proto": "tcp", "host_ports": [port, port], "guest_port": 80
        }))
        .unwrap(),
        owner_uid: 0,
        libvirt: None,
    }
}

fn guest(pid: u32) -> Guest {
    Guest {
        process: Process { pid, start_time: 1 },
        uid: 0,
        name: Some(GuestName::kept("web")),
        uuid: None,
        qmp_server: None,
        nics: vec![Nic {
            mac: mac(1),
            qemu_name: Some("net0".into()),
            device: Some("tap0".parse().unwrap()),
            network: Some(NicNetwork::Qnet("lab".parse().unwrap())),
            ip: Some(Ipv4Addr::new(10, 0, 0, 5)),
        }],
    }
}

/// A state directory and a run directory, apart as on a host (where
/// the run directory is tmpfs).
struct Dirs {
    state: tempfile::TempDir,
    run: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        Dirs {
            state: tempfile::tempdir().unwrap(),
            run: tempfile::tempdir().unwrap(),
        }
    }

    /// The state directory.
    fn path(&self) -> &Path {
        self.state.path()
    }

    fn run(&self) -> &Path {
        self.run.path()
    }

    fn open(&self) -> (Store, State) {
        Store::open(self.path(), self.run()).unwrap()
    }
}

/// A store opened on new empty directories, and its (empty) state.
fn empty_store() -> (Dirs, Store, State) {
    let dir = Dirs::new();
    let (store, state) = dir.open();
    (dir, store, state)
}

/// What a store opened on `dir` loads.
fn reopened(dir: &Dirs) -> State {
    dir.open().1
}

/// `state.json` of `dir`, which must hold no record itself.
fn header(dir: &Path) -> String {
    fs::read_to_string(dir.join(STATE_FILE)).unwrap()
}

fn modified(path: &Path) -> std::time::SystemTime {
    fs::metadata(path).unwrap().modified().unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn every_record_round_trips_through_files_of_its_own() {
    let (dir, mut store, mut state) = empty_store();
    assert_eq!(state, State::default());
    let lab: NetName = "lab".parse().unwrap();
    state
        .reservations
        .table_mut(&lab)
        .insert(mac(1), reservation([10, 0, 0, 5]));
    state.guests.insert(42, guest(42));
    state.forwards = vec![forward(8080), forward(8081)];
    state.networks_down.insert(lab.clone());
    state.libvirt_addresses.insert(
        mac(9),
        LibvirtAddress {
            network: "default".into(),
            bridge: "virbr0".parse().unwrap(),
            ip: Ipv4Addr::new(192, 168, 122, 7),
            fixed: false,
        },
    );
    store.save(&mut state).unwrap();
    assert_eq!(names(&dir.path().join(RESERVATIONS_DIR)), ["lab.jsonl"]);
    assert_eq!(names(&dir.run().join("guests")), ["42.json"]);
    assert_eq!(names(&dir.path().join("forwards")).len(), 2);
    let header = header(dir.path());
    assert!(
        !header.contains("8080") && !header.contains("10.0.0.5"),
        "{header}"
    );
    assert_eq!(reopened(&dir), state);
}

#[test]
fn a_save_writes_only_what_changed() {
    let (dir, mut store, mut state) = empty_store();
    state.guests.insert(1, guest(1));
    state.guests.insert(2, guest(2));
    store.save(&mut state).unwrap();
    let first = modified(&dir.run().join("guests/1.json"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    state.guests.get_mut(&2).unwrap().uid = 5;
    state.guests.insert(3, guest(3));
    state.guests.remove(&1);
    store.save(&mut state).unwrap();
    assert_eq!(names(&dir.run().join("guests")), ["2.json", "3.json"]);
    state.guests.insert(1, guest(1));
    store.save(&mut state).unwrap();
    let again = modified(&dir.run().join("guests/1.json"));
    assert_ne!(first, again, "rewritten after it was removed");
    let untouched = modified(&dir.run().join("guests/3.json"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    store.save(&mut state).unwrap();
    let same = modified(&dir.run().join("guests/3.json"));
    assert_eq!(untouched, same, "an unchanged record is not rewritten");
}

#[test]
fn version_1_state_loads_and_moves_its_records_to_files() {
    let dir = Dirs::new();
    // As version 1 wrote it: everything inside state.json.
    fs::write(
        dir.path().join(STATE_FILE),
        serde_json::json!({
            "version": 1,
            "default_subnet": "10.213.7.0/24",
            "networks_down": ["lab"],
            "reservations": {"qnet0": {"52:54:00:00:00:0a": {"ip": "10.213.7.2", "name": "a", "explicit": true}}},
            "guests": {"42": {"pid": 42, "start_time": 9, "uid": 0, "name": "web", "uuid": null,
                "qmp_server": null, "nics": [{"mac": "52:54:00:00:00:0a", "device": "tap0",
                "network": "qnet0", "ip": "10.213.7.2"}]}},
            "forwards": [{"guest": "web", "proto": "tcp", "host_ports": [8080, 8080], "guest_port": 80, "owner_uid": 0}],
            "attached": [],
            "libvirt_addresses": {}
        })
        .to_string(),
    )
    .unwrap();
    let (mut store, mut state) = dir.open();
    let qnet0: NetName = "qnet0".parse().unwrap();
    let mac_a: Mac = "52:54:00:00:00:0a".parse().unwrap();
    assert_eq!(
        state.reservations[&qnet0][&mac_a].ip,
        Ipv4Addr::new(10, 213, 7, 2)
    );
    assert!(state.reservations[&qnet0][&mac_a].explicit);
    assert_eq!(state.guests[&42].nics[0].mac, mac_a);
    assert_eq!(state.forwards.len(), 1);
    assert_eq!(state.default_subnet, Some("10.213.7.0/24".parse().unwrap()));
    store.save(&mut state).unwrap();
    let header = header(dir.path());
    assert!(
        header.contains(&format!("\"version\": {}", saved::VERSION))
            && !header.contains("10.213.7.2"),
        "{header}"
    );
    // The guest's record is written where guests' records live now.
    assert_eq!(names(&dir.run().join(GUESTS_DIR)), ["42.json"]);
    assert!(!dir.path().join(GUESTS_DIR).exists());
    assert_eq!(reopened(&dir), state);
}

#[test]
fn bad_files_are_set_aside_and_the_rest_loads() {
    let (dir, mut store, mut state) = empty_store();
    state.forwards = vec![forward(8080)];
    store.save(&mut state).unwrap();
    let forwards = dir.path().join(FORWARDS_DIR);
    // Truncated, reversed range, overflowing range, not JSON at all.
    fs::write(forwards.join("tcp-1-a.json"), "{\"guest\": \"web\", ").unwrap();
    for (name, ports, guest) in [
        ("tcp-9000-b.json", [9000, 8000], 80),
        ("tcp-60000-c.json", [60000, 60010], 65530),
    ] {
        fs::write(
            forwards.join(name),
            serde_json::json!({"guest": "web", "proto": "tcp", "host_ports": ports, "guest_port": guest, "owner_uid": 0}).to_string(),
        )
        .unwrap();
    }
    fs::create_dir_all(dir.path().join("reservations/lab")).unwrap();
    fs::write(dir.path().join("reservations/lab/nonsense.json"), "{}").unwrap();
    fs::write(dir.path().join(".state.json.tmp.999"), "half").unwrap();
    assert_eq!(reopened(&dir).forwards, state.forwards);
    let left = names(&forwards);
    for bad in [
        "tcp-1-a.json.bad",
        "tcp-9000-b.json.bad",
        "tcp-60000-c.json.bad",
    ] {
        assert!(left.contains(&bad.to_string()), "{left:?}");
    }
    assert!(!dir.path().join(".state.json.tmp.999").exists());
    assert!(dir
        .path()
        .join("reservations/lab/nonsense.json.bad")
        .exists());
}

/// A guest's record left empty by a power cut (they are not fsynced) is
/// removed: its QEMU is gone. An empty record of anything else is bad.
#[test]
fn an_empty_guest_record_is_removed_not_set_aside() {
    let (dir, mut store, mut state) = empty_store();
    state.guests.insert(7, guest(7));
    store.save(&mut state).unwrap();
    let guests = dir.run().join(GUESTS_DIR);
    fs::write(guests.join("8.json"), "").unwrap();
    fs::create_dir_all(dir.path().join(FORWARDS_DIR)).unwrap();
    fs::write(dir.path().join(FORWARDS_DIR).join("tcp-1-a.json"), "").unwrap();
    assert_eq!(reopened(&dir).guests, state.guests);
    assert_eq!(names(&guests), ["7.json"]);
    assert_eq!(names(&dir.path().join(FORWARDS_DIR)), ["tcp-1-a.json.bad"]);
}

#[test]
fn a_corrupt_state_file_is_set_aside_not_fatal() {
    let dir = Dirs::new();
    fs::write(dir.path().join(STATE_FILE), "{not json").unwrap();
    assert_eq!(reopened(&dir), State::default());
    assert!(dir.path().join("state.json.bad").exists());
}

#[test]
fn a_full_disk_is_an_error_and_leaves_no_temp_file() {
    let (dir, mut store, mut state) = empty_store();
    // A forwards "directory" that is a file: every write into it fails.
    fs::write(dir.path().join(FORWARDS_DIR), "").unwrap();
    state.forwards = vec![forward(8080)];
    let err = store.save(&mut state).unwrap_err();
    assert!(err.to_string().contains("forwards"), "{err}");
    // Nothing was recorded as written: the next save tries again.
    fs::remove_file(dir.path().join(FORWARDS_DIR)).unwrap();
    store.save(&mut state).unwrap();
    assert_eq!(names(&dir.path().join(FORWARDS_DIR)).len(), 1);
}

#[test]
fn temp_files_of_every_record_directory_are_swept_at_open() {
    let dir = Dirs::new();
    let net_dir = dir.path().join(RESERVATIONS_DIR).join("lab");
    fs::create_dir_all(&net_dir).unwrap();
    fs::create_dir_all(dir.path().join(FORWARDS_DIR)).unwrap();
    fs::create_dir_all(dir.run().join(GUESTS_DIR)).unwrap();
    for path in [
        dir.path().join(".state.json.tmp.41"),
        net_dir.join(".52-54-00-00-00-01.json.tmp.42"),
        dir.path().join(FORWARDS_DIR).join(".tcp-80-00.json.tmp.43"),
        dir.run().join(GUESTS_DIR).join(".7.json.tmp.44"),
    ] {
        fs::write(path, b"{").unwrap();
    }
    dir.open();
    assert!(names(&net_dir).is_empty(), "{:?}", names(&net_dir));
    assert!(names(&dir.path().join(FORWARDS_DIR)).is_empty());
    assert!(names(&dir.run().join(GUESTS_DIR)).is_empty());
    assert!(!dir.path().join(".state.json.tmp.41").exists());
}

/// The lines of `lab`'s journal in `dir`.
fn journal_lines(dir: &Path) -> Vec<String> {
    let text = fs::read_to_string(dir.join(RESERVATIONS_DIR).join("lab.jsonl")).unwrap();
    text.lines().map(str::to_owned).collect()
}

fn lab() -> NetName {
    "lab".parse().unwrap()
}

/// A store on a new directory whose `lab` has `n` reservations, saved.
fn store_with_lab(n: u8) -> (Dirs, Store, State) {
    let (dir, mut store, mut state) = empty_store();
    for n in 1..=n {
        let r = reservation([10, 0, 0, n]);
        state.reservations.table_mut(&lab()).insert(mac(n), r);
    }
    store.save(&mut state).unwrap();
    (dir, store, state)
}

#[test]
fn a_reservation_change_is_a_line_appended_to_its_journal() {
    let (dir, mut store, mut state) = store_with_lab(3);
    assert_eq!(journal_lines(dir.path()).len(), 3);
    state
        .reservations
        .get_mut("lab", &mac(2))
        .unwrap()
        .last_seen = 9;
    state.reservations.table_mut(&lab()).remove(&mac(3));
    store.save(&mut state).unwrap();
    let lines = journal_lines(dir.path());
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(lines[4].contains("\"remove\""), "{lines:?}");
    assert_eq!(reopened(&dir), state);
    // Without reservations, a network has no journal.
    state.reservations.table_mut(&lab()).remove(&mac(1));
    state.reservations.table_mut(&lab()).remove(&mac(2));
    store.save(&mut state).unwrap();
    assert!(names(&dir.path().join(RESERVATIONS_DIR)).is_empty());
    assert!(reopened(&dir).reservations.is_empty());
}

#[test]
fn a_journal_is_rewritten_once_it_holds_twice_its_reservations() {
    let (dir, mut store, mut state) = store_with_lab(1);
    let mut longest = 0;
    for seen in 0..300 {
        state
            .reservations
            .get_mut("lab", &mac(1))
            .unwrap()
            .last_seen = seen;
        store.save(&mut state).unwrap();
        longest = longest.max(journal_lines(dir.path()).len());
    }
    assert_eq!(longest, 2 + journal::SLACK, "lines before a rewrite");
    assert_eq!(reopened(&dir), state);
}

#[test]
fn a_journal_cut_short_or_edited_loads_what_it_can() {
    let (dir, _store, state) = store_with_lab(2);
    let path = dir.path().join(RESERVATIONS_DIR).join("lab.jsonl");
    let whole = fs::read(&path).unwrap();
    // A crash in the middle of an append: the torn line goes, silently.
    fs::write(&path, [&whole[..], b"{\"op\":\"set\",\"ma"].concat()).unwrap();
    assert_eq!(reopened(&dir), state);
    assert_eq!(fs::read(&path).unwrap(), whole, "rewritten without it");
    // A whole line that is not an entry: set aside, the rest kept.
    let lines = journal_lines(dir.path());
    fs::write(&path, format!("{}\nnot json\n{}\n", lines[0], lines[1])).unwrap();
    assert_eq!(reopened(&dir), state);
    assert!(dir
        .path()
        .join(RESERVATIONS_DIR)
        .join("lab.jsonl.bad")
        .exists());
    assert_eq!(journal_lines(dir.path()), lines);
}

#[test]
fn a_journal_changed_behind_the_daemon_is_written_again_from_its_state() {
    let (dir, mut store, mut state) = store_with_lab(1);
    fs::remove_file(dir.path().join(RESERVATIONS_DIR).join("lab.jsonl")).unwrap();
    let r = reservation([10, 0, 0, 6]);
    state.reservations.table_mut(&lab()).insert(mac(2), r);
    store.save(&mut state).unwrap();
    assert_eq!(journal_lines(dir.path()).len(), 2);
    assert_eq!(reopened(&dir), state);
}

/// Version 2 kept each reservation in a file of its own: they load, move
/// into the network's journal, and their files and directory go.
#[test]
fn version_2_reservation_files_move_into_the_journal() {
    let dir = Dirs::new();
    let net_dir = dir.path().join(RESERVATIONS_DIR).join("lab");
    fs::create_dir_all(&net_dir).unwrap();
    for n in [1u8, 2] {
        let record = SavedReservation::from(&reservation([10, 0, 0, n]));
        let name = format!("52-54-00-00-00-0{n}.json");
        fs::write(net_dir.join(name), serde_json::to_vec(&record).unwrap()).unwrap();
    }
    fs::write(dir.path().join(STATE_FILE), r#"{"version": 2}"#).unwrap();
    let state = reopened(&dir);
    let lab = &state.reservations[&lab()];
    assert_eq!(lab[&mac(2)], reservation([10, 0, 0, 2]));
    assert_eq!(lab.len(), 2);
    assert!(!net_dir.exists(), "{:?}", names(&net_dir));
    assert_eq!(journal_lines(dir.path()).len(), 2);
    assert_eq!(reopened(&dir), state);
}

/// Writes `guest` as an older daemon did: into `STATE/guests/`.
fn write_old_record(dir: &Dirs, guest: &Guest) {
    let old = dir.path().join(GUESTS_DIR);
    fs::create_dir_all(&old).unwrap();
    let path = old.join(format!("{}.json", guest.process.pid));
    fs::write(path, record_bytes(&SavedGuest::from(guest))).unwrap();
}

#[test]
fn an_older_daemons_guest_records_move_to_the_run_dir() {
    let dir = Dirs::new();
    for pid in [1, 2] {
        write_old_record(&dir, &guest(pid));
    }
    // A power cut's empty record and a temp file: removed as before.
    fs::write(dir.path().join(GUESTS_DIR).join("3.json"), "").unwrap();
    fs::write(dir.path().join(GUESTS_DIR).join(".4.json.tmp.5"), "{").unwrap();
    let (_, state) = dir.open();
    assert_eq!(state.guests.keys().collect::<Vec<_>>(), [&1, &2]);
    assert_eq!(state.guests[&2], guest(2));
    assert_eq!(names(&dir.run().join(GUESTS_DIR)), ["1.json", "2.json"]);
    assert!(!dir.path().join(GUESTS_DIR).exists());
    assert_eq!(reopened(&dir), state);
}

/// A crash while moving leaves a record in both places: the run
/// directory's is the newer. A bad old record stays where it is.
#[test]
fn a_guest_record_in_both_places_is_the_run_dirs() {
    let (dir, mut store, mut state) = empty_store();
    state.guests.insert(5, guest(5));
    store.save(&mut state).unwrap();
    let mut older = guest(5);
    older.uid = 9;
    write_old_record(&dir, &older);
    fs::write(dir.path().join(GUESTS_DIR).join("6.json"), "{").unwrap();
    assert_eq!(reopened(&dir).guests, state.guests);
    assert_eq!(names(&dir.run().join(GUESTS_DIR)), ["5.json"]);
    assert_eq!(names(&dir.path().join(GUESTS_DIR)), ["6.json.bad"]);
}

/// `--run-dir` and `--state-dir` one directory: nothing moves, nothing
/// is lost.
#[test]
fn one_dir_for_state_and_run_keeps_the_guests() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, mut state) = Store::open(dir.path(), dir.path()).unwrap();
    state.guests.insert(5, guest(5));
    store.save(&mut state).unwrap();
    let again = Store::open(dir.path(), dir.path()).unwrap().1;
    assert_eq!(again.guests, state.guests);
    assert_eq!(names(&dir.path().join(GUESTS_DIR)), ["5.json"]);
}

#[test]
fn known_networks_load_as_earlier_daemons_wrote_them() {
    let dir = Dirs::new();
    // As every daemon so far wrote them: flat, and a LAN network with
    // placeholders for the addressing it does not have.
    let nowhere = ["0.0.0.0", "0.0.0.0"];
    fs::write(
        dir.path().join(STATE_FILE),
        serde_json::json!({
            "version": 3,
            "known_networks": {
                "lab": {"name": "lab", "bridge": "qnlab", "mode": "nat", "subnet": "10.42.0.0/24",
                    "router": "10.42.0.1", "dhcp_range": ["10.42.0.2", "10.42.0.254"],
                    "domain": "lab.qnet", "uplink": null, "blocked_ports": [{"proto": "tcp", "port": 25}], "ipv6": null},
                "lan": {"name": "lan", "bridge": "lan", "mode": "bridged", "subnet": "0.0.0.0/32",
                    "router": "0.0.0.0", "dhcp_range": nowhere, "domain": "lan.qnet",
                    "uplink": "eth0", "blocked_ports": [], "ipv6": null},
                // No daemon writes a nat network without its domain.
                "odd": {"name": "odd", "bridge": "odd", "mode": "nat", "subnet": "10.43.0.0/24",
                    "router": "10.43.0.1", "dhcp_range": ["10.43.0.2", "10.43.0.9"],
                    "uplink": null, "ipv6": null}
            }
        })
        .to_string(),
    )
    .unwrap();
    let (mut store, mut state) = dir.open();
    let names: Vec<&str> = state.known_networks.keys().map(NetName::as_str).collect();
    assert_eq!(
        names,
        ["lab", "lan"],
        "the record without a domain is left out"
    );
    let lab = &state.known_networks[&"lab".parse::<NetName>().unwrap()];
    let own = lab.addressing.as_ref().expect("lab has addressing");
    assert_eq!(own.subnet, "10.42.0.0/24".parse().unwrap());
    assert_eq!(own.blocked_ports[0].to_string(), "tcp/25");
    let lan = &state.known_networks[&"lan".parse::<NetName>().unwrap()];
    assert_eq!(lan.addressing, None);
    assert_eq!(lan.uplink, Some("eth0".parse().unwrap()));
    // Written again the same way, so an earlier daemon still reads it.
    state.networks_down.insert("lab".parse().unwrap());
    store.save(&mut state).unwrap();
    let header: serde_json::Value = serde_json::from_str(&header(dir.path())).unwrap();
    let lan = &header["known_networks"]["lan"];
    assert_eq!(
        (&lan["subnet"], &lan["router"], &lan["domain"]),
        (
            &serde_json::json!("0.0.0.0/32"),
            &serde_json::json!("0.0.0.0"),
            &serde_json::json!("lan.qnet")
        )
    );
    assert_eq!(lan["dhcp_range"], serde_json::json!(nowhere));
    assert_eq!(reopened(&dir), state);
}

#[test]
fn a_nics_network_is_saved_flat_and_a_bad_qnet_name_loads_as_none() {
    let on = |network| Nic {
        mac: mac(1),
        qemu_name: None,
        device: None,
        network: Some(network),
        ip: Some(Ipv4Addr::new(192, 168, 122, 9)),
    };
    let libvirt = on(NicNetwork::Libvirt {
        name: "default".into(),
        bridge: "virbr0".parse().unwrap(),
    });
    let qnet = on(NicNetwork::Qnet("default".parse().unwrap()));
    for (nic, bridge) in [(&libvirt, Some("virbr0")), (&qnet, None)] {
        let saved = saved::SavedNic::from(nic);
        assert_eq!(saved.network.as_deref(), Some("default"));
        assert_eq!(saved.libvirt_bridge.as_ref().map(|b| b.as_str()), bridge);
        assert_eq!(&Nic::from(saved), nic);
    }
    // A qnet network that is no network name (a record edited by hand).
    let odd: saved::SavedNic = serde_json::from_value(serde_json::json!({
        "mac": "52:54:00:00:00:01", "device": null, "network": "no/such net", "ip": null
    }))
    .unwrap();
    assert_eq!(Nic::from(odd).network, None);
}

#[test]
fn a_reservations_owner_is_saved_as_earlier_daemons_wrote_it() {
    let uuid: GuestUuid = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0".parse().unwrap();
    let process = Process {
        pid: 42,
        start_time: 9,
    };
    for (key, saved) in [
        (
            GuestKey::Uuid(uuid),
            "uuid:4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
        ),
        (GuestKey::Name(GuestName::kept("web:1")), "name:web:1"),
        (GuestKey::Process(process), "pid:42:9"),
    ] {
        let mut owned = reservation([10, 0, 0, 2]);
        owned.nic = Some(NicOwner {
            guest: key.clone(),
            nic: "net0".into(),
        });
        let record = saved::SavedReservation::from(&owned);
        assert_eq!(record.nic.as_ref().map(|o| o.guest.as_str()), Some(saved));
        assert_eq!(Reservation::from(record), owned);
    }
    // An owner edited by hand: the reservation stays, owned by no NIC.
    for odd in ["uuid:../etc", "pid:42", "pid:x:9", "web", "mac:52"] {
        let record: saved::SavedReservation = serde_json::from_value(serde_json::json!({
            "ip": "10.0.0.2", "name": null, "explicit": false,
            "nic": {"guest": odd, "nic": "net0"}
        }))
        .unwrap();
        let loaded = Reservation::from(record);
        assert_eq!(
            (loaded.ip, loaded.nic),
            (Ipv4Addr::new(10, 0, 0, 2), None),
            "{odd}"
        );
    }
}
