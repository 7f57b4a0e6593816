//! In-memory dialogue tests: a scripted client drives a [`Session`] the way the driver does,
//! answering every verdict event (accept by default), and checks the exact replies.

use std::collections::VecDeque;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{Event, Session, SessionConfig};
use crate::smtp::reply::{self, Reply};

const HOST: &str = "mx.example";

fn cfg() -> SessionConfig {
    SessionConfig {
        hostname: HOST.to_string(),
        postmaster: crate::envelope::Address::parse("postmaster@example.net").unwrap(),
        max_command_length: 512,
        max_message_size: 1000,
        max_recipients: 3,
        max_errors: 10,
        starttls: true,
        implicit_tls: false,
        require_tls: false,
        auth_enabled: false,
        auth_required: false,
    }
}

/// A submission-like listener: STARTTLS, AUTH enabled.
fn auth_cfg() -> SessionConfig {
    SessionConfig {
        auth_enabled: true,
        ..cfg()
    }
}

fn b64(s: &[u8]) -> String {
    STANDARD.encode(s)
}

/// The replies written during one step of the dialogue.
#[derive(Debug, Clone)]
struct Replies {
    /// Complete replies, each as its lines (without CRLF).
    replies: Vec<Vec<String>>,
}

impl Replies {
    fn parse(out: &[u8]) -> Replies {
        let text = std::str::from_utf8(out).expect("replies are UTF-8");
        assert!(
            text.is_empty() || text.ends_with("\r\n"),
            "unterminated: {text:?}"
        );
        let mut replies = Vec::new();
        let mut current = Vec::new();
        for line in text.split_terminator("\r\n") {
            assert!(well_formed(line), "malformed reply line {line:?}");
            current.push(line.to_string());
            if line.as_bytes()[3] == b' ' {
                replies.push(std::mem::take(&mut current));
            }
        }
        assert!(
            current.is_empty(),
            "unfinished multi-line reply: {current:?}"
        );
        Replies { replies }
    }

    fn codes(&self) -> Vec<u16> {
        self.replies.iter().map(|r| code_of(&r[0])).collect()
    }

    /// Exactly one reply, with this code.
    #[track_caller]
    fn expect(self, code: u16) -> Self {
        assert_eq!(self.codes(), vec![code], "{:#?}", self.replies);
        self
    }

    /// Exactly one reply, with this code and enhanced code.
    #[track_caller]
    fn expect_enh(self, code: u16, enhanced: &str) -> Self {
        let r = self.expect(code);
        assert_eq!(r.enhanced(0), enhanced, "{:#?}", r.replies);
        r
    }

    /// Exactly these replies, in order.
    #[track_caller]
    fn expect_codes(self, codes: &[u16]) -> Self {
        assert_eq!(self.codes(), codes, "{:#?}", self.replies);
        self
    }

    /// Exactly this reply (code, enhanced code, text).
    #[track_caller]
    fn expect_reply(self, reply: &Reply) -> Self {
        let mut wire = Vec::new();
        reply.write_to(&mut wire);
        assert_eq!(
            self.text(),
            String::from_utf8(wire).unwrap(),
            "{:#?}",
            self.replies
        );
        self
    }

    fn enhanced(&self, i: usize) -> &str {
        let last = self.replies[i].last().unwrap();
        last[4..].split(' ').next().unwrap_or("")
    }

    fn lines(&self) -> Vec<String> {
        self.replies.concat()
    }

    fn text(&self) -> String {
        self.lines().iter().map(|l| format!("{l}\r\n")).collect()
    }

    /// The EHLO keywords (every line after the first, without the code).
    fn keywords(&self) -> Vec<String> {
        self.lines()
            .iter()
            .skip(1)
            .map(|l| l[4..].to_string())
            .collect()
    }
}

fn code_of(line: &str) -> u16 {
    line[..3].parse().unwrap()
}

/// `DDD[ -]text`, ASCII printable, no CR/LF inside.
fn well_formed(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() >= 4
        && b[..3].iter().all(u8::is_ascii_digit)
        && (b[3] == b' ' || b[3] == b'-')
        && b[4..].iter().all(|&c| (0x20..0x7f).contains(&c))
}

type Policy = Box<dyn FnMut(&Event) -> Option<Reply>>;

/// The scripted client and driver.
struct T {
    s: Session,
    greeting: Replies,
    /// Every event polled, in order.
    events: Vec<Event>,
    /// Verdicts to give, before the policy is asked.
    reject_queue: VecDeque<Reply>,
    /// `None` accepts.
    policy: Policy,
    /// Call `tls_started` right after a StartTls event (the handshake "succeeds").
    auto_tls: bool,
    /// Message octets of the transaction in progress.
    spool: Vec<u8>,
    /// Messages that were queued, with their id.
    queued: Vec<(String, Vec<u8>)>,
    closed: bool,
}

impl T {
    fn new(config: SessionConfig) -> T {
        let mut s = Session::new(config);
        s.greet();
        let greeting = Replies::parse(s.output());
        s.clear_output();
        T::with_session(s, greeting)
    }

    fn refused(config: SessionConfig) -> T {
        let mut s = Session::new(config);
        s.refuse(&reply::ACCESS_DENIED);
        let greeting = Replies::parse(s.output());
        s.clear_output();
        T::with_session(s, greeting)
    }

    fn with_session(s: Session, greeting: Replies) -> T {
        T {
            s,
            greeting,
            events: Vec::new(),
            reject_queue: VecDeque::new(),
            policy: Box::new(|_| None),
            auto_tls: true,
            spool: Vec::new(),
            queued: Vec::new(),
            closed: false,
        }
    }

    /// A session that has already said EHLO.
    fn ehlo(config: SessionConfig) -> T {
        let mut t = T::new(config);
        t.send("EHLO client.example").expect(250);
        t
    }

    /// A session inside TLS (through STARTTLS), greeted again.
    fn tls(config: SessionConfig) -> T {
        let mut t = T::ehlo(config);
        t.send("STARTTLS").expect_enh(220, "2.0.0");
        assert!(t.s.is_tls());
        t.send("EHLO client.example").expect(250);
        t
    }

    fn reject_next(&mut self, reply: Reply) -> &mut Self {
        self.reject_queue.push_back(reply);
        self
    }

    /// Send one command line (CRLF appended).
    fn send(&mut self, line: &str) -> Replies {
        self.send_raw(format!("{line}\r\n").as_bytes())
    }

    /// Send octets as they are, in one `receive`.
    fn send_raw(&mut self, bytes: &[u8]) -> Replies {
        self.s.receive(bytes);
        self.run()
    }

    /// Send octets one `receive` per byte.
    fn send_bytewise(&mut self, bytes: &[u8]) -> Replies {
        let mut out = Vec::new();
        for &b in bytes {
            self.s.receive(&[b]);
            out.extend(self.run().replies);
        }
        Replies { replies: out }
    }

    fn verdict(&mut self, event: &Event) -> Option<Reply> {
        self.reject_queue
            .pop_front()
            .or_else(|| (self.policy)(event))
    }

    /// Poll until the session wants input or closes, answering every question.
    fn run(&mut self) -> Replies {
        let mut out = Vec::new();
        loop {
            if self.s.is_closed() && self.closed {
                break;
            }
            let event = self.s.poll();
            out.extend_from_slice(self.s.output());
            self.s.clear_output();
            self.events.push(event.clone());
            match &event {
                Event::NeedInput => break,
                Event::Close => {
                    self.closed = true;
                    break;
                }
                Event::Flush | Event::Rejected { .. } => {}
                Event::Helo { .. }
                | Event::Mail { .. }
                | Event::Rcpt(_)
                | Event::DataStart
                | Event::Auth(_) => match self.verdict(&event) {
                    None => self.s.accept(),
                    Some(r) => self.s.reject(&r),
                },
                Event::StartTls { .. } => {
                    if self.auto_tls {
                        self.s.tls_started();
                    }
                }
                Event::DataChunk => self.spool.extend_from_slice(self.s.data_chunk()),
                Event::DataEnd => match self.verdict(&event) {
                    None => {
                        let id = format!("Q{}", self.queued.len() + 1);
                        self.s.queued(&id);
                        self.queued.push((id, std::mem::take(&mut self.spool)));
                    }
                    Some(r) => {
                        self.spool.clear();
                        self.s.reject(&r);
                    }
                },
                Event::DataRejected(_) => self.spool.clear(),
            }
            out.extend_from_slice(self.s.output());
            self.s.clear_output();
        }
        Replies::parse(&out)
    }

    fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| f(e)).count()
    }

    fn mails(&self) -> usize {
        self.count(|e| matches!(e, Event::Mail { .. }))
    }

    fn data_ends(&self) -> usize {
        self.count(|e| matches!(e, Event::DataEnd))
    }

    fn rules(&self) -> Vec<&'static str> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Rejected { rule, .. } => Some(*rule),
                _ => None,
            })
            .collect()
    }

    #[track_caller]
    fn assert_closed(&self) {
        assert!(self.closed && self.s.is_closed(), "session still open");
    }

    #[track_caller]
    fn assert_open(&self) {
        assert!(!self.closed && !self.s.is_closed(), "session closed");
    }

    /// MAIL + one RCPT, both accepted.
    fn envelope(&mut self) {
        self.send("MAIL FROM:<a@b.example>")
            .expect_enh(250, "2.1.0");
        self.send("RCPT TO:<c@d.example>").expect_enh(250, "2.1.5");
    }
}

// --- Greeting and EHLO ---------------------------------------------------------------------

#[test]
fn greeting_names_the_host() {
    let t = T::new(cfg());
    assert_eq!(t.greeting.text(), "220 mx.example ESMTP ready\r\n");
}

#[test]
fn ehlo_advertises_extensions_by_listener_and_tls_state() {
    const BASE: &[&str] = &[
        "PIPELINING",
        "SIZE 1000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
    ];
    // (starttls listener, implicit tls, auth enabled, go through STARTTLS) → STARTTLS?, AUTH?
    let cases = [
        (true, false, false, false, true, false),
        (true, false, true, false, true, false),
        (true, false, true, true, false, true),
        (true, false, false, true, false, false),
        (false, false, true, false, false, false),
        (false, true, true, false, false, true),
        (false, true, false, false, false, false),
    ];
    for (starttls, implicit, auth, upgrade, want_tls, want_auth) in cases {
        let config = SessionConfig {
            starttls,
            implicit_tls: implicit,
            auth_enabled: auth,
            ..cfg()
        };
        let mut t = if upgrade {
            T::tls(config)
        } else {
            T::new(config)
        };
        let r = t.send("EHLO client.example").expect(250);
        let case = (starttls, implicit, auth, upgrade);
        assert_eq!(r.lines()[0], "250-mx.example", "{case:?}");
        let kw = r.keywords();
        for k in BASE {
            assert!(kw.iter().any(|x| x == k), "{k} missing in {kw:?} {case:?}");
        }
        assert_eq!(kw.iter().any(|x| x == "STARTTLS"), want_tls, "{case:?}");
        assert_eq!(
            kw.iter().any(|x| x == "AUTH PLAIN LOGIN"),
            want_auth,
            "{case:?}"
        );
        assert!(
            !kw.iter()
                .any(|x| x.starts_with("AUTH") && x != "AUTH PLAIN LOGIN")
        );
    }
}

#[test]
fn helo_is_one_line_and_forbids_mail_parameters() {
    let mut t = T::new(cfg());
    let r = t.send("HELO client.example").expect(250);
    assert_eq!(r.lines(), vec!["250 mx.example"]);
    t.send("MAIL FROM:<a@b.example> SIZE=10")
        .expect_enh(555, "5.5.4");
    t.send("MAIL FROM:<a@b.example> BODY=8BITMIME")
        .expect_enh(555, "5.5.4");
    t.send("MAIL FROM:<a@b.example>").expect_enh(250, "2.1.0");
}

#[test]
fn helo_without_name_is_refused() {
    let mut t = T::new(cfg());
    t.send("EHLO").expect(501);
    t.send("HELO").expect(501);
    assert_eq!(t.count(|e| matches!(e, Event::Helo { .. })), 0);
}

#[test]
fn rejected_helo_leaves_session_ungreeted() {
    let mut t = T::new(cfg());
    t.reject_next(reply::ACCESS_DENIED);
    t.send("EHLO bad.example").expect_enh(554, "5.7.1");
    t.send("MAIL FROM:<a@b.example>").expect_enh(503, "5.5.1");
}

// --- Sequence -----------------------------------------------------------------------------

#[test]
fn sequence_errors() {
    // (setup lines, command, code, enhanced)
    let cases: &[(&[&str], &str, u16, &str)] = &[
        (&[], "MAIL FROM:<a@b.example>", 503, "5.5.1"),
        (&[], "RCPT TO:<a@b.example>", 503, "5.5.1"),
        (&[], "DATA", 503, "5.5.1"),
        (&["EHLO x"], "RCPT TO:<a@b.example>", 503, "5.5.1"),
        (&["EHLO x"], "DATA", 503, "5.5.1"),
        (&["EHLO x", "MAIL FROM:<a@b.example>"], "DATA", 503, "5.5.1"),
        (
            &["EHLO x", "MAIL FROM:<a@b.example>"],
            "MAIL FROM:<a@b.example>",
            503,
            "5.5.1",
        ),
        (
            &["EHLO x", "MAIL FROM:<a@b.example>", "RSET"],
            "RCPT TO:<c@d.example>",
            503,
            "5.5.1",
        ),
        (
            &["EHLO x", "MAIL FROM:<a@b.example>", "RSET"],
            "MAIL FROM:<a@b.example>",
            250,
            "2.1.0",
        ),
        (&["EHLO x", "RSET"], "MAIL FROM:<a@b.example>", 250, "2.1.0"),
        (&["RSET"], "MAIL FROM:<a@b.example>", 503, "5.5.1"),
    ];
    for (setup, cmd, code, enh) in cases {
        let mut t = T::new(cfg());
        for line in *setup {
            let r = t.send(line);
            assert!(r.codes()[0] < 400, "{setup:?}: {line} → {r:?}");
        }
        let r = t.send(cmd);
        assert_eq!(r.codes(), vec![*code], "{setup:?} then {cmd}");
        assert_eq!(r.enhanced(0), *enh, "{setup:?} then {cmd}");
    }
}

#[test]
fn data_after_all_recipients_refused_is_554() {
    let mut t = T::ehlo(cfg());
    t.send("MAIL FROM:<a@b.example>").expect(250);
    t.reject_next(reply::RELAY_DENIED);
    t.send("RCPT TO:<c@d.example>").expect_enh(550, "5.7.1");
    t.send("DATA").expect_enh(554, "5.5.1");
    assert_eq!(t.count(|e| matches!(e, Event::DataStart)), 0);
}

#[test]
fn rset_clears_the_transaction() {
    let mut t = T::ehlo(cfg());
    t.envelope();
    assert!(t.s.transaction().is_some());
    t.send("RSET").expect_enh(250, "2.0.0");
    assert!(t.s.transaction().is_none());
    t.send("DATA").expect_enh(503, "5.5.1");
}

// --- Transactions ---------------------------------------------------------------------------

#[test]
fn full_transaction_spools_the_unstuffed_message() {
    let mut t = T::ehlo(cfg());
    t.envelope();
    t.send("DATA").expect(354);
    assert!(t.s.in_data());
    let r = t.send_raw(b"Subject: hi\r\n\r\n..leading dot\r\n...two\r\n.\r\n");
    r.expect_enh(250, "2.0.0")
        .expect_reply(&reply::QUEUED.with_text("Ok: queued as Q1"));
    assert_eq!(t.queued.len(), 1);
    assert_eq!(
        t.queued[0].1,
        b"Subject: hi\r\n\r\n.leading dot\r\n..two\r\n".to_vec()
    );
    assert!(!t.s.in_data());
    // A second transaction on the same session.
    t.envelope();
    t.send("DATA").expect(354);
    t.send_raw(b"second\r\n.\r\n").expect(250);
    assert_eq!(t.queued[1], ("Q2".to_string(), b"second\r\n".to_vec()));
    t.send("QUIT").expect_enh(221, "2.0.0");
    t.assert_closed();
}

#[test]
fn empty_message_is_queued() {
    let mut t = T::ehlo(cfg());
    t.envelope();
    t.send("DATA").expect(354);
    t.send_raw(b".\r\n").expect(250);
    assert_eq!(t.queued[0].1, b"");
}

#[test]
fn end_of_data_and_quit_in_one_receive() {
    let mut t = T::ehlo(cfg());
    t.envelope();
    t.send("DATA").expect(354);
    t.send_raw(b"body\r\n.\r\nQUIT\r\n")
        .expect_codes(&[250, 221]);
    assert_eq!(t.queued.len(), 1);
    t.assert_closed();
}

#[test]
fn rejected_data_end_is_not_queued() {
    let mut t = T::ehlo(cfg());
    t.envelope();
    t.send("DATA").expect(354);
    t.reject_next(reply::INSUFFICIENT_STORAGE);
    t.send_raw(b"body\r\n.\r\n").expect_enh(452, "4.3.1");
    assert!(t.queued.is_empty());
    // The session is back to idle: a new transaction works.
    t.envelope();
}

#[test]
fn bare_accept_of_data_end_is_a_local_error_not_a_queued_reply() {
    let mut s = Session::new(cfg());
    s.greet();
    s.receive(b"EHLO x\r\n");
    assert!(matches!(s.poll(), Event::Helo { .. }));
    s.accept();
    s.receive(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n");
    assert!(matches!(s.poll(), Event::Mail { .. }));
    s.accept();
    assert!(matches!(s.poll(), Event::Rcpt(_)));
    s.accept();
    assert_eq!(s.poll(), Event::DataStart);
    s.accept();
    s.receive(b".\r\n");
    assert_eq!(s.poll(), Event::DataEnd);
    s.clear_output();
    s.accept();
    assert!(s.output().starts_with(b"451 4.3.0"));
}

// --- PIPELINING -------------------------------------------------------------------------

#[test]
fn pipelined_group_gets_replies_in_order() {
    let mut t = T::ehlo(cfg());
    t.send_raw(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\nDATA\r\n",
    )
    .expect_codes(&[250, 250, 250, 354]);
    assert_eq!(t.s.transaction().unwrap().recipients.len(), 2);
}

#[test]
fn pipelined_group_with_a_refused_recipient() {
    let mut t = T::ehlo(cfg());
    t.policy = Box::new(|e| match e {
        Event::Rcpt(a) if a.domain() == "bad.example" => Some(reply::RELAY_DENIED),
        _ => None,
    });
    t.send_raw(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@bad.example>\r\nRCPT TO:<e@f.example>\r\nDATA\r\n",
    )
    .expect_codes(&[250, 550, 250, 354]);
}

#[test]
fn early_talker_after_ehlo_is_closed() {
    let mut t = T::new(cfg());
    let r = t.send_raw(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\n");
    r.expect_enh(554, "5.5.0");
    t.assert_closed();
    assert_eq!(t.mails(), 0);
    assert_eq!(t.rules(), vec!["early_talker"]);
    // Nothing more is processed.
    assert!(t.send("NOOP").replies.is_empty());
}

#[test]
fn early_talker_after_data_is_closed() {
    let mut t = T::ehlo(cfg());
    t.send("MAIL FROM:<a@b.example>").expect(250);
    t.send("RCPT TO:<c@d.example>").expect(250);
    t.send_raw(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        .expect_enh(554, "5.5.0");
    t.assert_closed();
    assert!(t.queued.is_empty());
    assert_eq!(t.count(|e| matches!(e, Event::DataStart)), 0);
}

// --- SIZE ---------------------------------------------------------------------------------

#[test]
fn declared_size() {
    let cases: &[(&str, u16, &str)] = &[
        ("SIZE=1000", 250, "2.1.0"),
        ("SIZE=1001", 552, "5.3.4"),
        ("SIZE=18446744073709551615", 552, "5.3.4"),
        ("SIZE=18446744073709551616", 552, "5.3.4"),
        ("SIZE=99999999999999999999999999", 552, "5.3.4"),
        (
            "SIZE=99999999999999999999999999999999999999999",
            552,
            "5.3.4",
        ),
    ];
    for (param, code, enh) in cases {
        let mut t = T::ehlo(cfg());
        let r = t.send(&format!("MAIL FROM:<a@b.example> {param}"));
        assert_eq!(r.codes(), vec![*code], "{param}");
        assert_eq!(r.enhanced(0), *enh, "{param}");
    }
}

#[test]
fn oversized_message_is_read_to_its_end_then_refused() {
    let mut t = T::ehlo(cfg());
    t.envelope();
    t.send("DATA").expect(354);
    let line = [vec![b'x'; 98], b"\r\n".to_vec()].concat();
    for _ in 0..20 {
        assert!(t.send_raw(&line).replies.is_empty());
    }
    t.send_raw(b".\r\n").expect_enh(552, "5.3.4");
    assert_eq!(t.data_ends(), 0);
    assert!(t.queued.is_empty());
    t.assert_open();
    t.send("NOOP").expect(250);
}

// --- Smuggling ------------------------------------------------------------------------------

#[test]
fn smuggled_end_of_data_never_executes_commands() {
    let variants: &[&[u8]] = &[
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\n.\r",
        b"\r.\n",
        b"\r\n.\r\r\n",
    ];
    for v in variants {
        for bytewise in [false, true] {
            let mut t = T::ehlo(cfg());
            t.envelope();
            t.send("DATA").expect(354);
            let mut msg = b"Subject: hi\r\n\r\nbody".to_vec();
            msg.extend_from_slice(v);
            msg.extend_from_slice(
                b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\nDATA\r\nsmuggled\r\n",
            );
            let r = if bytewise {
                t.send_bytewise(&msg)
            } else {
                t.send_raw(&msg)
            };
            assert!(r.replies.is_empty(), "{v:?}: {r:?}");
            assert!(t.s.in_data(), "{v:?} ended DATA");
            let r = t.send_raw(b".\r\n");
            r.expect_reply(&reply::BARE_LINE_ENDING_IN_DATA);
            assert_eq!(t.mails(), 1, "{v:?}: a smuggled MAIL was executed");
            assert_eq!(t.data_ends(), 0, "{v:?}");
            assert!(t.queued.is_empty());
            assert!(
                t.count(|e| matches!(
                    e,
                    Event::DataRejected(crate::smtp::DataFault::BareLineEnding)
                )) == 1
            );
            t.send("NOOP").expect(250);
        }
    }
}

// --- Command lines ----------------------------------------------------------------------

#[test]
fn malformed_command_lines() {
    let long = format!("NOOP {}", "x".repeat(600));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"MAIL FROM:<a@b.example>\n".to_vec(), "bare_lf_in_command"),
        (b"MAIL FROM:<a@b.example>\r".to_vec(), ""),
        (
            b"MAIL FROM:<a@b.\rexample>\r\n".to_vec(),
            "bare_cr_in_command",
        ),
        (b"MAIL FROM:<a@b.\0example>\r\n".to_vec(), "nul_in_command"),
        (format!("{long}\r\n").into_bytes(), "command_too_long"),
    ];
    for (input, rule) in cases {
        let mut t = T::ehlo(cfg());
        let r = t.send_raw(&input);
        if rule.is_empty() {
            // A trailing CR alone is not a line end yet.
            assert!(r.replies.is_empty());
            continue;
        }
        r.expect_enh(500, "5.5.2");
        assert_eq!(t.rules(), vec![rule], "{input:?}");
        assert_eq!(t.mails(), 0, "{input:?}");
        if rule == "bare_lf_in_command" {
            // By design everything after a bare LF up to the next CRLF is discarded as the
            // rest of that line (line.rs), so the next CRLF ends the refused line.
            assert!(t.send("NOOP").replies.is_empty());
            assert_eq!(t.rules(), vec![rule]);
        }
        t.send("NOOP").expect(250);
        t.assert_open();
    }
}

#[test]
fn bare_lf_line_is_not_executed_even_when_crlf_follows() {
    let mut t = T::ehlo(cfg());
    t.send_raw(b"MAIL FROM:<a@b.example>\nRCPT TO:<c@d.example>\r\nNOOP\r\n")
        .expect_codes(&[500, 250]);
    assert_eq!(t.mails(), 0);
    assert_eq!(t.count(|e| matches!(e, Event::Rcpt(_))), 0);
}

#[test]
fn line_over_the_limit_then_next_line_works() {
    // max_command_length (512) includes the CRLF.
    for (len, code) in [(510, 250), (511, 500)] {
        let mut t = T::ehlo(cfg());
        let line = format!("NOOP {}", "y".repeat(len - 5));
        let r = t.send(&line);
        assert_eq!(r.codes(), vec![code], "{len}");
        if code == 500 {
            r.expect_reply(&reply::LINE_TOO_LONG);
        }
        t.send("NOOP").expect(250);
    }
}

/// Regression: the framer consumed the whole buffer after an over-long line, so pipelined
/// commands after it were silently dropped.
#[test]
fn line_too_long_does_not_swallow_the_next_pipelined_commands() {
    let mut t = T::ehlo(cfg());
    let long = format!("NOOP {}\r\nNOOP\r\nRSET\r\n", "x".repeat(2000));
    t.send_raw(long.as_bytes()).expect_codes(&[500, 250, 250]);
    // Same, fed a byte at a time.
    let mut t = T::ehlo(cfg());
    t.send_bytewise(long.as_bytes())
        .expect_codes(&[500, 250, 250]);
}

#[test]
fn flood_without_line_end_is_421_and_close() {
    let mut t = T::ehlo(cfg());
    let r = t.send_raw(&vec![b'a'; 70 * 1024]);
    assert_eq!(r.codes(), vec![500, 421]);
    assert_eq!(r.enhanced(1), "4.7.0");
    t.assert_closed();
    // Fed in pieces, too.
    let mut t = T::ehlo(cfg());
    let mut codes = Vec::new();
    for _ in 0..70 {
        codes.extend(t.send_raw(&[b'a'; 1024]).codes());
    }
    assert_eq!(codes, vec![500, 421]);
    t.assert_closed();
}

#[test]
fn auth_line_limit_is_12288() {
    let mut t = T::tls(auth_cfg());
    // "AUTH PLAIN " + payload + CRLF == 12288: framed and handed to SASL (bad base64).
    let payload = "A".repeat(12288 - 2 - 11);
    t.send(&format!("AUTH PLAIN {payload}"))
        .expect_enh(501, "5.5.2");
    let payload = "A".repeat(12288 - 2 - 11 + 1);
    t.send(&format!("AUTH PLAIN {payload}"))
        .expect_enh(500, "5.5.6");
    t.send("NOOP").expect(250);
    // A SASL response line has the same limit.
    t.send("AUTH LOGIN").expect(334);
    t.send(&"A".repeat(12300)).expect_enh(500, "5.5.6");
    t.send("NOOP").expect(250);
}

// --- Error budget ---------------------------------------------------------------------------

#[test]
fn error_budget_closes_with_421() {
    let mut t = T::ehlo(SessionConfig {
        max_errors: 3,
        ..cfg()
    });
    t.send("FOO").expect_enh(500, "5.5.1");
    t.send("BAR").expect_enh(500, "5.5.1");
    t.send("BAZ").expect_codes(&[500, 421]);
    t.assert_closed();
}

#[test]
fn error_budget_reply_text() {
    let mut t = T::ehlo(SessionConfig {
        max_errors: 1,
        ..cfg()
    });
    let r = t.send("FOO");
    assert_eq!(
        r.text(),
        "500 5.5.1 Command unrecognized\r\n421 4.7.0 Too many errors, closing connection\r\n"
    );
    t.assert_closed();
}

// --- STARTTLS --------------------------------------------------------------------------------

/// RFC 3207 §4: STARTTLS takes no parameters; with one it is refused and nothing of the
/// session changes (no TLS, nothing discarded). DATA and RSET likewise take none.
#[test]
fn verbs_without_parameters_refuse_one_with_501_5_5_4() {
    let mut t = T::ehlo(cfg());
    t.auto_tls = false;
    t.send("STARTTLS foo")
        .expect_reply(&reply::STARTTLS_SYNTAX)
        .expect_enh(501, "5.5.4");
    assert_eq!(t.count(|e| matches!(e, Event::StartTls { .. })), 0);
    assert!(!t.s.is_tls());
    t.send("MAIL FROM:<a@b.example>").expect(250);
    t.send("RCPT TO:<c@d.example>").expect(250);
    t.send("DATA x").expect_enh(501, "5.5.4");
    t.send("RSET x").expect_enh(501, "5.5.4");
    // Still in the transaction: neither DATA nor RSET ran.
    assert!(t.s.transaction().is_some());
    t.send("RSET  ").expect_enh(250, "2.0.0");
    assert!(t.s.transaction().is_none());
    assert_eq!(
        t.rules(),
        ["starttls_argument", "data_argument", "rset_argument"]
    );
    t.send("STARTTLS").expect_enh(220, "2.0.0");
}

#[test]
fn starttls_injection_is_discarded() {
    let mut t = T::ehlo(cfg());
    t.auto_tls = false;
    t.send_raw(b"STARTTLS\r\nMAIL FROM:<x@y.example>\r\n")
        .expect_enh(220, "2.0.0");
    let discarded = t
        .events
        .iter()
        .find_map(|e| match e {
            Event::StartTls { discarded } => Some(*discarded),
            _ => None,
        })
        .unwrap();
    assert_eq!(discarded, b"MAIL FROM:<x@y.example>\r\n".len());
    t.s.tls_started();
    assert!(t.run().replies.is_empty());
    assert_eq!(t.mails(), 0);
    // EHLO is required again.
    t.send("MAIL FROM:<x@y.example>").expect_enh(503, "5.5.1");
    t.send("EHLO x").expect(250);
    t.send("MAIL FROM:<x@y.example>").expect(250);
    assert_eq!(t.mails(), 1);
}

#[test]
fn starttls_twice_and_unavailable() {
    let mut t = T::tls(cfg());
    t.send("STARTTLS").expect_enh(503, "5.5.1");
    let mut t = T::ehlo(SessionConfig {
        starttls: false,
        ..cfg()
    });
    t.send("STARTTLS").expect_enh(502, "5.5.1");
    let mut t = T::ehlo(SessionConfig {
        starttls: false,
        implicit_tls: true,
        ..cfg()
    });
    t.send("STARTTLS").expect_enh(503, "5.5.1");
}

#[test]
fn require_tls_gates_mail_and_auth() {
    let config = SessionConfig {
        require_tls: true,
        auth_enabled: true,
        ..cfg()
    };
    let mut t = T::ehlo(config.clone());
    t.send("MAIL FROM:<a@b.example>")
        .expect_reply(&reply::MUST_STARTTLS)
        .expect_enh(530, "5.7.0");
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0pw")))
        .expect_reply(&reply::MUST_STARTTLS);
    assert_eq!(t.count(|e| matches!(e, Event::Auth(_))), 0);
    let mut t = T::tls(config);
    t.send("MAIL FROM:<a@b.example>").expect(250);
    t.send("RSET").expect(250);
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0pw")))
        .expect_enh(235, "2.7.0");
}

// --- AUTH ------------------------------------------------------------------------------------

#[test]
fn auth_disabled_is_502() {
    let mut t = T::tls(cfg());
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0pw")))
        .expect_enh(502, "5.5.1");
}

#[test]
fn auth_before_tls_is_538() {
    let mut t = T::ehlo(auth_cfg());
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0pw")))
        .expect_enh(538, "5.7.11");
}

#[test]
fn auth_plain_with_initial_response() {
    let mut t = T::tls(auth_cfg());
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0secret")))
        .expect_reply(&reply::AUTH_OK);
    let creds = t
        .events
        .iter()
        .find_map(|e| match e {
            Event::Auth(c) => Some(c.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (creds.login.as_str(), creds.password.as_str()),
        ("alice", "secret")
    );
    assert_eq!(t.s.user(), Some("alice"));
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0secret")))
        .expect_enh(503, "5.5.1");
}

#[test]
fn auth_plain_with_empty_challenge() {
    let mut t = T::tls(auth_cfg());
    let r = t.send("AUTH PLAIN").expect(334);
    assert_eq!(r.text(), "334 \r\n");
    t.send(&b64(b"alice\0alice\0secret"))
        .expect_enh(235, "2.7.0");
}

#[test]
fn auth_login_two_steps() {
    let mut t = T::tls(auth_cfg());
    assert_eq!(
        t.send("AUTH LOGIN").expect(334).text(),
        "334 VXNlcm5hbWU6\r\n"
    );
    assert_eq!(
        t.send(&b64(b"alice")).expect(334).text(),
        "334 UGFzc3dvcmQ6\r\n"
    );
    t.send(&b64(b"secret")).expect_enh(235, "2.7.0");
    // With the user name as initial response.
    let mut t = T::tls(auth_cfg());
    assert_eq!(
        t.send(&format!("AUTH LOGIN {}", b64(b"alice")))
            .expect(334)
            .text(),
        "334 UGFzc3dvcmQ6\r\n"
    );
    t.send(&b64(b"secret")).expect_enh(235, "2.7.0");
}

#[test]
fn auth_failures() {
    // (command, response lines, code, enhanced)
    let plain = |s: &[u8]| format!("AUTH PLAIN {}", b64(s));
    let cases: Vec<(String, Vec<String>, u16, &str)> = vec![
        ("AUTH PLAIN".into(), vec!["*".into()], 501, "5.7.0"),
        ("AUTH LOGIN".into(), vec!["*".into()], 501, "5.7.0"),
        (
            "AUTH LOGIN".into(),
            vec![b64(b"alice"), "*".into()],
            501,
            "5.7.0",
        ),
        (
            "AUTH PLAIN".into(),
            vec!["!!notbase64".into()],
            501,
            "5.5.2",
        ),
        ("AUTH PLAIN !!notbase64".into(), vec![], 501, "5.5.2"),
        (plain(b"mallory\0alice\0secret"), vec![], 535, "5.7.8"),
        ("AUTH CRAM-MD5".into(), vec![], 504, "5.5.4"),
    ];
    for (cmd, responses, code, enh) in cases {
        let mut t = T::tls(auth_cfg());
        let mut r = t.send(&cmd);
        for line in &responses {
            r.clone().expect(334);
            r = t.send(line);
        }
        assert_eq!(r.codes(), vec![code], "{cmd} {responses:?}");
        assert_eq!(r.enhanced(0), enh, "{cmd} {responses:?}");
        assert_eq!(t.count(|e| matches!(e, Event::Auth(_))), 0, "{cmd}");
        assert_eq!(t.s.user(), None);
        // Back to commands.
        t.send("NOOP").expect(250);
    }
}

#[test]
fn a_response_that_decodes_but_is_no_sasl_message_is_told_apart_from_bad_base64() {
    let mut t = T::tls(auth_cfg());
    let r = t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0secret\0extra")));
    assert_eq!(r.text(), "501 5.5.2 Malformed SASL message\r\n");
    let r = t.send("AUTH PLAIN !!notbase64");
    assert_eq!(r.text(), "501 5.5.2 Invalid base64 data\r\n");
}

#[test]
fn auth_rejected_then_retry() {
    let mut t = T::tls(auth_cfg());
    t.reject_next(reply::AUTH_FAILED);
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0wrong")))
        .expect_enh(535, "5.7.8");
    assert_eq!(t.s.user(), None);
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0right")))
        .expect_enh(235, "2.7.0");
}

#[test]
fn auth_required_gates_mail() {
    let mut t = T::tls(SessionConfig {
        auth_required: true,
        ..auth_cfg()
    });
    t.send("MAIL FROM:<a@b.example>")
        .expect_reply(&reply::AUTH_REQUIRED);
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0pw")))
        .expect(235);
    t.send("MAIL FROM:<a@b.example>").expect(250);
    // Not during a transaction.
    let mut t = T::tls(auth_cfg());
    t.send("MAIL FROM:<a@b.example>").expect(250);
    t.send(&format!("AUTH PLAIN {}", b64(b"\0alice\0pw")))
        .expect_enh(503, "5.5.1");
}

// --- Refused sessions -----------------------------------------------------------------------

#[test]
fn refused_session_answers_503_until_quit() {
    let mut t = T::refused(cfg());
    assert_eq!(t.greeting.text(), "554 5.7.1 Access denied\r\n");
    for cmd in [
        "EHLO x",
        "HELO x",
        "MAIL FROM:<a@b.example>",
        "NOOP",
        "RSET",
        "STARTTLS",
    ] {
        t.send(cmd).expect_enh(503, "5.7.1");
    }
    assert_eq!(
        t.count(|e| matches!(e, Event::Helo { .. } | Event::StartTls { .. })),
        0
    );
    t.send("QUIT").expect_enh(221, "2.0.0");
    t.assert_closed();
}

// --- Recipients, addresses, small commands ------------------------------------------------

#[test]
fn recipient_cap_is_452() {
    let mut t = T::ehlo(cfg());
    t.send("MAIL FROM:<a@b.example>").expect(250);
    for i in 0..3 {
        t.send(&format!("RCPT TO:<r{i}@d.example>")).expect(250);
    }
    t.send("RCPT TO:<r9@d.example>").expect_enh(452, "4.5.3");
    assert_eq!(t.s.transaction().unwrap().recipients.len(), 3);
}

#[test]
fn utf8_addresses_need_smtputf8() {
    let mut t = T::ehlo(cfg());
    t.send("MAIL FROM:<jörg@b.example>")
        .expect_enh(553, "5.6.7");
    t.send("MAIL FROM:<a@b.example>").expect(250);
    t.send("RCPT TO:<jörg@d.example>").expect_enh(553, "5.6.7");
    t.send("RSET").expect(250);
    t.send("MAIL FROM:<jörg@b.example> SMTPUTF8").expect(250);
    t.send("RCPT TO:<ü@dömain.example>").expect(250);
}

#[test]
fn postmaster_without_domain() {
    let mut t = T::ehlo(cfg());
    t.send("MAIL FROM:<>").expect(250);
    t.send("RCPT TO:<postmaster>").expect(250);
    t.send("RCPT TO:<Postmaster>").expect(250);
    let rcpts = &t.s.transaction().unwrap().recipients;
    assert_eq!(rcpts[0].to_string(), "postmaster@example.net");
    t.send("RCPT TO:<>").expect_enh(553, "5.1.3");
}

#[test]
fn small_commands() {
    let cases: &[(&str, u16, &str)] = &[
        ("FROB", 500, "5.5.1"),
        ("VRFY alice", 252, "2.5.0"),
        ("HELP", 214, "2.0.0"),
        ("NOOP", 250, "2.0.0"),
        ("EXPN list", 502, "5.5.1"),
        ("BDAT 10 LAST", 502, "5.5.1"),
    ];
    for (cmd, code, enh) in cases {
        let mut t = T::ehlo(cfg());
        let r = t.send(cmd);
        assert_eq!(r.codes(), vec![*code], "{cmd}");
        assert_eq!(r.enhanced(0), *enh, "{cmd}");
        t.assert_open();
    }
}

#[test]
fn timeout_is_421_and_close() {
    let mut t = T::ehlo(cfg());
    t.s.timeout();
    t.run().expect_enh(421, "4.4.2");
    t.assert_closed();
    // Also while a verdict is pending.
    let mut s = Session::new(cfg());
    s.receive(b"EHLO x\r\n");
    assert!(matches!(s.poll(), Event::Helo { .. }));
    s.timeout();
    assert_eq!(s.poll(), Event::Close);
    assert!(s.output().starts_with(b"421 4.4.2"));
}

// --- Feeding ---------------------------------------------------------------------------------

/// A client that waits for each reply: byte-at-a-time feeding must give the same replies as
/// whole lines.
#[test]
fn bytewise_feeding_gives_the_same_dialogue() {
    let script: &[&[u8]] = &[
        b"EHLO client.example\r\n",
        b"NOOP\r\n",
        b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\n",
        b"RCPT TO:<c@d.example>\r\n",
        b"RCPT TO:<postmaster>\r\n",
        b"FROB\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\n..dot\r\nline\r\n.\r\n",
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n",
        b"DATA\r\n",
        b"a\nb\r\n.\r\n",
        b"BAD\0LINE\r\n",
        b"RSET\r\n",
        b"STARTTLS\r\n",
        b"EHLO again\r\n",
        b"QUIT\r\n",
    ];
    let mut whole = T::new(cfg());
    let mut bytewise = T::new(cfg());
    for step in script {
        let a = whole.send_raw(step);
        let b = bytewise.send_bytewise(step);
        assert_eq!(a.lines(), b.lines(), "{:?}", String::from_utf8_lossy(step));
    }
    assert_eq!(whole.queued, bytewise.queued);
    assert_eq!(whole.queued.len(), 1);
    whole.assert_closed();
    bytewise.assert_closed();
}

#[test]
fn output_high_water_asks_for_flush() {
    let mut s = Session::new(cfg());
    s.receive(b"EHLO x\r\n");
    assert!(matches!(s.poll(), Event::Helo { .. }));
    s.accept();
    assert_eq!(s.poll(), Event::NeedInput);
    s.clear_output();
    s.receive(&b"NOOP\r\n".repeat(2000));
    let mut flushes = 0;
    loop {
        match s.poll() {
            Event::Flush => {
                flushes += 1;
                assert!(s.output().len() >= 16 * 1024);
                s.clear_output();
            }
            Event::NeedInput => break,
            e => panic!("{e:?}"),
        }
    }
    assert!(flushes >= 1);
    assert_eq!(s.buffered_input(), 0);
}

/// Regression: smtp-proto's SIZE parser wraps past usize::MAX (26 nines read as 999999, which
/// passed the size check) and refuses exactly usize::MAX as a syntax error (555, not 552).
#[test]
fn size_overflow_does_not_wrap_to_a_small_size() {
    let mut t = T::ehlo(SessionConfig {
        max_message_size: u64::MAX,
        ..cfg()
    });
    t.send("MAIL FROM:<a@b.example> SIZE=99999999999999999999999999")
        .expect(250);
    assert_eq!(t.s.transaction().unwrap().params.size, Some(u64::MAX));
    // Sequence errors still come first.
    let mut t = T::new(cfg());
    t.send("MAIL FROM:<a@b.example> SIZE=18446744073709551616")
        .expect_enh(503, "5.5.1");
}

#[test]
fn size_overflow_without_angle_brackets_is_not_accepted() {
    let mut t = T::ehlo(cfg());
    let r = t.send("MAIL FROM:a@b.example SIZE=99999999999999999999999999");
    assert_ne!(r.codes(), vec![250], "{r:?}");
}

/// The recipients and sender of the open transaction, in canonical text.
fn envelope_text(t: &T) -> (String, Vec<String>) {
    let tx = t.s.transaction().expect("a transaction");
    (
        tx.from.to_string(),
        tx.recipients.iter().map(|r| r.to_string()).collect(),
    )
}

#[test]
fn quoted_local_parts_keep_their_quotes_so_nothing_is_injected_upstream() {
    let mut t = T::ehlo(cfg());
    t.send("MAIL FROM:<\"a b\"@b.example> BODY=8BITMIME")
        .expect(250);
    t.send("RCPT TO:<\"x>y\"@d.example>").expect(250);
    t.send("RCPT TO:<\"john doe\"@d.example>").expect(250);
    t.send("RCPT TO:<\"semi;colon\\\"q\"@d.example>")
        .expect(250);
    let (from, rcpts) = envelope_text(&t);
    assert_eq!(from, "\"a b\"@b.example");
    assert_eq!(
        rcpts,
        [
            "\"x>y\"@d.example",
            "\"john doe\"@d.example",
            "\"semi;colon\\\"q\"@d.example",
        ]
    );
    // Needless quotes are dropped: one mailbox, one form.
    t.send("RSET").expect(250);
    t.send("MAIL FROM:<\"plain.dot\"@b.example>").expect(250);
    assert_eq!(envelope_text(&t).0, "plain.dot@b.example");
}

#[test]
fn a_path_read_differently_by_smtp_proto_is_a_syntax_error() {
    use super::{PathFault, path_address, path_text};
    assert_eq!(
        path_text(b"RCPT TO:<\"x>y\"@d.example> X=1"),
        Some("\"x>y\"@d.example")
    );
    assert_eq!(
        path_text(b"MAIL FROM:<@a,@b:u@d.example>"),
        Some("u@d.example")
    );
    assert_eq!(path_text(b"MAIL FROM: < >"), Some(""));
    assert_eq!(path_text(b"MAIL FROM:<u@d.example"), None);
    assert!(path_address("\"x>y\"@d.example", "x>y@d.example").is_ok());
    assert_eq!(
        path_address("u@d.example", "v@d.example"),
        Err(PathFault::Syntax)
    );
    assert_eq!(
        path_address("u@d.example", "u@e.example"),
        Err(PathFault::Syntax)
    );
}

#[test]
fn source_routes_are_ignored_and_paths_that_are_not_addresses_refused() {
    let mut t = T::ehlo(cfg());
    t.send("MAIL FROM:<@relay.example,@other.example:a@b.example>")
        .expect(250);
    t.send("RCPT TO:<@relay.example:r@d.example>").expect(250);
    assert_eq!(envelope_text(&t).1, ["r@d.example"]);
    for (line, code, enh, rule) in [
        (
            "RCPT TO:<x>y@d.example>",
            553,
            "5.1.3",
            "bad_recipient_syntax",
        ),
        (
            "RCPT TO:<a..b@d.example>",
            553,
            "5.1.3",
            "bad_recipient_syntax",
        ),
        (
            "RCPT TO:<\"\"@d.example>",
            553,
            "5.1.3",
            "bad_recipient_syntax",
        ),
        (
            "RCPT TO:<a\u{7f}b@d.example>",
            553,
            "5.1.3",
            "bad_recipient",
        ),
        ("RCPT TO:<r@xn--a.example>", 553, "5.1.3", "bad_idna"),
    ] {
        t.send(line).expect_enh(code, enh);
        assert_eq!(t.rules().last(), Some(&rule), "{line}");
    }
    t.send("RSET").expect(250);
    t.send("MAIL FROM:<postmaster>").expect_enh(553, "5.1.7");
    t.send("MAIL FROM:<s@xn--a.example>")
        .expect_enh(553, "5.1.7");
    assert_eq!(t.rules().last(), Some(&"bad_idna"));
}

#[test]
fn u_label_domains_need_smtputf8_and_are_kept_as_a_labels() {
    let mut t = T::ehlo(cfg());
    t.send("MAIL FROM:<a@bücher.example>")
        .expect_enh(553, "5.6.7");
    t.send("MAIL FROM:<a@b.example> SMTPUTF8").expect(250);
    t.send("RCPT TO:<info@Bücher.example>").expect(250);
    t.send("RCPT TO:<\u{212A}ate@d.example>").expect(250);
    let (_, rcpts) = envelope_text(&t);
    assert_eq!(
        rcpts,
        ["info@xn--bcher-kva.example", "\u{212A}ate@d.example"]
    );
}

// --- Stress mode: commands that make no progress ---------------------------------------------

#[test]
fn stress_mode_closes_a_session_at_its_second_junk_command() {
    // Each kind of junk, twice, in stress mode: the second one closes with 421 4.7.0.
    for junk in [
        "NOOP",
        "RSET",
        "HELP",
        "VRFY x",
        "EXPN x",
        "EHLO again.example",
        "BOGUS",
    ] {
        let mut t = T::ehlo(cfg());
        t.s.set_stressed(true);
        let first = t.send(junk);
        assert!(!first.replies.is_empty(), "{junk}");
        t.assert_open();
        // A refused command keeps its own reply, then 421 closes (as for max_errors).
        let second = t.send(junk);
        assert_eq!(second.codes().last(), Some(&421), "{junk}");
        assert!(t.s.closed_for_junk(), "{junk}");
        t.assert_closed();
    }
    // A policy refusal counts too: a refused RCPT, then a NOOP.
    let mut t = T::ehlo(cfg());
    t.s.set_stressed(true);
    t.send("MAIL FROM:<a@b.example>").expect(250);
    t.reject_next(reply::RELAY_DENIED);
    t.send("RCPT TO:<x@elsewhere.example>").expect(550);
    t.send("NOOP").expect_enh(421, "4.7.0");
    assert!(t.s.closed_for_junk());
}

#[test]
fn junk_commands_are_not_limited_outside_stress_mode_and_progress_resets_the_count() {
    let mut t = T::ehlo(cfg());
    for _ in 0..20 {
        t.send("NOOP").expect(250);
    }
    assert!(!t.s.closed_for_junk());
    // Commands before stress mode count: the next junk command once stressed closes.
    t.s.set_stressed(true);
    t.send("NOOP").expect_enh(421, "4.7.0");

    // A queued message starts the count over.
    let mut t = T::ehlo(cfg());
    t.s.set_stressed(true);
    t.send("NOOP").expect(250);
    t.envelope();
    t.send("DATA").expect(354);
    t.send_raw(b"Subject: x\r\n\r\nx\r\n.\r\n").expect(250);
    assert_eq!(t.queued.len(), 1);
    t.send("NOOP").expect(250);
    t.assert_open();
    t.send("NOOP").expect_enh(421, "4.7.0");
}

/// A path whose text is not UTF-8 cannot be read, let alone checked as a mailbox: a syntax
/// error in the command's arguments (`501`, RFC 5321 §4.2.2; rule `path_syntax`, like a path
/// smtp-proto reads otherwise), not a mailbox refused (`553`, as before).
#[test]
fn a_path_that_is_not_utf8_is_a_syntax_error() {
    let mut t = T::ehlo(cfg());
    for line in [
        &b"MAIL FROM:<a\xff@b.example>\r\n"[..],
        b"MAIL FROM:<a@b.example\xc3>\r\n",
    ] {
        t.send_raw(line).expect_enh(501, "5.5.2");
        assert_eq!(t.rules().last(), Some(&"path_syntax"));
    }
    assert_eq!(t.mails(), 0);
    t.send("MAIL FROM:<a@b.example>").expect(250);
    t.send_raw(b"RCPT TO:<r\xff@d.example>\r\n")
        .expect_enh(501, "5.5.2");
    assert_eq!(t.rules().last(), Some(&"path_syntax"));
    t.send("RCPT TO:<r@d.example>").expect(250);
}

/// Parameters after HELO and parameters not advertised are refused for their own reasons,
/// with the one reply and rule (`555 5.5.4`, `mail_parameter`).
#[test]
fn mail_parameters_are_refused_for_a_named_reason() {
    use super::{MailParamError, mail_params};
    use smtp_proto::{MAIL_BODY_8BITMIME, MailFrom};
    let plain = MailFrom {
        address: "a@b.example".to_string(),
        ..MailFrom::default()
    };
    let eight_bit = MailFrom {
        flags: MAIL_BODY_8BITMIME,
        ..plain.clone()
    };
    let env_id = MailFrom {
        env_id: Some("x".to_string()),
        ..plain.clone()
    };
    assert!(mail_params(&plain, None, false).is_ok());
    assert_eq!(
        mail_params(&eight_bit, None, false),
        Err(MailParamError::WithoutEhlo)
    );
    assert_eq!(
        mail_params(&plain, Some(10), false),
        Err(MailParamError::WithoutEhlo)
    );
    assert_eq!(
        mail_params(&env_id, None, true),
        Err(MailParamError::Unsupported)
    );
    assert_eq!(
        mail_params(&eight_bit, Some(10), true).map(|p| (p.body, p.size)),
        Ok((Some(crate::envelope::Body::EightBitMime), Some(10)))
    );
    let mut t = T::new(cfg());
    t.send("HELO c.example").expect(250);
    t.send("MAIL FROM:<a@b.example> BODY=8BITMIME")
        .expect_enh(555, "5.5.4");
    assert_eq!(t.rules().last(), Some(&"mail_parameter"));
}
