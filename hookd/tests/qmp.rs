//! QMP sessions against fake QEMUs (well-behaved and hostile, in-process
//! and in a separate Python process) and against real QEMUs, in both
//! directions: the daemon listening (QEMU dials, `-chardev socket,...
//! -mon mode=control`) and the daemon dialing (`-qmp unix:...,server=on`).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use qnet_hookd::qmp::{
    self, GuestIdentity, GuestInfo, NicInfo, QmpError, QmpEvent, QmpEvents, QmpSession,
    SessionOptions,
};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// Failure bound for anything that should happen promptly.
const BOUND: Duration = Duration::from_secs(60);

/// What QEMU 7.2.22 (Debian) actually sends.
const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;
const FAKE_UUID: &str = "6f1c1d3e-8a50-4d5b-9d0c-2b7cbb1e0a11";

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(BOUND, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {BOUND:?} waiting for {what}"),
    }
}

fn our_identity() -> GuestIdentity {
    GuestIdentity {
        pid: std::process::id(),
        uid: nix::unistd::getuid().as_raw(),
    }
}

fn options(timeout: Duration) -> SessionOptions {
    SessionOptions {
        timeout,
        ..SessionOptions::default()
    }
}

// ---------------------------------------------------------------------------
// In-process fake QEMU

/// The QEMU end of a connection, driven by a test script.
struct Fake {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Fake {
    fn new(stream: UnixStream) -> Self {
        let (reader, writer) = stream.into_split();
        Fake {
            reader: BufReader::new(reader),
            writer,
        }
    }

    /// Sends raw bytes; errors are ignored (hostile scripts keep writing
    /// after the daemon hung up).
    async fn raw(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes).await;
    }

    /// Sends one line the way QEMU does (`\r\n`).
    async fn send(&mut self, line: &str) {
        self.raw(format!("{line}\r\n").as_bytes()).await;
    }

    async fn reply(&mut self, id: &Value, value: Value) {
        self.send(&json!({"return": value, "id": id}).to_string())
            .await;
    }

    async fn error(&mut self, id: &Value, class: &str, desc: &str) {
        self.send(&json!({"id": id, "error": {"class": class, "desc": desc}}).to_string())
            .await;
    }

    async fn event(&mut self, name: &str, data: Option<Value>) {
        let mut event = json!({
            "timestamp": {"seconds": 1795458770, "microseconds": 929653},
            "event": name,
        });
        if let Some(data) = data {
            event["data"] = data;
        }
        self.send(&event.to_string()).await;
    }

    /// Next command, `None` on EOF.
    async fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line).await {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("the daemon sent invalid JSON")),
        }
    }

    /// Reads the next command, checks its name, returns its id.
    async fn command(&mut self, expected: &str) -> Value {
        let message = self.recv().await.expect("EOF instead of a command");
        assert_eq!(message["execute"], expected, "unexpected command {message}");
        message["id"].clone()
    }

    /// Greeting and capability negotiation.
    async fn handshake(&mut self) {
        self.send(GREETING).await;
        let id = self.command("qmp_capabilities").await;
        self.reply(&id, json!({})).await;
    }

    /// Waits until the daemon closes the connection.
    async fn wait_eof(&mut self) {
        let mut sink = Vec::new();
        let _ = self.reader.read_to_end(&mut sink).await;
    }
}

/// `query-rx-filter` reply for one virtio-net NIC, as QEMU 7.2 sends it
/// (a NIC without VLAN filtering lists all 4096 VLANs).
fn rx_filter(name: &str, mac: &str) -> Value {
    let vlans: Vec<u32> = (0..4096).rev().collect();
    json!([{
        "promiscuous": true, "name": name, "main-mac": mac, "unicast": "normal",
        "vlan": "all", "vlan-table": vlans, "unicast-table": [], "multicast": "normal",
        "multicast-overflow": false, "unicast-overflow": false, "multicast-table": [],
        "broadcast-allowed": false
    }])
}

/// HMP `info network` with a virtio-net NIC on a TAP and an e1000 that
/// `query-rx-filter` does not list.
const INFO_NETWORK: &str = "net0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ hn0: index=0,type=tap,ifname=qtap0,script=no,downscript=no\r\nnic1: index=0,type=nic,model=e1000,macaddr=52:54:00:AB:CD:EF\r\n \\ hn1: index=0,type=user,net=10.0.2.0,restrict=off\r\n";

/// A well-behaved QEMU that interleaves events with its replies, including
/// one no schema knows, from the end of the handshake on.
async fn qemu_like(mut fake: Fake) {
    while let Some(message) = fake.recv().await {
        let id = &message["id"];
        match message["execute"].as_str().unwrap_or_default() {
            "query-name" => {
                fake.event("FOO_BAR_FROM_QEMU_10", Some(json!({"whatever": [1, 2]})))
                    .await;
                fake.reply(id, json!({"name": "fake-guest"})).await;
            }
            "query-uuid" => fake.reply(id, json!({"UUID": FAKE_UUID})).await,
            "query-status" => {
                fake.event("STOP", None).await;
                fake.reply(
                    id,
                    json!({"status": "prelaunch", "singlestep": false, "running": false}),
                )
                .await;
            }
            "query-rx-filter" => {
                fake.event(
                    "NIC_RX_FILTER_CHANGED",
                    Some(
                        json!({"name": "net0", "path": "/machine/peripheral/net0/virtio-backend"}),
                    ),
                )
                .await;
                fake.reply(id, rx_filter("net0", "52:54:00:12:34:56")).await;
            }
            "human-monitor-command" => {
                assert_eq!(message["arguments"]["command-line"], "info network");
                fake.reply(id, json!(INFO_NETWORK)).await;
            }
            "quit" => {
                fake.reply(id, json!({})).await;
                fake.event(
                    "SHUTDOWN",
                    Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                )
                .await;
                return;
            }
            other => {
                let desc = format!("The command {other} has not been found");
                fake.error(id, "CommandNotFound", &desc).await;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// QEMU dials the daemon's listening socket.
    Client,
    /// QEMU listens; the daemon dials with `qmp::dial`.
    Server,
}

const MODES: [Mode; 2] = [Mode::Client, Mode::Server];

/// A daemon-side stream connected to a fake running `script`.
struct Conn {
    stream: UnixStream,
    fake: JoinHandle<()>,
    _dir: TempDir,
}

async fn connect<F, Fut>(mode: Mode, script: F) -> Conn
where
    F: FnOnce(Fake) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    match mode {
        Mode::Client => {
            let path = dir.path().join("listen.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let fake = tokio::spawn(async move {
                let stream = UnixStream::connect(&path).await.unwrap();
                script(Fake::new(stream)).await;
            });
            let (stream, _) = bounded("the fake to dial", listener.accept())
                .await
                .unwrap();
            Conn {
                stream,
                fake,
                _dir: dir,
            }
        }
        Mode::Server => {
            let path = dir.path().join("q.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let fake = tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                script(Fake::new(stream)).await;
            });
            let stream = qmp::dial(&path).await.unwrap();
            Conn {
                stream,
                fake,
                _dir: dir,
            }
        }
    }
}

/// A session, its events, the fake's task and the fake's directory.
type Started = (QmpSession, QmpEvents, JoinHandle<()>, TempDir);

/// Starts a session against a fake that does the handshake, then
/// `script`; returns the session, its events and the fake's task.
async fn session<F, Fut>(mode: Mode, script: F, opts: SessionOptions, capacity: usize) -> Started
where
    F: FnOnce(Fake) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let script = |mut fake: Fake| async move {
        fake.handshake().await;
        script(fake).await;
    };
    let conn = connect(mode, script).await;
    let opts = SessionOptions {
        events: capacity,
        ..opts
    };
    let (session, identity, rx) =
        bounded("the handshake", QmpSession::start_with(conn.stream, opts))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: handshake failed: {e}"));
    assert_eq!(identity, our_identity());
    assert_eq!(session.identity(), identity);
    (session, rx, conn.fake, conn._dir)
}

/// [`session`] with the default options and room for 16 events, as most
/// tests want it.
async fn default_session<F, Fut>(mode: Mode, script: F) -> Started
where
    F: FnOnce(Fake) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    session(mode, script, SessionOptions::default(), 16).await
}

/// Starts a session that must fail during the handshake.
async fn failed_start<F, Fut>(mode: Mode, script: F, opts: SessionOptions) -> QmpError
where
    F: FnOnce(Fake) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let conn = connect(mode, script).await;
    match bounded(
        "the handshake to fail",
        QmpSession::start_with(conn.stream, opts),
    )
    .await
    {
        Ok(_) => panic!("{mode:?}: handshake succeeded against a broken peer"),
        Err(e) => {
            eprintln!("{mode:?}: {e}");
            e
        }
    }
}

/// Everything left on an events channel: events, the total of `Lagged`,
/// and the closing error. Checks that `Closed` is last and the channel
/// then ends.
/// The session's events end without an error, and the fake saw EOF.
async fn ended_cleanly(rx: &mut QmpEvents, fake: JoinHandle<()>) {
    let (_, _, error) = drain(rx).await;
    assert!(error.is_none(), "{error:?}");
    bounded("the fake to see EOF", fake).await.unwrap();
}

async fn drain(rx: &mut QmpEvents) -> (Vec<QmpEvent>, u64, Option<String>) {
    let mut events = Vec::new();
    let mut lagged = 0;
    loop {
        match bounded("session events", rx.recv()).await {
            Some(QmpEvent::Lagged(n)) => lagged += n,
            Some(QmpEvent::Closed { error }) => {
                assert!(
                    bounded("the end of the events channel", rx.recv())
                        .await
                        .is_none(),
                    "something after Closed"
                );
                return (events, lagged, error);
            }
            Some(event) => events.push(event),
            None => panic!("events channel ended without Closed"),
        }
    }
}

// ---------------------------------------------------------------------------
// Well-behaved fakes

#[tokio::test]
async fn well_behaved_fake_both_directions() {
    for mode in MODES {
        let (session, mut rx, fake, _dir) =
            session(mode, qemu_like, SessionOptions::default(), 64).await;
        assert_eq!(session.greeting().version, (7, 2, 22));
        assert_eq!(session.greeting().capabilities, ["oob"]);

        let info = bounded("query_info", session.query_info()).await.unwrap();
        assert_eq!(info.name.as_deref(), Some("fake-guest"));
        assert_eq!(info.uuid.as_deref(), Some(FAKE_UUID));
        assert_eq!(info.status, "prelaunch");
        assert!(!info.running);
        // net0 from rx-filter, nic1 (e1000) only from HMP, in QEMU's order.
        assert_eq!(
            info.nics,
            [
                NicInfo {
                    name: "net0".into(),
                    mac: "52:54:00:12:34:56".parse().unwrap()
                },
                NicInfo {
                    name: "nic1".into(),
                    mac: "52:54:00:ab:cd:ef".parse().unwrap()
                },
            ]
        );
        assert_eq!(info.nics[1].mac.octets(), [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(
            session.query_rx_filter().await.unwrap(),
            info.nics[..1].to_vec()
        );

        // A typed qapi command, and one QEMU does not know: the session
        // survives the error.
        let status = session.execute(qapi::qmp::query_status {}).await;
        assert!(status.is_ok_and(|s| !s.running));
        match session.execute_raw("query-nonsense", None).await {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("query-nonsense"), "{desc}");
            }
            other => panic!("expected a command error, got {other:?}"),
        }

        bounded("quit", session.execute(qapi::qmp::quit {}))
            .await
            .unwrap();
        let (events, lagged, error) = drain(&mut rx).await;
        assert_eq!(lagged, 0);
        assert!(error.is_none(), "{error:?}");
        for expected in [
            QmpEvent::Other("FOO_BAR_FROM_QEMU_10".into()),
            QmpEvent::Stop,
            QmpEvent::NicRxFilterChanged {
                name: Some("net0".into()),
                path: "/machine/peripheral/net0/virtio-backend".into(),
            },
        ] {
            assert!(
                events.contains(&expected),
                "{mode:?}: no {expected:?} in {events:?}"
            );
        }
        assert_eq!(
            events.last(),
            Some(&QmpEvent::Shutdown {
                guest: false,
                reason: Some("host-qmp-quit".into())
            })
        );
        assert!(session.is_closed());
        match session.execute(qapi::qmp::query_name {}).await {
            Err(QmpError::Closed { reason, .. }) => {
                assert!(reason.contains("peer closed"), "{reason}")
            }
            other => panic!("expected Closed, got {other:?}"),
        }
        fake.await.unwrap();
    }
}

/// A fake QEMU in a separate process (Python), so that SO_PEERCRED names a
/// pid other than ours. It offers no HMP, so NICs come from rx-filter alone.
const PYTHON_FAKE: &str = r#"
import json, socket, sys
mode, path = sys.argv[1], sys.argv[2]
if mode == "listen":
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print("ready", flush=True)
    conn, _ = server.accept()
else:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
f = conn.makefile("rwb")
def send(obj):
    f.write((json.dumps(obj) + "\r\n").encode())
    f.flush()
send({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 10}, "package": "py"}, "capabilities": ["oob"]}})
for line in f:
    msg = json.loads(line)
    cmd, i = msg.get("execute"), msg.get("id")
    if cmd == "qmp_capabilities":
        ret = {}
    elif cmd == "query-name":
        send({"event": "FOO_BAR_FROM_QEMU_10", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}})
        ret = {"name": "py-guest"}
    elif cmd == "query-uuid":
        ret = {"UUID": "00000000-0000-0000-0000-000000000000"}
    elif cmd == "query-status":
        ret = {"status": "running", "running": True}
    elif cmd == "query-rx-filter":
        ret = [{"name": "net0", "main-mac": "52:54:00:AA:BB:01", "promiscuous": True, "unicast": "normal",
                "vlan": "none", "vlan-table": [], "unicast-table": [], "multicast": "normal",
                "multicast-overflow": False, "unicast-overflow": False, "multicast-table": [],
                "broadcast-allowed": False},
               {"name": "net1", "main-mac": "52:54:00:aa:bb:02", "promiscuous": True, "unicast": "normal",
                "vlan": "none", "vlan-table": [], "unicast-table": [], "multicast": "normal",
                "multicast-overflow": False, "unicast-overflow": False, "multicast-table": [],
                "broadcast-allowed": False}]
    else:
        send({"error": {"class": "CommandNotFound", "desc": "The command %s has not been found" % cmd}, "id": i})
        continue
    send({"return": ret, "id": i})
"#;

#[tokio::test]
async fn peer_credentials_of_another_process() {
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.sock");
        let mut command = tokio::process::Command::new("python3");
        command
            .arg("-c")
            .arg(PYTHON_FAKE)
            .arg(match mode {
                Mode::Client => "dial",
                Mode::Server => "listen",
            })
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        let (stream, mut child) = match mode {
            Mode::Client => {
                let listener = UnixListener::bind(&path).unwrap();
                let child = command.spawn().expect("python3 is required");
                let (stream, _) = bounded("python to dial", listener.accept()).await.unwrap();
                (stream, child)
            }
            Mode::Server => {
                let mut child = command.spawn().expect("python3 is required");
                let stdout = child.stdout.take().unwrap();
                let mut ready = String::new();
                bounded(
                    "python to listen",
                    BufReader::new(stdout).read_line(&mut ready),
                )
                .await
                .unwrap();
                assert_eq!(ready.trim(), "ready");
                (qmp::dial(&path).await.unwrap(), child)
            }
        };
        let (session, identity, mut rx) = bounded("the handshake", QmpSession::start(stream))
            .await
            .unwrap();
        assert_eq!(identity.pid, child.id().unwrap(), "{mode:?}");
        assert_ne!(identity.pid, std::process::id());
        assert_eq!(identity.uid, nix::unistd::getuid().as_raw());
        assert_eq!(session.greeting().version, (10, 2, 0));

        let info = bounded("query_info", session.query_info()).await.unwrap();
        assert_eq!(info.name.as_deref(), Some("py-guest"));
        assert_eq!(info.uuid, None, "the nil UUID means no -uuid");
        assert_eq!((info.status.as_str(), info.running), ("running", true));
        assert_nics(
            &info,
            &[("net0", "52:54:00:aa:bb:01"), ("net1", "52:54:00:aa:bb:02")],
        );

        child.kill().await.unwrap();
        let (events, _, error) = drain(&mut rx).await;
        assert!(error.is_none(), "{error:?}");
        assert!(events.contains(&QmpEvent::Other("FOO_BAR_FROM_QEMU_10".into())));
    }
}

// ---------------------------------------------------------------------------
// Hostile fakes: the handshake

/// What a fake does, boxed so that a table can hold many.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A fake's script, shareable between the two connection modes.
type Script = Arc<dyn Fn(Fake) -> Task + Send + Sync>;

/// A fake's answer to a command, given the command's id.
type Answer = Arc<dyn Fn(Fake, Value) -> Task + Send + Sync>;

fn script<F, Fut>(f: F) -> Script
where
    F: Fn(Fake) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |fake| Box::pin(f(fake)))
}

/// Writes 10 MiB without a newline (after `prefix`).
async fn huge_line(fake: &mut Fake, prefix: &str) {
    fake.raw(prefix.as_bytes()).await;
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..10 {
        fake.raw(&chunk).await;
    }
    fake.wait_eof().await;
}

/// Sends `line` as the greeting, then waits for the daemon to hang up.
fn greets_with(line: &'static str) -> Script {
    script(move |mut f| async move {
        f.send(line).await;
        f.wait_eof().await;
    })
}

/// One broken peer that must make the handshake fail, and the error it
/// must fail with.
struct HandshakeFailure {
    what: &'static str,
    script: Script,
    opts: SessionOptions,
    expect: fn(&QmpError) -> bool,
}

fn handshake_failures() -> Vec<HandshakeFailure> {
    let default = SessionOptions::default;
    let mut cases = vec![
        HandshakeFailure {
            what: "garbage instead of the greeting",
            script: greets_with("this is not JSON at all"),
            opts: default(),
            expect: |e| matches!(e, QmpError::Protocol { detail, .. } if detail.contains("invalid JSON")),
        },
        HandshakeFailure {
            what: "an event before the greeting",
            script: script(|mut f| async move {
                f.event("RESUME", None).await;
                f.send(GREETING).await;
                f.wait_eof().await;
            }),
            opts: default(),
            expect: |e| matches!(e, QmpError::Protocol { detail, .. } if detail.contains("got event \"RESUME\"")),
        },
        HandshakeFailure {
            what: "a huge greeting",
            script: script(|mut f| async move { huge_line(&mut f, r#"{"QMP": ""#).await }),
            opts: default(),
            expect: |e| matches!(e, QmpError::LineTooLong { limit, .. } if *limit == qmp::DEFAULT_MAX_LINE),
        },
        HandshakeFailure {
            what: "no greeting",
            script: script(|mut f| async move { f.wait_eof().await }),
            opts: options(Duration::from_millis(300)),
            expect: |e| matches!(e, QmpError::Timeout { waiting_for, .. } if waiting_for.contains("greeting")),
        },
        HandshakeFailure {
            what: "EOF before the greeting",
            script: script(|_| async {}),
            opts: default(),
            expect: |e| matches!(e, QmpError::Eof { during, .. } if during.contains("greeting")),
        },
        HandshakeFailure {
            what: "EOF after the greeting",
            script: script(|mut f| async move { f.send(GREETING).await }),
            opts: default(),
            expect: |e| {
                matches!(e, QmpError::Closed { command, reason, .. }
                    if command == "qmp_capabilities" && reason.contains("peer closed"))
            },
        },
        HandshakeFailure {
            what: "capabilities refused",
            script: script(|mut f| async move {
                f.send(GREETING).await;
                let id = f.command("qmp_capabilities").await;
                f.error(
                    &id,
                    "GenericError",
                    "Capabilities negotiation is already complete",
                )
                .await;
                f.wait_eof().await;
            }),
            opts: default(),
            expect: |e| {
                matches!(e, QmpError::Command { command, class, .. }
                    if command == "qmp_capabilities" && class == "GenericError")
            },
        },
    ];
    for greeting in [
        r#"{"QMP": "hello"}"#,
        r#"{"hello": {"version": {}}}"#,
        r#"[1, 2, 3]"#,
        r#""QMP""#,
        r#"{"return": {}, "id": 0}"#,
    ] {
        cases.push(HandshakeFailure {
            what: greeting,
            script: greets_with(greeting),
            opts: default(),
            expect: |e| matches!(e, QmpError::Protocol { detail, .. } if detail.contains("expected the QMP greeting")),
        });
    }
    cases
}

/// Runs `check` on each of `cases` in each connection mode.
async fn each_case_in_both_modes<C>(cases: Vec<C>, check: impl AsyncFn(&C, Mode)) {
    for case in &cases {
        for mode in MODES {
            check(case, mode).await;
        }
    }
}

#[tokio::test]
async fn broken_peers_fail_the_handshake() {
    each_case_in_both_modes(handshake_failures(), async |case, mode| {
        let script = case.script.clone();
        let e = failed_start(mode, move |f| script(f), case.opts).await;
        assert!((case.expect)(&e), "{}, {mode:?}: {e:?}", case.what);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Hostile fakes: after the handshake

/// Runs `query-name` against a fake that answers it with `respond`; returns
/// the command's result and how the session ended.
async fn after_handshake<F, Fut>(
    mode: Mode,
    respond: F,
) -> (Result<String, QmpError>, Vec<QmpEvent>, Option<String>)
where
    F: FnOnce(Fake, Value) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (session, mut rx, fake, _dir) = default_session(mode, |mut f| async move {
        let id = f.command("query-name").await;
        respond(f, id).await;
    })
    .await;
    let result = bounded("query-name", session.execute(qapi::qmp::query_name {}))
        .await
        .map(|n| n.name.unwrap_or_default());
    let (events, _, error) = drain(&mut rx).await;
    fake.await.unwrap();
    eprintln!("{mode:?}: {result:?}, {error:?}");
    (result, events, error)
}

/// A peer that breaks the session after the handshake: what it sends in
/// answer to `query-name` (given the command's id), and what the command's
/// error and the session's closing error must contain.
struct BrokenAnswer {
    what: String,
    answer: Answer,
    result_says: &'static str,
    closing_says: &'static str,
}

fn broken_answers() -> Vec<BrokenAnswer> {
    let mut cases = Vec::new();
    for garbage in [
        "}{ not json",
        "[1, 2, 3]",
        "42",
        r#"{"surprise": true}"#,
        GREETING,
    ] {
        cases.push(BrokenAnswer {
            what: format!("garbage {garbage}"),
            answer: Arc::new(move |mut f, _| {
                Box::pin(async move {
                    f.send(garbage).await;
                    f.wait_eof().await;
                })
            }),
            result_says: "protocol error",
            closing_says: "protocol error",
        });
    }
    cases.push(BrokenAnswer {
        what: "a huge line".into(),
        answer: Arc::new(|mut f, id| {
            Box::pin(async move {
                huge_line(&mut f, &format!(r#"{{"id": {id}, "return": {{"name": ""#)).await;
            })
        }),
        result_says: "longer than",
        closing_says: "message longer than",
    });
    cases.push(BrokenAnswer {
        what: "EOF in the middle of a reply".into(),
        answer: Arc::new(|mut f, _| {
            Box::pin(async move { f.raw(br#"{"return": {"name": "half"#).await })
        }),
        result_says: "middle of a message",
        closing_says: "connection closed in the middle of a message",
    });
    cases
}

#[tokio::test]
async fn broken_answers_close_the_session() {
    each_case_in_both_modes(broken_answers(), async |case, mode| {
        let answer = case.answer.clone();
        let (result, _, error) = after_handshake(mode, move |f, id| answer(f, id)).await;
        assert!(
            matches!(&result, Err(QmpError::Closed { reason, .. }) if reason.contains(case.result_says)),
            "{}, {mode:?}: {result:?}",
            case.what
        );
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains(case.closing_says)),
            "{}, {mode:?}: {error:?}",
            case.what
        );
    })
    .await;
}

#[tokio::test]
async fn error_replies_keep_the_session() {
    for mode in MODES {
        let (session, mut rx, fake, _dir) = default_session(mode, |mut f| async move {
            let id = f.command("query-name").await;
            f.error(&id, "GenericError", "no name for you").await;
            let id = f.command("query-uuid").await;
            // An error class newer than qapi's schema.
            f.error(&id, "SomeFutureErrorClass", "try QEMU 12").await;
            let id = f.command("query-name").await;
            f.reply(&id, json!({"name": "after-errors"})).await;
            f.wait_eof().await;
        })
        .await;
        match session.execute(qapi::qmp::query_name {}).await {
            Err(QmpError::Command {
                command,
                class,
                desc,
                ..
            }) => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("query-name", "GenericError", "no name for you")
                );
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        match session.execute(qapi::qmp::query_uuid {}).await {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "SomeFutureErrorClass"),
            other => panic!("expected a command error, got {other:?}"),
        }
        let name = session.execute(qapi::qmp::query_name {}).await.unwrap();
        assert_eq!(name.name.as_deref(), Some("after-errors"));
        // Dropping the last handle closes the connection (the fake sees
        // EOF) and ends the events cleanly.
        drop(session);
        ended_cleanly(&mut rx, fake).await;
    }
}

#[tokio::test]
async fn replies_with_unknown_ids_are_ignored() {
    for mode in MODES {
        let (result, events, error) = after_handshake(mode, |mut f, id| async move {
            f.send(r#"{"return": {"name": "wrong"}, "id": 123456}"#)
                .await;
            f.send(r#"{"return": {"name": "wrong"}, "id": "a string"}"#)
                .await;
            f.send(r#"{"return": {"name": "wrong"}, "id": null}"#).await;
            f.send(r#"{"return": {"name": "wrong"}}"#).await;
            f.send(r#"{"error": {"class": "GenericError", "desc": "x"}, "id": -1}"#)
                .await;
            f.send("").await;
            f.event(
                "RESET",
                Some(json!({"guest": true, "reason": "guest-reset"})),
            )
            .await;
            f.reply(&id, json!({"name": "right"})).await;
        })
        .await;
        assert_eq!(result.unwrap(), "right");
        assert_eq!(events, [QmpEvent::Reset]);
        assert!(error.is_none(), "{error:?}");
    }
}

#[tokio::test]
async fn wrongly_shaped_reply() {
    for mode in MODES {
        let (result, _, error) = after_handshake(mode, |mut f, id| async move {
            f.reply(&id, json!({"name": 42})).await;
        })
        .await;
        assert!(
            matches!(&result, Err(QmpError::Decode { command, .. }) if command == "query-name"),
            "{result:?}"
        );
        assert!(error.is_none(), "{error:?}");
    }
}

#[tokio::test]
async fn command_timeout_leaves_the_session_usable() {
    for mode in MODES {
        let (session, mut rx, fake, _dir) = session(
            mode,
            |mut f| async move {
                let late = f.command("query-name").await;
                let id = f.command("query-uuid").await;
                // The reply to the command that timed out comes too late.
                f.reply(&late, json!({"name": "late"})).await;
                f.reply(&id, json!({"UUID": FAKE_UUID})).await;
                f.wait_eof().await;
            },
            // Long enough for the second reply even on a loaded machine.
            options(Duration::from_secs(2)),
            16,
        )
        .await;
        match session.execute(qapi::qmp::query_name {}).await {
            Err(QmpError::Timeout { waiting_for, .. }) => {
                assert!(waiting_for.contains("query-name"), "{waiting_for}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        let uuid = session.execute(qapi::qmp::query_uuid {}).await.unwrap();
        assert_eq!(uuid.UUID, FAKE_UUID);
        session.close();
        assert!(session.is_closed());
        match session.execute(qapi::qmp::query_uuid {}).await {
            Err(QmpError::Closed { reason, .. }) => assert_eq!(reason, "closed by us"),
            other => panic!("expected Closed, got {other:?}"),
        }
        ended_cleanly(&mut rx, fake).await;
    }
}

#[tokio::test]
async fn replies_out_of_order_reach_their_commands() {
    for mode in MODES {
        let (session, _rx, _fake, _dir) = default_session(mode, |mut f| async move {
            let mut ids = Vec::new();
            for _ in 0..2 {
                let message = f.recv().await.unwrap();
                ids.push((
                    message["execute"].as_str().unwrap().to_owned(),
                    message["id"].clone(),
                ));
            }
            for (command, id) in ids.iter().rev() {
                match command.as_str() {
                    "query-name" => f.reply(id, json!({"name": "n"})).await,
                    "query-uuid" => f.reply(id, json!({"UUID": FAKE_UUID})).await,
                    other => panic!("unexpected {other}"),
                }
            }
            f.wait_eof().await;
        })
        .await;
        let (name, uuid) = bounded("both replies", async {
            tokio::join!(
                session.execute(qapi::qmp::query_name {}),
                session.execute(qapi::qmp::query_uuid {})
            )
        })
        .await;
        assert_eq!(name.unwrap().name.as_deref(), Some("n"));
        assert_eq!(uuid.unwrap().UUID, FAKE_UUID);
    }
}

#[tokio::test]
async fn a_slow_consumer_never_blocks_replies() {
    const FLOOD: u64 = 500;
    for mode in MODES {
        // Room for one event; nobody reads until the reply is in.
        let (session, mut rx, fake, _dir) = session(
            mode,
            |mut f| async move {
                let id = f.command("query-name").await;
                for _ in 0..FLOOD {
                    f.event("STOP", None).await;
                }
                f.reply(&id, json!({"name": "flooded"})).await;
                f.send(
                    r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
                )
                .await;
            },
            SessionOptions::default(),
            1,
        )
        .await;
        let name = bounded(
            "the reply behind the flood",
            session.execute(qapi::qmp::query_name {}),
        )
        .await
        .unwrap();
        assert_eq!(name.name.as_deref(), Some("flooded"));
        let (events, lagged, error) = drain(&mut rx).await;
        assert!(error.is_none(), "{error:?}");
        assert!(lagged > 0, "nothing was dropped with a channel of 1");
        assert_eq!(
            events.len() as u64 + lagged,
            FLOOD + 1,
            "every event is delivered or counted"
        );
        fake.await.unwrap();
    }
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_dropped() {
    for mode in MODES {
        let (session, mut rx, _fake, _dir) = session(
            mode,
            |f| async move {
                // Keep the connection open without ever reading again.
                tokio::time::sleep(BOUND).await;
                drop(f);
            },
            options(Duration::from_millis(300)),
            16,
        )
        .await;
        // Far more than the socket buffers hold.
        let blob = "x".repeat(16 << 20);
        match session
            .execute_raw("x-blob", Some(json!({ "blob": blob })))
            .await
        {
            Err(QmpError::Timeout { .. } | QmpError::Closed { .. }) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
        let (_, _, error) = drain(&mut rx).await;
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("session aborted") && e.contains("timed out")),
            "{error:?}"
        );
        assert!(session.is_closed());
    }
}

#[tokio::test]
async fn dial_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    match qmp::dial(&missing).await {
        Err(QmpError::Connect { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

/// A peer whose `-name` carries terminal escapes and a newline, and whose
/// UUID is an escape sequence: what a user could run instead of QEMU.
async fn escaping(mut fake: Fake) {
    while let Some(message) = fake.recv().await {
        let id = &message["id"];
        let reply = match message["execute"].as_str().unwrap_or_default() {
            "query-name" => json!({"name": "\u{1b}]0;owned\u{7}web\nroot# "}),
            "query-uuid" => json!({"UUID": "\u{1b}[2J"}),
            "query-status" => json!({"status": "running", "singlestep": false, "running": true}),
            "query-rx-filter" => json!([]),
            "human-monitor-command" => json!(""),
            _ => return,
        };
        fake.reply(id, reply).await;
    }
}

#[tokio::test]
async fn a_peers_name_loses_its_control_characters_and_a_bad_uuid_is_none() {
    for mode in MODES {
        let (session, _rx, _fake, _dir) =
            session(mode, escaping, SessionOptions::default(), 64).await;
        let info = bounded("query_info", session.query_info()).await.unwrap();
        let name = info.name.expect("a name");
        assert!(!name.chars().any(char::is_control), "{name:?}");
        assert!(name.contains("owned") && name.contains("web"), "{name:?}");
        assert_eq!(info.uuid, None);
    }
}

// ---------------------------------------------------------------------------
// Real QEMU

/// The guest's NICs are `expected`: (name, MAC) in QEMU's order.
#[track_caller]
fn assert_nics(info: &GuestInfo, expected: &[(&str, &str)]) {
    let macs: Vec<String> = info.nics.iter().map(|n| n.mac.to_string()).collect();
    let nics: Vec<(&str, &str)> = info
        .nics
        .iter()
        .zip(&macs)
        .map(|(n, mac)| (n.name.as_str(), mac.as_str()))
        .collect();
    assert_eq!(nics, expected);
}

/// A QEMU process, killed when dropped.
struct Qemu {
    child: std::process::Child,
}

impl Qemu {
    fn spawn(args: &[&str]) -> Qemu {
        let child = qnet_tests::guest::stopped_qemu()
            .args(args)
            .spawn()
            .expect("qemu-system-x86_64 is required");
        Qemu { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("QEMU exited early: {status}");
        }
    }

    /// Waits (bounded) for QEMU to exit on its own.
    async fn exited(&mut self) -> std::process::ExitStatus {
        bounded("QEMU to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn random_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_owned()
}

async fn wait_for_socket(qemu: &mut Qemu, path: &Path) {
    bounded("QEMU's QMP socket", async {
        while !path.exists() {
            qemu.check_alive();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn sock_arg(prefix: &str, path: &Path, suffix: &str) -> String {
    format!("{prefix}{}{suffix}", path.display())
}

/// The arguments of a stopped guest named `qnet-test-guest` with `uuid`
/// and one virtio-net NIC, then `more`.
fn guest_args<'a>(uuid: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-name",
        "qnet-test-guest",
        "-uuid",
        uuid,
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
    ];
    args.extend_from_slice(more);
    args
}

/// Starts a session with the QEMU of [`guest_args`] on `stream` and reads
/// its info: the peer is that QEMU, the guest is named and not started.
async fn start_with_guest(
    stream: UnixStream,
    qemu: &Qemu,
    uuid: &str,
) -> (QmpSession, GuestIdentity, QmpEvents, GuestInfo) {
    let opts = SessionOptions {
        events: 64,
        ..SessionOptions::default()
    };
    let (session, identity, rx) = bounded("the handshake", QmpSession::start_with(stream, opts))
        .await
        .unwrap();
    assert_eq!(identity.pid, qemu.pid());
    let info = bounded("query_info", session.query_info()).await.unwrap();
    eprintln!("{info:?}");
    assert_eq!(info.name.as_deref(), Some("qnet-test-guest"));
    assert_eq!(info.uuid.as_deref(), Some(uuid));
    assert_eq!(info.status, "prelaunch");
    (session, identity, rx, info)
}

#[tokio::test]
async fn real_qemu_server_mode() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("q.sock");
    let uuid = random_uuid();
    let qmp_arg = sock_arg("unix:", &sock, ",server=on,wait=off");
    let mut qemu = Qemu::spawn(&guest_args(&uuid, &["-qmp", &qmp_arg]));
    wait_for_socket(&mut qemu, &sock).await;
    let stream = qmp::dial(&sock).await.unwrap();
    let (session, identity, mut rx, info) = start_with_guest(stream, &qemu, &uuid).await;
    assert_eq!(identity.uid, nix::unistd::getuid().as_raw());
    let (major, minor, micro) = qnet_tests::guest::qemu_version();
    assert_eq!(session.greeting().version, (major, minor, micro));
    assert!(!info.running);
    assert_eq!(info.nics.len(), 1, "{:?}", info.nics);
    assert_eq!(info.nics[0].mac, "52:54:00:12:34:56");
    assert_eq!(session.query_rx_filter().await.unwrap(), info.nics);

    // Run state changes come as events.
    session.execute(qapi::qmp::cont {}).await.unwrap();
    session.execute(qapi::qmp::stop {}).await.unwrap();
    let status = session.query_status().await.unwrap();
    assert_eq!((status.status.as_str(), status.running), ("paused", false));

    // The reply to quit may lose the race with QEMU's exit.
    match bounded("quit", session.execute(qapi::qmp::quit {})).await {
        Ok(_) | Err(QmpError::Closed { .. }) => {}
        Err(e) => panic!("quit: {e}"),
    }
    let (mut events, lagged, error) = drain(&mut rx).await;
    eprintln!("{events:?}");
    assert_eq!(lagged, 0);
    assert!(error.is_none(), "{error:?}");
    // The firmware ran for a moment; only look at run state events.
    events.retain(|e| {
        matches!(
            e,
            QmpEvent::Resume | QmpEvent::Stop | QmpEvent::Shutdown { .. }
        )
    });
    assert_eq!(
        events,
        [
            QmpEvent::Resume,
            QmpEvent::Stop,
            QmpEvent::Shutdown {
                guest: false,
                reason: Some("host-qmp-quit".into())
            }
        ]
    );
    assert!(qemu.exited().await.success());
}

#[tokio::test]
async fn real_qemu_client_mode() {
    let dir = tempfile::tempdir().unwrap();
    let listen = dir.path().join("listen.sock");
    let listener = UnixListener::bind(&listen).unwrap();
    let uuid = random_uuid();
    let chardev = sock_arg("socket,id=qnet,path=", &listen, ",reconnect=1");
    let mut qemu = Qemu::spawn(&guest_args(
        &uuid,
        &[
            // Not listed by query-rx-filter: found through HMP.
            "-netdev",
            "user,id=n1",
            "-device",
            "e1000,netdev=n1,id=nic1,mac=52:54:00:AB:CD:EF",
            "-chardev",
            &chardev,
            "-mon",
            "chardev=qnet,mode=control",
        ],
    ));
    let (stream, _) = bounded("QEMU to dial", listener.accept()).await.unwrap();
    qemu.check_alive();
    let (session, _, mut rx, info) = start_with_guest(stream, &qemu, &uuid).await;
    assert_nics(
        &info,
        &[
            ("virtio-net-pci.0", "52:54:00:12:34:56"),
            ("nic1", "52:54:00:ab:cd:ef"),
        ],
    );

    session
        .execute(qapi::qmp::system_powerdown {})
        .await
        .unwrap();
    assert!(matches!(
        bounded("POWERDOWN", rx.recv()).await,
        Some(QmpEvent::Powerdown)
    ));

    // Killed QEMU: the session just ends.
    qemu.child.kill().unwrap();
    let (events, _, error) = drain(&mut rx).await;
    assert!(events.is_empty(), "{events:?}");
    assert!(error.is_none(), "{error:?}");
    assert!(matches!(
        session.query_status().await,
        Err(QmpError::Closed { .. })
    ));
}
