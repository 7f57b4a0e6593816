//! Command-line framing: CRLF only, bounded length.
//!
//! smtp-proto's own receiver ends a line at a bare LF, which the smuggling rule forbids, so
//! framing is ours. A command line ends only at `<CRLF>`. A line that contains a NUL or a bare
//! CR is refused when its CRLF arrives; a bare LF is refused as soon as it is seen (so a client
//! that sends LF-only lines gets an answer instead of silence) and everything up to the next
//! CRLF is discarded, never executed. A line longer than its limit is refused as soon as the
//! limit is passed and its remainder discarded; a client that sends more than
//! [`MAX_DISCARD`] octets without any line end is disconnected.

/// Octets discarded without a line end before the session is closed.
pub const MAX_DISCARD: usize = 64 * 1024;

/// Limit for AUTH command lines and SASL responses (RFC 4954 §4).
pub const AUTH_LINE_LIMIT: usize = 12288;

/// Result of asking for the next command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Not enough input yet.
    Incomplete,
    /// A well-formed line: the range of its bytes (without CRLF) in the buffer passed in.
    Line { start: usize, end: usize },
    /// A line containing a NUL octet, consumed.
    Nul,
    /// A line containing a bare CR, consumed.
    BareCr,
    /// A bare LF was seen; the rest of its line will be discarded.
    BareLf,
    /// The line passed its limit; the rest will be discarded. `auth` when the AUTH limit was
    /// the one exceeded.
    TooLong { auth: bool },
    /// More than [`MAX_DISCARD`] octets without a line end.
    Flood,
}

/// Framing state carried between reads.
#[derive(Debug, Default)]
pub struct LineFramer {
    /// Discarding until the next CRLF.
    discarding: bool,
    /// Octets discarded since the last line end.
    discarded: usize,
}

/// The limit that applies to a line: `normal`, or [`AUTH_LINE_LIMIT`] for an `AUTH` command
/// (and for every line when `sasl` is set, i.e. a SASL response is expected).
fn limit_for(line: &[u8], normal: usize, sasl: bool) -> (usize, bool) {
    if sasl {
        return (AUTH_LINE_LIMIT, true);
    }
    let is_auth = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ");
    if is_auth {
        (AUTH_LINE_LIMIT.max(normal), true)
    } else {
        (normal, false)
    }
}

impl LineFramer {
    /// Frame the next line from `buf`. Returns the frame and how many octets of `buf` were
    /// consumed. `limit` includes the CRLF.
    pub fn next(&mut self, buf: &[u8], limit: usize, sasl: bool) -> (Frame, usize) {
        let mut consumed = 0;
        if self.discarding {
            let rest = buf;
            match rest.iter().position(|&b| b == b'\n') {
                None => {
                    // Keep a trailing CR: it may pair with an LF in the next read.
                    let keep = usize::from(rest.last() == Some(&b'\r'));
                    let n = rest.len() - keep;
                    self.discarded += n;
                    if self.discarded > MAX_DISCARD {
                        return (Frame::Flood, n);
                    }
                    return (Frame::Incomplete, n);
                }
                Some(p) => {
                    consumed = p + 1;
                    if p > 0 && rest[p - 1] == b'\r' {
                        self.discarding = false;
                        self.discarded = 0;
                    } else {
                        self.discarded += consumed;
                        if self.discarded > MAX_DISCARD {
                            return (Frame::Flood, consumed);
                        }
                        return (Frame::BareLf, consumed);
                    }
                }
            }
        }
        let rest = &buf[consumed..];
        let (limit, auth) = limit_for(rest, limit, sasl);
        let window = &rest[..rest.len().min(limit)];
        match window.iter().position(|&b| b == b'\n') {
            Some(p) => {
                let start = consumed;
                consumed += p + 1;
                if p == 0 || rest[p - 1] != b'\r' {
                    self.discarding = true;
                    self.discarded = 0;
                    return (Frame::BareLf, consumed);
                }
                let line = &rest[..p - 1];
                if line.contains(&0) {
                    return (Frame::Nul, consumed);
                }
                if line.contains(&b'\r') {
                    return (Frame::BareCr, consumed);
                }
                (
                    Frame::Line {
                        start,
                        end: start + p - 1,
                    },
                    consumed,
                )
            }
            None if rest.len() >= limit => {
                // Consume only the window: the line's remainder (and any pipelined lines
                // after it) is handled by the discarding branch above. A trailing CR is kept
                // so that it can pair with the LF that may follow.
                self.discarding = true;
                let keep = usize::from(window.last() == Some(&b'\r'));
                self.discarded = window.len() - keep;
                (Frame::TooLong { auth }, consumed + window.len() - keep)
            }
            None => (Frame::Incomplete, consumed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], limit: usize) -> Vec<Frame> {
        let mut f = LineFramer::default();
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let (frame, n) = f.next(&input[pos..], limit, false);
            let frame = match frame {
                Frame::Line { start, end } => Frame::Line {
                    start: start + pos,
                    end: end + pos,
                },
                other => other,
            };
            pos += n;
            if frame == Frame::Incomplete {
                break;
            }
            out.push(frame);
        }
        out
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], &[Frame])] = &[
            (b"NOOP\r\n", &[Frame::Line { start: 0, end: 4 }]),
            (b"NOOP", &[]),
            (b"NOOP\r", &[]),
            (
                b"A\r\nB\r\n",
                &[
                    Frame::Line { start: 0, end: 1 },
                    Frame::Line { start: 3, end: 4 },
                ],
            ),
            (b"NO\0OP\r\n", &[Frame::Nul]),
            (b"NO\rOP\r\n", &[Frame::BareCr]),
            // A bare LF is refused at once, and the text after it up to the CRLF is dropped.
            (
                b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\r\nNOOP\r\n",
                &[Frame::BareLf, Frame::Line { start: 31, end: 35 }],
            ),
            // LF-only lines: one refusal per line.
            (
                b"EHLO x\nMAIL FROM:<a@b>\n",
                &[Frame::BareLf, Frame::BareLf],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                frames(input, 64),
                *expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn too_long_then_resync() {
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(
            frames(&input, 20),
            vec![
                Frame::TooLong { auth: false },
                Frame::Line {
                    start: 102,
                    end: 106
                }
            ]
        );
        // Exactly at the limit (line + CRLF == limit) is accepted.
        let line = [vec![b'y'; 18], b"\r\n".to_vec()].concat();
        assert_eq!(frames(&line, 20), vec![Frame::Line { start: 0, end: 18 }]);
        let line = [vec![b'y'; 19], b"\r\n".to_vec()].concat();
        assert_eq!(frames(&line, 20)[0], Frame::TooLong { auth: false });
    }

    #[test]
    fn auth_lines_get_the_larger_limit() {
        let mut line = b"AUTH PLAIN ".to_vec();
        line.extend(vec![b'A'; 5000]);
        line.extend_from_slice(b"\r\n");
        assert!(matches!(frames(&line, 1024)[0], Frame::Line { .. }));
        let mut line = b"AUTH PLAIN ".to_vec();
        line.extend(vec![b'A'; 13000]);
        line.extend_from_slice(b"\r\n");
        assert_eq!(frames(&line, 1024)[0], Frame::TooLong { auth: true });
    }

    #[test]
    fn flood_without_line_end_is_detected_across_reads() {
        let mut f = LineFramer::default();
        let chunk = vec![b'z'; 8192];
        let mut flooded = false;
        for _ in 0..20 {
            let mut pos = 0;
            while pos < chunk.len() {
                let (frame, n) = f.next(&chunk[pos..], 1024, false);
                pos += n;
                if frame == Frame::Flood {
                    flooded = true;
                    break;
                }
                if frame == Frame::Incomplete && n == 0 {
                    break;
                }
            }
            if flooded {
                break;
            }
        }
        assert!(flooded);
    }

    #[test]
    fn crlf_split_across_reads_while_discarding() {
        let mut f = LineFramer::default();
        let (frame, _) = f.next(&[b'x'; 30], 20, false);
        assert_eq!(frame, Frame::TooLong { auth: false });
        let (frame, n) = f.next(b"xx\r", 20, false);
        assert_eq!((frame, n), (Frame::Incomplete, 2));
        let (frame, n) = f.next(b"\r\nNOOP\r\n", 20, false);
        assert_eq!((frame, n), (Frame::Line { start: 2, end: 6 }, 8));
    }
}
