//! Command line: QEMU's helper protocol plus a man-style `--help`.

use clap::Parser;
use qnet_hostnet::protocol::ProtocolArgs;

const ABOUT: &str = "Attach a QEMU guest to a Linux bridge through a new TAP device \
(drop-in replacement for qemu-bridge-helper)";

const LONG_ABOUT: &str = "\
NAME
    qnet-bridge-helper - attach a QEMU guest NIC to a Linux bridge

SYNOPSIS
    qnet-bridge-helper [--use-vnet] --br=BRIDGE --fd=N [--debug]

DESCRIPTION
    QEMU runs this program for `-netdev bridge,br=BRIDGE,helper=PATH` and
    `-netdev tap,helper=PATH`. It checks that the calling user may use BRIDGE
    (see ACL FILES), creates a brand-new TAP device without IPv6 addresses
    of its own (addrgenmode none), copies the bridge's MTU to it, gives it a
    MAC starting with fe: (so the bridge keeps its own address), enslaves it
    to the bridge, brings it up, and sends the open TAP file descriptor to
    QEMU over the unix socket N with SCM_RIGHTS. The process at the other end
    of N must have started the helper (QEMU does).

    The TAP lives as long as QEMU: it disappears when QEMU closes the
    descriptor. QEMU could make it persistent (TUNSETPERSIST), so the TAP
    is owned by the caller (nobody else may attach to it), marked (ifalias
    `qnet-tap uid=... pid=<QEMU's pid> ...`), and a small reaper process
    (qtap-reaper) deletes it when QEMU exits. A bridge is matched against
    the ACL under its name and every alternative name (`deny br0` also
    refuses any altname of br0). The holder of the descriptor can change the
    TAP's MAC: give bridges a fixed MAC, or a guest can change the bridge's.

    Extra arguments may follow the path in QEMU's helper string, e.g.
    helper=\"/usr/libexec/qnet-bridge-helper --br=br1\"; QEMU then runs the
    helper through /bin/sh -c and does not add its own --br.";

const AFTER_LONG_HELP: &str = "\
ACL FILES
    CONFIG_DIR/bridge.conf (CONFIG_DIR is fixed at build time; see --version)
    lists which bridges callers may use, one rule per line:
        allow NAME | allow all | deny NAME | deny all | include PATH
    Every rule of the file and its includes is evaluated; a bridge must be
    allowed and not denied (deny wins, the default is deny). Includes are
    read as the calling user, so a root:alice 0640 file included from
    bridge.conf applies to alice only; a missing or unreadable include is
    skipped. A relative include path is relative to the including file.
    Blank lines and # comments (also after a rule) are ignored. Unlike
    qemu-bridge-helper, a malformed line in any file is an error that names
    file:line, include cycles and nesting deeper than 8 are refused, and
    names of 16 bytes or more are refused.

    Example /etc/qemu/bridge.conf:
        allow br0
        include /etc/qemu/users/alice.conf

PRIVILEGES
    Install setuid root (chmod 4755) or with `setcap cap_net_admin+ep`.
    Before reading any input the helper keeps only CAP_NET_ADMIN, returns to
    the caller's uid/gid, clears the bounding, ambient and inheritable
    capability sets, sets no_new_privs and ignores the environment.

EXIT STATUS
    0  the TAP descriptor was sent to QEMU
    1  anything else; one line on stderr says what went wrong and how to fix
       it, and no device is left behind";

// clap names the command after the package, `qnet-bridge-helper` like the
// binary. `--debug` and `--version` come with `ProtocolArgs`: every qnet
// helper has them.
#[derive(Debug, Parser)]
#[command(about = ABOUT, long_about = LONG_ABOUT, after_long_help = AFTER_LONG_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub protocol: ProtocolArgs,
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::Parser;

    use super::Cli;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("qnet-bridge-helper").chain(args.iter().copied()))
    }

    #[test]
    fn qemus_argv_is_accepted() {
        let cli = parse(&["--use-vnet", "--fd=5", "--br=br0"]).unwrap();
        assert!(cli.protocol.use_vnet);
        assert_eq!(cli.protocol.fd, 5);
        assert_eq!(cli.protocol.br, "br0");
        assert!(!cli.protocol.debug);
    }

    #[test]
    fn sh_c_form_puts_extra_arguments_first() {
        // helper="qnet-bridge-helper --br=br1 --debug" becomes
        // `qnet-bridge-helper --br=br1 --debug --use-vnet --fd=7`.
        let cli = parse(&["--br=br1", "--debug", "--use-vnet", "--fd=7"]).unwrap();
        assert_eq!(cli.protocol.br, "br1");
        assert_eq!(cli.protocol.fd, 7);
        assert!(cli.protocol.debug);
    }

    #[test]
    fn use_vnet_is_optional() {
        let cli = parse(&["--fd=3", "--br=br0"]).unwrap();
        assert!(!cli.protocol.use_vnet);
    }

    #[test]
    fn bridge_and_fd_are_required() {
        for args in [&["--fd=3"][..], &["--br=br0"][..], &[][..]] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{args:?}");
        }
    }

    #[test]
    fn anything_else_is_an_error() {
        for args in [
            &["--fd=3", "--br=br0", "--ifname=tap9"][..],
            &["--fd=3", "--br=br0", "extra"][..],
            &["--fd=three", "--br=br0"][..],
            &["--fd=3", "--br=br0", "--br=br1"][..],
        ] {
            let err = parse(args).unwrap_err();
            assert!(
                !matches!(
                    err.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
                ),
                "{args:?}"
            );
        }
    }

    #[test]
    fn help_and_version_are_not_errors_to_report() {
        assert_eq!(
            parse(&["--help"]).unwrap_err().kind(),
            ErrorKind::DisplayHelp
        );
        assert_eq!(
            parse(&["--version"]).unwrap_err().kind(),
            ErrorKind::DisplayVersion
        );
    }
}
