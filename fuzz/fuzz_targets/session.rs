//! Drive a whole SMTP session with arbitrary client octets and check its invariants.
//!
//! Input layout (so that seeds are real dialogues with a 3-byte header):
//! - byte 0, listener flags: 0x01 starttls, 0x02 implicit TLS, 0x04 require_tls,
//!   0x08 auth enabled, 0x10 auth required, 0x20 command timeout after the input,
//!   0x40 the TLS handshake fails (the driver drops the connection), 0x80 small limits;
//! - byte 1, chunk-size seed (how the stream is split into `receive` calls);
//! - byte 2, verdicts: bit 7 refuses the client at connect; bits 0..=6, taken in turn, make
//!   the driver reject the next verdict event instead of accepting it;
//! - the rest: what the client sends.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::smtp::reply;
use portcullis::smtp::{Event, Session, SessionConfig};

mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    Driver::new(data[0], data[2]).run(common::Chunks::new(data[1]), &data[3..]);
});

struct Driver {
    s: Session,
    config: SessionConfig,
    flags: u8,
    verdicts: u8,
    turn: u32,
    /// Every octet given to `receive`.
    fed: Vec<u8>,
    /// Everything the session wrote.
    out: Vec<u8>,
    /// Offset in `fed` where the current message starts (after the accepted DATA line).
    data_start: Option<usize>,
    spool: Vec<u8>,
    closed: bool,
}

impl Driver {
    fn new(flags: u8, verdicts: u8) -> Driver {
        let small = flags & 0x80 != 0;
        let config = SessionConfig {
            hostname: "mx.example".into(),
            postmaster: portcullis::envelope::Address::parse("postmaster@mx.example").unwrap(),
            max_command_length: if small { 64 } else { 1024 },
            max_message_size: if small { 100 } else { 100_000 },
            max_recipients: if small { 2 } else { 100 },
            max_errors: if small { 4 } else { 20 },
            starttls: flags & 0x01 != 0,
            implicit_tls: flags & 0x02 != 0,
            require_tls: flags & 0x04 != 0,
            auth_enabled: flags & 0x08 != 0,
            auth_required: flags & 0x10 != 0,
        };
        let mut s = Session::new(config.clone());
        if verdicts & 0x80 != 0 {
            s.refuse(&reply::ACCESS_DENIED);
        } else {
            s.greet();
        }
        let mut d = Driver {
            s,
            config,
            flags,
            verdicts,
            turn: 0,
            fed: Vec::new(),
            out: Vec::new(),
            data_start: None,
            spool: Vec::new(),
            closed: false,
        };
        d.take_output();
        d
    }

    fn run(mut self, mut chunks: common::Chunks, stream: &[u8]) {
        let mut offset = 0;
        while offset < stream.len() && !self.closed {
            let n = chunks.next_len().min(stream.len() - offset);
            let chunk = &stream[offset..offset + n];
            offset += n;
            self.fed.extend_from_slice(chunk);
            self.s.receive(chunk);
            self.drive();
        }
        if !self.closed && self.flags & 0x20 != 0 {
            self.s.timeout();
            let before = self.out.len();
            assert_eq!(self.s.poll(), Event::Close);
            self.take_output();
            assert!(self.out[before..].starts_with(b"421 4.4.2 "));
            self.closed = true;
        }
        if self.closed && self.s.is_closed() {
            // After Close nothing more is processed.
            let before = self.out.len();
            self.s.receive(b"MAIL FROM:<a@b.example>\r\nQUIT\r\n");
            assert_eq!(self.s.poll(), Event::Close);
            assert_eq!(self.s.output().len(), 0);
            assert_eq!(self.out.len(), before);
        }
        check_replies(&self.out);
    }

    fn take_output(&mut self) {
        assert!(self.s.output().len() < 64 * 1024, "output not bounded");
        self.out.extend_from_slice(self.s.output());
        self.s.clear_output();
    }

    fn reject_this_one(&mut self) -> bool {
        let bit = self.turn % 7;
        self.turn += 1;
        self.verdicts & (1 << bit) != 0
    }

    fn verdict(&mut self) {
        if self.reject_this_one() {
            self.s.reject(&reply::RELAY_DENIED);
        } else {
            self.s.accept();
        }
    }

    /// Bytes the session has processed.
    fn consumed(&self) -> usize {
        self.fed.len() - self.s.buffered_input()
    }

    fn drive(&mut self) {
        // A poll loop that stops making progress would spin forever in the driver.
        let mut budget = 16 * self.fed.len() + 1000;
        loop {
            budget -= 1;
            assert!(budget > 0, "poll loop does not make progress");
            let event = self.s.poll();
            self.take_output();
            match event {
                Event::NeedInput => return,
                Event::Close => {
                    assert!(self.s.is_closed());
                    self.closed = true;
                    return;
                }
                Event::Flush => {}
                Event::Rejected { reply, .. } => assert!(reply.is_error(), "{reply}"),
                Event::Helo { name, .. } => {
                    assert!(!name.is_empty());
                    self.verdict();
                }
                Event::Mail { .. } => {
                    assert!(self.s.helo().is_some(), "MAIL before EHLO");
                    assert!(self.s.transaction().is_none(), "nested MAIL");
                    assert!(
                        !self.config.require_tls || self.s.is_tls(),
                        "MAIL without TLS"
                    );
                    assert!(
                        !self.config.auth_required || self.s.user().is_some(),
                        "MAIL without AUTH"
                    );
                    self.verdict();
                }
                Event::Rcpt(_) => {
                    let tx = self.s.transaction().expect("RCPT without MAIL");
                    assert!(tx.recipients.len() < self.config.max_recipients);
                    self.verdict();
                }
                Event::DataStart => {
                    let tx = self.s.transaction().expect("DATA without MAIL");
                    assert!(!tx.recipients.is_empty());
                    // DATA ends a pipelined group: nothing may follow it unanswered.
                    assert_eq!(self.s.buffered_input(), 0);
                    if self.reject_this_one() {
                        self.s.reject(&reply::INSUFFICIENT_STORAGE);
                    } else {
                        self.s.accept();
                        assert!(self.s.in_data());
                        self.data_start = Some(self.consumed());
                        self.spool.clear();
                    }
                }
                Event::Auth(_) => {
                    assert!(self.s.is_tls(), "AUTH without TLS");
                    assert!(self.s.user().is_none(), "second AUTH");
                    self.verdict();
                }
                Event::StartTls { .. } => {
                    assert!(!self.s.is_tls());
                    assert!(self.config.starttls);
                    assert_eq!(self.s.buffered_input(), 0, "STARTTLS injection kept");
                    if self.flags & 0x40 != 0 {
                        // Handshake failed: the driver drops the connection.
                        self.closed = true;
                        return;
                    }
                    self.s.tls_started();
                }
                Event::DataChunk => {
                    assert!(self.data_start.is_some());
                    assert!(!self.s.data_chunk().is_empty());
                    self.spool.extend_from_slice(self.s.data_chunk());
                }
                Event::DataEnd => {
                    let reference = self.check_message_end();
                    assert_eq!(reference.fault, None);
                    assert_eq!(self.spool, reference.out, "spooled octets");
                    assert!(self.spool.len() as u64 <= self.config.max_message_size);
                    if self.reject_this_one() {
                        self.s.reject(&reply::INSUFFICIENT_STORAGE);
                    } else {
                        let before = self.out.len();
                        self.s.queued("ID1");
                        self.take_output();
                        assert!(self.out[before..].starts_with(b"250 2.0.0 Ok: queued as ID1\r\n"));
                    }
                    assert!(!self.s.in_data());
                }
                Event::DataRejected(fault) => {
                    let reference = self.check_message_end();
                    assert_eq!(Some(fault), reference.fault);
                    assert!(!self.s.in_data());
                }
            }
        }
    }

    /// The message just ended: the session must have consumed exactly through the first real
    /// `<CRLF>.<CRLF>` after the DATA line, as the reference decoder finds it.
    fn check_message_end(&mut self) -> common::Reference {
        let start = self.data_start.take().expect("end of data without DATA");
        let consumed = self.consumed();
        assert!(
            self.fed[..consumed].ends_with(b"\r\n.\r\n"),
            "DataEnd without terminator"
        );
        let reference = common::reference_decode(&self.fed[start..], self.config.max_message_size);
        assert_eq!(
            reference.end,
            Some(consumed - start),
            "end of data at the wrong place"
        );
        reference
    }
}

/// Everything written is a sequence of well-formed replies: `DDD` then `-` or ` `, printable
/// text, CRLF; a `-` line is continued by a line with the same code.
fn check_replies(out: &[u8]) {
    assert!(
        out.is_empty() || out.ends_with(b"\r\n"),
        "unterminated output"
    );
    let mut continued: Option<&[u8]> = None;
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").expect("line without CRLF");
        assert!(line.len() >= 4, "short reply line {line:?}");
        assert!(line[..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert!((b'2'..=b'5').contains(&line[0]), "{line:?}");
        assert!(
            line[4..].iter().all(|&c| (0x20..0x7f).contains(&c)),
            "{line:?}"
        );
        if let Some(code) = continued {
            assert_eq!(code, &line[..3], "multi-line reply changed code");
        }
        continued = match line[3] {
            b'-' => Some(&line[..3]),
            b' ' => None,
            _ => panic!("bad separator in {line:?}"),
        };
    }
    assert!(continued.is_none(), "unfinished multi-line reply");
}
