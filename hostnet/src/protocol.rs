//! The command line QEMU gives a network helper (`net/tap.c`).
//!
//! QEMU runs `HELPER --use-vnet --fd=N --br=BRIDGE`, or, when the helper
//! string holds a space or tab, `/bin/sh -c "HELPER ARGS --use-vnet --fd=N
//! [--br=BRIDGE]"` (it leaves `--br=` out when the string already has one).
//! Both helpers flatten [`ProtocolArgs`] into their own clap parser, which
//! also gives them what every qnet helper adds to QEMU's protocol: `--debug`
//! and the `--version` line.

use std::os::fd::{BorrowedFd, RawFd};
use std::sync::LazyLock;

use clap::Args;
use thiserror::Error;

use crate::acl::{self, NameError};
use crate::fdpass::{self, FdPassError};
use crate::owner::{self, OwnerError, Qemu};
use crate::privilege::{PrivilegeError, Privileges};

// `version` applies to the command this is flattened into: both helpers
// print the same line (see `VERSION_LINE`).
#[derive(Debug, Clone, Args, PartialEq, Eq)]
#[command(version = VERSION_LINE.as_str())]
pub struct ProtocolArgs {
    /// Give the device a virtio-net header (IFF_VNET_HDR) if the kernel supports it. QEMU always passes this.
    #[arg(long = "use-vnet")]
    pub use_vnet: bool,

    /// The unix socket (inherited from QEMU) over which the new device's fd is sent.
    #[arg(long = "fd", value_name = "N", required = true)]
    pub fd: RawFd,

    /// The bridge (bridge helper) or lower device (macvtap helper) to attach to.
    #[arg(long = "br", value_name = "NAME", required = true)]
    pub br: String,

    /// Log each step to stderr (a qnet extension; QEMU never passes it).
    #[arg(long)]
    pub debug: bool,
}

/// What QEMU's side of the protocol can get wrong, whichever device the
/// helper makes.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("{what} name `{name}` is invalid: {source}")]
    BadName {
        what: &'static str,
        name: String,
        source: NameError,
    },
    #[error("--fd={fd} is not the unix socket QEMU passes to a helper: {source}")]
    BadSocket { fd: RawFd, source: FdPassError },
    #[error(transparent)]
    Owner(#[from] OwnerError),
    #[error("failed to send the fd of {what} `{name}` to QEMU: {source}")]
    Send {
        what: &'static str,
        name: String,
        source: FdPassError,
    },
}

/// Hands the new device to QEMU: its fd over QEMU's `socket`, as QEMU's
/// `net/tap.c` expects it. `what` and `name` say which device, for the
/// error.
pub fn hand_over(
    socket: BorrowedFd<'_>,
    device: BorrowedFd<'_>,
    what: &'static str,
    name: &str,
) -> Result<(), ProtocolError> {
    fdpass::send_fd(socket, device).map_err(|source| ProtocolError::Send {
        what,
        name: name.to_string(),
        source,
    })
}

impl ProtocolArgs {
    /// `--br`, once it is a name the kernel could give a device (`what`
    /// says which device, for the error): checked before any lookup, so
    /// no ACL or netlink code sees a name no device can have.
    pub fn device_name(&self, what: &'static str) -> Result<&str, ProtocolError> {
        acl::check_name(&self.br).map_err(|source| ProtocolError::BadName {
            what,
            name: self.br.clone(),
            source,
        })?;
        Ok(&self.br)
    }

    /// QEMU's socket (`--fd`), and the QEMU process behind it, identified
    /// as [`owner::identify_qemu`] says: whom the device is made for.
    pub fn caller(&self) -> Result<(BorrowedFd<'static>, Qemu), ProtocolError> {
        let fd = self.fd;
        let socket = fdpass::borrow_unix_stream(fd)
            .map_err(|source| ProtocolError::BadSocket { fd, source })?;
        let qemu = owner::identify_qemu(socket, fd)?;
        Ok((socket, qemu))
    }
}

/// A helper's `--version` line: the version (every crate of the
/// workspace has the same) and the build-time ACL directory, so a user
/// can tell which files it reads.
///
/// clap wants a `&'static str` and evaluates the attribute each time it
/// builds the command, that is on every parse; so the line is made once
/// per process. Making (and leaking) it per call cost a fuzz run of 10
/// million parses 540 MB.
pub static VERSION_LINE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (config dir {})",
        env!("CARGO_PKG_VERSION"),
        crate::CONFIG_DIR
    )
});

/// A helper's `main` once it has dropped its privileges (`privileges`, or
/// why it could not): parses argv (clap errors as [`exit_for_cli_error`]
/// says), turns on `--debug` logging (`protocol` finds the helper's
/// [`ProtocolArgs`] in its command line), runs `run`, and makes its error
/// one line on stderr and exit status 1.
pub fn helper_main<C, E>(
    program: &str,
    usage: &str,
    privileges: Result<Privileges, PrivilegeError>,
    protocol: fn(&C) -> &ProtocolArgs,
    run: impl FnOnce(&C, Privileges) -> Result<(), E>,
) -> std::process::ExitCode
where
    C: clap::Parser,
    E: std::fmt::Display,
{
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(err) => return exit_for_cli_error(program, usage, err),
    };
    init_debug_logging(protocol(&cli).debug);
    let failed = |err: &dyn std::fmt::Display| {
        say(format_args!("{program}: {err}"));
        std::process::ExitCode::FAILURE
    };
    match privileges.map(|p| run(&cli, p)) {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(err)) => failed(&err),
        Err(err) => failed(&err),
    }
}

/// What a helper does with a clap error: `--help`/`--version` print and
/// succeed; anything else is one usage line on stderr and exit status 1,
/// as qemu-bridge-helper does.
pub fn exit_for_cli_error(program: &str, usage: &str, err: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            std::process::ExitCode::SUCCESS
        }
        _ => {
            say(format_args!("{}", cli_error_line(program, usage, &err)));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes one line to stderr, ignoring failure: stderr may be a closed
/// pipe (EPIPE; Rust ignores SIGPIPE) or a full one, and a helper must
/// neither panic (`eprintln!` does) nor fail because nobody reads it.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The one line a helper prints for a refused command line: clap's first
/// line and the usage. clap quotes the offending argument as given, so its
/// control characters are shown escaped and a long one is cut: the line
/// stays one line of bounded length whatever argv holds.
pub fn cli_error_line(program: &str, usage: &str, err: &clap::Error) -> String {
    const MAX: usize = 512;
    let text = err.to_string();
    let first = text.lines().next().unwrap_or("invalid arguments");
    let shown = one_line(first.trim_start_matches("error: "), MAX);
    format!("{program}: {shown}; usage: {program} {usage} (see --help)")
}

/// `text` as one line of about `max` bytes at most, for echoing what a
/// peer sent in a message: control characters (line breaks, terminal
/// escapes) are shown escaped (`\n`, `\u{1b}`), so that a hostile value
/// cannot forge log lines or a second line of an error, and a longer text
/// is cut on a character boundary with `…`.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 4);
    for c in text.chars() {
        if out.len() >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Logging goes to stderr (QEMU shows it to the user) and is configured by
/// argv only: the environment is never trusted in a privileged helper.
/// Without `--debug` no subscriber is installed at all: errors are printed
/// by `main`, and a one-shot helper should not pay for an idle logger.
pub fn init_debug_logging(debug: bool) {
    if debug {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::DEBUG)
            .with_target(false)
            .without_time()
            // A write error would otherwise be reported with `eprint!`,
            // which panics when stderr is a closed pipe.
            .log_internal_errors(false)
            .init();
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        protocol: ProtocolArgs,
    }

    fn error_line(args: &[&str]) -> String {
        let err =
            Cli::try_parse_from(std::iter::once("helper").chain(args.iter().copied())).unwrap_err();
        cli_error_line("helper", "--br=NAME --fd=N", &err)
    }

    /// Reproducer of the helper_argv fuzz target: clap echoed the unknown
    /// argument `--debu\x01` raw, control character included.
    #[test]
    fn refused_argv_is_one_clean_line() {
        let line = error_line(&["--br=br1", "--debu\u{1}", "--fd=7"]);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("--debu\\u{1}"), "{line}");
        let line = error_line(&["--br=br0", &format!("--x={}", "\n".repeat(100_000))]);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.len() < 1024, "{}", line.len());
    }

    /// Reproducer of helper_argv's growth: every parse asked for the
    /// version line, and every call leaked a new one.
    #[test]
    fn version_line_is_made_once() {
        let first = VERSION_LINE.as_str();
        let again = VERSION_LINE.as_str();
        assert!(std::ptr::eq(first, again), "a second line was made");
        assert_eq!(
            first,
            format!(
                "{} (config dir {})",
                env!("CARGO_PKG_VERSION"),
                crate::CONFIG_DIR
            )
        );
    }
}
