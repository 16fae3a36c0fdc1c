//! Keeping our rules first in a chain of someone else's: the one plan
//! both iptables (`-I CHAIN 1`) and libvirt's nftables table (`insert
//! rule`) follow, since both only insert at the head of a chain.

use std::collections::BTreeSet;

/// One change to a chain: delete the listed rule at this index, or
/// insert a rule at the head of its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<R> {
    Delete(usize),
    Insert(R),
}

/// The changes that leave exactly `wanted` of our rules in `listed` (a
/// listing in order: each rule and whether it is ours), each ahead of
/// every rule of others in its chain (`chain` names a rule's chain):
/// deletes first (ours no longer wanted, duplicates, and every one of
/// ours in a chain where a peer put a rule ahead of one of them, as
/// libvirt does when it rebuilds its chains), then inserts (in reverse,
/// so that inserting each at the head keeps their order).
pub fn head_diff<R: Ord + Clone>(
    listed: &[(R, bool)],
    chain: impl Fn(&R) -> &str,
    wanted: &[R],
) -> Vec<Change<R>> {
    let overtaken = overtaken_chains(listed, &chain);
    let mut kept = BTreeSet::new();
    let mut changes = Vec::new();
    for (i, (rule, _)) in listed.iter().enumerate().filter(|(_, (_, ours))| *ours) {
        let keep = wanted.contains(rule) && !overtaken.contains(chain(rule));
        if keep && kept.insert(rule.clone()) {
            continue;
        }
        changes.push(Change::Delete(i));
    }
    for rule in wanted.iter().rev() {
        if !kept.contains(rule) {
            changes.push(Change::Insert(rule.clone()));
        }
    }
    changes
}

/// The chains where a rule of someone else's comes before one of ours.
fn overtaken_chains<'a, R>(
    listed: &'a [(R, bool)],
    chain: &impl Fn(&'a R) -> &'a str,
) -> BTreeSet<&'a str> {
    let mut foreign_seen = BTreeSet::new();
    let mut overtaken = BTreeSet::new();
    for (rule, ours) in listed {
        let c = chain(rule);
        if !ours {
            foreign_seen.insert(c);
        } else if foreign_seen.contains(c) {
            overtaken.insert(c);
        }
    }
    overtaken
}
