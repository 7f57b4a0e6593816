//! The upstream reply parser (`smtp::upstream_reply`) on hostile input.
//!
//! Input: any octets, as an upstream would send them, read line by line (LF, optional CR)
//! through `ReplyReader` the way the client reads the wire. For every reply it completes:
//! - the code is 200–599, there are 1 to `MAX_REPLY_LINES` lines, no line is longer than
//!   `MAX_REPLY_LINE` characters and none holds a control character but tab (nothing from
//!   the peer reaches a log or a DSN unescaped);
//! - its text form (`Display`, the log, `last_error` and the DSN's Diagnostic-Code) has no CR
//!   or LF;
//! - the enhanced status code, when found, starts the first line and is `class.subject.detail`
//!   with class 2, 4 or 5 and one to three digits each (RFC 3463); `status()` always is, but
//!   for a 3xx;
//! - written back in wire form, it parses (`UpstreamReply::parse`) to the same reply.
//!
//! After an error the reader is dropped (as the client drops the connection) and a new one
//! reads the rest.

#![no_main]

mod common;

use common::wire;
use libfuzzer_sys::fuzz_target;
use portcullis::smtp::upstream_reply::{MAX_REPLY_LINE, MAX_REPLY_LINES, ReplyReader, UpstreamReply};

fn is_status(code: &str) -> bool {
    let parts: Vec<&str> = code.split('.').collect();
    let number = |p: &str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    matches!(parts[..], [class, subject, detail]
        if matches!(class, "2" | "4" | "5") && number(subject) && number(detail))
}

fn check(reply: &UpstreamReply) {
    assert!((200..600).contains(&reply.code), "{reply:?}");
    assert!((1..=MAX_REPLY_LINES).contains(&reply.lines.len()), "{reply:?}");
    for line in &reply.lines {
        assert!(line.chars().count() <= MAX_REPLY_LINE, "{reply:?}");
        assert!(!line.chars().any(|c| c.is_control() && c != '\t'), "{reply:?}");
    }
    let text = reply.to_string();
    assert!(!text.contains(['\r', '\n']), "{text:?}");
    assert!(text.starts_with(&reply.code.to_string()), "{text:?}");
    if let Some(enhanced) = reply.enhanced() {
        assert!(reply.lines[0].starts_with(enhanced), "{reply:?}");
        assert!(is_status(enhanced), "{enhanced:?}");
    }
    // RFC 3463 has no class 3: a 3xx gives `3.0.0`, which the DSN builder reports as
    // `5.0.0`.
    if !reply.is_intermediate() {
        assert!(is_status(&reply.status()), "{reply:?}");
    }
    // Classifications never panic and agree with the code.
    if reply.is_back_pressure() || reply.is_too_many_recipients() {
        assert!(matches!(reply.code, 421 | 452 | 552), "{reply:?}");
    }
    assert_eq!(UpstreamReply::parse(&wire(reply)).as_ref(), Ok(reply));
}

fuzz_target!(|data: &[u8]| {
    let mut reader = ReplyReader::default();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match reader.push_line(line) {
            Ok(Some(reply)) => check(&reply),
            Ok(None) => {}
            Err(_) => reader = ReplyReader::default(),
        }
    }
    if let Ok(reply) = UpstreamReply::parse(data) {
        check(&reply);
    }
});
