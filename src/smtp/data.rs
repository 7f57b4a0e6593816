//! The DATA phase: dot-unstuffing, end-of-data detection and the smuggling rule.
//!
//! End of data is only `<CRLF>.<CRLF>` (RFC 5321 §4.1.1.4), where the first CRLF may be the
//! one that ended the DATA command. A bare LF or a bare CR never ends a line here, so
//! `<LF>.<LF>`, `<LF>.<CRLF>`, `<CRLF>.<LF>`, `<CR>.<CR>` and friends are ordinary
//! message bytes: they can never end the message early and let the rest be read as commands
//! (the 2023 "SMTP smuggling" advisories). A message that contains any bare CR is read to its
//! real end and then refused with `550 5.5.2`. A bare LF is refused the same way, unless the
//! decoder was made with [`DataDecoder::normalizing`] (the listener's `bare_lf`): then it is
//! stored as CRLF, so no server downstream can read the stored bytes differently, and the
//! relay dot-stuffs the stored lines again when it sends them on. Real submission clients
//! (Python's smtplib, curl) send LF-only messages; Postfix calls this
//! `smtpd_forbid_bare_newline = normalize`.
//!
//! After a bare LF, a line that starts with `..` loses one dot (the client stuffed it, as
//! smtplib does); a single dot is kept, since it was not stuffing: `<LF>.<CRLF>` is the line
//! `.`, never the end of the message.
//!
//! The decoder only counts bytes past `max_size`; it never buffers a whole message.

/// Why a message is refused after it has been read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFault {
    /// Contained a bare CR or LF.
    BareLineEnding,
    /// Exceeded the size limit.
    TooBig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    /// At the start of a line (after CRLF).
    LineStart,
    /// After a `.` at the start of a line.
    Dot,
    /// After `<CRLF>.<CR>`.
    DotCr,
    /// Inside a line.
    Text,
    /// After a CR inside a line.
    Cr,
    /// At the start of a line after a bare LF that was normalised to CRLF.
    LfLineStart,
    /// After a `.` at the start of such a line.
    LfDot,
}

/// Streaming decoder for one message body.
#[derive(Debug)]
pub struct DataDecoder {
    pos: Pos,
    max_size: u64,
    /// Decoded octets so far (including those past the limit, which are discarded).
    size: u64,
    bare_line_ending: bool,
    /// Store a bare LF as CRLF instead of refusing the message.
    normalize_lf: bool,
}

/// What one call to [`DataDecoder::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes consumed.
    pub consumed: usize,
    /// True when `<CRLF>.<CRLF>` was reached; `consumed` includes it.
    pub finished: bool,
}

impl DataDecoder {
    /// A decoder positioned just after the CRLF of the DATA command, that refuses a message
    /// with a bare CR or LF. `max_size` in octets, as decoded.
    pub fn new(max_size: u64) -> Self {
        DataDecoder {
            pos: Pos::LineStart,
            max_size,
            size: 0,
            bare_line_ending: false,
            normalize_lf: false,
        }
    }

    /// Like [`DataDecoder::new`], but a bare LF is stored as CRLF (see the module docs). A
    /// bare CR is still refused, and the end is still only `<CRLF>.<CRLF>`.
    pub fn normalizing(max_size: u64) -> Self {
        DataDecoder {
            normalize_lf: true,
            ..DataDecoder::new(max_size)
        }
    }

    /// Decoded size so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The fault to report once the end has been reached, if any. Bare line endings take
    /// precedence: they are the more serious finding.
    pub fn fault(&self) -> Option<DataFault> {
        if self.bare_line_ending {
            Some(DataFault::BareLineEnding)
        } else if self.size > self.max_size {
            Some(DataFault::TooBig)
        } else {
            None
        }
    }

    /// Decode `input`, appending message octets to `out` (until the size limit is passed, after
    /// which they are only counted). Stops right after the end-of-data marker.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Decoded {
        let mut i = 0;
        while i < input.len() {
            match self.pos {
                Pos::Text => {
                    // Fast path: copy a run of ordinary bytes.
                    let run = input[i..]
                        .iter()
                        .position(|&b| b == b'\r' || b == b'\n')
                        .unwrap_or(input.len() - i);
                    self.emit(&input[i..i + run], out);
                    i += run;
                    if i < input.len() {
                        if input[i] == b'\r' {
                            self.pos = Pos::Cr;
                        } else {
                            self.bare_lf(out);
                        }
                        i += 1;
                    }
                }
                Pos::LineStart => {
                    if input[i] == b'.' {
                        self.pos = Pos::Dot;
                        i += 1;
                    } else {
                        self.pos = Pos::Text;
                    }
                }
                Pos::Dot => {
                    if input[i] == b'\r' {
                        self.pos = Pos::DotCr;
                        i += 1;
                    } else {
                        // A stuffed dot: drop it, the rest of the line is text.
                        self.pos = Pos::Text;
                    }
                }
                Pos::DotCr => {
                    if input[i] == b'\n' {
                        return Decoded {
                            consumed: i + 1,
                            finished: true,
                        };
                    }
                    // `.<CR>` not followed by LF: the dot was stuffing, the CR is bare.
                    self.bare_line_ending = true;
                    self.emit(b"\r", out);
                    self.pos = Pos::Text;
                }
                Pos::LfLineStart => {
                    if input[i] == b'.' {
                        self.pos = Pos::LfDot;
                        i += 1;
                    } else {
                        self.pos = Pos::Text;
                    }
                }
                Pos::LfDot => {
                    // `..`: a stuffed dot, one is dropped. Anything else: the dot was text
                    // (a CR here can only start a line end, never the end of the message).
                    self.emit(b".", out);
                    if input[i] == b'.' {
                        i += 1;
                    }
                    self.pos = Pos::Text;
                }
                Pos::Cr => {
                    if input[i] == b'\n' {
                        self.emit(b"\r\n", out);
                        self.pos = Pos::LineStart;
                        i += 1;
                    } else {
                        self.bare_line_ending = true;
                        self.emit(b"\r", out);
                        self.pos = Pos::Text;
                    }
                }
            }
        }
        Decoded {
            consumed: input.len(),
            finished: false,
        }
    }

    /// A bare LF inside the message: stored as CRLF when normalising, else kept as it is and
    /// the message marked as refused.
    fn bare_lf(&mut self, out: &mut Vec<u8>) {
        if self.normalize_lf {
            self.emit(b"\r\n", out);
            self.pos = Pos::LfLineStart;
        } else {
            self.bare_line_ending = true;
            self.emit(b"\n", out);
        }
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let before = self.size;
        self.size += bytes.len() as u64;
        if before >= self.max_size {
            return;
        }
        let room = (self.max_size - before).min(bytes.len() as u64) as usize;
        out.extend_from_slice(&bytes[..room]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `input` fed in pieces of `step` bytes; return (message, consumed, fault).
    fn run(input: &[u8], step: usize, max: u64) -> (Vec<u8>, Option<usize>, Option<DataFault>) {
        let mut d = DataDecoder::new(max);
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < input.len() {
            let end = (offset + step).min(input.len());
            let r = d.decode(&input[offset..end], &mut out);
            offset += r.consumed;
            if r.finished {
                return (out, Some(offset), d.fault());
            }
            assert_eq!(r.consumed, end - (offset - r.consumed));
        }
        (out, None, d.fault())
    }

    #[test]
    fn plain_message_and_unstuffing() {
        for step in [1, 2, 3, 7, 1000] {
            let (msg, end, fault) = run(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n", step, 1000);
            assert_eq!(msg, b"Subject: x\r\n\r\n.dot\r\n", "step {step}");
            assert_eq!(end, Some(24), "step {step}");
            assert_eq!(fault, None);
        }
    }

    #[test]
    fn empty_message() {
        let (msg, end, fault) = run(b".\r\n", 1, 10);
        assert!(msg.is_empty());
        assert_eq!(end, Some(3));
        assert_eq!(fault, None);
    }

    /// Every line-ending variant from the 2023 SMTP smuggling advisories: none of them may end
    /// the message, and the message must be refused once it does end.
    #[test]
    fn smuggling_variants_never_end_data() {
        let variants: &[&[u8]] = &[
            b"\n.\n",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\n.\r",
            b"\r.\n",
            b"\r\n\x00.\r\n",
        ];
        for v in variants {
            let mut input = b"Subject: a\r\n\r\nbody".to_vec();
            input.extend_from_slice(v);
            input.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nsmuggled\r\n");
            // Without a real terminator the decoder must still be waiting.
            for step in [1, 4, 4096] {
                let (_, end, _) = run(&input, step, 1 << 20);
                assert_eq!(end, None, "variant {v:?} ended the message (step {step})");
            }
            input.extend_from_slice(b".\r\n");
            let (_, end, fault) = run(&input, 3, 1 << 20);
            assert_eq!(end, Some(input.len()), "variant {v:?}");
            if !v.contains(&0) {
                assert_eq!(fault, Some(DataFault::BareLineEnding), "variant {v:?}");
            }
        }
    }

    /// Like `run`, with a normalising decoder.
    fn run_normalizing(input: &[u8], step: usize) -> (Vec<u8>, Option<usize>, Option<DataFault>) {
        let mut d = DataDecoder::normalizing(1 << 20);
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < input.len() {
            let end = (offset + step).min(input.len());
            let r = d.decode(&input[offset..end], &mut out);
            offset += r.consumed;
            if r.finished {
                return (out, Some(offset), d.fault());
            }
        }
        (out, None, d.fault())
    }

    fn has_bare_lf(bytes: &[u8]) -> bool {
        bytes
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
    }

    /// Normalising changes what a bare LF means inside the message, never where it ends: every
    /// smuggling variant is still message text; a bare CR is still refused.
    #[test]
    fn normalizing_smuggling_variants_never_end_data_and_bare_cr_is_still_refused() {
        let variants: &[&[u8]] = &[
            b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n",
        ];
        for v in variants {
            let mut input = b"Subject: a\r\n\r\nbody".to_vec();
            input.extend_from_slice(v);
            input.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nsmuggled\r\n");
            for step in [1, 4, 4096] {
                let (_, end, _) = run_normalizing(&input, step);
                assert_eq!(end, None, "variant {v:?} ended the message (step {step})");
            }
            input.extend_from_slice(b".\r\n");
            for step in [1, 3, 4096] {
                let (msg, end, fault) = run_normalizing(&input, step);
                assert_eq!(end, Some(input.len()), "variant {v:?}");
                let bare_cr = v.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n')
                    || v.last() == Some(&b'\r');
                if bare_cr {
                    assert_eq!(fault, Some(DataFault::BareLineEnding), "variant {v:?}");
                } else {
                    assert_eq!(fault, None, "variant {v:?}");
                    assert!(!has_bare_lf(&msg), "variant {v:?}: {msg:?}");
                    assert!(contains_smuggled(&msg), "variant {v:?}");
                }
            }
        }
    }

    fn contains_smuggled(msg: &[u8]) -> bool {
        msg.windows(18).any(|w| w == b"MAIL FROM:<evil@x>")
    }

    #[test]
    fn normalizing_stores_lf_lines_as_crlf_and_unstuffs_only_doubled_dots() {
        // What smtplib.sendmail sends for an LF-only message: periods doubled after LF, CRLF
        // added before the terminator.
        let input = b"Subject: x\n\nline\n..dot\n.\n..\nend\n\r\n.\r\n";
        for step in [1, 2, 5, 4096] {
            let (msg, end, fault) = run_normalizing(input, step);
            assert_eq!(end, Some(input.len()));
            assert_eq!(fault, None);
            assert_eq!(
                msg, b"Subject: x\r\n\r\nline\r\n.dot\r\n.\r\n.\r\nend\r\n\r\n",
                "step {step}"
            );
        }
        // CRLF lines are unstuffed as always.
        let (msg, _, _) = run_normalizing(b"a\r\n..b\r\n.\r\n", 1);
        assert_eq!(msg, b"a\r\n.b\r\n");
    }

    #[test]
    fn bare_lf_inside_text_is_a_fault() {
        let (_, end, fault) = run(b"a\nb\r\n.\r\n", 1, 100);
        assert_eq!(end, Some(8));
        assert_eq!(fault, Some(DataFault::BareLineEnding));
    }

    #[test]
    fn size_limit_counts_but_does_not_store() {
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b"\r\n.\r\n");
        let (msg, end, fault) = run(&input, 9, 50);
        assert_eq!(msg.len(), 50);
        assert_eq!(end, Some(input.len()));
        assert_eq!(fault, Some(DataFault::TooBig));
        // Exactly at the limit is fine.
        let (msg, _, fault) = run(b"12345678\r\n.\r\n", 5, 10);
        assert_eq!(msg, b"12345678\r\n");
        assert_eq!(fault, None);
    }

    #[test]
    fn dot_line_in_middle_is_unstuffed_not_end() {
        let (msg, end, _) = run(b"a\r\n..\r\nb\r\n.\r\n", 1, 100);
        assert_eq!(msg, b"a\r\n.\r\nb\r\n");
        assert_eq!(end, Some(13));
    }
}
