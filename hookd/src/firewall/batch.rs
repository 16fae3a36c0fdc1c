//! Adding and removing forward elements in as few kernel transactions as
//! possible, with an outcome per element.
//!
//! The common case is ONE nfnetlink transaction, whatever the number of
//! elements (see [`super::nfnetlink`]). The kernel runs a transaction as a
//! whole: one element it refuses — a host port already forwarded to
//! another guest (`EEXIST`) — would fail all the others, an unrelated
//! guest's forward among them. So when a transaction fails for an
//! element's own reason, it is split in halves, each tried on its own
//! and split again while it fails: every element the kernel accepts is
//! changed, and each refused one is reported with the kernel's reason. With
//! k refused elements among n that costs about 2·k·log2(n) more small
//! transactions, and nothing when none is refused.

use std::io;

use super::element::{ForwardElement, Map};
use super::error::{errno, ErrorKind};
use super::nfnetlink::{self, ElementChange, Op};
use super::ruleset::TABLE_NAME;

/// What a change does to each element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Add the element; one that is installed already is a no-op.
    Add,
    /// Remove the element: add it (a no-op if it is there, so that an
    /// absent element is skipped rather than failing the others — nft
    /// 1.0.6 has no `destroy element`), then delete it.
    Remove,
}

/// What a change did, element by element.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElementReport {
    /// Elements now installed ([`Change::Add`]) or gone ([`Change::Remove`]).
    pub changed: Vec<ForwardElement>,
    /// Elements the kernel refused, each with its reason; the kernel state
    /// of these is what it was before.
    pub refused: Vec<Refused>,
}

impl ElementReport {
    /// Every element was changed.
    pub fn is_complete(&self) -> bool {
        self.refused.is_empty()
    }
}

/// One element the kernel refused to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("port forward `{element}`: {}", refusal_reason(*.change, *.errno))]
pub struct Refused {
    pub element: ForwardElement,
    pub change: Change,
    /// The kernel's error number (`EEXIST`: the host port is forwarded to
    /// another guest).
    pub errno: i32,
}

impl Refused {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::of_errno(Some(self.errno))
    }
}

fn refusal_reason(change: Change, errno: i32) -> String {
    let what = match (change, errno) {
        (Change::Add, libc::EEXIST) => "the host port is already forwarded to another guest",
        (Change::Remove, libc::EEXIST) => {
            "the host port is forwarded to another guest than the one given"
        }
        (Change::Add, _) => "the kernel refused to add it",
        (Change::Remove, _) => "the kernel refused to remove it",
    };
    format!("{what} ({})", io::Error::from_raw_os_error(errno))
}

/// Applies `change` to `elements` through the kernel: one transaction,
/// split as the module documentation says when an element is refused.
/// `Err` when the first transaction failed for a reason that is not any
/// one element's (the table is missing, no permission, no answer): then
/// nothing changed.
pub(super) fn apply(change: Change, elements: &[ForwardElement]) -> io::Result<ElementReport> {
    apply_with(change, elements, |part| {
        nfnetlink::transact(TABLE_NAME, &changes(change, part))
    })
}

/// [`apply`] with `transact` as the kernel: it runs one transaction for a
/// slice of the elements.
fn apply_with(
    change: Change,
    elements: &[ForwardElement],
    mut transact: impl FnMut(&[ForwardElement]) -> io::Result<()>,
) -> io::Result<ElementReport> {
    let mut report = ElementReport::default();
    match transact(elements) {
        Ok(()) => report.changed.extend_from_slice(elements),
        Err(e) if !is_elements_own(&e) => return Err(e),
        Err(e) => split(change, elements, e, &mut transact, &mut report),
    }
    Ok(report)
}

/// `elements` failed as one transaction with `failure`: try each half.
fn split(
    change: Change,
    elements: &[ForwardElement],
    failure: io::Error,
    transact: &mut impl FnMut(&[ForwardElement]) -> io::Result<()>,
    report: &mut ElementReport,
) {
    let refuse = |report: &mut ElementReport, part: &[ForwardElement], e: &io::Error| {
        let errno = errno(e).unwrap_or(libc::EIO);
        report.refused.extend(part.iter().map(|&element| Refused {
            element,
            change,
            errno,
        }))
    };
    if elements.len() == 1 || !is_elements_own(&failure) {
        return refuse(report, elements, &failure);
    }
    let (left, right) = elements.split_at(elements.len() / 2);
    for half in [left, right] {
        match transact(half) {
            Ok(()) => report.changed.extend_from_slice(half),
            Err(e) => split(change, half, e, transact, report),
        }
    }
}

/// Whether a failed transaction failed because of one of its elements
/// (`EEXIST`: a key is installed with another guest), rather than for
/// all of them (a missing table, no permission, no answer).
fn is_elements_own(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EEXIST)
}

/// The element changes one transaction makes for `elements`: per map, so
/// that each map's elements go in as few messages as possible.
fn changes(change: Change, elements: &[ForwardElement]) -> Vec<ElementChange<'static>> {
    let ops: &[Op] = match change {
        Change::Add => &[Op::Add],
        Change::Remove => &[Op::Add, Op::Delete],
    };
    let mut changes = Vec::with_capacity(elements.len() * ops.len());
    for &op in ops {
        for map in Map::ALL {
            changes.extend(
                elements
                    .iter()
                    .filter(|e| e.map() == map)
                    .map(|e| ElementChange {
                        op,
                        set: map.name(),
                        key: e.key_bytes(),
                        value: e.value_bytes(),
                    }),
            );
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Proto;
    use crate::firewall::element::tests::rule;

    fn elements(n: u16) -> Vec<ForwardElement> {
        (1..=n)
            .map(|p| rule(Proto::Tcp, None, p, "10.42.0.10", p))
            .collect()
    }

    /// A kernel where the host ports in `taken` are another guest's: a
    /// transaction with any of them fails with EEXIST, as a whole.
    fn kernel<'a>(
        taken: &'a [u16],
        calls: &'a mut usize,
    ) -> impl FnMut(&[ForwardElement]) -> io::Result<()> + 'a {
        move |part| {
            *calls += 1;
            match part.iter().any(|e| taken.contains(&e.host_port)) {
                true => Err(io::Error::from_raw_os_error(libc::EEXIST)),
                false => Ok(()),
            }
        }
    }

    #[test]
    fn without_a_refusal_it_is_one_transaction() {
        let all = elements(1000);
        let mut calls = 0;
        let report = apply_with(Change::Add, &all, kernel(&[], &mut calls)).unwrap();
        assert_eq!((report.changed, report.refused.len()), (all, 0));
        assert_eq!(calls, 1);
    }

    #[test]
    fn refused_elements_are_found_and_every_other_one_changed() {
        let all = elements(1000);
        let taken = [17, 600, 601];
        let mut calls = 0;
        let report = apply_with(Change::Add, &all, kernel(&taken, &mut calls)).unwrap();
        let refused: Vec<u16> = report.refused.iter().map(|r| r.element.host_port).collect();
        assert_eq!(refused, taken);
        assert!(report
            .refused
            .iter()
            .all(|r| r.kind() == ErrorKind::KeyTaken));
        let mut changed = report.changed.clone();
        changed.sort();
        let expected: Vec<_> = all
            .iter()
            .filter(|e| !taken.contains(&e.host_port))
            .copied()
            .collect();
        assert_eq!(changed, expected);
        assert!(calls <= 1 + 2 * taken.len() * 10, "{calls} transactions");
        assert!(report.refused[0]
            .to_string()
            .contains("`tcp *:17 -> 10.42.0.10:17`: the host port is already forwarded to another guest (File exists"));
    }

    #[test]
    fn a_failure_that_is_no_elements_own_changes_nothing() {
        let all = elements(10);
        let missing = |_: &[ForwardElement]| -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        };
        let err = apply_with(Change::Remove, &all, missing).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        // Once split, such a failure of a half refuses that half.
        let mut calls = 0;
        let report = apply_with(Change::Add, &all, |_| {
            calls += 1;
            match calls {
                1 => Err(io::Error::from_raw_os_error(libc::EEXIST)),
                2 => Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")),
                _ => Ok(()),
            }
        })
        .unwrap();
        assert_eq!(report.refused.len(), 5);
        assert_eq!(report.refused[0].errno, libc::ETIMEDOUT);
        assert_eq!(report.changed, all[5..]);
    }

    #[test]
    fn a_removal_adds_then_deletes_per_map() {
        let v4 = rule(Proto::Tcp, Some("10.99.0.1"), 80, "10.42.0.10", 80);
        let any = rule(Proto::Udp, None, 53, "10.42.0.10", 53);
        let ops: Vec<(Op, &str)> = changes(Change::Remove, &[any, v4])
            .iter()
            .map(|c| (c.op, c.set))
            .collect();
        assert_eq!(
            ops,
            [
                (Op::Add, "fwd4"),
                (Op::Add, "fwd4_any"),
                (Op::Delete, "fwd4"),
                (Op::Delete, "fwd4_any")
            ]
        );
    }
}
