//! Delivery status notifications (RFC 3464 bounces): pure construction, and [`enqueue`],
//! which commits one to the spool.
//!
//! When recipients fail permanently or a message expires, the relay tells the envelope sender
//! with a DSN sent from the null sender `<>`: [`build_dsn`] makes the message, and
//! [`bounce_envelope`] its envelope; the relay queues both with [`Spool::enqueue`]. No DSN is
//! ever built for a message whose own sender is `<>` (a bounce of a bounce could loop between
//! two relays forever); both functions return `None` then.
//!
//! The message is `multipart/report; report-type=delivery-status` (RFC 6522) with three parts:
//! a plain-text explanation, the `message/delivery-status` fields, and the original header
//! section as `text/rfc822-headers`, capped at [`MAX_RETURNED_HEADERS`] and cut between two
//! header fields, never inside one. The body of the original message is not returned: it is
//! what the sender already has, and returning it would double the traffic of a spam run's
//! bounces.
//!
//! Output guarantees, whatever the input (upstream replies and original headers are untrusted):
//! CRLF line endings only (no bare CR or LF), every line at most [`MAX_LINE`] octets, the MIME
//! boundary absent from every part. Text from upstream replies is reduced to printable ASCII.
//! When an address or the original headers are UTF-8, the parts use the RFC 6533 types
//! (`message/global-delivery-status`, `message/global-headers`), quoted-printable (RFC 6533
//! §6 requires a transfer encoding on a 7-bit path, and the path of a DSN is not known when
//! it is built); the text part then shows the address as it is, `charset=utf-8` and
//! quoted-printable. So a DSN is 7-bit and needs neither 8BITMIME nor SMTPUTF8, unless the
//! address it goes to (the `To:` field and the forward-path) is itself UTF-8. Long fields are
//! folded before white space, so that unfolding gives back the text unchanged.
//!
//! [`Spool::enqueue`]: super::Spool::enqueue

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use super::schedule::FailedRcpt;
use super::{Spool, SpoolError};
use crate::envelope::{
    Address, Body, Envelope, MailParams, QueueId, Recipient, ReversePath, unix_now,
};
use crate::smtp::upstream_reply::UpstreamReply;

/// Most octets of the original header section returned in a DSN (8 KiB, cut between two
/// header fields). Enough for the trace and the fields a sender needs to recognise the
/// message; small enough that a DSN to a forged sender carries little of a stranger's
/// content (RFC 3464 §5 leaves the amount returned to the reporting MTA).
pub const MAX_RETURNED_HEADERS: usize = 8 * 1024;

/// Longest line of a DSN, without its CRLF (RFC 5322 §2.1.1 allows 998).
pub const MAX_LINE: usize = 998;

/// Most characters of one diagnostic text kept (upstream replies can be long multi-line
/// texts; the first kilobyte says what went wrong).
pub const MAX_DIAGNOSTIC: usize = 1024;

/// The header field of a part sent quoted-printable.
const QP_HEADER: &str = "Content-Transfer-Encoding: quoted-printable\r\n";

/// Width at which long DSN fields are folded.
const FOLD_WIDTH: usize = 76;

/// Listener name recorded in the envelope of bounces the relay makes itself.
pub const BOUNCE_LISTENER: &str = "bounce";

/// Why a recipient failed, as written in its `Diagnostic-Code` (RFC 3464 §2.3.6). Decided
/// where the failure is known: the upstream client's reply as received, or our reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnostic {
    /// The upstream's SMTP reply, e.g. `550 5.1.1 <x@example.com>: user unknown`
    /// (`Diagnostic-Code: smtp; …`), its lines joined with a space.
    Smtp(UpstreamReply),
    /// A reason of our own, e.g. `message expired after 5d` (`Diagnostic-Code: X-Portcullis; …`).
    Local(String),
}

impl std::fmt::Display for Diagnostic {
    /// The reply (`550 5.1.1 …`, continuation lines joined with a space) or our reason.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Diagnostic::Smtp(reply) => reply.fmt(f),
            Diagnostic::Local(text) => f.write_str(text),
        }
    }
}

/// `Diagnostic::Smtp` of a reply as one line: the code, then the text as it stands (hostile
/// text included, to test what the builder makes of it). For tests only.
#[cfg(test)]
pub(crate) fn smtp(text: &str) -> Diagnostic {
    let (code, rest) = text.split_at(3);
    Diagnostic::Smtp(UpstreamReply {
        code: code.parse().unwrap(),
        lines: vec![rest.strip_prefix(' ').unwrap_or(rest).to_owned()],
    })
}

/// Everything a DSN says.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    /// Our host name (`server.hostname`): `Reporting-MTA` and the `MAILER-DAEMON` domain.
    pub reporting_host: &'a str,
    /// The envelope of the message that failed (sender, arrival time, queue id).
    pub original: &'a Envelope,
    /// The recipients that failed (at least one).
    pub failed: &'a [FailedRcpt],
    /// The start of the original message; its header section is returned, capped at
    /// [`MAX_RETURNED_HEADERS`]. Giving the first `MAX_RETURNED_HEADERS + 2` bytes or more is
    /// enough.
    pub original_head: &'a [u8],
    /// Now, in seconds since the Unix epoch (the `Date` of the DSN).
    pub now: u64,
}

/// The complete DSN message (CRLF line endings, not dot-stuffed), or `None` when the original
/// sender is `<>` or no recipient failed.
pub fn build_dsn(input: &DsnInput<'_>) -> Option<Vec<u8>> {
    let sender = input.original.mail_from.address()?;
    if input.failed.is_empty() {
        return None;
    }
    let host = ascii_token(input.reporting_host);
    let parts = Parts::encode(input, &host, sender.is_utf8());
    let boundary = parts.boundary(&input.original.id, input.now, &host);
    let mut out =
        Vec::with_capacity(parts.text.len() + parts.status.len() + parts.headers.len() + 1024);
    out.extend_from_slice(parts.head(input, &host, sender, &boundary).as_bytes());
    out.extend_from_slice(&parts.headers);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Some(out)
}

/// The three parts of a DSN, each encoded for a 7-bit path, with the MIME fields that say how.
struct Parts {
    /// `charset=` value of the text part, with its transfer encoding field when one is needed.
    text_charset: &'static str,
    text: String,
    /// RFC 6533 `message/global-delivery-status` (a UTF-8 address is reported).
    utf8_status: bool,
    status_cte: &'static str,
    status: String,
    /// RFC 6533 `message/global-headers` (the returned header section is UTF-8).
    utf8_headers: bool,
    headers_cte: &'static str,
    headers: Vec<u8>,
}

impl Parts {
    fn encode(input: &DsnInput<'_>, host: &str, sender_utf8: bool) -> Parts {
        let text = human_part(host, input.failed);
        // RFC 2045/2046: a text part that needs more than ASCII (a UTF-8 address) says so and
        // is quoted-printable, so it stays 7-bit and crosses any path.
        let (text_charset, text) = if text.is_ascii() {
            ("us-ascii\r\n", text)
        } else {
            (
                "utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n",
                quoted_printable(text.as_bytes()),
            )
        };
        let utf8_status = sender_utf8 || input.failed.iter().any(|f| f.address.is_utf8());
        let status = status_part(host, input.original.received_at, input.failed);
        let headers = returned_headers(input.original_head);
        let utf8_headers = !headers.is_ascii();
        // RFC 6533 §6.1/§6.3: the global types "will typically contain octets with the 8th
        // bit set. As a result a transfer encoding is required when a 7-bit transport is
        // used." The DSN's path is not known here (and may be 7-bit: an upstream without
        // 8BITMIME), and a DSN that cannot be delivered is lost for good (its sender is <>),
        // so a part with 8-bit octets is always quoted-printable: the DSN stays 7-bit, and
        // the ASCII of the fields stays readable.
        let (status_cte, status) = if status.is_ascii() {
            ("", status)
        } else {
            (QP_HEADER, quoted_printable(status.as_bytes()))
        };
        let (headers_cte, headers) = if headers.is_ascii() {
            ("", headers)
        } else {
            (QP_HEADER, quoted_printable(&headers).into_bytes())
        };
        Parts {
            text_charset,
            text,
            utf8_status,
            status_cte,
            status,
            utf8_headers,
            headers_cte,
            headers,
        }
    }

    /// A MIME boundary found in no part.
    fn boundary(&self, id: &QueueId, now: u64, host: &str) -> String {
        let mut boundary = format!("{id}.{now}/{host}");
        while [self.text.as_bytes(), self.status.as_bytes(), &self.headers]
            .iter()
            .any(|part| contains(part, boundary.as_bytes()))
        {
            boundary.push('=');
        }
        boundary
    }

    /// Everything up to the returned header section: the DSN's header, the text and status
    /// parts, and the header of the third part.
    fn head(&self, input: &DsnInput<'_>, host: &str, sender: &Address, boundary: &str) -> String {
        let mut head = String::new();
        let _ = write!(
            head,
            "From: \"Mail Delivery System\" <MAILER-DAEMON@{host}>\r\n\
             To: <{sender}>\r\n\
             Subject: Undelivered Mail Returned to Sender\r\n\
             Date: {date}\r\n\
             Message-ID: <{now}.{id}.dsn@{host}>\r\n\
             Auto-Submitted: auto-replied\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status;\r\n\
             \tboundary=\"{boundary}\"\r\n\
             \r\n\
             This is a MIME-encapsulated message.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Type: text/plain; charset={text_charset}\
             Content-Description: Notification\r\n\
             \r\n\
             {text}\
             \r\n\
             --{boundary}\r\n\
             Content-Type: message/{status_type}\r\n\
             {status_cte}\
             Content-Description: Delivery report\r\n\
             \r\n\
             {status}\
             \r\n\
             --{boundary}\r\n\
             Content-Type: {headers_type}\r\n\
             {headers_cte}\
             Content-Description: Undelivered message headers\r\n\
             \r\n",
            sender = header_safe(&sender.to_string()),
            date = rfc5322_date(input.now),
            now = input.now,
            id = input.original.id,
            text_charset = self.text_charset,
            text = self.text,
            status_cte = self.status_cte,
            status = self.status,
            headers_cte = self.headers_cte,
            status_type = if self.utf8_status {
                "global-delivery-status"
            } else {
                "delivery-status"
            },
            headers_type = if self.utf8_headers {
                "message/global-headers"
            } else {
                "text/rfc822-headers"
            },
        );
        head
    }
}

/// The envelope of the DSN `dsn` for `original`: from `<>` to the original sender, received
/// now on the [`BOUNCE_LISTENER`] from 127.0.0.1. `None` when the original sender is `<>`.
/// BODY=8BITMIME when the DSN has 8-bit octets (only a UTF-8 `To:` can put them there: the
/// parts are 7-bit); SMTPUTF8 when the sender's address needs it (RFC 6531 §3.4).
pub fn bounce_envelope(
    original: &Envelope,
    dsn: &[u8],
    reporting_host: &str,
    now: u64,
) -> Option<Envelope> {
    let sender = original.mail_from.address()?;
    Some(Envelope {
        id: QueueId::generate(),
        received_at: now,
        listener: BOUNCE_LISTENER.to_string(),
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        client_port: 0,
        helo: ascii_token(reporting_host),
        tls: None,
        auth_user: None,
        mail_from: ReversePath::Null,
        mail_params: MailParams {
            body: (!dsn.is_ascii()).then_some(Body::EightBitMime),
            smtputf8: sender.is_utf8(),
            size: Some(dsn.len() as u64),
        },
        recipients: vec![Recipient::new(sender.clone())],
    })
}

/// Build the bounce for the `failed` recipients of `original` and commit it to the spool
/// (fsync and all, like any accepted message); returns its id. Blocking: run it in
/// `spawn_blocking`. Errors: those of the spool, and [`SpoolError::Corrupt`] when no DSN can
/// be built (the sender is `<>`: check with [`super::schedule::bounce_decision`] first).
pub fn enqueue(
    spool: &Spool,
    reporting_host: &str,
    original: &Envelope,
    failed: &[FailedRcpt],
) -> Result<QueueId, SpoolError> {
    let head = spool.read_message_head(&original.id, MAX_RETURNED_HEADERS as u64 + 2)?;
    let now = unix_now();
    let input = DsnInput {
        reporting_host,
        original,
        failed,
        original_head: &head,
        now,
    };
    let not_bounceable = || SpoolError::Corrupt {
        path: spool.root().to_path_buf(),
        reason: format!("no bounce can be built for {} (sender <>)", original.id),
    };
    let dsn = build_dsn(&input).ok_or_else(not_bounceable)?;
    let envelope =
        bounce_envelope(original, &dsn, reporting_host, now).ok_or_else(not_bounceable)?;
    spool.enqueue(&envelope, &dsn)
}

/// The text/plain part: which recipients failed and why, wrapped at 76 columns.
fn human_part(host: &str, failed: &[FailedRcpt]) -> String {
    let mut out = format!(
        "This is the mail system at host {host}.\r\n\
         \r\n\
         Your message could not be delivered to one or more recipients.\r\n\
         It is attached below (headers only).\r\n\
         \r\n\
         For further assistance, please contact your postmaster and include\r\n\
         this report.\r\n\
         \r\n"
    );
    for f in failed {
        // The address as it is (a validated address has no controls), UTF-8 included: the
        // part is then sent as UTF-8 quoted-printable. Upstream text stays printable ASCII.
        // The address is one piece, never broken or respaced: a quoted local part may hold
        // spaces (`"a  b"@example.com`) and must read exactly as it was written.
        let address = format!("<{}>:", header_safe(&f.address.to_string()));
        for piece in fold(
            &address,
            &diagnostic_text(&f.diagnostic),
            FOLD_WIDTH,
            "    ",
        ) {
            out.push_str(&piece);
            out.push_str("\r\n");
        }
    }
    out
}

/// The delivery-status part: per-message fields, then one block per recipient.
fn status_part(host: &str, arrival: u64, failed: &[FailedRcpt]) -> String {
    let mut out = format!(
        "Reporting-MTA: dns; {host}\r\nArrival-Date: {}\r\n",
        rfc5322_date(arrival)
    );
    for f in failed {
        let addr = f.address.to_string();
        let addr_type = if f.address.is_utf8() {
            "utf-8"
        } else {
            "rfc822"
        };
        let _ = write!(
            out,
            "\r\nFinal-Recipient: {addr_type}; {}\r\nAction: failed\r\nStatus: {}\r\n",
            header_safe(&addr),
            status_code(&f.status)
        );
        if let Some(mta) = &f.upstream {
            let _ = write!(out, "Remote-MTA: dns; {}\r\n", ascii_token(mta));
        }
        let kind = match &f.diagnostic {
            Diagnostic::Smtp(_) => "smtp",
            Diagnostic::Local(_) => "X-Portcullis",
        };
        let text = f.diagnostic.to_string();
        let field = format!("Diagnostic-Code: {kind}; {}", printable_ascii(&text));
        for piece in fold_field(&field, FOLD_WIDTH) {
            out.push_str(&piece);
            out.push_str("\r\n");
        }
    }
    out
}

fn diagnostic_text(d: &Diagnostic) -> String {
    match d {
        Diagnostic::Smtp(reply) => format!(
            "the upstream server said: {}",
            printable_ascii(&reply.to_string())
        ),
        Diagnostic::Local(t) => printable_ascii(t),
    }
}

/// `status` if it is an RFC 3463 code of class 4 or 5, else `5.0.0`.
fn status_code(status: &str) -> &str {
    let parts: Vec<&str> = status.split('.').collect();
    let number = |p: &str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        ["4" | "5", subject, detail] if number(subject) && number(detail) => status,
        _ => "5.0.0",
    }
}

/// The header section of `head` (up to, not including, the blank line), at most
/// [`MAX_RETURNED_HEADERS`] octets and cut before the first header field that would not fit.
/// Lines longer than [`MAX_LINE`] are cut, stray CR and LF become spaces, and every line ends
/// in CRLF.
fn returned_headers(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    // Bytes of the header fields that fit so far, and the field being assembled.
    let mut field: Vec<u8> = Vec::new();
    let mut lines = split_lines(head);
    let flush = |out: &mut Vec<u8>, field: &mut Vec<u8>| -> bool {
        if out.len() + field.len() > MAX_RETURNED_HEADERS {
            return false;
        }
        out.append(field);
        true
    };
    // Whether the last field is known to be whole: the blank line that ends the section was
    // seen, or `head` is short enough to be the whole message rather than a cut of it.
    let mut whole = head.len() <= MAX_RETURNED_HEADERS + 1;
    for line in lines.by_ref() {
        if line.is_empty() {
            whole = true;
            break;
        }
        let continuation = matches!(line[0], b' ' | b'\t');
        if !continuation && !field.is_empty() && !flush(&mut out, &mut field) {
            return out;
        }
        // Shorten an over-long line, never inside a UTF-8 sequence.
        let mut end = line.len().min(MAX_LINE);
        while end < line.len() && end > 0 && line[end] & 0xC0 == 0x80 {
            end -= 1;
        }
        let line = &line[..end];
        field.extend(line.iter().map(|&b| match b {
            b'\r' | b'\n' => b' ',
            b => b,
        }));
        field.extend_from_slice(b"\r\n");
    }
    // A last field that `head` may have cut is left out: the cap is met between fields.
    if whole {
        flush(&mut out, &mut field);
    }
    out
}

/// Split at CRLF; a final piece without CRLF is a line too. Lines never contain the CRLF.
fn split_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match rest.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                let line = &rest[..i];
                rest = &rest[i + 2..];
                Some(line)
            }
            None => {
                let line = rest;
                rest = &[];
                Some(line)
            }
        }
    })
}

/// `first` then `text`, separated by a space, in lines of at most `width` octets where
/// possible, for display (not for header fields: see [`fold_field`]); continuation lines start
/// with `indent`. `first` is never broken. `text` is broken only at a single space between two
/// words, which the line break replaces; every other space (a run of them, as in a quoted
/// local part) is kept, so nothing is collapsed. A word longer than a line may be is cut, at a
/// character boundary.
fn fold(first: &str, text: &str, width: usize, indent: &str) -> Vec<String> {
    let limit = MAX_LINE - indent.len() - 1;
    let cut = |word: &str| -> String {
        let mut end = word.len().min(limit);
        while !word.is_char_boundary(end) {
            end -= 1;
        }
        word[..end].to_owned()
    };
    // Words: the pieces between single spaces, runs of spaces staying inside a word.
    let mut words = vec![cut(first)];
    let mut word = String::new();
    let mut chars = text.chars().peekable();
    let mut prev_space = true;
    while let Some(c) = chars.next() {
        let next_space = chars.peek().is_none_or(|&n| n == ' ');
        if c == ' ' && !prev_space && !next_space {
            words.push(cut(&std::mem::take(&mut word)));
        } else {
            word.push(c);
        }
        prev_space = c == ' ';
    }
    if !word.trim().is_empty() {
        words.push(cut(word.trim_end()));
    }
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in words.into_iter().filter(|w| !w.is_empty()) {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::replace(&mut line, indent.to_string()));
            line.push_str(&word);
            continue;
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.trim().is_empty() {
        lines.push(line);
    }
    lines
}

/// Fold a header field (RFC 5322 §2.2.3) before a space or tab that has more text after it
/// on the line; that white space then starts the continuation line, so unfolding (removing
/// each CRLF) gives back `text` exactly, with no white space added, lost or changed (a tab
/// stays a tab). White space at the end of `text` is dropped rather than folded: a
/// continuation line of white space only is obsolete syntax (RFC 5322 §3.2.2, §4.2) that
/// must not be generated. Lines are at most `width` octets where white space allows; a run
/// without any stays whole up to [`MAX_LINE`], past which it is cut. No line is white space
/// only.
fn fold_field(text: &str, width: usize) -> Vec<String> {
    let wsp = |b: u8| b == b' ' || b == b'\t';
    let mut lines = Vec::new();
    let mut rest = text.trim_end_matches([' ', '\t']);
    while rest.len() > width {
        let bytes = rest.as_bytes();
        // A fold point: white space with more than white space before it on this line (and,
        // `rest` having no trailing white space, always text after it).
        let breaks = |i: &usize| {
            wsp(bytes[*i]) && *i > 0 && !rest[..*i].trim_matches([' ', '\t']).is_empty()
        };
        // The last fold point within the width, else the first one further on.
        let cut = (0..=width)
            .rev()
            .find(breaks)
            .or_else(|| (width + 1..bytes.len()).find(breaks));
        let Some(cut) = cut else { break };
        lines.push(rest[..cut].to_owned());
        rest = &rest[cut..];
    }
    // A run without white space longer than a line may be (hostile upstream text): cut,
    // since RFC 5322 §2.1.1 does not allow the line.
    let mut end = rest.len().min(MAX_LINE);
    while !rest.is_char_boundary(end) {
        end -= 1;
    }
    lines.push(rest[..end].to_owned());
    lines
}

/// `text` (CRLF line ends) as quoted-printable (RFC 2045 §6.7): every non-ASCII octet, `=` and
/// control as `=XX`, a space or tab before a line end encoded too, lines soft-broken (`=`) to
/// at most 76 characters. Octets, not characters: an original header that is not UTF-8 is
/// carried unchanged.
fn quoted_printable(text: &[u8]) -> String {
    const WIDTH: usize = 76;
    let mut out = String::with_capacity(text.len() * 11 / 10);
    for (n, bytes) in split_crlf(text).enumerate() {
        if n > 0 {
            out.push_str("\r\n");
        }
        let mut column = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let last = i + 1 == bytes.len();
            let literal = matches!(b, 33..=60 | 62..=126) || (matches!(b, b' ' | b'\t') && !last);
            let piece = if literal {
                char::from(b).to_string()
            } else {
                format!("={b:02X}")
            };
            // Room for the piece, and for a soft break after it unless the line ends here.
            let needed = piece.len() + usize::from(!last);
            if column + needed > WIDTH {
                out.push_str("=\r\n");
                column = 0;
            }
            out.push_str(&piece);
            column += piece.len();
        }
    }
    out
}

/// Split at every CRLF, like `str::split("\r\n")`: n CRLFs give n + 1 pieces.
fn split_crlf(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                rest = Some(&r[i + 2..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// Untrusted text as printable ASCII on one line: a tab stays a tab (folding white space,
/// RFC 5322 §3.2.2), other controls (CR, LF included) become spaces, other non-ASCII
/// characters `?`; at most [`MAX_DIAGNOSTIC`] characters.
fn printable_ascii(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_DIAGNOSTIC)
        .map(|c| match c {
            '\t' => '\t',
            c if c.is_ascii_control() || c.is_control() => ' ',
            c if c.is_ascii() => c,
            _ => '?',
        })
        .collect();
    if text.chars().count() > MAX_DIAGNOSTIC {
        out.push_str(" [...]");
    }
    out
}

/// A host name reduced to characters that are safe in a header and a boundary.
fn ascii_token(text: &str) -> String {
    let token: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
        .take(253)
        .collect();
    if token.is_empty() {
        "localhost".into()
    } else {
        token
    }
}

/// An address for a header line: validated addresses have no controls or spaces, but be sure.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// RFC 5322 date-time in UTC, e.g. `Tue, 14 Nov 2023 22:13:20 +0000`.
fn rfc5322_date(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc2822).ok())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".into())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::sample_envelope;
    use mail_parser::{MessageParser, MimeHeaders, PartType};

    use super::smtp;

    fn failed(addr: &str, status: &str, d: Diagnostic, mta: Option<&str>) -> FailedRcpt {
        FailedRcpt {
            index: 0,
            address: Address::parse(addr).unwrap(),
            status: status.into(),
            diagnostic: d,
            upstream: mta.map(String::from),
        }
    }

    const HEAD: &[u8] = b"Received: from client.example\r\n\tby relay.test; Tue, 14 Nov 2023\r\n\
Subject: hello\r\nFrom: sender@example.org\r\nMessage-ID: <m1@example.org>\r\n\r\nbody\r\n.\r\n";

    fn lines_ok(dsn: &[u8]) {
        for (i, &b) in dsn.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && dsn[i - 1] == b'\r', "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(dsn.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        assert!(dsn.ends_with(b"\r\n"));
        for line in dsn.split(|&b| b == b'\n') {
            assert!(line.len() <= MAX_LINE + 1, "line of {} octets", line.len());
        }
    }

    /// The DSN's subject, `From:` (the relay's MAILER-DAEMON) and `To:` (the original sender).
    fn assert_from_mailer_daemon_to_the_sender(msg: &mail_parser::Message<'_>) {
        assert_eq!(msg.subject(), Some("Undelivered Mail Returned to Sender"));
        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.address(), Some("MAILER-DAEMON@relay.test"));
        assert_eq!(from.name(), Some("Mail Delivery System"));
        assert_eq!(
            msg.to().unwrap().first().unwrap().address(),
            Some("sender@example.org")
        );
    }

    /// The content types of the parts of a multipart message, in order.
    fn part_types(msg: &mail_parser::Message<'_>) -> Vec<String> {
        let root = &msg.parts[0];
        let PartType::Multipart(children) = &root.body else {
            panic!("not multipart: {:?}", root.body);
        };
        children
            .iter()
            .map(|&i| {
                let ct = msg.parts[i as usize].content_type().unwrap();
                format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
            })
            .collect()
    }

    #[test]
    fn dsn_is_a_three_part_multipart_report_that_parses() {
        let env = sample_envelope(&["a@example.com", "b@example.com"]);
        let list = [
            failed(
                "a@example.com",
                "5.1.1",
                smtp("550 5.1.1 <a@example.com>: user unknown"),
                Some("exchange.example.internal"),
            ),
            failed(
                "b@example.com",
                "4.4.7",
                Diagnostic::Local("message expired after 5d".into()),
                None,
            ),
        ];
        let input = DsnInput {
            reporting_host: "relay.test",
            original: &env,
            failed: &list,
            original_head: HEAD,
            now: 1_700_000_000,
        };
        let dsn = build_dsn(&input).unwrap();
        lines_ok(&dsn);
        let text = String::from_utf8(dsn.clone()).unwrap();
        let msg = MessageParser::default().parse(&dsn).unwrap();
        assert_from_mailer_daemon_to_the_sender(&msg);
        assert!(text.contains("\r\nAuto-Submitted: auto-replied\r\n"));
        assert!(text.contains("\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
        let ct = msg.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("report"));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));

        assert_eq!(
            part_types(&msg),
            [
                "text/plain",
                "message/delivery-status",
                "text/rfc822-headers"
            ]
        );
        let human = msg.body_text(0).unwrap();
        assert!(human.contains("<a@example.com>: the upstream server said: 550 5.1.1"));
        assert!(human.contains("<b@example.com>: message expired after 5d"));

        // The status part, checked in the raw text (field order and blank-line blocks).
        assert!(text.contains(
            "Reporting-MTA: dns; relay.test\r\nArrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n\
             \r\nFinal-Recipient: rfc822; a@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n\
             Remote-MTA: dns; exchange.example.internal\r\n\
             Diagnostic-Code: smtp; 550 5.1.1 <a@example.com>: user unknown\r\n\
             \r\nFinal-Recipient: rfc822; b@example.com\r\nAction: failed\r\nStatus: 4.4.7\r\n\
             Diagnostic-Code: X-Portcullis; message expired after 5d\r\n"
        ));
        // The headers part: the header section only, not the body.
        assert!(text.contains(
            "Content-Description: Undelivered message headers\r\n\r\nReceived: from client.example\r\n\
             \tby relay.test; Tue, 14 Nov 2023\r\nSubject: hello\r\nFrom: sender@example.org\r\n\
             Message-ID: <m1@example.org>\r\n\r\n--"
        ));
        assert!(!text.contains("body\r\n"));
    }

    #[test]
    fn folded_fields_unfold_to_the_same_text() {
        let cases = [
            "Diagnostic-Code: smtp; 550 5.1.1 <kate@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
            "Diagnostic-Code: smtp; 550  two  spaces  kept  everywhere  and  a  long  tail  of  words  that  must  fold",
            "Diagnostic-Code: smtp; 550 averyveryveryveryveryveryveryveryveryveryveryveryveryveryveryveryverylongword then more",
            "short",
        ];
        let hostile = format!("Diagnostic-Code: smtp; 550 {}", "x".repeat(1100));
        assert!(
            fold_field(&hostile, FOLD_WIDTH)
                .iter()
                .all(|l| l.len() <= MAX_LINE)
        );
        for text in cases {
            let lines = fold_field(text, FOLD_WIDTH);
            assert_eq!(lines.concat(), text, "{lines:?}");
            for (i, line) in lines.iter().enumerate() {
                assert!(!line.trim().is_empty(), "{lines:?}");
                assert_eq!(i > 0, line.starts_with(' '), "{lines:?}");
            }
            assert!(lines.iter().all(|l| l.len() <= FOLD_WIDTH) || text.contains("veryvery"));
        }
        let lines = fold_field(cases[0], FOLD_WIDTH);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with(" ") && !lines[1].starts_with("  "));
    }

    #[test]
    fn quoted_printable_is_7bit_short_lined_and_exact() {
        let text =
            "<ü@example.com>: no = sign lost \r\ntrailing space \r\n".to_owned() + &"é".repeat(60);
        let qp = quoted_printable(text.as_bytes());
        assert!(qp.is_ascii());
        assert!(
            qp.starts_with("<=C3=BC@example.com>: no =3D sign lost=20\r\ntrailing space=20\r\n")
        );
        assert!(qp.split("\r\n").all(|l| l.len() <= 76), "{qp}");
        // Decoding gives the text back.
        let mut decoded = Vec::new();
        let soft = qp.replace("=\r\n", "");
        let b = soft.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'=' {
                decoded.push(u8::from_str_radix(&soft[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                decoded.push(b[i]);
                i += 1;
            }
        }
        assert_eq!(String::from_utf8(decoded).unwrap(), text);
    }

    #[test]
    fn no_dsn_for_the_null_sender_or_without_failures() {
        let env = sample_envelope(&["a@example.com"]);
        let list = [failed("a@example.com", "5.1.1", smtp("550 no"), None)];
        let input = DsnInput {
            reporting_host: "relay.test",
            original: &env,
            failed: &[],
            original_head: HEAD,
            now: 1,
        };
        assert!(build_dsn(&input).is_none(), "no failed recipients");
        let mut null = env.clone();
        null.mail_from = ReversePath::Null;
        let input = DsnInput {
            original: &null,
            failed: &list,
            ..input
        };
        assert!(build_dsn(&input).is_none(), "bounce for <>");
        assert!(bounce_envelope(&null, b"x", "relay.test", 1).is_none());
    }

    #[test]
    fn returned_headers_are_capped_at_a_field_boundary() {
        let mut head = Vec::new();
        let field = format!("X-Filler: {}\r\n\t{}\r\n", "a".repeat(500), "b".repeat(480));
        while head.len() < 3 * MAX_RETURNED_HEADERS {
            head.extend_from_slice(field.as_bytes());
        }
        head.extend_from_slice(b"\r\nbody\r\n");
        let out = returned_headers(&head);
        assert!(out.len() <= MAX_RETURNED_HEADERS);
        assert!(out.len() > MAX_RETURNED_HEADERS - field.len());
        assert_eq!(out.len() % field.len(), 0, "cut inside a field");
        assert!(out.starts_with(field.as_bytes()) && out.ends_with(b"\r\n"));
    }

    #[test]
    fn a_field_cut_by_the_head_slice_is_never_returned_even_after_shortened_lines() {
        // Shortened long lines leave room under the cap for the partial field at the end of
        // the slice the caller passes; it must still be left out.
        let mut head = format!("X-Long: {}\r\n", "l".repeat(3000)).into_bytes();
        for i in 0..60 {
            head.extend_from_slice(format!("X-Pad-{i:03}: {}\r\n", "0".repeat(200)).as_bytes());
        }
        head.extend_from_slice(b"\r\nbody\r\n");
        let slice = &head[..MAX_RETURNED_HEADERS + 2];
        let out = returned_headers(slice);
        let text = String::from_utf8(out).unwrap();
        for line in text.split_terminator("\r\n").skip(1) {
            assert_eq!(
                line.len(),
                "X-Pad-000: ".len() + 200,
                "cut inside a field: {line:?}"
            );
        }
        // A line shortened at the line cap never ends inside a UTF-8 sequence.
        let utf8 = format!("Subject: {}\r\n\r\n", "é".repeat(800));
        let out = returned_headers(utf8.as_bytes());
        assert!(std::str::from_utf8(&out).is_ok());
    }

    #[test]
    fn hostile_input_still_gives_short_crlf_lines() {
        let env = sample_envelope(&["a@example.com"]);
        let long_reply = format!(
            "550-5.7.1 first line\r\n550 5.7.1 {}\n\rbare\x1b[31m {}",
            "word ".repeat(400),
            "x".repeat(3000)
        );
        let list = [failed(
            "a@example.com",
            "2.0.0",
            smtp(&long_reply),
            Some("evil host\r\nX-Injected: 1"),
        )];
        let head = format!(
            "Subject: {}\r\nX-Bare: a\nb\rc\r\nX-Ok: 1\r\n\r\n",
            "s".repeat(2000)
        );
        let input = DsnInput {
            reporting_host: "relay.test",
            original: &env,
            failed: &list,
            original_head: head.as_bytes(),
            now: 1_700_000_000,
        };
        let dsn = build_dsn(&input).unwrap();
        lines_ok(&dsn);
        let text = String::from_utf8(dsn.clone()).unwrap();
        assert!(
            text.contains("\r\nStatus: 5.0.0\r\n"),
            "class 2 status kept"
        );
        assert!(!text.contains("\r\nX-Injected"));
        assert!(!text.contains('\x1b'));
        assert!(text.contains("\r\nX-Bare: a b c\r\nX-Ok: 1\r\n"));
        assert!(text.contains(" [...]"), "diagnostic not capped");
        let msg = MessageParser::default().parse(&dsn).unwrap();
        let PartType::Multipart(children) = &msg.parts[0].body else {
            panic!("not multipart");
        };
        assert_eq!(children.len(), 3);
    }

    #[test]
    fn bounce_envelope_goes_from_null_to_the_sender() {
        let mut env = sample_envelope(&["a@example.com"]);
        let dsn = b"ascii only\r\n";
        let b = bounce_envelope(&env, dsn, "relay.test", 1_700_000_100).unwrap();
        assert_eq!(b.mail_from, ReversePath::Null);
        assert_eq!(b.recipients.len(), 1);
        assert_eq!(b.recipients[0].address.to_string(), "sender@example.org");
        assert_eq!(b.listener, BOUNCE_LISTENER);
        assert_eq!(b.received_at, 1_700_000_100);
        assert!(b.client_ip.is_loopback());
        assert_eq!(b.mail_params.body, None);
        assert!(!b.mail_params.smtputf8);
        assert_eq!(b.mail_params.size, Some(dsn.len() as u64));
        assert_ne!(b.id, env.id);

        env.mail_from = ReversePath::Address(Address::parse("δοκιμή@example.org").unwrap());
        let list = [failed("a@example.com", "5.1.1", smtp("550 no"), None)];
        let dsn = build_dsn(&DsnInput {
            reporting_host: "relay.test",
            original: &env,
            failed: &list,
            original_head: "Subject: ünïcode\r\n\r\n".as_bytes(),
            now: 1,
        })
        .unwrap();
        let text = String::from_utf8(dsn.clone()).unwrap();
        assert!(text.contains("Content-Type: message/global-delivery-status\r\n"));
        assert!(text.contains("Content-Type: message/global-headers\r\n"));
        let b = bounce_envelope(&env, &dsn, "relay.test", 1).unwrap();
        assert_eq!(b.mail_params.body, Some(Body::EightBitMime));
        assert!(b.mail_params.smtputf8);
    }

    /// Decode quoted-printable (RFC 2045 §6.7), for checking what the parts carry.
    fn qp_decode(qp: &str) -> Vec<u8> {
        let soft = qp.replace("=\r\n", "");
        let b = soft.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'=' {
                out.push(u8::from_str_radix(&soft[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn dsn_with_utf8_recipient_and_headers_is_7bit_for_an_ascii_sender() {
        let env = sample_envelope(&["ü@dest.test"]);
        let list = [failed(
            "ü@dest.test",
            "5.1.1",
            smtp("550 5.1.1 no such user"),
            None,
        )];
        // A header that is not UTF-8 at all (Latin-1 é) is carried octet for octet.
        let mut head = "Subject: Grüße\r\nX-Latin1: caf".as_bytes().to_vec();
        head.extend_from_slice(b"\xE9\r\n\r\nbody\r\n");
        let dsn = build_dsn(&DsnInput {
            reporting_host: "relay.test",
            original: &env,
            failed: &list,
            original_head: &head,
            now: 1_700_000_000,
        })
        .unwrap();
        lines_ok(&dsn);
        assert!(dsn.is_ascii(), "{}", String::from_utf8_lossy(&dsn));
        let text = String::from_utf8(dsn.clone()).unwrap();
        assert!(text.contains(
            "Content-Type: message/global-delivery-status\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n"
        ));
        assert!(text.contains(
            "Content-Type: message/global-headers\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n"
        ));
        assert!(text.contains("\r\nFinal-Recipient: utf-8; =C3=BC@dest.test\r\n"));
        // Each part decodes to exactly what it would carry unencoded.
        let part = |desc: &str| {
            let start = text.find(desc).unwrap() + desc.len() + 4;
            let end = start + text[start..].find("\r\n--").unwrap();
            qp_decode(&text[start..end])
        };
        let status = part("Content-Description: Delivery report");
        assert_eq!(
            String::from_utf8(status).unwrap(),
            status_part("relay.test", env.received_at, &list)
        );
        let headers = part("Content-Description: Undelivered message headers");
        assert_eq!(
            headers,
            b"Subject: Gr\xC3\xBC\xC3\x9Fe\r\nX-Latin1: caf\xE9\r\n"
        );
        let b = bounce_envelope(&env, &dsn, "relay.test", 1).unwrap();
        assert_eq!(b.mail_params.body, None, "a 7-bit DSN asks for 8BITMIME");
        assert!(!b.mail_params.smtputf8, "an ASCII sender asks for SMTPUTF8");
        // It still parses as a three-part report.
        let msg = MessageParser::default().parse(&dsn).unwrap();
        let PartType::Multipart(children) = &msg.parts[0].body else {
            panic!("not multipart");
        };
        assert_eq!(children.len(), 3);
    }

    #[test]
    fn diagnostic_code_folding_keeps_tabs_and_makes_no_whitespace_only_line() {
        let reply = format!("550 5.1.1 a tab\there {} end ", "word ".repeat(30));
        let list = [failed("a@example.com", "5.1.1", smtp(&reply), None)];
        let status = status_part("relay.test", 0, &list);
        let lines: Vec<&str> = status.split("\r\n").collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with("Diagnostic-Code:"))
            .unwrap();
        let field: Vec<&str> = lines[at..]
            .iter()
            .take_while(|l| !l.is_empty())
            .copied()
            .collect();
        assert!(field.len() > 1, "not folded: {field:?}");
        for line in &field {
            assert!(!line.trim().is_empty(), "whitespace-only line: {field:?}");
            assert!(!line.ends_with(' '), "{field:?}");
            assert!(line.len() <= FOLD_WIDTH, "{field:?}");
        }
        assert_eq!(
            field.join(""),
            format!("Diagnostic-Code: smtp; {}", reply.trim_end()),
            "unfolding does not give back the reply"
        );
        // Folding at a tab: the tab starts the continuation line, unchanged.
        let text = format!("Diagnostic-Code: smtp; {}\tz", "y".repeat(52));
        let lines = fold_field(&text, FOLD_WIDTH);
        assert_eq!(lines, [&text[..text.len() - 2], "\tz"]);
        // Trailing white space only past the width: dropped, not folded onto its own line.
        let text = format!("Diagnostic-Code: smtp; {} \t ", "y".repeat(52));
        assert_eq!(fold_field(&text, FOLD_WIDTH), [text.trim_end()]);
    }

    #[test]
    fn human_part_shows_a_quoted_address_with_its_spaces() {
        let addr = Address::parse("\"a  b\"@dest.test").unwrap();
        assert_eq!(addr.to_string(), "\"a  b\"@dest.test");
        let list = [FailedRcpt {
            index: 0,
            address: addr,
            status: "5.1.1".into(),
            diagnostic: smtp(&format!(
                "550 5.1.1 <\"a  b\"@dest.test>:  two spaces kept {}",
                "long ".repeat(20)
            )),
            upstream: None,
        }];
        let text = human_part("relay.test", &list);
        assert!(
            text.contains("\r\n<\"a  b\"@dest.test>: the upstream server said: 550 5.1.1\r\n"),
            "{text}"
        );
        // The diagnostic's own runs of spaces are not collapsed either.
        assert!(
            text.contains("<\"a  b\"@dest.test>:  two spaces kept"),
            "{text}"
        );
        // An address longer than a line is never broken.
        let long = format!("{}@{}.test", "l".repeat(60), "d".repeat(60));
        let list = [failed(
            &long,
            "5.1.1",
            Diagnostic::Local("gone".into()),
            None,
        )];
        let text = human_part("relay.test", &list);
        assert!(
            text.contains(&format!("\r\n<{long}>:\r\n    gone\r\n")),
            "{text}"
        );
    }
}
