//! Helpers shared by the fuzz targets.

#![allow(dead_code)]

use portcullis::smtp::DataFault;
use portcullis::smtp::upstream_reply::UpstreamReply;

/// Deterministic chunk sizes from one seed byte: the low bits pick the size range (from
/// byte-at-a-time to large reads), the rest seed a small xorshift.
pub struct Chunks {
    state: u32,
    cap: usize,
}

impl Chunks {
    pub fn new(seed: u8) -> Chunks {
        Chunks {
            state: u32::from(seed).wrapping_mul(0x9E37_79B9) | 1,
            cap: [1, 2, 3, 7, 16, 64, 512, 8192][usize::from(seed & 7)],
        }
    }

    pub fn next_len(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        1 + self.state as usize % self.cap
    }
}

/// What the reference decoder found.
#[derive(Debug, PartialEq, Eq)]
pub struct Reference {
    /// Decoded octets, truncated at the size limit.
    pub out: Vec<u8>,
    /// Octets consumed through `<CRLF>.<CRLF>`, if it was reached.
    pub end: Option<usize>,
    /// Decoded size, counting octets past the limit.
    pub size: u64,
    /// The fault, once the end is reached.
    pub fault: Option<DataFault>,
}

/// A naive RFC 5321 §4.5.2 decoder over the whole input (the stream after `DATA<CRLF>`):
/// only `<CRLF>.<CRLF>` ends the message; a leading dot is removed; a CR not followed by LF
/// and an LF not preceded by CR are bare line endings (kept as octets, and a fault). A CR at
/// the very end of an unfinished input is not yet decided and not yet emitted.
pub fn reference_decode(input: &[u8], max: u64) -> Reference {
    let mut decoded = Vec::new();
    let mut bare = false;
    let mut end = None;
    let mut i = 0;
    let mut line_start = true;
    while i < input.len() {
        if line_start {
            line_start = false;
            if input[i] == b'.' {
                if input[i..].starts_with(b".\r\n") {
                    end = Some(i + 3);
                    break;
                }
                // Dot-stuffing: drop it (a lone "." or ".\r" at the end of input is pending).
                i += 1;
                continue;
            }
        }
        match input[i] {
            b'\r' if i + 1 == input.len() => break, // undecided
            b'\r' if input[i + 1] == b'\n' => {
                decoded.extend_from_slice(b"\r\n");
                i += 2;
                line_start = true;
            }
            b'\r' | b'\n' => {
                bare = true;
                decoded.push(input[i]);
                i += 1;
            }
            b => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let size = decoded.len() as u64;
    let fault = if bare {
        Some(DataFault::BareLineEnding)
    } else if size > max {
        Some(DataFault::TooBig)
    } else {
        None
    };
    decoded.truncate(
        usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(decoded.len()),
    );
    Reference {
        out: decoded,
        end,
        size,
        fault,
    }
}

/// `reply` as an upstream sends it: `CODE-text` lines, the last `CODE text`, each ending in
/// CRLF (RFC 5321 §4.2.1).
pub fn wire(reply: &UpstreamReply) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, line) in reply.lines.iter().enumerate() {
        let sep = if i + 1 == reply.lines.len() { ' ' } else { '-' };
        out.extend_from_slice(format!("{}{sep}{line}\r\n", reply.code).as_bytes());
    }
    out
}
