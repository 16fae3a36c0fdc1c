//! Shared checks of the fuzz targets: the properties every parser that
//! sees untrusted input must keep, whatever it is given.

/// A message shown to a user (an error, a denial) is ONE line: no line
/// breaks nor other control characters (a hostile input must not be able
/// to forge log lines or terminal escapes), not empty, and bounded by the
/// input that caused it (a peer cannot make us answer with more than a
/// small multiple of what it sent).
pub fn assert_one_line(what: &str, message: &str, input_len: usize) {
    assert!(!message.trim().is_empty(), "{what}: empty message");
    assert!(
        !message.chars().any(char::is_control),
        "{what}: message is not one clean line: {message:?}"
    );
    let bound = 4096 + 12 * input_len;
    assert!(
        message.len() <= bound,
        "{what}: message of {} bytes for {input_len} bytes of input",
        message.len()
    );
}

/// What a parser keeps is bounded by what it was given.
pub fn assert_bounded(what: &str, items: usize, input_len: usize) {
    assert!(
        items <= input_len + 1,
        "{what}: {items} items from {input_len} bytes of input"
    );
}
