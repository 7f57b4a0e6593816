use super::*;

fn run(msg: &[u8], rules: StripRules, step: usize) -> (Vec<u8>, HeaderFilter) {
    let mut f = HeaderFilter::new(Arc::new(rules));
    let mut out = Vec::new();
    for chunk in msg.chunks(step) {
        if !f.push(chunk, &mut out) {
            out.extend_from_slice(chunk);
        }
    }
    f.finish(&mut out);
    (out, f)
}

fn exchange_rules() -> StripRules {
    StripRules {
        names: vec![
            NamePattern::new("X-MS-Exchange-Organization-*"),
            NamePattern::new("X-MS-Exchange-Forest-*"),
        ],
        auth_results_for: Some("relay.example.com".into()),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const STEPS: [usize; 6] = [1, 2, 3, 7, 17, 4096];

#[test]
fn counts_received_and_strips_across_chunk_boundaries() {
    let msg = b"Received: from a\r\n\tby b\r\nReceived: x\r\nX-MS-Exchange-Organization-SCL: -1\r\n\
X-Ms-Exchange-Forest-Foo: y\r\n  folded\r\nAuthentication-Results: relay.example.com; spf=pass\r\n\
Authentication-Results: other.example; spf=fail\r\nSubject: hi\r\n\r\nbody\r\nX-MS-Exchange-Organization-SCL: 9\r\n";
    for step in STEPS {
        let (out, f) = run(msg, exchange_rules(), step);
        assert_eq!(f.received_count(), 2, "step {step}");
        assert_eq!(
            out,
            b"Received: from a\r\n\tby b\r\nReceived: x\r\n\
Authentication-Results: other.example; spf=fail\r\nSubject: hi\r\n\r\nbody\r\nX-MS-Exchange-Organization-SCL: 9\r\n",
            "step {step}"
        );
        assert_eq!(f.stripped().len(), 3);
        assert_eq!(f.stripped_count(), 3);
    }
}

#[test]
fn whitespace_before_the_colon_is_not_part_of_the_name() {
    let msg = b"X-MS-Exchange-Organization-SCL : -1\r\nX-MS-Exchange-Organization-AuthAs\t:\tInternal\r\n\
Received : x\r\nSubject: kept\r\n\r\n";
    for step in STEPS {
        let (out, f) = run(msg, exchange_rules(), step);
        assert_eq!(out, b"Received : x\r\nSubject: kept\r\n\r\n", "step {step}");
        assert_eq!(f.received_count(), 1);
        assert_eq!(
            f.stripped(),
            [
                "X-MS-Exchange-Organization-SCL",
                "X-MS-Exchange-Organization-AuthAs"
            ]
        );
    }
}

#[test]
fn whitespace_inside_a_name_does_not_hide_it() {
    let msg = b"X-MS-Exchange- Organization-SCL: -1\r\nRe ceived: x\r\nFr\tom : a@b\r\nSubject: kept\r\n\r\n";
    for step in STEPS {
        let mut f = HeaderFilter::with_inspector(Arc::new(exchange_rules()), Seen::default());
        let mut out = Vec::new();
        for chunk in msg.chunks(step) {
            assert!(f.push(chunk, &mut out));
        }
        f.finish(&mut out);
        assert_eq!(
            out,
            b"Re ceived: x\r\nFr\tom : a@b\r\nSubject: kept\r\n\r\n"
        );
        assert_eq!(f.received_count(), 1);
        assert_eq!(
            f.into_inspector().0,
            [(WholeField::From, b"Fr\tom : a@b\r\n".to_vec())]
        );
    }
}

#[test]
fn leading_whitespace_and_colons_do_not_hide_a_name() {
    // A line starting with white space that continues no field, and colons before the name,
    // are read as mail-parser reads them: the name is what follows.
    let msg =
        b" X-MS-Exchange-Organization-SCL: -1\r\nno colon here\r\n\t:X-MS-Exchange-Forest-A: 1\r\n\
Subject: kept\r\n\r\n";
    for step in STEPS {
        let (out, _) = run(msg, exchange_rules(), step);
        assert_eq!(out, b"Subject: kept\r\n\r\n", "step {step}");
    }
}

#[test]
fn a_field_ends_at_its_line_end_whatever_its_value() {
    // mail-parser's date parser reads past the line end after a zone letter; the field still
    // ends there (RFC 5322 §2.2), so the next field is filtered.
    let msg = b"Date: -k\r\nX-MS-Exchange-Organization-SCL: -1\r\nSubject: s\r\n\r\n";
    let (out, f) = run(msg, exchange_rules(), 3);
    assert_eq!(out, b"Date: -k\r\nSubject: s\r\n\r\n");
    assert_eq!(f.stripped_count(), 1);
}

#[test]
fn field_names_as_mail_parser_reads_them() {
    let names = |s: &str| -> Vec<String> {
        field_names(s.as_bytes())
            .into_iter()
            .map(|n| String::from_utf8(n).unwrap())
            .collect()
    };
    assert_eq!(
        names("From : a\r\nmal formed: x\r\n x: continued\r\n: :Subject: y\r\nlast"),
        ["From", "mal formed", "Subject", "last"]
    );
    assert_eq!(names("A: 1\r\n\r\nB: 2\r\n"), ["A"]);
    assert!(names("").is_empty());
}

#[test]
fn a_huge_header_section_is_filtered_to_its_end() {
    // The 1 MiB section that used to turn the firewall off: thousands of long fields with
    // the Exchange field first and last.
    let pad = format!("X-Pad: {}\r\n", "p".repeat(110));
    let mut msg = b"X-MS-Exchange-Organization-SCL: -1\r\n".to_vec();
    for _ in 0..9_500 {
        msg.extend_from_slice(pad.as_bytes());
    }
    msg.extend_from_slice(b"X-MS-Exchange-Organization-SCL: -1\r\n\r\nbody\r\n");
    for step in [4096, 8192, 65_536] {
        let (out, f) = run(&msg, exchange_rules(), step);
        assert!(!contains(&out, b"SCL"), "step {step}");
        assert_eq!(f.stripped_count(), 2);
        assert_eq!(out.len(), msg.len() - 2 * 36);
    }
}

#[test]
fn long_lines_of_ordinary_fields_pass_without_being_held() {
    let mut msg = b"X-Long: ".to_vec();
    msg.extend(std::iter::repeat_n(b'a', 300_000));
    msg.extend_from_slice(b"\r\nSubject: x\r\n\r\n");
    let mut f = HeaderFilter::new(Arc::new(exchange_rules()));
    let mut out = Vec::new();
    for chunk in msg.chunks(8192) {
        assert!(f.push(chunk, &mut out));
        assert!(f.buffered() <= 16, "held {}", f.buffered());
    }
    f.finish(&mut out);
    assert_eq!(out, msg);
    assert!(f.too_large().is_none());
}

#[test]
fn a_line_without_crlf_never_grows_the_buffer_past_the_bound() {
    // A name that never ends, a held field that never ends, a stripped field that never ends.
    for prefix in [&b""[..], b"From: ", b"X-MS-Exchange-Organization-SCL: "] {
        let mut f = HeaderFilter::new(Arc::new(exchange_rules()));
        let mut out = Vec::new();
        f.push(prefix, &mut out);
        let chunk = [b'x'; 8192];
        for _ in 0..256 {
            out.clear();
            f.push(&chunk, &mut out);
            assert!(f.buffered() <= MAX_BUFFERED);
            assert!(f.buf.capacity() <= MAX_BUFFERED, "{}", f.buf.capacity());
        }
        f.finish(&mut out);
        let expect_refused = !prefix.starts_with(b"X-MS");
        assert_eq!(f.too_large().is_some(), expect_refused, "{prefix:?}");
    }
}

#[test]
fn a_held_field_over_64_kib_is_refused_and_nothing_more_is_emitted() {
    let mut msg = b"Subject: a\r\nFrom: ".to_vec();
    msg.extend(std::iter::repeat_n(b'a', 70 * 1024));
    msg.extend_from_slice(b"@example.com\r\n\r\nbody\r\n");
    let (out, f) = run(&msg, StripRules::default(), 1000);
    assert_eq!(f.too_large(), Some("From"));
    assert_eq!(out, b"Subject: a\r\n");
    // Just under the bound is fine.
    let mut ok = b"From: ".to_vec();
    ok.extend(std::iter::repeat_n(b'a', MAX_WHOLE_FIELD - 20));
    ok.extend_from_slice(b"\r\n\r\n");
    let (out, f) = run(&ok, StripRules::default(), 1000);
    assert!(f.too_large().is_none());
    assert_eq!(out, ok);
}

#[test]
fn no_rules_is_identity() {
    let msg = b"A: 1\r\nB: 2\r\n folded\r\nno colon\r\nFrom: x@y\r\n\r\nbody\r\n";
    for step in STEPS {
        let (out, f) = run(msg, StripRules::default(), step);
        assert_eq!(out, msg);
        assert_eq!(f.received_count(), 0);
    }
}

#[test]
fn message_without_body_and_without_headers() {
    let (out, f) = run(b"Received: x\r\nSubject: y\r\n", StripRules::default(), 4);
    assert_eq!(out, b"Received: x\r\nSubject: y\r\n");
    assert_eq!(f.received_count(), 1);
    let (out, _) = run(b"\r\njust body\r\n", exchange_rules(), 2);
    assert_eq!(out, b"\r\njust body\r\n");
    let (out, _) = run(b"", exchange_rules(), 2);
    assert!(out.is_empty());
    // A last field with no line end and a name without colon at the very end.
    let (out, _) = run(
        b"A: 1\r\nX-MS-Exchange-Organization-SCL",
        exchange_rules(),
        3,
    );
    assert_eq!(out, b"A: 1\r\n");
    let (out, _) = run(b"A: 1\r\nB", exchange_rules(), 3);
    assert_eq!(out, b"A: 1\r\nB");
}

#[derive(Default, Debug)]
struct Seen(Vec<(WholeField, Vec<u8>)>);

impl FieldInspector for Seen {
    fn field(&mut self, kind: WholeField, field: &[u8], _: &[u8]) {
        self.0.push((kind, field.to_vec()));
    }
}

#[test]
fn every_from_and_sender_field_reaches_the_inspector_whole() {
    let mut msg = b"From: a@example.com\r\n".to_vec();
    for _ in 0..1000 {
        msg.extend_from_slice(format!("X-Pad: {}\r\n", "p".repeat(100)).as_bytes());
    }
    msg.extend_from_slice(
        b"from :\r\n ceo@example.com\r\nSender: s@example.com\r\n\r\nFrom: body@x\r\n",
    );
    for step in [1, 9, 4096] {
        let mut f = HeaderFilter::with_inspector(Arc::new(StripRules::default()), Seen::default());
        let mut out = Vec::new();
        for chunk in msg.chunks(step) {
            if !f.push(chunk, &mut out) {
                out.extend_from_slice(chunk);
            }
        }
        f.finish(&mut out);
        assert_eq!(out, msg);
        let seen = f.into_inspector().0;
        assert_eq!(
            seen,
            [
                (WholeField::From, b"From: a@example.com\r\n".to_vec()),
                (WholeField::From, b"from :\r\n ceo@example.com\r\n".to_vec()),
                (WholeField::Sender, b"Sender: s@example.com\r\n".to_vec()),
            ]
        );
    }
}

#[test]
fn authserv_id_by_the_rfc_8601_grammar() {
    let id = |v: &str| authserv_id(v.as_bytes()).map(|b| String::from_utf8(b).unwrap());
    assert_eq!(
        id(" relay.example.com; spf=pass").as_deref(),
        Some("relay.example.com")
    );
    assert_eq!(
        id(" (x) relay.example.com; dmarc=pass").as_deref(),
        Some("relay.example.com")
    );
    assert_eq!(
        id(" (a (nested \\) ) comment)\r\n\trelay.example.com 1; none").as_deref(),
        Some("relay.example.com")
    );
    assert_eq!(
        id(" \"relay.example.com\"; spf=pass").as_deref(),
        Some("relay.example.com")
    );
    assert_eq!(
        id(" \"relay\\.example.com\" ; spf=pass").as_deref(),
        Some("relay.example.com")
    );
    assert_eq!(
        id(" relay.example.com(x); spf=pass").as_deref(),
        Some("relay.example.com")
    );
    assert_eq!(
        id(" RELAY.Example.COM.; spf=pass").as_deref(),
        Some("RELAY.Example.COM.")
    );
    assert_eq!(id(" (never ends relay.example.com; spf=pass"), None);
    assert_eq!(id(" ; spf=pass"), None);
    assert_eq!(id(" \"unterminated"), None);
    assert!(same_domain(b"RELAY.Example.COM.", "relay.example.com"));
    assert!(!same_domain(b"relay.example.com.evil", "relay.example.com"));
}

#[test]
fn authentication_results_in_our_name_are_removed_in_every_form() {
    let ours = [
        "Authentication-Results: relay.example.com; dmarc=pass\r\n",
        "Authentication-Results: (x) relay.example.com; dmarc=pass\r\n",
        "Authentication-Results: \"Relay.Example.Com.\"; dmarc=pass\r\n",
        "Authentication-Results : relay.example.com;\r\n dmarc=pass\r\n",
        "authentication-results:\r\n (a (b)) RELAY.EXAMPLE.COM 1; spf=pass\r\n",
        "Authentication-Results: (unterminated relay.example.com; dmarc=pass\r\n",
        ": Authentication-Results: relay.example.com; dmarc=pass\r\n",
        "::Authentication-Results :relay.example.com; dmarc=pass\r\n",
    ];
    for field in ours {
        let msg = format!("Subject: s\r\n{field}\r\nbody");
        for step in STEPS {
            let (out, f) = run(msg.as_bytes(), exchange_rules(), step);
            assert_eq!(out, b"Subject: s\r\n\r\nbody", "{field:?} step {step}");
            assert_eq!(f.stripped().len(), 1);
            assert!(f.stripped()[0].eq_ignore_ascii_case("Authentication-Results"));
        }
    }
    let theirs = [
        "Authentication-Results: mx.other.example; dmarc=pass\r\n",
        "Authentication-Results: (relay.example.com) mx.other.example; dmarc=pass\r\n",
        "Authentication-Results: relay.example.com.evil.test; dmarc=pass\r\n",
    ];
    for field in theirs {
        let msg = format!("Subject: s\r\n{field}\r\nbody");
        let (out, _) = run(msg.as_bytes(), exchange_rules(), 5);
        assert_eq!(out, msg.as_bytes(), "{field:?}");
        // Trusted mail keeps even ours.
    }
    let msg = format!("{}\r\n", ours[0]);
    let (out, _) = run(msg.as_bytes(), StripRules::default(), 5);
    assert_eq!(out, msg.as_bytes());
}

#[test]
fn stripped_names_kept_for_the_log_are_bounded() {
    let msg = "X-MS-Exchange-Organization-A: 1\r\n".repeat(1000);
    let (out, f) = run(msg.as_bytes(), exchange_rules(), 4096);
    assert!(out.is_empty());
    assert_eq!(f.stripped_count(), 1000);
    assert_eq!(f.stripped().len(), MAX_LOGGED_STRIPPED);
    let long = format!("X-MS-Exchange-Organization-{}: 1\r\n", "a".repeat(60_000));
    let (_, f) = run(long.as_bytes(), exchange_rules(), 4096);
    assert_eq!(f.stripped()[0].len(), 64);
}

#[test]
fn patterns() {
    assert!(
        NamePattern::new("X-MS-Exchange-Organization-*").matches("x-ms-exchange-organization-scl")
    );
    assert!(!NamePattern::new("X-MS-Exchange-Organization-*").matches("X-MS-Exchange-Org"));
    assert!(NamePattern::new("X-Spam").matches("x-spam"));
    assert!(!NamePattern::new("X-Spam").matches("x-spam-score"));
    assert!(!NamePattern::new("X-Spam").matches("x-spa"));
    // Non-ASCII names never panic on a char boundary.
    assert!(!NamePattern::new("X-MS-*").matches("X-Mxé"));
}

/// Property: however the octets are cut into chunks, the output is the same, and the filter
/// never holds more than its bound.
#[test]
fn output_does_not_depend_on_chunking() {
    // A small deterministic generator (xorshift) over an alphabet rich in the octets that
    // matter: colon, white space, CR, LF, and letters of the stripped names.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let atoms: [&[u8]; 10] = [
        b":",
        b" ",
        b"\t",
        b"\r\n",
        b"X-MS-Exchange-Organization-SCL",
        b"From",
        b"a@b",
        b"Authentication-Results",
        b"relay.example.com;",
        b"(c)",
    ];
    for _ in 0..500 {
        let mut msg = Vec::new();
        for _ in 0..(next() % 40) {
            msg.extend_from_slice(atoms[(next() % atoms.len() as u64) as usize]);
        }
        let (whole, f1) = run(&msg, exchange_rules(), msg.len().max(1));
        for step in [1, 2, 5] {
            let (out, f) = run(&msg, exchange_rules(), step);
            assert_eq!(
                out,
                whole,
                "{:?} step {step}",
                String::from_utf8_lossy(&msg)
            );
            assert_eq!(f.stripped(), f1.stripped());
            assert_eq!(f.received_count(), f1.received_count());
        }
    }
}

#[test]
fn folded_lines_before_the_first_field_are_removed() {
    let msg =
        b"\tfrom evil ([10.9.9.9]) by mx.partner.example; Mon, 30 Nov 2026 17:00:00 +0000\r\n \
continued: x\r\nSubject: kept\r\n\r\n\tbody\r\n";
    for step in STEPS {
        let (out, f) = run(msg, exchange_rules(), step);
        assert_eq!(out, b"Subject: kept\r\n\r\n\tbody\r\n", "step {step}");
        assert_eq!(f.stripped(), [String::from_utf8_lossy(LEADING_FOLDED)]);
    }
    // A folded line after a field continues it, as always.
    let (out, _) = run(b"Subject: a\r\n\tb\r\n\r\n", StripRules::default(), 1);
    assert_eq!(out, b"Subject: a\r\n\tb\r\n\r\n");
    // A section that starts with a space-only line is not a blank line either.
    let (out, _) = run(b" \r\nSubject: a\r\n\r\n", StripRules::default(), 1);
    assert_eq!(out, b"Subject: a\r\n\r\n");
}

#[test]
fn folding_before_the_colon_does_not_hide_the_field_name() {
    // A reader that unfolds first sees the first line's name, mail-parser the last line's
    // (`X-Pad\r\n :From: v` is From to it): such a field is removed, whatever its names.
    let msg = b"X-MS-Exchange-Organization-SCL\r\n : -1\r\n\
Authentication-Results\r\n : relay.example.com; dmarc=pass\r\n\
No-Colon-Line\r\nX-Pad\r\n\t:X-MS-Exchange-Forest-A: 1\r\n\
Subject\r\n\t: folded\r\n  again\r\nSubject: kept\r\n\r\n";
    for step in STEPS {
        let (out, f) = run(msg, exchange_rules(), step);
        assert_eq!(
            out, b"No-Colon-Line\r\nSubject: kept\r\n\r\n",
            "step {step}"
        );
        assert_eq!(
            f.stripped(),
            [
                "X-MS-Exchange-Organization-SCL",
                "Authentication-Results",
                "X-Pad",
                "Subject"
            ]
        );
    }
}

#[test]
fn authserv_id_variants_of_ours_are_stripped() {
    let rules = || StripRules {
        names: Vec::new(),
        auth_results_for: Some("relay.example.com".into()),
    };
    for field in [
        "Authentication-Results: relay.example.com\u{a0}; dmarc=pass\r\n",
        "Authentication-Results: \"relay.example.com \"; dmarc=pass\r\n",
        "Authentication-Results: relay\u{3002}example\u{3002}com; dmarc=pass\r\n",
        "Authentication-Results: relay.example\u{ff0e}com; dmarc=pass\r\n",
        "Authentication-Results: relay.exa\u{200b}mple.com; dmarc=pass\r\n",
        "Authentication-Results: RELAY.example.com.; dmarc=pass\r\n",
        "ARC-Authentication-Results: i=1; relay.example.com; dmarc=pass\r\n",
        "ARC-Authentication-Results: i = 2 (x) ; (y) \"Relay.Example.com\"; spf=pass\r\n",
        "ARC-Authentication-Results: relay.example.com; dmarc=pass\r\n",
    ] {
        let msg = format!("{field}Subject: x\r\n\r\n");
        for step in STEPS {
            let (out, f) = run(msg.as_bytes(), rules(), step);
            assert_eq!(out, b"Subject: x\r\n\r\n", "{field:?} step {step}");
            assert_eq!(f.stripped_count(), 1);
        }
    }
    for field in [
        "Authentication-Results: mx.partner.example; dmarc=pass\r\n",
        "ARC-Authentication-Results: i=1; mx.partner.example; dmarc=pass\r\n",
        "Authentication-Results: relay.example.com.evil.test; dmarc=pass\r\n",
    ] {
        let msg = format!("{field}Subject: x\r\n\r\n");
        let (out, _) = run(msg.as_bytes(), rules(), 7);
        assert_eq!(out, msg.as_bytes(), "{field:?}");
    }
}

/// `non_ascii` of a filter fed `parts` then finished.
fn non_ascii(parts: &[&[u8]]) -> bool {
    let mut f = HeaderFilter::new(Arc::new(StripRules::default()));
    let mut out = Vec::new();
    for p in parts {
        if !f.push(p, &mut out) {
            out.extend_from_slice(p);
        }
    }
    f.finish(&mut out);
    f.non_ascii()
}

#[test]
fn only_the_header_section_counts_as_non_ascii_across_any_chunking() {
    let msg = "Subject: caf\u{e9}\r\nTo: a@b\r\n\r\nbody\r\n".as_bytes();
    for cut in 0..msg.len() {
        assert!(non_ascii(&[&msg[..cut], &msg[cut..]]), "cut {cut}");
    }
    let body_only = "Subject: x\r\n\r\ncaf\u{e9}\r\n".as_bytes();
    for cut in 0..body_only.len() {
        assert!(
            !non_ascii(&[&body_only[..cut], &body_only[cut..]]),
            "cut {cut}"
        );
    }
    // No header section at all: the message starts with the empty line.
    assert!(!non_ascii(&["\r\nSubject: caf\u{e9}\r\n".as_bytes()]));
    // A folded field's continuation is still the header section.
    assert!(non_ascii(&["Subject: a\r\n \u{e9}\r\n\r\n".as_bytes()]));
    // A message that is all header section.
    assert!(non_ascii(&["X: \u{e9}".as_bytes()]));
    // A removed field does not count: it is not sent.
    let mut f = HeaderFilter::new(Arc::new(StripRules {
        names: vec![NamePattern::new("X-Strip")],
        ..StripRules::default()
    }));
    let mut out = Vec::new();
    f.push(
        "X-Strip: caf\u{e9}\r\nSubject: x\r\n\r\n".as_bytes(),
        &mut out,
    );
    f.finish(&mut out);
    assert!(!f.non_ascii());
}

/// The journal finds a message by its Message-ID: the first field's value is kept as
/// received, unfolded and trimmed, whatever the chunking.
#[test]
fn the_first_message_id_is_kept_unfolded_across_chunk_boundaries() {
    let msg = b"Subject: hi\r\nMessage-ID:\r\n <abc.123@mail.example>\r\nMessage-Id: <second@x>\r\n\r\nbody\r\n";
    for step in STEPS {
        let (out, f) = run(msg, StripRules::default(), step);
        assert_eq!(
            f.message_id(),
            Some("<abc.123@mail.example>"),
            "step {step}"
        );
        assert_eq!(out, msg, "step {step}: the field passes unchanged");
    }
}

#[test]
fn a_message_without_message_id_or_with_an_empty_one_has_none() {
    let (_, f) = run(
        b"Subject: hi\r\n\r\nMessage-ID: <in@body>\r\n",
        StripRules::default(),
        5,
    );
    assert_eq!(f.message_id(), None);
    let (_, f) = run(b"Message-ID:  \r\n\r\n", StripRules::default(), 3);
    assert_eq!(f.message_id(), None);
}

/// Held memory stays bounded: a value over `MAX_MESSAGE_ID` octets is not kept, and the
/// field still passes whole.
#[test]
fn a_message_id_over_the_bound_is_not_kept_and_the_field_passes() {
    let long = format!("<{}@x>", "a".repeat(MAX_MESSAGE_ID));
    let msg = format!("Message-ID: {long}\r\n\r\nbody\r\n");
    let (out, f) = run(msg.as_bytes(), StripRules::default(), 64);
    assert_eq!(f.message_id(), None);
    assert_eq!(out, msg.as_bytes());
    // The value as received: a space, the id, CRLF.
    let fits = format!("<{}@x>", "a".repeat(MAX_MESSAGE_ID - 7));
    let msg = format!("Message-ID: {fits}\r\n\r\n");
    let (_, f) = run(msg.as_bytes(), StripRules::default(), 64);
    assert_eq!(f.message_id(), Some(fits.as_str()));
}

/// A header section that ends without a body (no blank line) still yields its Message-ID.
#[test]
fn a_message_id_at_the_very_end_is_kept() {
    let (_, f) = run(b"Message-ID: <last@x>", StripRules::default(), 4);
    assert_eq!(f.message_id(), Some("<last@x>"));
}

/// A removed field is not kept.
#[test]
fn a_stripped_message_id_is_not_kept() {
    let rules = StripRules {
        names: vec![NamePattern::new("Message-ID")],
        auth_results_for: None,
    };
    let (_, f) = run(b"Message-ID: <x@y>\r\n\r\n", rules, 7);
    assert_eq!(f.message_id(), None);
}

/// Hostile octets in the value: not UTF-8 is replaced (the journal is JSON text), and the
/// field still passes unchanged.
#[test]
fn a_message_id_that_is_not_utf8_is_kept_with_replacement_characters() {
    let msg = b"Message-ID: <a\xff\xfe@x>\r\n\r\nbody\r\n";
    for step in STEPS {
        let (out, f) = run(msg, StripRules::default(), step);
        assert_eq!(f.message_id(), Some("<a\u{FFFD}\u{FFFD}@x>"), "step {step}");
        assert_eq!(out, msg, "step {step}");
    }
}
