//! Interface names as the kernel accepts them.

use super::*;

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

pub(super) fn name_char_ok(ch: char) -> bool {
    let mut buf = [0; 4];
    !(ch == '/'
        || ch == ':'
        || ch.is_control()
        || ch.is_whitespace()
        || ch.encode_utf8(&mut buf).bytes().any(|b| b == 0xA0))
}

pub(super) struct DescribeChar(char);

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
