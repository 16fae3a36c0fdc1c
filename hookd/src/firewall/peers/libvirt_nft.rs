//! libvirt's nftables backend (libvirt 10.4 and later, `firewall_backend
//! = "nftables"` in /etc/libvirt/network.conf): its own `table ip
//! libvirt_network`, whose base chain `forward` jumps to `guest_input`,
//! which ends every NAT and isolated network with `oif BRIDGE reject`. A
//! reject in any table is final whatever `table inet qnet` accepts, so a
//! forward of ours into such a network gets its accept in that chain,
//! ahead of libvirt's rules, as narrow as in `LIBVIRT_FWI` (DNAT'ed, to
//! that guest and port only) and with the comment `qnet:libvirt-NETWORK`.
//! libvirt inserts its rules at the head of the chain when a network
//! starts: the next apply (woken by nftables' change notification) puts
//! ours first again.
//!
//! Planning is pure ([`parse_chain`], [`commands`]); [`LibvirtNft`] runs
//! `nft`, all changes in one transaction.

use super::head::{head_diff, Change};
use super::iptables::run;
use super::MARKER_PREFIX;
use super::{libvirt_marker, Applied, LibvirtForward, Openings, PeerDriver, PeerError};

/// libvirt's table (family `ip`) and the chain rejecting inbound traffic.
pub const TABLE: &str = "libvirt_network";
pub const CHAIN: &str = "guest_input";

/// One rule of the chain as `nft -a list chain` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub text: String,
    pub handle: u64,
}

/// The rules of `nft -a list chain …` output, in order.
pub fn parse_chain(listing: &str) -> Vec<Listed> {
    listing
        .lines()
        .filter_map(|line| {
            let (text, handle) = line.trim().rsplit_once(" # handle ")?;
            if text.ends_with('{') || text.starts_with("type ") {
                return None;
            }
            Some(Listed {
                text: text.to_owned(),
                handle: handle.trim().parse().ok()?,
            })
        })
        .collect()
}

/// Whether a listed rule carries a qnet marker.
pub fn is_ours(text: &str) -> bool {
    text.contains(&format!("comment \"{MARKER_PREFIX}"))
}

/// The accept for one forward, spelled as `nft list` prints it (so a
/// listing compares equal to it).
pub fn rule(f: &LibvirtForward) -> String {
    format!(
        "oifname \"{}\" ip daddr {} {} dport {} ct status dnat accept comment \"{}\"",
        f.bridge,
        f.guest,
        f.proto,
        f.port,
        libvirt_marker(&f.network)
    )
}

/// The nft commands (one transaction) that leave exactly the accepts
/// `what` needs first in the chain `listed`.
pub fn commands(listed: &[Listed], what: &Openings) -> Vec<String> {
    let mut wanted: Vec<String> = Vec::new();
    for r in what.libvirt.iter().map(rule) {
        if !wanted.contains(&r) {
            wanted.push(r);
        }
    }
    let rules: Vec<(String, bool)> = listed
        .iter()
        .map(|l| (l.text.clone(), is_ours(&l.text)))
        .collect();
    head_diff(&rules, |_| CHAIN, &wanted)
        .into_iter()
        .map(|change| match change {
            Change::Delete(i) => {
                format!("delete rule ip {TABLE} {CHAIN} handle {}", listed[i].handle)
            }
            Change::Insert(text) => format!("insert rule ip {TABLE} {CHAIN} {text}"),
        })
        .collect()
}

/// libvirt's nftables table as a peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct LibvirtNft;

impl LibvirtNft {
    /// The chain's rules; `None` when libvirt's table or chain is absent
    /// (libvirtd not running, its iptables backend, another layout).
    pub async fn chain(&self) -> Result<Option<Vec<Listed>>, PeerError> {
        let tables = run("nft", &["list", "tables"]).await?;
        let table = format!("table ip {TABLE}");
        if !tables.lines().any(|l| l.trim() == table) {
            return Ok(None);
        }
        match run("nft", &["-a", "list", "chain", "ip", TABLE, CHAIN]).await {
            Ok(listing) => Ok(Some(parse_chain(&listing))),
            Err(PeerError::Failed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl PeerDriver for LibvirtNft {
    fn name(&self) -> String {
        format!("libvirt's nftables chain ip {TABLE} {CHAIN}")
    }

    async fn apply(&self, what: &Openings) -> Result<Applied, PeerError> {
        let Some(listed) = self.chain().await? else {
            return Ok(Applied::default());
        };
        let commands = commands(&listed, what);
        if !commands.is_empty() {
            // nft reads its arguments as one script: `;` separates
            // commands, and the whole is one transaction.
            run("nft", &[&commands.join("; ")]).await?;
        }
        Ok(Applied {
            present: true,
            changes: commands.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{IfName, Proto};
    use std::str::FromStr;

    /// What libvirt 11's nftables backend lists for a NAT network, with
    /// `nft -a`.
    const LIBVIRT: &str = "table ip libvirt_network {\n\
        \tchain guest_input { # handle 3\n\
        \t\toif \"virbr0\" counter packets 0 bytes 0 reject # handle 12\n\
        \t\toif \"virbr0\" ip daddr 192.168.122.0/24 ct state established,related counter packets 9 bytes 900 accept # handle 11\n\
        \t}\n}\n";

    fn forward(guest: &str, port: u16) -> LibvirtForward {
        LibvirtForward {
            network: "default".into(),
            bridge: IfName::from_str("virbr0").unwrap(),
            guest: guest.parse().unwrap(),
            proto: Proto::Tcp,
            port,
        }
    }

    fn what(forwards: Vec<LibvirtForward>) -> Openings {
        Openings {
            networks: Vec::new(),
            libvirt: forwards,
        }
    }

    #[test]
    fn a_forward_gets_its_accept_first_in_guest_input() {
        let listed = parse_chain(LIBVIRT);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].handle, 12);
        assert!(!is_ours(&listed[0].text));
        let f = forward("192.168.122.50", 80);
        assert_eq!(
            commands(&listed, &what(vec![f.clone(), f])),
            ["insert rule ip libvirt_network guest_input oifname \"virbr0\" ip daddr 192.168.122.50 \
              tcp dport 80 ct status dnat accept comment \"qnet:libvirt-default\""]
        );
        // No forward: nothing to do.
        assert_eq!(commands(&listed, &what(Vec::new())), Vec::<String>::new());
    }

    #[test]
    fn ours_are_adopted_moved_back_first_and_removed_by_handle() {
        let ours = rule(&forward("192.168.122.50", 80));
        let first = format!(
            "table ip libvirt_network {{\n\tchain guest_input {{ # handle 3\n\t\t{ours} # handle 20\n{}",
            LIBVIRT.split_once("# handle 3\n").unwrap().1
        );
        let listed = parse_chain(&first);
        assert!(is_ours(&listed[0].text));
        // Adopted as it is (also after a restart): nothing to do.
        assert_eq!(
            commands(&listed, &what(vec![forward("192.168.122.50", 80)])),
            Vec::<String>::new()
        );
        // The forward went: its accept goes, by handle.
        assert_eq!(
            commands(&listed, &what(Vec::new())),
            ["delete rule ip libvirt_network guest_input handle 20"]
        );
        // libvirt restarted the network and inserted its rules ahead of
        // ours: ours is put first again.
        let mut behind = listed.clone();
        behind.rotate_left(1);
        assert_eq!(
            commands(&behind, &what(vec![forward("192.168.122.50", 80)])),
            [
                "delete rule ip libvirt_network guest_input handle 20".to_string(),
                format!("insert rule ip libvirt_network guest_input {ours}"),
            ]
        );
    }
}
