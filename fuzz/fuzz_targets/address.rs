//! Round trip of the canonical address form.
//!
//! Input: any octets, read as the text of a path (what stands between `<` and `>`). For every
//! address [`Address::parse`] accepts, its canonical text (`Display`) must:
//! - parse back to the same address, also through the spool reader `Address::from_stored`;
//! - contain no CR or LF, and no `>`, `<`, space or `"` outside the quotes of the local part,
//!   so written into `RCPT TO:<…>` it can neither end the path early nor add a parameter;
//! - be read by an independent SMTP parser (smtp-proto) as the same local part and domain
//!   when written into a RCPT command, as the next hop would read it (except address
//!   literals, which smtp-proto refuses);
//! - be at most `MAX_ADDRESS_LEN` octets.
//!
//! Mailbox matching must agree with its lookup form: `a.matches(b)` exactly when
//! `a.for_matching() == b.for_matching()` (checked against the input read as two halves).

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::envelope::{Address, MAX_ADDRESS_LEN};
use smtp_proto::Request;

/// The text after the quoted local part (or the whole text when the local part is a
/// dot-string); panics on unterminated quotes.
fn outside_quotes(text: &str) -> &str {
    let Some(q) = text.strip_prefix('"') else {
        return text;
    };
    let mut chars = q.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '"' => return &q[i + 1..],
            _ => {}
        }
    }
    panic!("unterminated quotes in {text:?}");
}

fn check(a: &Address) {
    let text = a.to_string();
    assert!(text.len() <= MAX_ADDRESS_LEN, "{text:?}");
    assert!(!text.contains(['\r', '\n']), "{text:?}");
    assert!(
        !outside_quotes(&text).contains(['>', '<', ' ', '"']),
        "{text:?}"
    );
    assert_eq!(Address::parse(&text).as_ref(), Ok(a), "{text:?}");
    assert_eq!(Address::from_stored(&text).as_ref(), Ok(a), "{text:?}");

    // smtp-proto refuses address literals (`[` is not atext to it), so they never come in
    // through a session; the rest of the checks cover them.
    if a.is_ip_literal() {
        return;
    }
    let line = format!("RCPT TO:<{text}>\r\n");
    match Request::parse(&mut line.as_bytes().iter()) {
        Ok(Request::Rcpt { to }) => {
            assert_eq!(
                to.address,
                format!("{}@{}", a.local(), a.domain()),
                "{line:?}"
            );
            assert!(to.flags == 0 && to.orcpt.is_none(), "parameter injected: {line:?}");
        }
        other => panic!("{line:?} read as {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = Address::parse(text);
    if let Ok(a) = &parsed {
        check(a);
    }
    // The spool reader accepts a superset (the older unquoted form); whatever it reads must
    // also have a canonical text that round-trips, unless it is over the length limit.
    if let Ok(a) = Address::from_stored(text) {
        if a.to_string().len() <= MAX_ADDRESS_LEN {
            check(&a);
        }
        if let Ok(p) = &parsed {
            assert_eq!(p, &a, "spool reader and parser disagree on {text:?}");
        }
    }
    if let Some((x, y)) = text.split_once('\u{1}') {
        if let (Ok(a), Ok(b)) = (Address::parse(x), Address::parse(y)) {
            assert_eq!(a.matches(&b), a.for_matching() == b.for_matching());
            assert_eq!(a.matches(&b), b.matches(&a));
        }
    }
});
