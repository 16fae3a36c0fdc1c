//! Requests on the daemon's control socket (any member of group `qnet`
//! may send them), decoded exactly as the daemon decodes them.
//!
//! Properties: decoding never panics; a refused request gets one line
//! back, bounded; an accepted request encodes (as qnetctl and the libvirt
//! hook send it) and decodes again to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qnet_api::Request;
use qnet_fuzz::assert_one_line;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let request = match Request::from_line(line) {
        Ok(request) => request,
        Err(e) => return assert_one_line("request error", &e.to_string(), data.len()),
    };
    let encoded = serde_json::to_string(&request).expect("requests always encode");
    assert!(!encoded.contains('\n'));
    let again = Request::from_line(&encoded)
        .unwrap_or_else(|e| panic!("{encoded} does not decode again: {e}"));
    assert_eq!(request, again, "{encoded}");
});
