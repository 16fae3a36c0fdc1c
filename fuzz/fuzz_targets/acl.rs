//! `bridge.conf` / `macvtap.conf` with includes, read from memory.
//!
//! The input is up to 16 files separated by NUL bytes: the first is the
//! top-level `/etc/qemu/bridge.conf`, file k is `/etc/qemu/k` (so `include
//! 1` and `include /etc/qemu/./1` name it). A file starting with byte 1, 2
//! or 3 cannot be read (permission denied, not a regular file, an I/O
//! error); one that is not UTF-8 is refused as [`FsReader`] refuses it.
//!
//! Properties: loading never panics; every error and denial is one line;
//! the rules are bounded by the lines given; deny wins and the default is
//! deny for every name tried (each word of the input, each rule's name);
//! printing the rules and parsing them again gives the same rules and the
//! same decisions.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::path::{Component, Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use qnet_fuzz::{assert_bounded, assert_one_line};
use qnet_hostnet::acl::{
    self, Acl, AclReader, Action, Decision, DenyReason, ReadError, MAX_INCLUDED_FILES,
};

const TOP: &str = "/etc/qemu/bridge.conf";

struct Mem(BTreeMap<PathBuf, Vec<u8>>);

impl AclReader for Mem {
    fn read(&self, path: &Path) -> Result<String, ReadError> {
        let bytes = self.0.get(&lexical(path)).ok_or(ReadError::NotFound)?;
        match bytes.first() {
            Some(1) => return Err(ReadError::PermissionDenied),
            Some(2) => return Err(ReadError::NotRegularFile),
            Some(3) => return Err(ReadError::Other(io::Error::other("Input/output error"))),
            _ => {}
        }
        String::from_utf8(bytes.clone()).map_err(|e| ReadError::NotUtf8 {
            line: 1 + bytes[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
        })
    }

    fn canonicalize(&self, path: &Path) -> Option<PathBuf> {
        let path = lexical(path);
        self.0.contains_key(&path).then_some(path)
    }
}

/// `path` with `.` and `..` resolved as the kernel would without links.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(c) => out.push(c),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

fn files(data: &[u8]) -> Mem {
    let mut files = BTreeMap::new();
    for (k, chunk) in data.split(|&b| b == 0).take(16).enumerate() {
        let path = if k == 0 {
            PathBuf::from(TOP)
        } else {
            PathBuf::from(format!("/etc/qemu/{k}"))
        };
        files.insert(path, chunk.to_vec());
    }
    Mem(files)
}

/// The names worth asking about: every word of the input and every rule's.
fn names(data: &[u8], acl: &Acl) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let mut names: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '\0')
        .filter(|w| !w.is_empty())
        .take(16)
        .map(str::to_owned)
        .collect();
    for rule in acl.rules().iter().take(16) {
        if let acl::Target::Name(n) = &rule.target {
            names.push(n.clone());
        }
    }
    names.extend(["br0", "", "all", "a\u{a0}"].map(String::from));
    names
}

fn check_decision(acl: &Acl, name: &str, input_len: usize) -> Decision {
    let decision = acl.decide(name);
    let valid = acl::check_name(name).is_ok();
    let matching = |action| {
        acl.rules()
            .iter()
            .any(|r| r.action == action && r.matches(name))
    };
    let denied = matching(Action::Deny);
    let allowed = matching(Action::Allow);
    // Deny wins; the default is deny; an invalid name is never allowed.
    assert_eq!(
        decision.is_allowed(),
        valid && allowed && !denied,
        "{name:?}: {decision:?}"
    );
    match &decision {
        Decision::Allowed { by } => {
            assert!(by.action == Action::Allow && by.matches(name));
        }
        Decision::Denied(denial) => {
            match &denial.reason {
                DenyReason::InvalidName(_) => assert!(!valid),
                DenyReason::DeniedBy(rule) => {
                    assert!(valid && rule.action == Action::Deny && rule.matches(name))
                }
                DenyReason::NotAllowed => assert!(valid && !allowed && !denied),
            }
            assert_one_line("denial", &denial.message("bridge"), input_len + name.len());
        }
    }
    decision
}

fuzz_target!(|data: &[u8]| {
    let mem = files(data);
    let acl = match acl::load(&mem, Path::new(TOP)) {
        Ok(acl) => acl,
        Err(e) => return assert_one_line("load error", &e.to_string(), data.len()),
    };
    // Each rule comes from one line of some file; each file is read at
    // most MAX_INCLUDED_FILES times.
    let lines = data.iter().filter(|&&b| b == b'\n' || b == 0).count() + 1;
    assert_bounded("rules", acl.rules().len(), lines * (MAX_INCLUDED_FILES + 1));
    assert!(acl.skipped_includes().len() <= MAX_INCLUDED_FILES);
    for skipped in acl.skipped_includes() {
        assert_one_line("skipped include", &skipped.to_string(), data.len());
    }

    // Print, parse again: the same rules, hence the same decisions.
    let printed: String = acl.rules().iter().map(|r| format!("{r}\n")).collect();
    let again = acl::load(
        &Mem(BTreeMap::from([(
            PathBuf::from(TOP),
            printed.clone().into_bytes(),
        )])),
        Path::new(TOP),
    )
    .unwrap_or_else(|e| panic!("printed rules do not parse: {e}\n{printed}"));
    let shape = |a: &Acl| -> Vec<(Action, acl::Target)> {
        a.rules()
            .iter()
            .map(|r| (r.action, r.target.clone()))
            .collect()
    };
    assert_eq!(shape(&acl), shape(&again), "{printed}");

    for name in names(data, &acl) {
        let first = check_decision(&acl, &name, data.len());
        let second = check_decision(&again, &name, printed.len());
        assert_eq!(first.is_allowed(), second.is_allowed(), "{name:?}");
    }
});
