//! `--help` and `--version` work (and, as an integration test, this makes
//! `cargo test --workspace` build the binary the namespaced tests run).

#[test]
fn help_and_version() {
    qnet_tests::check_help_and_version(
        env!("CARGO_BIN_EXE_qnet-bridge-helper").as_ref(),
        "qnet-bridge-helper",
        env!("CARGO_PKG_VERSION"),
    );
}
