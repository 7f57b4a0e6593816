//! The SASL response readers (`smtp::sasl`, RFC 4954 §4, RFC 4616) on hostile input.
//!
//! Input: any octets as one response line. `decode_response` must not panic; `*` cancels and
//! `=` is empty. Whatever it decodes, `parse_plain` must not panic, and what it accepts is
//! exactly `authzid NUL authcid NUL passwd` with UTF-8 parts, a non-empty login and password,
//! and an authorization identity that is empty or the login: built again from the login and
//! password, it parses to the same credentials. `parse_login_field` accepts exactly non-empty
//! UTF-8 without NUL, unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::smtp::sasl::{SaslError, decode_response, parse_login_field, parse_plain};

fuzz_target!(|data: &[u8]| {
    match decode_response(data) {
        Err(SaslError::Cancelled) => assert_eq!(data, b"*"),
        Err(_) => {}
        Ok(decoded) => {
            if data == b"=" {
                assert!(decoded.is_empty());
            }
            check_plain(&decoded);
            check_login_field(&decoded);
        }
    }
    // The decoded forms are also tried on the raw octets, as a client may send anything.
    check_plain(data);
    check_login_field(data);
});

fn check_plain(decoded: &[u8]) {
    let Ok(credentials) = parse_plain(decoded) else {
        return;
    };
    let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
    assert_eq!(parts.len(), 3);
    assert!(parts[0].is_empty() || parts[0] == parts[1]);
    assert_eq!(credentials.login.as_bytes(), parts[1]);
    assert_eq!(credentials.password.as_bytes(), parts[2]);
    assert!(!credentials.login.is_empty() && !credentials.password.is_empty());
    let rebuilt = format!("\0{}\0{}", credentials.login, credentials.password);
    assert_eq!(parse_plain(rebuilt.as_bytes()), Ok(credentials));
}

fn check_login_field(decoded: &[u8]) {
    let expected = std::str::from_utf8(decoded)
        .ok()
        .filter(|s| !s.is_empty() && !s.contains('\0'));
    match parse_login_field(decoded.to_vec()) {
        Ok(text) => assert_eq!(Some(text.as_str()), expected),
        Err(_) => assert_eq!(expected, None),
    }
}
