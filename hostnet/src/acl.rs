//! The `bridge.conf` access-control list of qemu-bridge-helper (also used
//! for `macvtap.conf`): parser and evaluator.
//!
//! This module is pure: text goes in, a [`Decision`] comes out. Files are
//! read through the [`AclReader`] trait, so tests need no files; [`FsReader`]
//! is the real reader. It reads with the identity of the current process:
//! the caller arranges that this is the calling user's identity.
//!
//! # Syntax and semantics (compatible with qemu-bridge-helper)
//!
//! One directive per line; leading and trailing whitespace is ignored, the
//! keyword and its argument are separated by spaces or tabs, blank lines and
//! lines whose first non-blank character is `#` are ignored:
//!
//! ```text
//! allow NAME      # NAME may use the ACL
//! allow all       # every name may use the ACL
//! deny NAME       # NAME may not, whatever allows it
//! deny all        # nothing may, whatever allows it
//! include PATH    # read PATH's rules too (as the calling user)
//! ```
//!
//! Keywords are case-sensitive. All rules of the file and of the files it
//! includes are considered: a name is allowed if some `allow` rule matches it
//! and no `deny` rule does (a deny wins whatever the order; the default is
//! deny). An included file that does not exist or that the calling user may
//! not read is skipped, as qemu-bridge-helper does; it is recorded in
//! [`Acl::skipped_includes`] so that a denial can mention it. The top-level
//! file being missing or unreadable is an error.
//!
//! # Deliberate differences from qemu-bridge-helper
//!
//! 1. A malformed line is an error naming `file:line` and saying what to
//!    write, in included files too (qemu-bridge-helper silently stopped
//!    reading an included file at its first bad line and kept the rules
//!    before it). Malformed means: unknown keyword, missing argument
//!    (`allow` alone or followed only by blanks, which the original accepted
//!    as a rule matching nothing), or more than one argument to
//!    `allow`/`deny` (the original took `deny br0 br1` as the single name
//!    `br0 br1`, which matches nothing: a silently ineffective deny).
//! 2. A trailing comment is a comment: in `allow br0   # lab bridge` the
//!    name is `br0` (the original took `br0   # lab bridge` as the name). A
//!    `#` starts a comment at the start of a line or after a blank; `br#0` is
//!    still a name. The argument of `include` is the rest of the line up to
//!    such a comment, inner spaces included, as in the original.
//! 3. Names are checked like the kernel's `dev_valid_name()`: 1 to 15
//!    bytes, not `.` or `..`, no `/`, `:` or whitespace; in addition control
//!    characters and all Unicode whitespace are refused. An invalid name in
//!    a file is a `file:line` error; [`check_name`] checks a requested name,
//!    and [`Acl::decide`] denies an invalid one whatever the rules say (even
//!    under `allow all`). Names of 16 bytes or more were truncated by the
//!    original before the fix of CVE-2019-13164 (an ACL bypass).
//! 4. Include cycles are refused with an error naming the chain (the
//!    original recursed until it crashed), and so is nesting includes more
//!    than [`MAX_INCLUDE_DEPTH`] levels deep. A whole ACL may read at most
//!    [`MAX_INCLUDED_FILES`] included files and [`MAX_INCLUDED_BYTES`] of
//!    included text, so that a user-writable included file cannot make the
//!    helper do unbounded work.
//! 5. A relative `include` path is resolved against the directory of the
//!    file that contains it (the original used the caller's current
//!    directory, which a hostile caller controls).
//! 6. Only an included file that does not exist (`ENOENT`, `ENOTDIR`) or
//!    may not be read (`EACCES`, `EPERM`) is skipped. Any other failure is an
//!    error: an I/O error, a file that is not a regular file (the original
//!    read directories as empty and blocked forever on a FIFO), larger than
//!    [`MAX_FILE_SIZE`] or not UTF-8 text.
//! 7. Lines have no length limit (the original cut lines into 4095-byte
//!    pieces, each parsed as a line), and a UTF-8 byte-order mark at the
//!    start of a file is ignored.
//! 8. The keyword and its argument may be separated by any blank (space,
//!    tab, vertical tab, form feed, carriage return); the original split at
//!    the first space, or at the first tab only if there was no space at all.
//! 9. A denial says why: which `file:line` rule denied the name, or that no
//!    rule allowed it (and which includes were skipped), see
//!    [`Denial::message`].

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

/// Longest valid interface name, in bytes (`IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = 15;
/// Deepest nesting of `include`s: the top-level file may include a file
/// that includes a file ... down to this many levels.
pub const MAX_INCLUDE_DEPTH: usize = 8;
/// Largest file [`FsReader::default`] reads, in bytes.
pub const MAX_FILE_SIZE: u64 = 1 << 20;
/// Most included files one [`load`] reads (attempts, counting skipped ones).
pub const MAX_INCLUDED_FILES: usize = 256;
/// Most bytes of included text one [`load`] reads, all files together.
pub const MAX_INCLUDED_BYTES: usize = 4 << 20;

// ---------------------------------------------------------------------------
// Reading files
// ---------------------------------------------------------------------------

/// How the ACL files are read.
pub trait AclReader {
    /// The whole text of `path`.
    fn read(&self, path: &Path) -> Result<String, ReadError>;

    /// A canonical name of `path` (symbolic links resolved), used only to
    /// detect include cycles sooner; `None` if unknown. A cycle is still
    /// stopped by [`MAX_INCLUDE_DEPTH`] without it.
    fn canonicalize(&self, path: &Path) -> Option<PathBuf> {
        let _ = path;
        None
    }
}

/// Why a file could not be read. The messages do not name the file: the
/// [`AclError`] that wraps it does.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("no such file")]
    NotFound,
    #[error("permission denied")]
    PermissionDenied,
    #[error("not a regular file")]
    NotRegularFile,
    #[error("larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("not valid UTF-8 text (line {line})")]
    NotUtf8 { line: usize },
    #[error("{}", Show(&.0.to_string()))]
    Other(io::Error),
}

impl ReadError {
    /// Classify an I/O error: a missing file or path component is
    /// [`ReadError::NotFound`], `EACCES`/`EPERM` is
    /// [`ReadError::PermissionDenied`].
    pub fn from_io(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => Self::NotFound,
            io::ErrorKind::PermissionDenied => Self::PermissionDenied,
            _ => Self::Other(error),
        }
    }
}

/// Reads files with `std::fs` as the current process; refuses anything but
/// a regular file of at most `max_size` bytes of UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsReader {
    pub max_size: u64,
}

impl Default for FsReader {
    fn default() -> Self {
        Self {
            max_size: MAX_FILE_SIZE,
        }
    }
}

impl AclReader for FsReader {
    fn read(&self, path: &Path) -> Result<String, ReadError> {
        // O_NONBLOCK: opening a FIFO must not block (it is refused below).
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(ReadError::from_io)?;
        let meta = file.metadata().map_err(ReadError::from_io)?;
        if !meta.is_file() {
            return Err(ReadError::NotRegularFile);
        }
        let expected = usize::try_from(meta.len().min(self.max_size)).unwrap_or(0);
        let mut bytes = Vec::with_capacity(expected.saturating_add(1));
        file.take(self.max_size.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(ReadError::from_io)?;
        if bytes.len() as u64 > self.max_size {
            return Err(ReadError::TooLarge {
                limit: self.max_size,
            });
        }
        String::from_utf8(bytes).map_err(|e| {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            ReadError::NotUtf8 {
                line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
            }
        })
    }

    fn canonicalize(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok()
    }
}

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

/// Why a name is not a valid Linux interface name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("it is {len} bytes long, but Linux interface names have at most 15 bytes")]
    TooLong { len: usize },
    #[error("`.` and `..` are not valid interface names")]
    Dots,
    #[error(
        "it contains {}, which Linux interface names cannot contain (no `/`, `:`, whitespace or control characters)",
        DescribeChar(*.ch)
    )]
    BadChar { ch: char },
}

/// Check that `name` is a valid Linux interface name: 1 to
/// [`MAX_NAME_LEN`] bytes, not `.` or `..`, without `/`, `:`, whitespace or
/// control characters (nor a character whose UTF-8 encoding holds the byte
/// 0xA0, which the kernel takes as whitespace).
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    if name == "." || name == ".." {
        return Err(NameError::Dots);
    }
    match name.chars().find(|&ch| !name_char_ok(ch)) {
        Some(ch) => Err(NameError::BadChar { ch }),
        None => Ok(()),
    }
}

fn name_char_ok(ch: char) -> bool {
    let mut buf = [0; 4];
    !(ch == '/'
        || ch == ':'
        || ch.is_control()
        || ch.is_whitespace()
        || ch.encode_utf8(&mut buf).bytes().any(|b| b == 0xA0))
}

struct DescribeChar(char);

impl fmt::Display for DescribeChar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ch = self.0;
        if ch.is_control() || ch.is_whitespace() {
            write!(f, "U+{:04X}", u32::from(ch))
        } else if ch.is_ascii() {
            write!(f, "`{ch}`")
        } else {
            write!(f, "`{ch}` (U+{:04X})", u32::from(ch))
        }
    }
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

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

fn hint(cause: &ReadError) -> &'static str {
    match cause {
        ReadError::NotFound => ": create it with a line such as `allow br0`",
        ReadError::PermissionDenied => ": make it readable by the calling user",
        ReadError::NotRegularFile => ": make it a regular text file",
        ReadError::TooLarge { .. } => ": an ACL file needs only a few lines",
        ReadError::NotUtf8 { .. } => ": save it as UTF-8 text",
        ReadError::Other(_) => "",
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// A loaded ACL: the rules of a file and of the files it includes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    path: PathBuf,
    rules: Vec<Rule>,
    skipped_includes: Vec<SkippedInclude>,
}

/// Read and parse the ACL file `path` and, recursively, the files it
/// includes.
pub fn load(reader: &dyn AclReader, path: &Path) -> Result<Acl, AclError> {
    let text = reader.read(path).map_err(|cause| AclError::Read {
        path: path.to_owned(),
        cause,
    })?;
    let mut loader = Loader {
        reader,
        rules: Vec::new(),
        skipped: Vec::new(),
        stack: Vec::new(),
        included_files: 0,
        included_bytes: 0,
    };
    let key = loader.key(path);
    loader.load_file(Arc::from(path), key, &text)?;
    Ok(Acl {
        path: path.to_owned(),
        rules: loader.rules,
        skipped_includes: loader.skipped,
    })
}

struct Loader<'r> {
    reader: &'r dyn AclReader,
    rules: Vec<Rule>,
    skipped: Vec<SkippedInclude>,
    /// Files being read, outermost first: (identity, path as displayed).
    stack: Vec<(PathBuf, Arc<Path>)>,
    included_files: usize,
    included_bytes: usize,
}

enum Line<'a> {
    Rule(Action, Target),
    Include(&'a str),
}

impl Loader<'_> {
    /// Identity of a file for cycle detection.
    fn key(&self, path: &Path) -> PathBuf {
        self.reader
            .canonicalize(path)
            // `components()` drops `.` and repeated or trailing slashes.
            .unwrap_or_else(|| path.components().collect())
    }

    fn load_file(&mut self, file: Arc<Path>, key: PathBuf, text: &str) -> Result<(), AclError> {
        self.stack.push((key, Arc::clone(&file)));
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, raw) in text.split('\n').enumerate() {
            let origin = || Origin {
                file: Arc::clone(&file),
                line: index + 1,
            };
            match parse_line(raw) {
                Ok(None) => {}
                Ok(Some(Line::Rule(action, target))) => self.rules.push(Rule {
                    action,
                    target,
                    origin: origin(),
                }),
                Ok(Some(Line::Include(written))) => self.include(origin(), written)?,
                Err(problem) => {
                    return Err(AclError::Syntax {
                        at: origin(),
                        problem,
                    })
                }
            }
        }
        self.stack.pop();
        Ok(())
    }

    fn include(&mut self, at: Origin, written: &str) -> Result<(), AclError> {
        let written = Path::new(written);
        let path = match at.file.parent() {
            Some(dir) if written.is_relative() => dir.join(written),
            _ => written.to_owned(),
        };
        let key = self.key(&path);
        if self.stack.iter().any(|(k, _)| *k == key) {
            let mut chain: Vec<PathBuf> = self.stack.iter().map(|(_, p)| p.to_path_buf()).collect();
            chain.push(path);
            return Err(AclError::IncludeCycle { at, chain });
        }
        // The stack holds the top-level file plus one file per level.
        if self.stack.len() > MAX_INCLUDE_DEPTH {
            return Err(AclError::IncludeTooDeep { at, path });
        }
        if self.included_files >= MAX_INCLUDED_FILES {
            return Err(AclError::IncludeLimit { at });
        }
        self.included_files += 1;
        let reason = match self.reader.read(&path) {
            Ok(text) => {
                self.included_bytes = self.included_bytes.saturating_add(text.len());
                if self.included_bytes > MAX_INCLUDED_BYTES {
                    return Err(AclError::IncludeLimit { at });
                }
                return self.load_file(Arc::from(path), key, &text);
            }
            Err(ReadError::NotFound) => SkipReason::NotFound,
            Err(ReadError::PermissionDenied) => SkipReason::PermissionDenied,
            Err(cause) => return Err(AclError::IncludeRead { at, path, cause }),
        };
        tracing::debug!(
            include = %ShowPath(&path),
            from = %at,
            %reason,
            "skipping unreadable ACL include"
        );
        self.skipped.push(SkippedInclude {
            path,
            origin: at,
            reason,
        });
        Ok(())
    }
}

/// Blanks as C's `isspace()` in the "C" locale.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Cut a comment off a line that starts with a non-blank: a `#` at its start
/// or after a blank starts one.
fn strip_comment(line: &str) -> &str {
    let mut after_blank = true;
    for (i, c) in line.char_indices() {
        if c == '#' && after_blank {
            return &line[..i];
        }
        after_blank = is_blank(c);
    }
    line
}

fn parse_line(raw: &str) -> Result<Option<Line<'_>>, LineError> {
    let line = strip_comment(raw.trim_start_matches(is_blank)).trim_end_matches(is_blank);
    if line.is_empty() {
        return Ok(None);
    }
    let (keyword, rest) = match line.find(is_blank) {
        Some(i) => (&line[..i], line[i..].trim_start_matches(is_blank)),
        None => (line, ""),
    };
    let (action, keyword) = match keyword {
        "allow" => (Action::Allow, "allow"),
        "deny" => (Action::Deny, "deny"),
        "include" if rest.is_empty() => {
            return Err(LineError::MissingArgument { keyword: "include" })
        }
        "include" => return Ok(Some(Line::Include(rest))),
        _ => {
            return Err(LineError::UnknownKeyword {
                keyword: keyword.to_owned(),
            })
        }
    };
    let mut args = rest.split(is_blank).filter(|a| !a.is_empty());
    let Some(arg) = args.next() else {
        return Err(LineError::MissingArgument { keyword });
    };
    if args.next().is_some() {
        return Err(LineError::TooManyArguments {
            keyword,
            args: rest.to_owned(),
        });
    }
    if arg == "all" {
        return Ok(Some(Line::Rule(action, Target::All)));
    }
    check_name(arg).map_err(|error| LineError::InvalidName {
        name: arg.to_owned(),
        error,
    })?;
    Ok(Some(Line::Rule(action, Target::Name(arg.to_owned()))))
}

// ---------------------------------------------------------------------------
// Deciding
// ---------------------------------------------------------------------------

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
const MAX_SKIPS_SHOWN: usize = 3;

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

// ---------------------------------------------------------------------------
// Display helpers: user-supplied text is shown on one line, with control
// characters and unusual whitespace escaped.
// ---------------------------------------------------------------------------

struct Show<'a>(&'a str);

impl fmt::Display for Show<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() || (c.is_whitespace() && c != ' ') {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

struct ShowPath<'a>(&'a Path);

impl fmt::Display for ShowPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Show(&self.0.to_string_lossy()))
    }
}

struct ShowChain<'a>(&'a [PathBuf]);

impl fmt::Display for ShowChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, path) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" -> ")?;
            }
            write!(f, "{}", ShowPath(path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const TOP: &str = "/etc/qemu/bridge.conf";

    /// In-memory reader. A path not in `files` is missing. `canonical`
    /// resolves `..` lexically when enabled, to model a real canonicalizer.
    #[derive(Default)]
    struct Mem {
        files: HashMap<PathBuf, Result<String, ReadError>>,
        canonical: bool,
    }

    impl Mem {
        fn new(files: &[(&str, &str)]) -> Self {
            let mut mem = Self::default();
            for (path, text) in files {
                mem.files.insert(PathBuf::from(path), Ok(text.to_string()));
            }
            mem
        }

        fn with_error(mut self, path: &str, error: ReadError) -> Self {
            self.files.insert(PathBuf::from(path), Err(error));
            self
        }
    }

    impl AclReader for Mem {
        fn read(&self, path: &Path) -> Result<String, ReadError> {
            match self.files.get(path) {
                None | Some(Err(ReadError::NotFound)) => Err(ReadError::NotFound),
                Some(Ok(text)) => Ok(text.clone()),
                Some(Err(ReadError::PermissionDenied)) => Err(ReadError::PermissionDenied),
                Some(Err(ReadError::NotRegularFile)) => Err(ReadError::NotRegularFile),
                Some(Err(ReadError::TooLarge { limit })) => {
                    Err(ReadError::TooLarge { limit: *limit })
                }
                Some(Err(ReadError::NotUtf8 { line })) => Err(ReadError::NotUtf8 { line: *line }),
                Some(Err(ReadError::Other(e))) => {
                    Err(ReadError::Other(io::Error::new(e.kind(), e.to_string())))
                }
            }
        }

        fn canonicalize(&self, path: &Path) -> Option<PathBuf> {
            if !self.canonical {
                return None;
            }
            let mut out = PathBuf::new();
            for c in path.components() {
                match c {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    std::path::Component::CurDir => {}
                    c => out.push(c),
                }
            }
            Some(out)
        }
    }

    fn acl(text: &str) -> Acl {
        load(&Mem::new(&[(TOP, text)]), Path::new(TOP)).expect("ACL loads")
    }

    fn err(mem: &Mem) -> AclError {
        load(mem, Path::new(TOP)).expect_err("ACL must not load")
    }

    fn err_text(text: &str) -> String {
        let e = err(&Mem::new(&[(TOP, text)]));
        let message = e.to_string();
        assert_single_line(&message);
        message
    }

    fn assert_single_line(message: &str) {
        assert!(
            !message.contains('\n') && !message.contains('\r'),
            "multi-line message: {message:?}"
        );
    }

    fn allowed(acl: &Acl, name: &str) -> bool {
        acl.decide(name).is_allowed()
    }

    fn denial(acl: &Acl, name: &str) -> Denial {
        match acl.decide(name) {
            Decision::Denied(d) => d,
            Decision::Allowed { by } => panic!("{name} allowed by {by} at {}", by.origin),
        }
    }

    // --- rules --------------------------------------------------------------

    #[test]
    fn allow_name() {
        let acl = acl("allow br0\n");
        assert!(allowed(&acl, "br0"));
        assert!(!allowed(&acl, "br1"));
        assert!(!allowed(&acl, "br"));
        assert!(!allowed(&acl, "br00"));
        match acl.decide("br0") {
            Decision::Allowed { by } => {
                assert_eq!(by.to_string(), "allow br0");
                assert_eq!(by.origin.to_string(), "/etc/qemu/bridge.conf:1");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn allow_all() {
        let acl = acl("allow all");
        assert!(allowed(&acl, "br0"));
        assert!(allowed(&acl, "virbr0"));
        assert!(allowed(&acl, "all"));
    }

    #[test]
    fn deny_name() {
        let acl = acl("allow all\ndeny br1\n");
        assert!(allowed(&acl, "br0"));
        let d = denial(&acl, "br1");
        assert_eq!(
            d.message("bridge"),
            "bridge `br1` is denied by /etc/qemu/bridge.conf:2 (`deny br1`): a deny rule wins over any allow rule"
        );
    }

    #[test]
    fn deny_all() {
        let acl = acl("allow br0\ndeny all\n");
        assert!(!allowed(&acl, "br0"));
        let d = denial(&acl, "br0");
        assert!(matches!(&d.reason, DenyReason::DeniedBy(r) if r.target == Target::All));
        assert!(d.message("bridge").contains("(`deny all`)"));
    }

    #[test]
    fn deny_wins_whatever_the_order() {
        for text in ["deny br0\nallow br0\n", "allow br0\ndeny br0\n"] {
            let acl = acl(text);
            assert!(!allowed(&acl, "br0"), "{text:?}");
        }
        for text in ["deny all\nallow all\n", "allow all\ndeny all\n"] {
            assert!(!allowed(&acl(text), "br0"), "{text:?}");
        }
    }

    #[test]
    fn default_deny() {
        for text in ["", "\n\n", "# only a comment\n   # another\n"] {
            let acl = acl(text);
            assert!(acl.rules().is_empty());
            let d = denial(&acl, "br0");
            assert_eq!(d.reason, DenyReason::NotAllowed);
            assert_eq!(
                d.message("bridge"),
                "bridge `br0` is not allowed: add `allow br0` to /etc/qemu/bridge.conf (or a file it includes)"
            );
        }
        // A deny alone does not allow anything else.
        assert!(!allowed(&acl("deny br1"), "br0"));
    }

    // --- includes -----------------------------------------------------------

    #[test]
    fn allowed_via_include() {
        let mem = Mem::new(&[
            (TOP, "include /etc/qemu/alice.conf\n"),
            ("/etc/qemu/alice.conf", "allow br0\n"),
        ]);
        let acl = load(&mem, Path::new(TOP)).unwrap();
        assert!(allowed(&acl, "br0"));
        assert_eq!(acl.rules()[0].origin.to_string(), "/etc/qemu/alice.conf:1");
        assert!(acl.skipped_includes().is_empty());
    }

    #[test]
    fn deny_in_include_beats_allow_in_top_file() {
        for top in [
            "allow br0\ninclude /etc/qemu/deny.conf\n",
            "include /etc/qemu/deny.conf\nallow br0\n",
        ] {
            let mem = Mem::new(&[(TOP, top), ("/etc/qemu/deny.conf", "\n\ndeny br0\n")]);
            let acl = load(&mem, Path::new(TOP)).unwrap();
            let d = denial(&acl, "br0");
            assert!(d
                .message("bridge")
                .contains("denied by /etc/qemu/deny.conf:3"));
        }
    }

    #[test]
    fn missing_include_is_skipped() {
        let mem = Mem::new(&[(TOP, "include /etc/qemu/nobody.conf\nallow br0\n")]);
        let acl = load(&mem, Path::new(TOP)).unwrap();
        assert!(allowed(&acl, "br0"));
        assert_eq!(
            acl.skipped_includes(),
            [SkippedInclude {
                path: PathBuf::from("/etc/qemu/nobody.conf"),
                origin: Origin {
                    file: Arc::from(Path::new(TOP)),
                    line: 1
                },
                reason: SkipReason::NotFound,
            }]
        );
    }

    #[test]
    fn unreadable_include_is_skipped_and_mentioned() {
        let mem = Mem::new(&[(TOP, "allow br0\ninclude /etc/qemu/alice.conf\n")])
            .with_error("/etc/qemu/alice.conf", ReadError::PermissionDenied);
        let acl = load(&mem, Path::new(TOP)).unwrap();
        assert!(allowed(&acl, "br0"));
        assert_eq!(acl.skipped_includes().len(), 1);
        assert_eq!(
            acl.skipped_includes()[0].reason,
            SkipReason::PermissionDenied
        );
        let message = denial(&acl, "br1").message("bridge");
        assert_eq!(
            message,
            "bridge `br1` is not allowed: add `allow br1` to /etc/qemu/bridge.conf (or a file it includes) \
             (skipped include /etc/qemu/alice.conf: permission denied)"
        );
        assert_eq!(
            acl.skipped_includes()[0].to_string(),
            "skipped include /etc/qemu/alice.conf: permission denied (at /etc/qemu/bridge.conf:2)"
        );
    }

    #[test]
    fn other_include_read_errors_are_errors() {
        let mem = Mem::new(&[(TOP, "include /etc/qemu/big.conf\n")])
            .with_error("/etc/qemu/big.conf", ReadError::TooLarge { limit: 1 << 20 });
        let e = err(&mem);
        assert!(matches!(e, AclError::IncludeRead { .. }));
        assert_eq!(
            e.to_string(),
            "/etc/qemu/bridge.conf:1: failed to read included file /etc/qemu/big.conf: \
             larger than 1048576 bytes: an ACL file needs only a few lines"
        );
        let mem = Mem::new(&[(TOP, "include /etc/qemu/io.conf\n")]).with_error(
            "/etc/qemu/io.conf",
            ReadError::Other(io::Error::from_raw_os_error(libc::EIO)),
        );
        let message = err(&mem).to_string();
        assert_single_line(&message);
        assert!(message.starts_with(
            "/etc/qemu/bridge.conf:1: failed to read included file /etc/qemu/io.conf: "
        ));
    }

    #[test]
    fn top_file_errors() {
        let e = err(&Mem::default());
        assert!(matches!(
            e,
            AclError::Read {
                cause: ReadError::NotFound,
                ..
            }
        ));
        assert_eq!(
            e.to_string(),
            "failed to read /etc/qemu/bridge.conf: no such file: create it with a line such as `allow br0`"
        );
        let e = err(&Mem::default().with_error(TOP, ReadError::PermissionDenied));
        assert_eq!(
            e.to_string(),
            "failed to read /etc/qemu/bridge.conf: permission denied: make it readable by the calling user"
        );
        let e = err(&Mem::default().with_error(TOP, ReadError::NotUtf8 { line: 3 }));
        assert_eq!(
            e.to_string(),
            "failed to read /etc/qemu/bridge.conf: not valid UTF-8 text (line 3): save it as UTF-8 text"
        );
    }

    #[test]
    fn relative_include_is_relative_to_the_including_file() {
        let mem = Mem::new(&[
            (TOP, "include users/alice.conf\n"),
            ("/etc/qemu/users/alice.conf", "include ./more/../bob.conf\n"),
            ("/etc/qemu/users/more/../bob.conf", "allow br0\n"),
            // What the original would have read, with the caller's cwd at /.
            ("users/alice.conf", "allow evil0\n"),
        ]);
        let acl = load(&mem, Path::new(TOP)).unwrap();
        assert!(allowed(&acl, "br0"));
        assert!(!allowed(&acl, "evil0"));
    }

    #[test]
    fn malformed_line_in_include_names_the_include() {
        let mem = Mem::new(&[
            (TOP, "allow br0\ninclude /etc/qemu/alice.conf\n"),
            ("/etc/qemu/alice.conf", "# alice\nallow br1\nalow br2\n"),
        ]);
        let e = err(&mem);
        assert_eq!(
            e.to_string(),
            "/etc/qemu/alice.conf:3: unknown keyword: expected `allow NAME`, `deny NAME`, \
             `allow all`, `deny all` or `include PATH`"
        );
        match e {
            AclError::Syntax { at, problem } => {
                assert_eq!(at.file.as_ref(), Path::new("/etc/qemu/alice.conf"));
                assert_eq!(at.line, 3);
                assert_eq!(
                    problem,
                    LineError::UnknownKeyword {
                        keyword: "alow".into()
                    }
                );
            }
            e => panic!("{e:?}"),
        }
    }

    // --- cycles and depth ---------------------------------------------------

    #[test]
    fn self_include_is_a_cycle() {
        let mem = Mem::new(&[(TOP, "allow br0\ninclude /etc/qemu/bridge.conf\n")]);
        let e = err(&mem);
        assert_eq!(
            e.to_string(),
            "/etc/qemu/bridge.conf:2: include cycle /etc/qemu/bridge.conf -> /etc/qemu/bridge.conf: \
             remove one of these includes"
        );
        // Same file through `.` and a doubled slash (lexical normalization).
        let mem = Mem::new(&[(TOP, "include .//bridge.conf\n")]);
        assert!(matches!(err(&mem), AclError::IncludeCycle { .. }));
    }

    #[test]
    fn two_file_cycle() {
        let mem = Mem::new(&[
            (TOP, "include a.conf\n"),
            ("/etc/qemu/a.conf", "include b.conf\n"),
            ("/etc/qemu/b.conf", "\ninclude /etc/qemu/a.conf\n"),
        ]);
        let e = err(&mem);
        match &e {
            AclError::IncludeCycle { at, chain } => {
                assert_eq!(at.to_string(), "/etc/qemu/b.conf:2");
                assert_eq!(chain.len(), 4);
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            e.to_string(),
            "/etc/qemu/b.conf:2: include cycle /etc/qemu/bridge.conf -> /etc/qemu/a.conf -> \
             /etc/qemu/b.conf -> /etc/qemu/a.conf: remove one of these includes"
        );
    }

    #[test]
    fn cycle_through_other_spellings_ends_at_max_depth() {
        // `..` is not resolved lexically (symbolic links), so each level is a
        // new spelling of the same file: the depth limit stops it.
        let files = [
            (TOP, "include a.conf\n"),
            ("/etc/qemu/a.conf", "include ../qemu/a.conf\n"),
        ];
        let mut mem = Mem::new(&files);
        let mut path = PathBuf::from("/etc/qemu/a.conf");
        for _ in 0..MAX_INCLUDE_DEPTH + 1 {
            path = path.parent().unwrap().join("../qemu/a.conf");
            mem.files
                .insert(path.clone(), Ok("include ../qemu/a.conf\n".into()));
        }
        match err(&mem) {
            AclError::IncludeTooDeep { at, .. } => {
                assert_eq!(
                    at.file.components().count(),
                    4 + 2 * (MAX_INCLUDE_DEPTH - 1)
                );
            }
            e => panic!("{e:?}"),
        }
        // A reader that canonicalizes catches it as a cycle at once.
        mem.canonical = true;
        match err(&mem) {
            AclError::IncludeCycle { chain, .. } => assert_eq!(chain.len(), 3),
            e => panic!("{e:?}"),
        }
    }

    /// TOP includes /c/1.conf, which includes /c/2.conf, ... down to
    /// /c/{levels}.conf, which allows br0.
    fn chain(levels: usize) -> Mem {
        let mut mem = Mem::new(&[(TOP, "include /c/1.conf\n")]);
        for i in 1..=levels {
            let text = if i == levels {
                "allow br0\n".to_string()
            } else {
                format!("include /c/{}.conf\n", i + 1)
            };
            mem.files
                .insert(PathBuf::from(format!("/c/{i}.conf")), Ok(text));
        }
        mem
    }

    #[test]
    fn depth_8_ok_depth_9_refused() {
        let acl = load(&chain(MAX_INCLUDE_DEPTH), Path::new(TOP)).unwrap();
        assert!(allowed(&acl, "br0"));
        let e = err(&chain(MAX_INCLUDE_DEPTH + 1));
        assert_eq!(
            e.to_string(),
            "/c/8.conf:1: including /c/9.conf nests includes more than 8 levels deep: \
             include it from a less nested file"
        );
        // Also when the too-deep file does not exist.
        let mut mem = chain(MAX_INCLUDE_DEPTH + 1);
        mem.files.remove(Path::new("/c/9.conf"));
        assert!(matches!(err(&mem), AclError::IncludeTooDeep { .. }));
    }

    /// Reproducer of the acl fuzz target: every skipped include was
    /// listed in a denial, so 800 bytes of ACL repeating missing includes
    /// made a 14 KB "line".
    #[test]
    fn denial_names_a_few_skipped_includes() {
        let top = "allow br0\n".to_string() + &"include missing\n".repeat(200);
        let acl = acl(&top);
        assert_eq!(acl.skipped_includes().len(), 200);
        let message = denial(&acl, "br1").message("bridge");
        assert_single_line(&message);
        assert!(message.len() < 400, "{}: {message}", message.len());
        assert!(
            message.contains("(and 197 more skipped includes)"),
            "{message}"
        );
    }

    #[test]
    fn include_fan_out_is_bounded() {
        let many = "include /etc/qemu/empty.conf\n".repeat(MAX_INCLUDED_FILES + 1);
        let mem = Mem::new(&[(TOP, &many), ("/etc/qemu/empty.conf", "")]);
        let e = err(&mem);
        assert!(matches!(&e, AclError::IncludeLimit { at } if at.line == MAX_INCLUDED_FILES + 1));
        assert_single_line(&e.to_string());
        // Diamond includes below the limit are fine.
        let some = "include /etc/qemu/one.conf\n".repeat(10);
        let mem = Mem::new(&[(TOP, &some), ("/etc/qemu/one.conf", "allow br0")]);
        let acl = load(&mem, Path::new(TOP)).unwrap();
        assert_eq!(acl.rules().len(), 10);
        // Text volume.
        let big = "allow br0\n".repeat((MAX_INCLUDED_BYTES / 10) / 4 + 1);
        let mem = Mem::new(&[(TOP, &"include /big.conf\n".repeat(4)), ("/big.conf", &big)]);
        assert!(matches!(err(&mem), AclError::IncludeLimit { at } if at.line == 4));
    }

    // --- lexical details ----------------------------------------------------

    #[test]
    fn comments_blanks_tabs_crlf() {
        let text = "\u{feff}# header\r\n\r\n   \t \r\n\tallow\tbr0\t\r\n  allow  \t br1  \r\n\
                    \t# indented comment\r\ndeny\tbr2\r\nallow br2\r\nallow br3";
        let acl = acl(text);
        assert!(allowed(&acl, "br0"));
        assert!(allowed(&acl, "br1"));
        assert!(!allowed(&acl, "br2"));
        assert!(allowed(&acl, "br3"));
        assert_eq!(acl.rules().len(), 5);
        assert_eq!(acl.rules()[0].origin.line, 4);
        assert_eq!(acl.rules()[4].origin.line, 9);
    }

    #[test]
    fn trailing_comment() {
        let acl = acl("allow br0   # lab bridge\nallow br1\t#tab\nallow br#2\ndeny all#x\n");
        assert_eq!(
            acl.rules()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>(),
            ["allow br0", "allow br1", "allow br#2", "deny all#x"].map(String::from)
        );
        let acl = self::acl("allow br0   # lab bridge\n");
        assert!(allowed(&acl, "br0"));
        // Include paths keep inner spaces, lose trailing comments.
        let mem = Mem::new(&[
            (TOP, "include /etc/qemu/my file.conf  # mine\n"),
            ("/etc/qemu/my file.conf", "allow br0"),
        ]);
        assert!(allowed(&load(&mem, Path::new(TOP)).unwrap(), "br0"));
    }

    #[test]
    fn keywords_are_case_sensitive() {
        let message = err_text("ALLOW br0\n");
        assert_eq!(
            message,
            "/etc/qemu/bridge.conf:1: unknown keyword: expected `allow NAME`, `deny NAME`, \
             `allow all`, `deny all` or `include PATH` (keywords are lowercase: write `allow`)"
        );
        assert!(err_text("Include x").contains("write `include`"));
        // `ALL` is not `all`: it is an interface name.
        let acl = acl("allow ALL\n");
        assert!(!allowed(&acl, "br0"));
        assert!(allowed(&acl, "ALL"));
    }

    #[test]
    fn malformed_lines() {
        assert_eq!(
            err_text("allow br0\nallow\n"),
            "/etc/qemu/bridge.conf:2: `allow` needs an interface name: write `allow NAME` or `allow all`"
        );
        assert_eq!(
            err_text("deny  \t \n"),
            "/etc/qemu/bridge.conf:1: `deny` needs an interface name: write `deny NAME` or `deny all`"
        );
        assert_eq!(
            err_text("allow br0 # c\ninclude   # nothing\n"),
            "/etc/qemu/bridge.conf:2: `include` needs a file: write `include PATH`"
        );
        assert_eq!(
            err_text("deny br0 br1\n"),
            "/etc/qemu/bridge.conf:1: `deny` takes one interface name, not 2: \
             write one `deny NAME` line per interface"
        );
        assert!(err_text("allow all br0").contains("takes one interface name"));
        assert!(err_text("permit br0").contains("unknown keyword:"));
        assert!(err_text("br0").contains("unknown keyword:"));
    }

    #[test]
    fn file_content_that_is_not_a_keyword_is_never_echoed() {
        // What an include of /proc/self/maps reads: the helper's own
        // address space layout must not reach the caller.
        let maps = "55d0c3a00000-55d0c3a2c000 r--p 00000000 08:01 1234 /usr/libexec/helper\n";
        let mem = Mem::new(&[
            (TOP, "include /proc/self/maps\n"),
            ("/proc/self/maps", maps),
        ]);
        let text = err(&mem).to_string();
        assert!(
            text.starts_with("/proc/self/maps:1: unknown keyword:"),
            "{text}"
        );
        for secret in ["55d0c3a", "r--p", "/usr/libexec", "1234"] {
            assert!(!text.contains(secret), "{secret} echoed: {text}");
        }
        let text = err_text("deny secret1 secret2\n");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn a_deny_on_any_name_of_the_device_wins() {
        let acl = acl("allow all\ndeny brprod\nallow enp0s31f6\n");
        // Asked for by an altname, the device is still `brprod`.
        let decision = acl.decide_device("prodalt", ["brprod", "prodalt"]);
        let Decision::Denied(denial) = decision else {
            panic!("{decision:?}");
        };
        assert_eq!(denial.name, "prodalt");
        assert!(
            matches!(denial.reason, DenyReason::DeniedBy(ref rule) if rule.to_string() == "deny brprod")
        );
        // An allow on an altname allows (unless some name is denied).
        let acl = self::acl("allow enp0s31f6\n");
        assert!(acl
            .decide_device("eth0", ["eth0", "enp0s31f6"])
            .is_allowed());
        assert!(!acl.decide_device("eth0", ["eth0"]).is_allowed());
        let acl = self::acl("allow eth0\ndeny enp0s31f6\n");
        assert!(!acl
            .decide_device("eth0", ["eth0", "enp0s31f6"])
            .is_allowed());
        // The requested string itself must still be a valid name.
        assert!(!acl.decide_device("a/b", ["eth0"]).is_allowed());
    }

    // --- names --------------------------------------------------------------

    #[test]
    fn name_lengths() {
        let n15 = "abcdefghijklmno";
        let n16 = "abcdefghijklmnop";
        assert_eq!(check_name(n15), Ok(()));
        assert_eq!(check_name(n16), Err(NameError::TooLong { len: 16 }));
        assert_eq!(check_name(""), Err(NameError::Empty));
        // 15-byte name allowed in a file.
        assert!(allowed(&acl(&format!("allow {n15}")), n15));
        // 16-byte name refused in a file, with file:line.
        assert_eq!(
            err_text(&format!("# x\nallow {n16}\n")),
            "/etc/qemu/bridge.conf:2: invalid interface name `abcdefghijklmnop`: \
             it is 16 bytes long, but Linux interface names have at most 15 bytes"
        );
        // Multi-byte: 8 two-byte chars are 16 bytes.
        assert_eq!(check_name("éééééééé"), Err(NameError::TooLong { len: 16 }));
    }

    #[test]
    fn cve_2019_13164_long_requested_name() {
        // Allowing a 15-byte prefix must not allow longer names, and not even
        // `allow all` allows an invalid name.
        let acl = acl("allow abcdefghijklmno\n");
        for long in ["abcdefghijklmnop", "abcdefghijklmnopqrstuvwxyz"] {
            let d = denial(&acl, long);
            assert!(matches!(
                d.reason,
                DenyReason::InvalidName(NameError::TooLong { .. })
            ));
            assert_eq!(
                denial(&self::acl("allow all"), long).reason,
                DenyReason::InvalidName(NameError::TooLong { len: long.len() })
            );
        }
        assert_eq!(
            denial(&acl, "abcdefghijklmnop").message("bridge"),
            "bridge name `abcdefghijklmnop` is invalid: it is 16 bytes long, but Linux interface \
             names have at most 15 bytes"
        );
    }

    #[test]
    fn invalid_characters() {
        for bad in [
            "br/0",
            "br:0",
            "br\u{b}0",
            "br\u{0}0",
            "br\u{7f}",
            "br\u{a0}0",
            "brà",
            "b\u{2003}r",
        ] {
            assert!(
                matches!(check_name(bad), Err(NameError::BadChar { .. })),
                "{bad:?}"
            );
            assert!(!allowed(&acl("allow all"), bad), "{bad:?}");
        }
        assert_eq!(check_name("."), Err(NameError::Dots));
        assert_eq!(check_name(".."), Err(NameError::Dots));
        for good in [
            "br0",
            "virbr0-nic",
            "br.100",
            "...",
            "tap#1",
            "brü",
            "a_b@c",
        ] {
            assert_eq!(check_name(good), Ok(()), "{good:?}");
        }
        assert_eq!(
            err_text("allow br:0\n"),
            "/etc/qemu/bridge.conf:1: invalid interface name `br:0`: it contains `:`, which Linux \
             interface names cannot contain (no `/`, `:`, whitespace or control characters)"
        );
        assert!(err_text("allow ..\n").contains("`.` and `..` are not valid interface names"));
        // Control characters are escaped, keeping messages on one line.
        let message = err_text("allow br\u{1b}[2J0\n");
        assert!(message.contains("`br\\u{1b}[2J0`"), "{message}");
        assert!(message.contains("contains U+001B"), "{message}");
        assert_eq!(
            check_name("br\u{b}0"),
            Err(NameError::BadChar { ch: '\u{b}' })
        );
        let message = err_text("alow\u{1b}[2J br0\n");
        assert!(!message.contains("alow"), "{message}");
        assert_single_line(&message);
        let d = denial(&acl("allow all"), "br\n0");
        assert_single_line(&d.message("bridge"));
    }

    #[test]
    fn error_messages_are_single_line() {
        let texts = [
            "alow br0",
            "allow",
            "include",
            "deny a b",
            "allow abcdefghijklmnopq",
            "allow a/b",
            "include /etc/qemu/bridge.conf",
            "include /etc/qemu/x\u{b}y\n",
        ];
        for text in texts {
            let mem = Mem::new(&[(TOP, text)]).with_error(
                "/etc/qemu/x\u{b}y",
                ReadError::Other(io::Error::other("bad\nthing")),
            );
            let message = match load(&mem, Path::new(TOP)) {
                Err(e) => e.to_string(),
                Ok(acl) => panic!("{text:?} loaded: {acl:?}"),
            };
            assert!(!message.contains('\n'), "{text:?}: {message:?}");
            assert!(
                message.starts_with("/etc/qemu/bridge.conf:1: "),
                "{message}"
            );
        }
    }

    // --- FsReader -----------------------------------------------------------

    #[test]
    fn read_error_from_io() {
        use io::Error;
        let kind = |errno| ReadError::from_io(Error::from_raw_os_error(errno));
        assert!(matches!(kind(libc::ENOENT), ReadError::NotFound));
        assert!(matches!(kind(libc::ENOTDIR), ReadError::NotFound));
        assert!(matches!(kind(libc::EACCES), ReadError::PermissionDenied));
        assert!(matches!(kind(libc::EPERM), ReadError::PermissionDenied));
        assert!(matches!(kind(libc::EIO), ReadError::Other(_)));
        assert!(matches!(kind(libc::ELOOP), ReadError::Other(_)));
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("qnet-acl-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn fs_reader() {
        let dir = TempDir::new("reader");
        let reader = FsReader::default();
        let ok = dir.write("ok.conf", b"allow br0\n");
        assert_eq!(reader.read(&ok).unwrap(), "allow br0\n");
        assert!(matches!(
            reader.read(&dir.0.join("missing.conf")),
            Err(ReadError::NotFound)
        ));
        assert!(matches!(
            reader.read(&ok.join("below-a-file")),
            Err(ReadError::NotFound)
        ));
        assert!(matches!(
            reader.read(&dir.0),
            Err(ReadError::NotRegularFile)
        ));
        let bad = dir.write("bad.conf", b"allow br0\n# caf\xe9\n");
        assert!(matches!(
            reader.read(&bad),
            Err(ReadError::NotUtf8 { line: 2 })
        ));
        let small = FsReader { max_size: 10 };
        assert_eq!(small.read(&ok).unwrap(), "allow br0\n");
        let big = dir.write("big.conf", b"allow br0\n\n");
        assert!(matches!(
            small.read(&big),
            Err(ReadError::TooLarge { limit: 10 })
        ));
        // A FIFO is refused without blocking.
        let fifo = dir.0.join("fifo");
        let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        assert!(matches!(reader.read(&fifo), Err(ReadError::NotRegularFile)));
    }

    #[test]
    fn fs_reader_end_to_end() {
        let dir = TempDir::new("e2e");
        std::fs::create_dir(dir.0.join("users")).unwrap();
        let top = dir.write(
            "bridge.conf",
            b"allow br0 # lab\ninclude users/alice.conf\ninclude missing.conf\n",
        );
        dir.write("users/alice.conf", b"allow br1\ninclude ../bridge.conf\n");
        // Cycle caught through canonicalization, not only the depth limit.
        match load(&FsReader::default(), &top) {
            Err(AclError::IncludeCycle { chain, .. }) => assert_eq!(chain.len(), 3),
            r => panic!("{r:?}"),
        }
        dir.write("users/alice.conf", b"allow br1\n");
        let acl = load(&FsReader::default(), &top).unwrap();
        assert!(allowed(&acl, "br0"));
        assert!(allowed(&acl, "br1"));
        assert_eq!(acl.skipped_includes().len(), 1);
        assert_eq!(acl.skipped_includes()[0].reason, SkipReason::NotFound);
        let e = load(&FsReader::default(), &dir.0.join("nope.conf")).unwrap_err();
        assert!(e.to_string().contains("nope.conf: no such file: create it"));
    }
}
