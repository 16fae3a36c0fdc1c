//! `--help` and `--version` of both binaries work (and, as an integration
//! test, this makes `cargo test --workspace` build them).

#[test]
fn help_and_version() {
    for (path, name) in [
        (env!("CARGO_BIN_EXE_qnet-hookd"), "qnet-hookd"),
        (env!("CARGO_BIN_EXE_qnetctl"), "qnetctl"),
    ] {
        qnet_tests::check_help_and_version(path.as_ref(), name, env!("CARGO_PKG_VERSION"));
    }
}
