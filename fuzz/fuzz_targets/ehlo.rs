//! The EHLO reply reader (`outbound::client::Extensions`) on hostile input, and against
//! smtp-proto's EHLO parser.
//!
//! Input: any octets, parsed as one upstream reply (`UpstreamReply::parse`). For every
//! positive reply, `Extensions::parse` must not panic and must find exactly the keywords a
//! line (after the first) starts with, case-insensitively: PIPELINING, STARTTLS, 8BITMIME,
//! SMTPUTF8, SIZE (its limit the first parameter when it is a number, else 0: "no fixed
//! limit"), and AUTH with PLAIN or LOGIN among its parameters (RFC 5321 §4.1.1.1, RFC 1870,
//! RFC 4954).
//!
//! Where the reply is a plain EHLO reply (code 250, lines of printable ASCII with single
//! spaces, keywords of letters, digits and `-`, SIZE limits of at most 18 digits),
//! smtp-proto's `EhloResponse::parse` must agree on each of these extensions.

#![no_main]

mod common;

use common::wire;
use libfuzzer_sys::fuzz_target;
use portcullis::outbound::client::Extensions;
use portcullis::smtp::upstream_reply::UpstreamReply;
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8,
    EXT_START_TLS, EhloResponse,
};

/// The extensions by a reading independent of `Extensions::parse`'s: each line's keyword
/// compared as a whole.
fn reference(reply: &UpstreamReply) -> Extensions {
    let mut ext = Extensions::default();
    for line in reply.lines.iter().skip(1) {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let Some((keyword, params)) = words.split_first() else {
            continue;
        };
        let is = |name: &str| keyword.eq_ignore_ascii_case(name);
        ext.pipelining |= is("PIPELINING");
        ext.starttls |= is("STARTTLS");
        ext.eightbitmime |= is("8BITMIME");
        ext.smtputf8 |= is("SMTPUTF8");
        if is("SIZE") {
            ext.size = Some(params.first().and_then(|n| n.parse().ok()).unwrap_or(0));
        }
        if is("AUTH") {
            ext.auth_plain |= params.iter().any(|m| m.eq_ignore_ascii_case("PLAIN"));
            ext.auth_login |= params.iter().any(|m| m.eq_ignore_ascii_case("LOGIN"));
        }
    }
    ext
}

/// A reply smtp-proto is meant to read the same way.
fn is_plain(reply: &UpstreamReply) -> bool {
    let plain_line = |l: &String| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            && !l.starts_with(' ')
            && !l.ends_with(' ')
            && !l.contains("  ")
    };
    let plain_ext = |l: &String| {
        let mut words = l.split(' ');
        let keyword = words.next().unwrap_or("");
        let size_ok = !keyword.eq_ignore_ascii_case("SIZE")
            || words.next().is_none_or(|n| n.len() <= 18 && n.bytes().all(|b| b.is_ascii_digit()));
        keyword.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && size_ok
    };
    reply.code == 250
        && reply.lines.iter().all(plain_line)
        && reply.lines.iter().skip(1).all(plain_ext)
}

fn compare_with_smtp_proto(reply: &UpstreamReply, ext: &Extensions) {
    let bytes = wire(reply);
    let Ok(theirs) = EhloResponse::<String>::parse(&mut bytes.iter()) else {
        return;
    };
    let has = |flag: u32| theirs.capabilities & flag != 0;
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(ext.pipelining, has(EXT_PIPELINING), "{text}");
    assert_eq!(ext.starttls, has(EXT_START_TLS), "{text}");
    assert_eq!(ext.eightbitmime, has(EXT_8BIT_MIME), "{text}");
    assert_eq!(ext.smtputf8, has(EXT_SMTP_UTF8), "{text}");
    assert_eq!(ext.size.is_some(), has(EXT_SIZE), "{text}");
    if let Some(size) = ext.size {
        assert_eq!(size, theirs.size as u64, "{text}");
    }
    assert_eq!(ext.auth_plain, theirs.auth_mechanisms & AUTH_PLAIN != 0, "{text}");
    assert_eq!(ext.auth_login, theirs.auth_mechanisms & AUTH_LOGIN != 0, "{text}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(reply) = UpstreamReply::parse(data) else {
        return;
    };
    if !reply.is_positive() {
        return;
    }
    let ext = Extensions::parse(&reply);
    assert_eq!(ext, reference(&reply), "{reply:?}");
    if is_plain(&reply) {
        compare_with_smtp_proto(&reply, &ext);
    }
});
