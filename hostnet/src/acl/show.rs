//! Showing user-supplied text on one line, control characters and unusual whitespace escaped.

use super::*;

pub(super) struct Show<'a>(pub(super) &'a str);

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

pub(super) struct ShowPath<'a>(pub(super) &'a Path);

impl fmt::Display for ShowPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Show(&self.0.to_string_lossy()))
    }
}

pub(super) struct ShowChain<'a>(pub(super) &'a [PathBuf]);

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
