//! Replies from an upstream (RFC 5321 §4.2): parsing multi-line replies and classifying them.
//!
//! The upstream is not trusted: a reply line is at most [`MAX_REPLY_LINE`] octets, a reply at
//! most [`MAX_REPLY_LINES`] lines, every line of a reply carries the same code, and control
//! characters never reach a log or a bounce. [`ReplyReader`] assembles one reply from lines
//! and is what the client and the `upstream_reply` fuzz target run.
//!
//! smtp-proto's response parser is not used here: it joins the lines into one string (the
//! EHLO keywords and the DSN need them apart), does not check that every line carries the same
//! code, and reads only one-digit enhanced status subjects and details (RFC 3463 allows up to
//! three, e.g. `5.7.26`).

use std::fmt;

/// Longest reply line accepted from an upstream, in octets without the line ending (RFC 5321
/// §4.5.3.1.5 allows 512; Exchange stays well below). Longer means a broken or hostile peer.
pub const MAX_REPLY_LINE: usize = 4096;

/// Most lines in one multi-line reply (an EHLO reply has one per extension).
pub const MAX_REPLY_LINES: usize = 128;

/// One complete reply from an upstream: its code and the text of each line (without code and
/// separator), as received but for control characters (replaced by a space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamReply {
    /// The three-digit code, 200 to 599.
    pub code: u16,
    /// Text of each line, in order; at least one, at most [`MAX_REPLY_LINES`].
    pub lines: Vec<String>,
}

impl UpstreamReply {
    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx (354 after DATA, 334 during AUTH).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The enhanced status code (RFC 3463 §2, RFC 2034) at the start of the first line, if any.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.lines.first()?;
        let code = first.split(' ').next()?;
        let mut parts = code.split('.');
        let class = parts.next()?;
        let ok = matches!(class, "2" | "4" | "5")
            && parts.clone().count() == 2
            && parts
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(code)
    }

    /// The enhanced status code for a delivery status notification (RFC 3464 §2.3.4): the
    /// reply's own, or `X.0.0` from the basic code.
    pub fn status(&self) -> String {
        match self.enhanced() {
            Some(code) => code.to_owned(),
            None => format!("{}.0.0", self.code / 100),
        }
    }

    /// "Too many recipients" in reply to RCPT (RFC 5321 §4.5.3.1.10): `452` with `4.5.3` or
    /// no enhanced code, and `552` with `5.5.3` or none, which older servers send and the RFC
    /// says to treat as temporary. Other `552`s (`5.2.2` mailbox full, `5.3.4` too big) keep
    /// their permanent meaning.
    pub fn is_too_many_recipients(&self) -> bool {
        matches!(
            (self.code, self.enhanced()),
            (452, None | Some("4.5.3")) | (552, None | Some("5.5.3"))
        )
    }

    /// Exchange (and others) signal "too busy, come back later" with `421` or
    /// `452 4.3.1 Insufficient system resources`: the upstream as a whole is unwell, not this
    /// message. Such replies open the circuit breaker.
    pub fn is_back_pressure(&self) -> bool {
        self.code == 421 || (self.code == 452 && self.enhanced() == Some("4.3.1"))
    }

    /// Parse one complete reply from `bytes`: lines ending in CRLF (or a bare LF), the last
    /// one `NNN text` or `NNN`. Bytes after the last line are an error too. For tests and
    /// fuzzing; the client reads replies from the wire with [`ReplyReader`].
    ///
    /// # Errors
    /// [`GarbledReply`] for anything [`ReplyReader::push_line`] refuses, for a reply that does
    /// not end, and for bytes after its end.
    pub fn parse(bytes: &[u8]) -> Result<UpstreamReply, GarbledReply> {
        let mut reader = ReplyReader::default();
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..end];
            rest = &rest[end + 1..];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(reply) = reader.push_line(line)? {
                return match rest.is_empty() {
                    true => Ok(reply),
                    false => Err(GarbledReply::Trailing),
                };
            }
        }
        match rest.len() > MAX_REPLY_LINE {
            true => Err(GarbledReply::LineTooLong),
            false => Err(GarbledReply::Unfinished),
        }
    }
}

impl fmt::Display for UpstreamReply {
    /// `250 2.6.0 <id> Queued mail for delivery`; continuation lines joined with a space.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        for line in &self.lines {
            if !line.is_empty() {
                write!(f, " {line}")?;
            }
        }
        Ok(())
    }
}

/// Why bytes from an upstream are not a reply. The text is what the log and the queue's
/// `last_error` show after the stage (`MAIL: reply line too long`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GarbledReply {
    /// Not `NNN`, `NNN text` or `NNN-text`; `shown`: the first 80 octets, for the log.
    #[error("malformed reply line {shown:?}")]
    Malformed { shown: String },
    /// A code outside 200–599 (RFC 5321 §4.2.1 defines the classes 2 to 5; 1yz is unused).
    #[error("reply code out of range in {shown:?}")]
    CodeOutOfRange { shown: String },
    /// A continuation line with another code than the first line (RFC 5321 §4.2.1).
    #[error("inconsistent multi-line reply")]
    Inconsistent,
    /// More than [`MAX_REPLY_LINES`] lines in one reply.
    #[error("inconsistent multi-line reply: more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
    /// A line longer than [`MAX_REPLY_LINE`] octets.
    #[error("reply line too long")]
    LineTooLong,
    /// The input ended inside a reply ([`UpstreamReply::parse`] only).
    #[error("reply ends without its last line")]
    Unfinished,
    /// Bytes after the last line of the reply ([`UpstreamReply::parse`] only).
    #[error("data after the last line of a reply")]
    Trailing,
}

/// What one reply line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    /// The three-digit code, 200 to 599.
    pub code: u16,
    /// False for `NNN-text` (more lines follow).
    pub last: bool,
    /// The text after the separator, control characters but tab replaced by a space.
    pub text: String,
}

/// Parse one reply line (without its line ending).
///
/// # Errors
/// [`GarbledReply::Malformed`], [`GarbledReply::CodeOutOfRange`], and
/// [`GarbledReply::LineTooLong`] beyond [`MAX_REPLY_LINE`] octets.
pub fn parse_line(line: &[u8]) -> Result<ReplyLine, GarbledReply> {
    let shown = || String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    if line.len() > MAX_REPLY_LINE {
        return Err(GarbledReply::LineTooLong);
    }
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(GarbledReply::Malformed { shown: shown() });
    }
    let code = u16::from(line[0] - b'0') * 100
        + u16::from(line[1] - b'0') * 10
        + u16::from(line[2] - b'0');
    if !(200..600).contains(&code) {
        return Err(GarbledReply::CodeOutOfRange { shown: shown() });
    }
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(GarbledReply::Malformed { shown: shown() }),
    };
    // Control characters from the peer never reach our logs or bounces. A tab is white
    // space, not a control, to a reader of the reply: kept, so that the DSN's Diagnostic-Code
    // gives the reply back exactly (RFC 3464 §2.3.6). Octets that are not UTF-8 become `?`,
    // not U+FFFD (three octets): the text is never longer than the line it came from, so a
    // reply within the limits stays within them when it is written out again.
    let text = String::from_utf8_lossy(text)
        .chars()
        .map(|c| match c {
            '\u{FFFD}' => '?',
            c if c.is_control() && c != '\t' => ' ',
            c => c,
        })
        .collect();
    Ok(ReplyLine { code, last, text })
}

/// Assembles one reply from its lines, checking that they agree and bounding their number.
#[derive(Debug, Default)]
pub struct ReplyReader {
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyReader {
    /// Take the next line (without its line ending). `Some` when it was the reply's last.
    ///
    /// # Errors
    /// [`GarbledReply`]: what [`parse_line`] refuses, a code other than the first line's
    /// ([`GarbledReply::Inconsistent`]), a line beyond [`MAX_REPLY_LINES`]. The reader is of
    /// no further use then (the connection cannot be trusted to be in step).
    pub fn push_line(&mut self, line: &[u8]) -> Result<Option<UpstreamReply>, GarbledReply> {
        let parsed = parse_line(line)?;
        if self.code.is_some_and(|c| c != parsed.code) {
            return Err(GarbledReply::Inconsistent);
        }
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(GarbledReply::TooManyLines);
        }
        self.code = Some(parsed.code);
        self.lines.push(parsed.text);
        if !parsed.last {
            return Ok(None);
        }
        self.code = None;
        Ok(Some(UpstreamReply {
            code: parsed.code,
            lines: std::mem::take(&mut self.lines),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> UpstreamReply {
        UpstreamReply {
            code,
            lines: vec![text.to_owned()],
        }
    }

    #[test]
    fn reply_text_keeps_tabs_and_trailing_space_but_not_other_controls() {
        let line = parse_line(b"550 5.1.1 a tab\there\x1b[31m\x00 end ").unwrap();
        assert_eq!(line.text, "5.1.1 a tab\there [31m  end ");
        assert!(line.last);
    }

    /// Found by the fuzz target: 4,000 octets of which some are not UTF-8 once grew past
    /// `MAX_REPLY_LINE` as U+FFFD, so the reply written out again did not parse.
    #[test]
    fn octets_that_are_not_utf8_never_make_a_line_longer() {
        let mut raw = b"550 ".to_vec();
        raw.extend(std::iter::repeat_n(0xffu8, MAX_REPLY_LINE - 4));
        let line = parse_line(&raw).unwrap();
        assert_eq!(line.text, "?".repeat(MAX_REPLY_LINE - 4));
        raw.extend(b"\r\n");
        let reply = UpstreamReply::parse(&raw).unwrap();
        let wire = format!("{} {}\r\n", reply.code, reply.lines[0]);
        assert_eq!(UpstreamReply::parse(wire.as_bytes()), Ok(reply));
    }

    #[test]
    fn too_many_recipients_includes_552_5_5_3_and_not_other_552s() {
        let cases = [
            (452, "4.5.3 Too many recipients", true),
            (452, "Too many recipients", true),
            (552, "5.5.3 Too many recipients", true),
            (552, "Too many recipients", true),
            (452, "4.3.1 Insufficient system storage", false),
            (552, "5.2.2 Mailbox full", false),
            (552, "5.3.4 Message too big", false),
            (550, "5.5.3 Too many recipients", false),
        ];
        for (code, text, want) in cases {
            assert_eq!(
                reply(code, text).is_too_many_recipients(),
                want,
                "{code} {text}"
            );
        }
    }

    #[test]
    fn lines_parse_and_reject_garbage() {
        assert_eq!(
            parse_line(b"250-PIPELINING").unwrap(),
            ReplyLine {
                code: 250,
                last: false,
                text: "PIPELINING".into()
            }
        );
        assert!(parse_line(b"250 2.0.0 Ok").unwrap().last);
        assert!(parse_line(b"354").unwrap().last);
        for bad in [&b"25"[..], b"abc ok", b"250xok", b"999 no", b"099 no"] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_line(b"550 a\x1bb").unwrap().text, "a b");
    }

    #[test]
    fn classification() {
        let exchange = reply(250, "2.6.0 <a@b> Queued mail for delivery");
        assert!(exchange.is_positive());
        assert_eq!(exchange.enhanced(), Some("2.6.0"));
        assert_eq!(
            exchange.to_string(),
            "250 2.6.0 <a@b> Queued mail for delivery"
        );
        assert!(reply(421, "4.3.2 Service not available").is_back_pressure());
        assert!(reply(452, "4.3.1 Insufficient system resources").is_back_pressure());
        assert!(!reply(452, "4.5.3 Too many recipients").is_back_pressure());
        assert_eq!(reply(550, "no such user").status(), "5.0.0");
        assert_eq!(reply(550, "5.1.1 unknown").status(), "5.1.1");
        assert_eq!(reply(550, "5.1 x").enhanced(), None);
        assert_eq!(reply(550, "5.7.26 unauthenticated").status(), "5.7.26");
    }

    /// Each way an upstream can garble a reply, as a table: the parse keeps the lines and
    /// codes apart and refuses what RFC 5321 §4.2.1 does not allow.
    #[test]
    fn whole_replies_parse_and_garbled_ones_are_refused_by_kind() {
        let ok = UpstreamReply::parse(b"550-5.1.1 first\r\n550-5.1.1 second\n550 5.1.1 third\r\n");
        assert_eq!(
            ok,
            Ok(UpstreamReply {
                code: 550,
                lines: vec![
                    "5.1.1 first".into(),
                    "5.1.1 second".into(),
                    "5.1.1 third".into()
                ],
            })
        );
        let many = "250-x\r\n".repeat(MAX_REPLY_LINES) + "250 y\r\n";
        let exactly = "250-x\r\n".repeat(MAX_REPLY_LINES - 1) + "250 y\r\n";
        let long = format!("250 {}\r\n", "x".repeat(MAX_REPLY_LINE));
        let cases: [(&[u8], GarbledReply); 7] = [
            (b"250-a\r\n251 b\r\n", GarbledReply::Inconsistent),
            (many.as_bytes(), GarbledReply::TooManyLines),
            (long.as_bytes(), GarbledReply::LineTooLong),
            (b"250-a\r\n250-b\r\n", GarbledReply::Unfinished),
            (b"250 a\r\n250 b\r\n", GarbledReply::Trailing),
            (
                b"25x a\r\n",
                GarbledReply::Malformed {
                    shown: "25x a".into(),
                },
            ),
            (
                b"199 a\r\n",
                GarbledReply::CodeOutOfRange {
                    shown: "199 a".into(),
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                UpstreamReply::parse(bytes),
                Err(want),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_eq!(
            UpstreamReply::parse(exactly.as_bytes()).map(|r| r.lines.len()),
            Ok(MAX_REPLY_LINES)
        );
    }
}
