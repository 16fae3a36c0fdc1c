//! Command line: QEMU's helper protocol, the macvtap mode and the guest
//! MAC, plus a man-style `--help`.

use std::fmt;
use std::str::FromStr;

use clap::{Parser, ValueEnum};
use qnet_hostnet::link::MacvtapMode;
use qnet_hostnet::macvtap::format_mac;
use qnet_hostnet::protocol::ProtocolArgs;

const ABOUT: &str = "Attach a QEMU guest directly to a host NIC through a new macvtap device";

const LONG_ABOUT: &str = "\
NAME
    qnet-macvtap-helper - attach a QEMU guest NIC to a host NIC via macvtap

SYNOPSIS
    qnet-macvtap-helper [--mode=MODE] [--mac=MAC] [--use-vnet] --br=LOWER --fd=N
                        [--debug]

DESCRIPTION
    QEMU runs this program like a bridge helper, with the host NIC (the
    \"lower device\") in br= and the options in the helper string:
        -netdev tap,id=n0,br=eth0,helper=\"/usr/libexec/qnet-macvtap-helper
                --mode=bridge --mac=52:54:00:12:34:56\"
        -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
    (QEMU then runs it through /bin/sh -c; `-netdev bridge,br=eth0,helper=...`
    works the same way, and --br=eth0 may also go into the helper string.)

    It checks that the calling user may use LOWER (see ACL FILES; LOWER is
    matched under its name and every alternative name), that the process at
    the other end of N started the helper (QEMU does), creates a brand-new
    macvtap device named qmvtapN on LOWER with the guest's MAC and LOWER's
    MTU, marks it (ifalias `qnet-macvtap uid=... pid=<QEMU's pid> ...`),
    brings it up, opens its character device /dev/tapN (IFF_VNET_HDR with
    --use-vnet) and sends the descriptor to QEMU over the unix socket N
    with SCM_RIGHTS.

    A macvtap outlives its descriptor, so the helper leaves a small reaper
    process behind (named qmvtap-reaper): detached in a session of its own,
    holding CAP_NET_ADMIN and no descriptor but a pidfd of QEMU and a
    netlink socket, it waits for QEMU to exit, then deletes the macvtap (if
    it is still the one created: same ifindex, name and marker) and, in
    passthru mode, puts LOWER's original MAC back. The reaper is started
    first and creates the macvtap itself, so however the helper fails or is
    killed, the reaper cleans up at once.

    One user may hold at most 64 qnet macvtaps; CONFIG_DIR/macvtap-user-limit
    (one number, root-owned and world-readable) changes that. Root is not
    limited.

MODES
    bridge    guests on the same LOWER reach each other directly (default)
    vepa      all traffic goes out through LOWER, also between guests (needs
              a switch with reflective relay / hairpin)
    private   like vepa, but guests on the same LOWER never reach each other
    passthru  the guest owns LOWER: the guest MAC is put on LOWER itself
              (its own MAC is restored when QEMU exits); only one guest at a
              time may hold LOWER, and LOWER may carry no other macvtap
              (`passthrough` is accepted too)

    --mac is required except in passthru mode: a macvtap drops every frame
    not addressed to its own MAC, so it must be the guest NIC's MAC (the
    mac= of QEMU's -device). In passthru mode without --mac, LOWER keeps its
    MAC and the guest NIC must use that one.

    The host cannot reach a guest through LOWER's own addresses in bridge
    and vepa mode (the kernel does not loop frames from LOWER back to its
    macvtaps). Give the host a macvlan in bridge mode on LOWER and put the
    host's address on it, or use qnet-bridge-helper.";

const AFTER_LONG_HELP: &str = "\
ACL FILES
    CONFIG_DIR/macvtap.conf (CONFIG_DIR is fixed at build time; see
    --version) lists which lower devices callers may use, with the syntax
    and meaning of bridge.conf, one rule per line:
        allow NAME | allow all | deny NAME | deny all | include PATH
    Every rule of the file and its includes is evaluated; a device must be
    allowed and not denied (deny wins, the default is deny, a missing
    macvtap.conf refuses everything). Includes are read as the calling user
    (a root:alice 0640 file included from macvtap.conf applies to alice
    only); a missing or unreadable include is skipped. Blank lines and #
    comments are ignored; a malformed line is an error naming file:line.

    Example /etc/qemu/macvtap.conf:
        allow eth1
        include /etc/qemu/users/alice-macvtap.conf

PRIVILEGES
    Install setuid root (chmod 4755). Before reading any input the helper
    returns to the caller's uid/gid, clears the bounding, ambient and
    inheritable capability sets, sets no_new_privs, ignores the environment
    and keeps CAP_NET_ADMIN effective. CAP_DAC_OVERRIDE (to open the
    root-only /dev/tapN), CAP_MKNOD and CAP_CHOWN (to make a private node
    when /dev/tapN is missing or belongs to another network namespace) are
    kept permitted but not effective, raised only around those system calls
    and dropped for good once the device is open. With file capabilities,
    use `setcap cap_net_admin,cap_dac_override,cap_mknod,cap_chown+ep`.

EXIT STATUS
    0  the macvtap descriptor was sent to QEMU (and the reaper runs)
    1  anything else; one line on stderr says what went wrong and how to fix
       it, and no device is left behind (a passthru MAC is restored)";

/// The macvtap mode, as `ip link` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Bridge,
    Vepa,
    Private,
    #[value(alias = "passthrough")]
    Passthru,
}

impl From<Mode> for MacvtapMode {
    fn from(mode: Mode) -> MacvtapMode {
        match mode {
            Mode::Bridge => MacvtapMode::Bridge,
            Mode::Vepa => MacvtapMode::Vepa,
            Mode::Private => MacvtapMode::Private,
            Mode::Passthru => MacvtapMode::Passthru,
        }
    }
}

/// A unicast, non-zero MAC for the guest NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestMac(pub [u8; 6]);

impl FromStr for GuestMac {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let example = "52:54:00:12:34:56";
        let bytes = macaddr::MacAddr6::from_str(text)
            .map_err(|_| format!("not a MAC address: write six hex bytes such as {example}"))?
            .into_array();
        if bytes == [0; 6] {
            return Err(format!(
                "the all-zero MAC is not usable: give the guest NIC's MAC, such as {example}"
            ));
        }
        if bytes[0] & 1 != 0 {
            return Err(format!(
                "{} is a multicast address (lowest bit of the first byte set): a NIC needs a \
                 unicast MAC, such as {example}",
                format_mac(bytes)
            ));
        }
        Ok(GuestMac(bytes))
    }
}

impl fmt::Display for GuestMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_mac(self.0))
    }
}

// clap names the command after the package, `qnet-macvtap-helper` like the
// binary. `--debug` and `--version` come with `ProtocolArgs`: every qnet
// helper has them.
#[derive(Debug, Parser)]
#[command(about = ABOUT, long_about = LONG_ABOUT, after_long_help = AFTER_LONG_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub protocol: ProtocolArgs,

    /// How the macvtap forwards traffic (see MODES).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Mode::Bridge)]
    pub mode: Mode,

    /// The guest NIC's MAC (the mac= of QEMU's -device); required except in passthru mode.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<GuestMac>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(
            ["qnet-macvtap-helper"]
                .iter()
                .chain(args)
                .chain(&["--fd=3", "--br=eth0"]),
        )
    }

    #[test]
    fn mode_defaults_to_bridge_and_accepts_passthrough() {
        assert_eq!(parse(&[]).unwrap().mode, Mode::Bridge);
        assert_eq!(parse(&["--mode=passthrough"]).unwrap().mode, Mode::Passthru);
        assert_eq!(parse(&["--mode", "private"]).unwrap().mode, Mode::Private);
        assert!(parse(&["--mode=source"]).is_err());
    }

    #[test]
    fn mac_must_be_unicast_and_not_zero() {
        let cli = parse(&["--mac=52:54:00:AB:cd:01"]).unwrap();
        assert_eq!(cli.mac, Some(GuestMac([0x52, 0x54, 0, 0xab, 0xcd, 1])));
        assert_eq!(cli.mac.unwrap().to_string(), "52:54:00:ab:cd:01");
        for bad in [
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "52:54:00",
            "x",
        ] {
            let err = parse(&[&format!("--mac={bad}")]).unwrap_err().to_string();
            assert!(err.contains("--mac"), "{bad}: {err}");
        }
    }
}
