//! Loading: the top-level file and its includes, bounded, cycles refused.

use super::*;

/// A loaded ACL: the rules of a file and of the files it includes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub(super) path: PathBuf,
    pub(super) rules: Vec<Rule>,
    pub(super) skipped_includes: Vec<SkippedInclude>,
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

pub(super) struct Loader<'r> {
    reader: &'r dyn AclReader,
    rules: Vec<Rule>,
    skipped: Vec<SkippedInclude>,
    /// Files being read, outermost first: (identity, path as displayed).
    stack: Vec<(PathBuf, Arc<Path>)>,
    included_files: usize,
    included_bytes: usize,
}

pub(super) enum Line<'a> {
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
pub(super) fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Cut a comment off a line that starts with a non-blank: a `#` at its start
/// or after a blank starts one.
pub(super) fn strip_comment(line: &str) -> &str {
    let mut after_blank = true;
    for (i, c) in line.char_indices() {
        if c == '#' && after_blank {
            return &line[..i];
        }
        after_blank = is_blank(c);
    }
    line
}

pub(super) fn parse_line(raw: &str) -> Result<Option<Line<'_>>, LineError> {
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
