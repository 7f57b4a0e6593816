//! Replies from an upstream: parsing multi-line replies and classifying them.

use std::fmt;

/// Longest reply line accepted from an upstream (RFC 5321 allows 512 octets; Exchange stays
/// well below). Longer means a broken or hostile peer.
pub const MAX_REPLY_LINE: usize = 4096;

/// Most lines in one multi-line reply (an EHLO reply has one per extension).
pub const MAX_REPLY_LINES: usize = 128;

/// One complete reply: its code and the text of each line (without code and separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// Text of each line, in order.
    pub lines: Vec<String>,
}

impl Reply {
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

    /// The enhanced status code (RFC 3463) at the start of the first line, if any.
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

    /// The enhanced status code for a delivery status notification: the reply's own, or
    /// `X.0.0` from the basic code.
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
}

impl fmt::Display for Reply {
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

/// What one reply line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    /// False for `NNN-text` (more lines follow).
    pub last: bool,
    pub text: String,
}

/// Parse one reply line (without its line ending).
pub fn parse_line(line: &[u8]) -> Result<ReplyLine, String> {
    let shown = || String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(format!("malformed reply line {:?}", shown()));
    }
    let code = u16::from(line[0] - b'0') * 100
        + u16::from(line[1] - b'0') * 10
        + u16::from(line[2] - b'0');
    if !(200..600).contains(&code) {
        return Err(format!("reply code out of range in {:?}", shown()));
    }
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(format!("malformed reply line {:?}", shown())),
    };
    // Control characters from the peer never reach our logs or bounces. A tab is white
    // space, not a control, to a reader of the reply: kept, so that the DSN's Diagnostic-Code
    // gives the reply back exactly (RFC 3464 §2.3.6).
    let text = String::from_utf8_lossy(text)
        .chars()
        .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
        .collect();
    Ok(ReplyLine { code, last, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> Reply {
        Reply {
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
    }
}
