//! Whether a message's header section is all ASCII, found while the message streams past.
//!
//! A message whose envelope and header section are ASCII needs no SMTPUTF8 (RFC 6531 §3.4),
//! whatever the client declared: it can go to an upstream without SMTPUTF8, and is sent
//! without the parameter. One with a non-ASCII header section cannot. [`HeaderScan`] is fed
//! the message in chunks of any size (the same octets the spool gets) and stops looking at the
//! end of the header section: the first empty line (RFC 5322 §2.1), or the end of the message
//! when there is none. Constant memory: it keeps no octets.

/// Streaming detector of a non-ASCII octet in the header section.
#[derive(Debug, Clone, Default)]
pub struct HeaderScan {
    /// Octets other than CR seen on the current line.
    line_len: usize,
    /// The empty line that ends the header section was seen.
    done: bool,
    /// A non-ASCII octet was seen in the header section.
    non_ascii: bool,
}

impl HeaderScan {
    /// A scan at the start of a message.
    pub fn new() -> HeaderScan {
        HeaderScan::default()
    }

    /// Look at the next `chunk` of the message (CRLF line endings).
    pub fn push(&mut self, chunk: &[u8]) {
        if self.done {
            return;
        }
        for &b in chunk {
            match b {
                b'\n' if self.line_len == 0 => {
                    self.done = true;
                    return;
                }
                b'\n' => self.line_len = 0,
                b'\r' => {}
                _ => {
                    self.non_ascii |= !b.is_ascii();
                    self.line_len += 1;
                }
            }
        }
    }

    /// True when the header section seen so far has a non-ASCII octet.
    pub fn non_ascii(&self) -> bool {
        self.non_ascii
    }

    /// True once the end of the header section was seen: further octets are the body.
    pub fn done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(parts: &[&[u8]]) -> (bool, bool) {
        let mut s = HeaderScan::new();
        for p in parts {
            s.push(p);
        }
        (s.non_ascii(), s.done())
    }

    #[test]
    fn only_the_header_section_counts_across_any_chunking() {
        let msg = "Subject: caf\u{e9}\r\nTo: a@b\r\n\r\nbody\r\n".as_bytes();
        for cut in 0..msg.len() {
            assert_eq!(scan(&[&msg[..cut], &msg[cut..]]), (true, true), "cut {cut}");
        }
        let body_only = "Subject: x\r\n\r\ncaf\u{e9}\r\n".as_bytes();
        for cut in 0..body_only.len() {
            let (non_ascii, done) = scan(&[&body_only[..cut], &body_only[cut..]]);
            assert!(!non_ascii && done, "cut {cut}");
        }
        // No header section at all: the message starts with the empty line.
        assert_eq!(
            scan(&["\r\nSubject: caf\u{e9}\r\n".as_bytes()]),
            (false, true)
        );
        // A folded field's continuation is still the header section.
        assert_eq!(
            scan(&["Subject: a\r\n \u{e9}\r\n\r\n".as_bytes()]),
            (true, true)
        );
        // A message that is all header section.
        assert_eq!(scan(&["X: \u{e9}".as_bytes()]), (true, false));
    }
}
