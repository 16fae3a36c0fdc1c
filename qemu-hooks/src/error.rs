//! The hook's errors: [`XmlError`], why a libvirt XML document (a domain's,
//! or a network's live status) was not read, with a kind; and
//! [`HookError`], everything that fails a hook run. Each reaches libvirt's
//! log (and, for a guest that fails to start, the user) as one line.

use std::fmt;
use std::io;

use qnet_api::client::ClientError;
use qnet_api::Invalid;
use thiserror::Error;

/// Longest message about an XML document.
const MAX_MESSAGE: usize = 1024;

/// What is wrong with a document, so callers and tests can tell a refusal
/// of hostile input from a mistake in qnet's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XmlErrorKind {
    /// Refused whatever it says: too long, not UTF-8, a DTD, nested too
    /// deep (see the crate's bounds).
    Refused,
    /// Not a well-formed document of the kind expected.
    Malformed,
    /// Well-formed, but not what libvirt writes: an empty `<name>`, an
    /// interface MAC that is not one, a bridge name no kernel takes.
    Invalid,
    /// qnet's own block in the domain's `<metadata>` is wrong: the domain's
    /// author has to fix it.
    Metadata,
    /// The file could not be read.
    Io,
}

/// Why a document was not read. Its message is one line of at most
/// [`MAX_MESSAGE`] bytes: quick-xml's messages and ours quote the document,
/// line breaks and all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct XmlError {
    kind: XmlErrorKind,
    message: String,
}

impl XmlError {
    pub(crate) fn new(kind: XmlErrorKind, message: impl fmt::Display) -> XmlError {
        XmlError {
            kind,
            message: qnet_api::types::one_line(&message.to_string(), MAX_MESSAGE),
        }
    }

    pub fn kind(&self) -> XmlErrorKind {
        self.kind
    }

    /// The same error, its message after `what: `.
    pub(crate) fn within(self, what: impl fmt::Display) -> XmlError {
        XmlError::new(self.kind, format!("{what}: {}", self.message))
    }
}

/// Everything that fails a run of the hook.
#[derive(Debug, Error)]
pub enum HookError {
    #[error("reading the domain XML: {0}")]
    ReadXml(io::Error),
    #[error("writing the domain XML: {0}")]
    WriteXml(io::Error),
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error("domain name: {0}")]
    DomainName(Invalid),
    #[error("domain UUID: {0}")]
    DomainUuid(Invalid),
    /// hookd is not running, and the domain asks for qnet.
    #[error("the domain's XML asks for qnet (qnet metadata), but {0}")]
    HookdNeeded(ClientError),
    #[error(transparent)]
    Hookd(ClientError),
    /// hookd refused or failed, and the domain does not ask for qnet.
    #[error("{0} (the guest has no qnet metadata: starting anyway)")]
    HookdIgnored(ClientError),
}
