//! QMP as a (possibly hostile) QEMU speaks it: the greeting, then one JSON
//! message per line, read exactly as a session reads them; plus the HMP
//! `info network` text the daemon parses for NIC names.
//!
//! Properties: reading never panics and never holds more than the line
//! limit; every error a session would end with or a command would fail
//! with is one line and bounded; previews are bounded; `info network`
//! yields each NIC once, with a name and no more NICs than lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qnet_fuzz::{assert_bounded, assert_one_line};
use qnet_hookd::qmp::fuzzing::{self, Read};

/// Small, so that the fuzzer also reaches the too-long-line path.
const MAX_LINE: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // 80 bytes at most, each escaped to at most 10 characters.
    let preview = fuzzing::preview_bytes(data);
    assert!(preview.chars().count() <= 80 * 10 + 5, "{preview}");
    match fuzzing::read_stream(data, MAX_LINE) {
        Err(e) => assert_one_line("session error", &e.to_string(), data.len()),
        Ok((greeting, messages)) => {
            let _ = format!("{greeting:?}");
            assert_bounded("capabilities", greeting.capabilities.len(), data.len());
            assert_bounded("messages", messages.len(), data.len());
            for message in &messages {
                if let Read::Reply(_, Err(e)) = message {
                    assert_one_line("command error", &e.to_string(), data.len());
                }
            }
        }
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        // 80 characters, each escaped to at most 10, and `...`.
        let preview = fuzzing::preview_value(&value);
        assert!(preview.chars().count() <= 80 * 10 + 3, "{preview}");
        assert!(!preview.chars().any(char::is_control), "{preview}");
    }
    let text = String::from_utf8_lossy(data);
    let nics = fuzzing::parse_info_network(&text);
    assert_bounded("nics", nics.len(), text.lines().count());
    for (i, nic) in nics.iter().enumerate() {
        assert!(!nic.name.is_empty() && !nic.name.contains(char::is_whitespace));
        assert!(nics[i + 1..].iter().all(|n| n.name != nic.name));
    }
    let _ = fuzzing::is_nil_uuid(&text);
});
