//! `xtask dist DIR` as `make install` runs it: the binary writes a man page
//! for every program (and for hookd.toml) and completions for the commands
//! people type, and says what to do when called wrongly. (Being an
//! integration test also makes `cargo test --workspace` build the xtask
//! binary, which the install tests run through make.)

use std::path::Path;
use std::process::Command;

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

#[test]
fn dist_writes_every_page_and_completion() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(XTASK)
        .arg("dist")
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Each file, what it must hold, and what it is without.
    for (file, holds, else_it) in [
        ("man/man8/qnet-hookd.8", ".TH", "is no man page"),
        ("man/man1/qnetctl.1", ".TH", "is no man page"),
        ("man/man5/qnet-hookd.toml.5", ".TH", "is no man page"),
        ("completions/bash/qnetctl", "doctor", "lacks a subcommand"),
        ("completions/zsh/_qnetctl", "doctor", "lacks a subcommand"),
        (
            "completions/fish/qnetctl.fish",
            "doctor",
            "lacks a subcommand",
        ),
    ] {
        let text = std::fs::read_to_string(dir.path().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains(holds), "{file} {else_it}:\n{text}");
    }
    assert!(Path::new(dir.path()).join("man").is_dir());
}

#[test]
fn a_wrong_call_says_how_to_call_it() {
    let out = Command::new(XTASK).arg("nonsense").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("usage: cargo run -p xtask -- dist DIR"),
        "{err}"
    );
}
