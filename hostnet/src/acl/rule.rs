//! Rules, where they were written, and skipped includes.

use super::*;

/// Where a rule or directive was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<Path>,
    /// 1-based.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", ShowPath(&self.file), self.line)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `all`: matches every name.
    All,
    /// A valid interface name (see [`check_name`]).
    Name(String),
}

/// One `allow`/`deny` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub target: Target,
    pub origin: Origin,
}

impl Rule {
    pub fn matches(&self, name: &str) -> bool {
        match &self.target {
            Target::All => true,
            Target::Name(n) => n == name,
        }
    }
}

/// The rule as it would be written: `allow br0`, `deny all`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::All => write!(f, "{} all", self.action),
            Target::Name(n) => write!(f, "{} {}", self.action, Show(n)),
        }
    }
}

/// Why an included file was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SkipReason {
    #[error("no such file")]
    NotFound,
    #[error("permission denied")]
    PermissionDenied,
}

/// An `include` whose file was missing or unreadable, hence skipped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("skipped include {}: {reason} (at {origin})", ShowPath(.path))]
pub struct SkippedInclude {
    /// The included path, resolved against the including file's directory.
    pub path: PathBuf,
    /// The `include` line.
    pub origin: Origin,
    pub reason: SkipReason,
}
