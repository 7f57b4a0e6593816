//! Differential fuzzing of the header-field reader (`smtp::headers`) against mail-parser 0.11,
//! the reference RFC 5322 reader: a field that one part of the relay sees must not be
//! invisible to another, or to the mail server behind it.
//!
//! Input: arbitrary octets, made into what the DATA phase can deliver (it refuses a bare CR or
//! bare LF): every CR is dropped and every LF becomes CRLF.
//!
//! Compared: the sequence of field names, ASCII case folded and with white space inside them
//! removed (mail-parser spells the names it knows its own way, and recognises them with white
//! space inside: `Fr om` is From; other names keep it), as `headers::field_names` reports them
//! and as mail-parser's `parse_headers(..).headers()` names them. The reader's list must start with mail-parser's,
//! and may be longer in one documented case only: mail-parser ends the header section at a
//! line of only white space that does not continue a field, where the reader reads on (it
//! filters more, never less). Where mail-parser's date parser swallows a line (a bug: see
//! below), names are compared up to that field only. Also checked: filtering the section in random chunks emits
//! the same octets as in one piece, and the reader never holds more than `MAX_BUFFERED`.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use portcullis::policy::senders::{Senders, check_from_header};
use portcullis::smtp::headers::{self, HeaderFilter, NamePattern, StripRules};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let seed = data[0];
    let mut section = Vec::with_capacity(data.len() * 2);
    for &b in &data[1..] {
        match b {
            b'\r' => {}
            b'\n' => section.extend_from_slice(b"\r\n"),
            b => section.push(b),
        }
    }

    // Chunking never changes the output.
    let rules = Arc::new(StripRules {
        names: vec![
            NamePattern::new("X-MS-Exchange-Organization-*"),
            NamePattern::new("Subject"),
        ],
        auth_results_for: Some("relay.example.com".into()),
    });
    let whole = filter(&section, rules.clone(), section.len().max(1));
    let step = usize::from(seed % 16) + 1;
    assert_eq!(filter(&section, rules, step), whole, "chunked at {step}");

    // The From: check of authenticated mail reads any section without panicking.
    let alice = Senders::new("alice", &["alice@example.com".to_string()]);
    let _ = check_from_header(&alice, &section);

    let ours: Vec<String> = headers::field_names(&section)
        .iter()
        .map(|n| compact(&String::from_utf8_lossy(n)))
        .collect();
    // The reader removes lines that continue no field (folded lines before the first field,
    // and a line without colon with its continuation lines, whose name readers disagree
    // on): mail-parser reads the section without them.
    let kept = without_removed_lines(&section);
    let section = kept;
    let parsed = mail_parser::MessageParser::new().parse_headers(&section);
    let fields = parsed.as_ref().map(|m| m.headers()).unwrap_or_default();
    let theirs: Vec<String> = fields.iter().map(|h| compact(h.name.as_str())).collect();
    // mail-parser's date parser (Date:, Resent-Date:, the date of Received:) reads two octets
    // after a time-zone letter without looking for a line end, so it can swallow the next
    // line or the empty line ending the section: a field spanning a line start that is not
    // folding. RFC 5322 ends the field there, as the reader does; compare up to that field.
    let swallowing = fields.iter().position(|h| {
        let span = &section[h.offset_field as usize..h.offset_end as usize];
        span.windows(2)
            .any(|w| w[0] == b'\n' && !matches!(w[1], b' ' | b'\t'))
    });
    let show = || {
        format!(
            "\nreader:      {ours:?}\nmail-parser: {theirs:?}\ninput: {:?}",
            String::from_utf8_lossy(&section)
        )
    };
    if let Some(i) = swallowing {
        assert!(ours.starts_with(&theirs[..=i]), "names differ:{}", show());
        return;
    }
    assert!(ours.starts_with(&theirs), "names differ:{}", show());
    if ours.len() > theirs.len() {
        let blank_with_space = section
            .split(|&b| b == b'\n')
            .any(|l| l != b"\r" && !l.is_empty() && l.iter().all(|b| b.is_ascii_whitespace()));
        assert!(
            blank_with_space,
            "reader sees more fields without a white-space line:{}",
            show()
        );
    }
});

/// The section without the lines the reader removes whatever their names: folded lines
/// before the first field, and a line without colon followed by folded lines (with them).
fn without_removed_lines(section: &[u8]) -> Vec<u8> {
    #[derive(PartialEq)]
    enum Last {
        Start,
        Field,
        NoColon(usize),
        Removed,
    }
    let mut out = Vec::with_capacity(section.len());
    let mut last = Last::Start;
    let mut rest = section;
    while !rest.is_empty() {
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |p| p + 1);
        let (line, after) = rest.split_at(len);
        if line == b"\r\n" || line == b"\n" {
            out.extend_from_slice(rest);
            break;
        }
        if matches!(line[0], b' ' | b'\t') {
            match last {
                Last::Start | Last::Removed => last = Last::Removed,
                Last::NoColon(at) => {
                    out.truncate(at);
                    last = Last::Removed;
                }
                Last::Field => out.extend_from_slice(line),
            }
        } else {
            let name_at = line
                .iter()
                .position(|&b| !b.is_ascii_whitespace() && b != b':')
                .unwrap_or(line.len());
            last = if line[name_at..].contains(&b':') {
                Last::Field
            } else {
                Last::NoColon(out.len())
            };
            out.extend_from_slice(line);
        }
        rest = after;
    }
    out
}

/// Lower case, without ASCII white space.
fn compact(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_ascii_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn filter(section: &[u8], rules: Arc<StripRules>, step: usize) -> Vec<u8> {
    let mut f = HeaderFilter::new(rules);
    let mut out = Vec::new();
    for chunk in section.chunks(step) {
        if !f.push(chunk, &mut out) {
            out.extend_from_slice(chunk);
        }
        assert!(f.buffered() <= headers::MAX_BUFFERED);
    }
    f.finish(&mut out);
    out
}
