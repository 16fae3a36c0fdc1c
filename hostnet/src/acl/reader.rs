//! How the ACL files are read: the reader trait and the real, bounded file reader.

use super::*;

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
