//! The helpers' command lines, as QEMU (or a hostile caller) gives them.
//!
//! The input's first byte picks the helper (even: bridge, odd: macvtap);
//! the rest is argv[1..], NUL-separated, any bytes (argv need not be UTF-8).
//! The helpers' own `cli` modules are compiled in by path, so this parses
//! with exactly their clap definitions.
//!
//! Properties: parsing never panics; an error becomes one usage line (as
//! `protocol::exit_for_cli_error` prints it); an accepted command line
//! printed canonically (`--br=X --fd=N ...`) parses to the same values.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::error::ErrorKind;
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use qnet_fuzz::assert_one_line;
use qnet_hostnet::protocol::{self, ProtocolArgs};

#[allow(dead_code)]
#[path = "../../bridge-helper/src/cli.rs"]
mod bridge_cli;
#[allow(dead_code)]
#[path = "../../macvtap-helper/src/cli.rs"]
mod macvtap_cli;

fn argv(program: &str, args: &[&[u8]]) -> Vec<OsString> {
    std::iter::once(OsString::from(program))
        .chain(args.iter().map(|a| OsString::from_vec(a.to_vec())))
        .collect()
}

/// The arguments both helpers share, printed canonically.
fn protocol_args(p: &ProtocolArgs) -> Vec<String> {
    let mut args = vec![format!("--br={}", p.br), format!("--fd={}", p.fd)];
    if p.use_vnet {
        args.push("--use-vnet".into());
    }
    if p.debug {
        args.push("--debug".into());
    }
    args
}

/// `args` parsed as helper `program`'s command line (`C`): refused, it
/// must print one line; accepted, its canonical form (`canonical`) must
/// parse to the same values (`assert_same`).
fn check<C: Parser>(
    program: &str,
    args: &[&[u8]],
    input_len: usize,
    canonical: fn(&C) -> Vec<String>,
    assert_same: fn(&C, &C),
) {
    let cli = match C::try_parse_from(argv(program, args)) {
        Err(err) => return check_error(program, &err, input_len),
        Ok(cli) => cli,
    };
    let again = canonical(&cli);
    let reparsed = C::try_parse_from(std::iter::once(program.to_string()).chain(again.clone()))
        .unwrap_or_else(|e| panic!("{again:?} does not parse again: {e}"));
    assert_same(&reparsed, &cli);
}

/// A refused command line: what the helper prints must be one line.
fn check_error(program: &str, err: &clap::Error, input_len: usize) {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        return;
    }
    let line = protocol::cli_error_line(program, "--br=NAME --fd=N", err);
    assert_one_line("usage error", &line, input_len);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let args: Vec<&[u8]> = rest.split(|&b| b == 0).take(32).collect();
    if which % 2 == 0 {
        check::<bridge_cli::Cli>(
            "qnet-bridge-helper",
            &args,
            data.len(),
            |cli| protocol_args(&cli.protocol),
            |reparsed, cli| {
                assert_eq!(reparsed.protocol, cli.protocol);
            },
        );
    } else {
        check::<macvtap_cli::Cli>(
            "qnet-macvtap-helper",
            &args,
            data.len(),
            |cli| {
                let mut again = protocol_args(&cli.protocol);
                let mode = clap::ValueEnum::to_possible_value(&cli.mode).expect("named mode");
                again.push(format!("--mode={}", mode.get_name()));
                if let Some(mac) = cli.mac {
                    again.push(format!("--mac={mac}"));
                }
                again
            },
            |reparsed, cli| {
                assert_eq!(reparsed.protocol, cli.protocol);
                assert_eq!(reparsed.mode, cli.mode);
                assert_eq!(reparsed.mac, cli.mac);
            },
        );
    }
});
