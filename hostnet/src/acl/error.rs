//! What can be wrong with an ACL, each error one line saying what to do.

use super::*;

/// What is wrong with a line (see [`AclError::Syntax`] for where).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    UnknownKeyword {
        keyword: String,
    },
    /// `keyword` is `allow`, `deny` or `include`.
    MissingArgument {
        keyword: &'static str,
    },
    /// `keyword` is `allow` or `deny`; `args` is everything after it.
    TooManyArguments {
        keyword: &'static str,
        args: String,
    },
    InvalidName {
        name: String,
        error: NameError,
    },
}

impl std::error::Error for LineError {}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The line is not echoed: an include may name a file whose
            // content the caller should not learn through a privileged
            // helper (`/proc/self/maps` is the helper's own memory map).
            Self::UnknownKeyword { keyword } => {
                f.write_str(
                    "unknown keyword: expected `allow NAME`, `deny NAME`, `allow all`, `deny all` or `include PATH`",
                )?;
                if let Some(k) = ["allow", "deny", "include"]
                    .into_iter()
                    .find(|k| k.eq_ignore_ascii_case(keyword))
                {
                    write!(f, " (keywords are lowercase: write `{k}`)")?;
                }
                Ok(())
            }
            Self::MissingArgument { keyword: "include" } => {
                f.write_str("`include` needs a file: write `include PATH`")
            }
            Self::MissingArgument { keyword } => write!(
                f,
                "`{keyword}` needs an interface name: write `{keyword} NAME` or `{keyword} all`"
            ),
            Self::TooManyArguments { keyword, args } => write!(
                f,
                "`{keyword}` takes one interface name, not {}: write one `{keyword} NAME` line per interface",
                args.split(is_blank).filter(|a| !a.is_empty()).count()
            ),
            Self::InvalidName { name, error } => {
                write!(f, "invalid interface name `{}`: {error}", Show(name))
            }
        }
    }
}

/// Why an ACL could not be loaded. Every message is one line that names the
/// file (and line) and tells what to write.
#[derive(Debug, Error)]
pub enum AclError {
    /// The top-level file could not be read.
    #[error("failed to read {}: {cause}{}", ShowPath(.path), hint(.cause))]
    Read { path: PathBuf, cause: ReadError },
    /// An included file could not be read, for another reason than being
    /// missing or unreadable (those are skipped).
    #[error("{at}: failed to read included file {}: {cause}{}", ShowPath(.path), hint(.cause))]
    IncludeRead {
        at: Origin,
        path: PathBuf,
        cause: ReadError,
    },
    #[error("{at}: {problem}")]
    Syntax { at: Origin, problem: LineError },
    /// `chain` runs from the top-level file to the file included again.
    #[error("{at}: include cycle {}: remove one of these includes", ShowChain(.chain))]
    IncludeCycle { at: Origin, chain: Vec<PathBuf> },
    #[error(
        "{at}: including {} nests includes more than {MAX_INCLUDE_DEPTH} levels deep: include it from a less nested file",
        ShowPath(.path)
    )]
    IncludeTooDeep { at: Origin, path: PathBuf },
    #[error(
        "{at}: too many includes (more than {MAX_INCLUDED_FILES} included files or {} MiB of included text in all): remove repeated includes",
        MAX_INCLUDED_BYTES >> 20
    )]
    IncludeLimit { at: Origin },
}

pub(super) fn hint(cause: &ReadError) -> &'static str {
    match cause {
        ReadError::NotFound => ": create it with a line such as `allow br0`",
        ReadError::PermissionDenied => ": make it readable by the calling user",
        ReadError::NotRegularFile => ": make it a regular text file",
        ReadError::TooLarge { .. } => ": an ACL file needs only a few lines",
        ReadError::NotUtf8 { .. } => ": save it as UTF-8 text",
        ReadError::Other(_) => "",
    }
}
