//! Deciding: deny wins, the default is deny, a device is decided under every name it has.

use super::*;

/// The outcome of [`Acl::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Decision {
    /// `by` is the first `allow` rule that matched; no `deny` rule matched.
    Allowed {
        by: Rule,
    },
    Denied(Denial),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed { .. })
    }
}

/// Skipped includes a denial names.
pub(super) const MAX_SKIPS_SHOWN: usize = 3;

/// A refused name, with what is needed to explain the refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The requested name.
    pub name: String,
    pub reason: DenyReason,
    /// The top-level ACL file.
    pub acl_file: PathBuf,
    /// Includes skipped while loading the ACL: one of them may have been
    /// meant to allow the name.
    pub skipped_includes: Vec<SkippedInclude>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The requested name is not a valid interface name.
    InvalidName(NameError),
    /// No `allow` rule matched the name.
    NotAllowed,
    /// This `deny` rule (the first one that matched) denied the name.
    DeniedBy(Rule),
}

impl Denial {
    /// A one-line explanation; `noun` names what was requested, e.g.
    /// `bridge` gives "bridge `br1` is not allowed: add `allow br1` to
    /// /etc/qemu/bridge.conf (or a file it includes)".
    pub fn message(&self, noun: &str) -> String {
        let name = Show(&self.name);
        match &self.reason {
            DenyReason::InvalidName(error) => format!("{noun} name `{name}` is invalid: {error}"),
            DenyReason::DeniedBy(rule) => format!(
                "{noun} `{name}` is denied by {} (`{rule}`): a deny rule wins over any allow rule",
                rule.origin
            ),
            DenyReason::NotAllowed => {
                let mut message = format!(
                    "{noun} `{name}` is not allowed: add `allow {name}` to {} (or a file it includes)",
                    ShowPath(&self.acl_file)
                );
                // A few are enough to point at the cause; a file that
                // skips the same include hundreds of times must not make
                // the message hundreds of times longer than itself.
                for skipped in self.skipped_includes.iter().take(MAX_SKIPS_SHOWN) {
                    message.push_str(&format!(
                        " (skipped include {}: {})",
                        ShowPath(&skipped.path),
                        skipped.reason
                    ));
                }
                let more = self.skipped_includes.len().saturating_sub(MAX_SKIPS_SHOWN);
                if more > 0 {
                    message.push_str(&format!(" (and {more} more skipped includes)"));
                }
                message
            }
        }
    }
}

impl Acl {
    /// The top-level file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All rules, in reading order (includes expanded in place).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Includes skipped because their file was missing or unreadable.
    pub fn skipped_includes(&self) -> &[SkippedInclude] {
        &self.skipped_includes
    }

    /// A helper's check of the device it was asked for by `requested`:
    /// `found` is the device the kernel resolves that name to, decided
    /// under every name it has (the kernel also finds a device by an
    /// alternative name); a device that does not exist is decided by the
    /// requested name, so a denied name is reported as denied, not as
    /// missing. Logs (debug) the skipped includes and the allowing rule.
    pub fn admit(
        &self,
        requested: &str,
        found: Option<&crate::link::Link>,
    ) -> Result<(), Box<Denial>> {
        for skipped in self.skipped_includes() {
            tracing::debug!(%skipped, "include skipped");
        }
        let decision = match found {
            Some(link) => self.decide_device(requested, link.names()),
            None => self.decide(requested),
        };
        match decision {
            Decision::Allowed { by } => {
                tracing::debug!(rule = %by, "allowed");
                Ok(())
            }
            Decision::Denied(denial) => Err(Box::new(denial)),
        }
    }

    /// May `name` be used? Allowed if it is a valid interface name, some
    /// `allow` rule matches it and no `deny` rule does.
    pub fn decide(&self, name: &str) -> Decision {
        self.decide_device(name, [name])
    }

    /// May the device known by `names` (its primary name and every
    /// alternative name, as the kernel resolved `requested`) be used?
    ///
    /// `requested` must be a valid interface name. The rules are applied to
    /// every name: a `deny` matching any of them wins, and an `allow`
    /// matching any of them allows. Deciding on the requested string alone
    /// would let `deny br0` be bypassed through an altname of `br0`.
    pub fn decide_device<'a, I>(&self, requested: &str, names: I) -> Decision
    where
        I: IntoIterator<Item = &'a str> + Clone,
    {
        let denied = |reason| {
            Decision::Denied(Denial {
                name: requested.to_owned(),
                reason,
                acl_file: self.path.clone(),
                skipped_includes: self.skipped_includes.clone(),
            })
        };
        if let Err(error) = check_name(requested) {
            return denied(DenyReason::InvalidName(error));
        }
        let first = |action| {
            self.rules.iter().find(|r| {
                r.action == action && names.clone().into_iter().any(|name| r.matches(name))
            })
        };
        if let Some(rule) = first(Action::Deny) {
            return denied(DenyReason::DeniedBy(rule.clone()));
        }
        match first(Action::Allow) {
            Some(rule) => Decision::Allowed { by: rule.clone() },
            None => denied(DenyReason::NotAllowed),
        }
    }
}
