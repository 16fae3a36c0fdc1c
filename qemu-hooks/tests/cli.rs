//! `--help` and `--version` work (and, as an integration test, this makes
//! `cargo test --workspace` build the binary the namespaced tests run).

#[test]
fn help_and_version() {
    qnet_tests::check_help_and_version(
        env!("CARGO_BIN_EXE_qnet-libvirt-hook").as_ref(),
        "qnet-libvirt-hook",
        env!("CARGO_PKG_VERSION"),
    );
}

fn run_hook(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qnet-libvirt-hook"))
        .args([
            "--socket",
            "/nonexistent/qnet-ctl.sock",
            "--timeout-ms",
            "500",
        ])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn sample(op: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/libvirt-9.0")
            .join(format!("{op}.xml")),
    )
    .unwrap()
}

#[test]
fn without_hookd_a_guest_with_qnet_metadata_fails_to_start() {
    let out = run_hook(&["vm", "prepare", "begin", "-"], &sample("prepare"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("qnet-hookd is not running") && err.contains("start it with"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn without_hookd_a_plain_guest_starts_and_teardown_never_fails() {
    let plain = String::from_utf8(sample("prepare")).unwrap();
    let start = plain.find("<metadata>").unwrap();
    let end = plain.find("</metadata>").unwrap() + "</metadata>".len();
    let plain = format!("{}{}", &plain[..start], &plain[end..]);
    let out = run_hook(&["vm", "start", "begin", "-"], plain.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for op in ["stopped", "release"] {
        let out = run_hook(&["vm", op, "end", "-"], &sample(op));
        assert!(out.status.success(), "{op}");
    }
}

#[test]
fn migrate_and_restore_are_filters_and_the_rest_no_ops() {
    let xml = sample("started");
    for op in ["migrate", "restore"] {
        let out = run_hook(&["vm", op, "begin", "-"], &xml);
        assert!(out.status.success(), "{op}");
        assert_eq!(out.stdout, xml, "{op}: XML changed");
    }
    for op in ["attach", "some-future-op"] {
        let out = run_hook(&["vm", op, "begin", "-"], b"not even XML");
        assert!(out.status.success(), "{op}");
        assert!(out.stdout.is_empty());
    }
    // Garbage for an operation that parses: a clear error.
    let out = run_hook(&["vm", "prepare", "begin", "-"], b"<domain><name>x");
    assert_eq!(out.status.code(), Some(1));
}
