//! Links between networks: `connect-to = ["b"]` in network `a` lets a's
//! guests open connections to b's guests and b's to a's;
//! `connect-to-one-way = ["c"]` lets a's guests open connections to c's,
//! not the reverse (c's guests only answer). Without a link, networks stay
//! apart, as before.
//!
//! An isolated network may be linked to, one way only: its guests open no
//! connection beyond the host (that is what isolated means, and what the
//! host's other firewalls are told, see `firewall::peers`), but guests of
//! a network linked to it may reach them (a back end without a way out).
//!
//! Pure: [`allowed`] says which directions the firewall opens for the
//! networks that are up; [`check`] is the validation of the config file
//! (and of any other set of networks, e.g. ones made at run time).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::NetworkConfig;
use crate::api::{Mode, NetName};

/// One link, as the network that declares it holds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Link {
    /// The network this one's guests may open connections to.
    pub to: NetName,
    /// Only this way: `to`'s guests may not open connections back.
    #[serde(default)]
    pub one_way: bool,
}

impl Link {
    /// The key of the config file that declares this link.
    pub fn key(&self) -> &'static str {
        Link::key_for(self.one_way)
    }

    /// The key of the config file that declares links one way (`true`)
    /// or both ways.
    pub fn key_for(one_way: bool) -> &'static str {
        if one_way {
            "connect-to-one-way"
        } else {
            "connect-to"
        }
    }
}

/// The directions new connections may be opened in, `(from, to)`: guests
/// of `from` to guests of `to`. Sorted by the two names, each once. A link
/// to a network not in `networks` (down, or gone) gives nothing; nor does a
/// link of a network to itself, or one that would let an isolated network's
/// guests open connections.
pub fn allowed(networks: &[NetworkConfig]) -> Vec<(&NetworkConfig, &NetworkConfig)> {
    let by_name: BTreeMap<&NetName, &NetworkConfig> =
        networks.iter().map(|n| (&n.name, n)).collect();
    let mut pairs = BTreeMap::new();
    for net in networks {
        for link in net.connect_to() {
            let Some(&other) = by_name.get(&link.to) else {
                continue;
            };
            let mut directions = vec![(net, other)];
            if !link.one_way {
                directions.push((other, net));
            }
            for (from, to) in directions {
                if from.name != to.name && from.mode != Mode::Isolated {
                    pairs.insert((&from.name, &to.name), (from, to));
                }
            }
        }
    }
    pairs.into_values().collect()
}

/// The links of `networks` checked against each other: the index of the
/// first network with a link that names no network of `networks`, itself,
/// or that would let an isolated network's guests open connections; the
/// key and the problem.
pub fn check(networks: &[NetworkConfig]) -> Result<(), (usize, &'static str, String)> {
    for (index, net) in networks.iter().enumerate() {
        for link in net.connect_to() {
            let problem = |text: String| Err((index, link.key(), text));
            let Some(other) = networks.iter().find(|n| n.name == link.to) else {
                return problem(format!("no network `{}`", link.to));
            };
            if other.name == net.name {
                return problem("a network cannot link to itself".into());
            }
            if other.is_lan() {
                return problem(format!(
                    "`{}` is a bridged network: its guests are on the LAN, which nat and routed guests reach anyway",
                    other.name
                ));
            }
            if net.mode == Mode::Isolated {
                return problem(
                    "the guests of an isolated network open no connections beyond the host: \
                     link from the other network with `connect-to-one-way`, or use mode nat"
                        .into(),
                );
            }
            if other.mode == Mode::Isolated && !link.one_way {
                return problem(format!(
                    "`{}` is isolated, its guests open no connections: use `connect-to-one-way`",
                    other.name
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn net(name: &str, mode: Mode, links: &[(&str, bool)]) -> NetworkConfig {
        let mut net = Config::default_network("10.9.0.0/24".parse().unwrap());
        net.name = name.parse().unwrap();
        net.mode = mode;
        net.own_mut().connect_to = links
            .iter()
            .map(|(to, one_way)| Link {
                to: to.parse().unwrap(),
                one_way: *one_way,
            })
            .collect();
        net
    }

    fn names(pairs: &[(&NetworkConfig, &NetworkConfig)]) -> Vec<String> {
        pairs
            .iter()
            .map(|(from, to)| format!("{}>{}", from.name, to.name))
            .collect()
    }

    #[test]
    fn two_way_links_open_both_directions_one_way_links_one() {
        let nets = [
            net("a", Mode::Nat, &[("b", false), ("c", true)]),
            net("b", Mode::Nat, &[]),
            net("c", Mode::Routed, &[]),
            net("d", Mode::Nat, &[]),
        ];
        assert_eq!(names(&allowed(&nets)), ["a>b", "a>c", "b>a"]);
        assert!(check(&nets).is_ok());
    }

    #[test]
    fn a_link_declared_twice_or_from_both_ends_is_one_pair() {
        let nets = [
            net("a", Mode::Nat, &[("b", true), ("b", false)]),
            net("b", Mode::Nat, &[("a", false), ("a", true)]),
        ];
        assert_eq!(names(&allowed(&nets)), ["a>b", "b>a"]);
    }

    #[test]
    fn links_to_networks_that_are_not_up_give_nothing() {
        let a = net("a", Mode::Nat, &[("b", false), ("gone", true)]);
        let b = net("b", Mode::Nat, &[("a", true)]);
        assert!(allowed(std::slice::from_ref(&a)).is_empty());
        assert!(allowed(std::slice::from_ref(&b)).is_empty());
        assert!(allowed(&[]).is_empty());
        assert_eq!(names(&allowed(&[b, a])), ["a>b", "b>a"]);
    }

    #[test]
    fn isolated_networks_are_reached_but_open_nothing() {
        let nets = [
            net("a", Mode::Nat, &[("iso", true)]),
            net("iso", Mode::Isolated, &[]),
        ];
        assert_eq!(names(&allowed(&nets)), ["a>iso"]);
        assert!(check(&nets).is_ok());
        // Whatever the links say (a network changed to isolated, say):
        // nothing from an isolated network.
        let nets = [
            net("a", Mode::Nat, &[("iso", false)]),
            net("iso", Mode::Isolated, &[("a", false), ("iso", false)]),
        ];
        assert_eq!(names(&allowed(&nets)), ["a>iso"]);
    }

    #[test]
    fn the_file_declares_links_and_its_errors_name_line_and_key() {
        let parse = |text: &str| Config::parse(std::path::Path::new("/etc/qnet/hookd.toml"), text);
        let base = "[[network]]\nname = \"a\"\nsubnet = \"10.1.0.0/24\"\n\
            connect-to = [\"b\"]\nconnect-to-one-way = [\"c\", \"c\"]\n\n\
            [[network]]\nname = \"b\"\nsubnet = \"10.2.0.0/24\"\n\n\
            [[network]]\nname = \"c\"\nmode = \"isolated\"\nsubnet = \"10.3.0.0/24\"\n";
        let config = parse(base).unwrap();
        let link = |to: &str, one_way| Link {
            to: to.parse().unwrap(),
            one_way,
        };
        assert_eq!(
            config.networks[0].connect_to(),
            [link("b", false), link("c", true)]
        );
        assert!(config.networks[1].connect_to().is_empty());
        for (extra, expected) in [
            (
                "connect-to = [\"x\"]",
                "/etc/qnet/hookd.toml:16: network `d`: `connect-to`: no network `x`",
            ),
            (
                "connect-to = [\"b\"]\nconnect-to-one-way = [\"b\"]",
                "/etc/qnet/hookd.toml:16: network `d`: `connect-to-one-way`: `b` is in `connect-to` too",
            ),
            (
                "connect-to-one-way = [\"no such\"]",
                "/etc/qnet/hookd.toml:16: network `d`: `connect-to-one-way`: `no such` must be",
            ),
            ("connect-to = [\"c\"]", "`connect-to`: `c` is isolated"),
            ("connect-to = \"b\"", "line 19"),
        ] {
            let text = format!("{base}\n[[network]]\nname = \"d\"\nsubnet = \"10.4.0.0/24\"\n{extra}\n");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra}: {err}");
        }
    }

    #[test]
    fn bad_links_are_refused_with_the_network_and_key() {
        for (nets, expected) in [
            (
                vec![
                    net("a", Mode::Nat, &[]),
                    net("b", Mode::Nat, &[("x", false)]),
                ],
                (1, "connect-to", "no network `x`"),
            ),
            (
                vec![net("a", Mode::Nat, &[("a", true)])],
                (0, "connect-to-one-way", "itself"),
            ),
            (
                vec![
                    net("a", Mode::Nat, &[("i", false)]),
                    net("i", Mode::Isolated, &[]),
                ],
                (0, "connect-to", "use `connect-to-one-way`"),
            ),
            (
                vec![
                    net("a", Mode::Nat, &[]),
                    net("i", Mode::Isolated, &[("a", true)]),
                ],
                (
                    1,
                    "connect-to-one-way",
                    "isolated network open no connections",
                ),
            ),
        ] {
            let (index, key, problem) = check(&nets).unwrap_err();
            assert_eq!((index, key), (expected.0, expected.1), "{problem}");
            assert!(problem.contains(expected.2), "{problem}");
        }
    }
}
