//! Every reply a client can see, as named values in one place.
//!
//! A reply carries its RFC 5321 code, its RFC 3463 enhanced status code and a text that says
//! what the client should do. The text never names a policy rule or a configuration key: the
//! log line does that (DESIGN.md invariant 3).

use std::borrow::Cow;
use std::fmt::Write as _;

/// One SMTP reply: `code enhanced text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// RFC 3463 enhanced status code such as `5.7.1`; empty only for the greeting and the
    /// EHLO reply, which precede ENHANCEDSTATUSCODES negotiation.
    pub enhanced: &'static str,
    pub text: Cow<'static, str>,
}

impl Reply {
    /// A reply with fixed text.
    pub const fn new(code: u16, enhanced: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            enhanced,
            text: Cow::Borrowed(text),
        }
    }

    /// The same code with other text (for replies that carry a value, e.g. a queue id).
    pub fn with_text(&self, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code: self.code,
            enhanced: self.enhanced,
            text: text.into(),
        }
    }

    /// True for 4xx and 5xx replies.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// True for 5xx replies.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Append the wire form (`CODE SP ENHANCED SP TEXT CRLF`) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut line = String::with_capacity(16 + self.text.len());
        let _ = write!(line, "{}", self.code);
        line.push(' ');
        if !self.enhanced.is_empty() {
            line.push_str(self.enhanced);
            line.push(' ');
        }
        line.push_str(&self.text);
        line.push_str("\r\n");
        out.extend_from_slice(line.as_bytes());
    }

    /// Short form for logs: `550 5.7.1 Relay access denied`.
    pub fn summary(&self) -> String {
        if self.enhanced.is_empty() {
            format!("{} {}", self.code, self.text)
        } else {
            format!("{} {} {}", self.code, self.enhanced, self.text)
        }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Write a multi-line reply: every line but the last as `CODE-TEXT`, the last as `CODE TEXT`.
pub fn write_multiline(code: u16, lines: &[&str], out: &mut Vec<u8>) {
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.extend_from_slice(format!("{code}{sep}{line}\r\n").as_bytes());
    }
}

/// [`DNSBL_LISTED`] naming the client and the lists that list it, as Postfix words it
/// (`550 5.7.1 Service unavailable; client [192.0.2.9] blocked using bl.example`): the one
/// refusal whose text names where it comes from (DESIGN.md invariant 3), so the sender can get
/// delisted. `names` are the zones' public `name`s from the policy; anything but printable
/// ASCII in them is left out, so the reply stays one clean line.
pub fn dnsbl_listed(client: std::net::IpAddr, names: &[&str]) -> Reply {
    let names: Vec<String> = names
        .iter()
        .map(|n| n.chars().filter(|c| c.is_ascii_graphic()).collect())
        .collect();
    DNSBL_LISTED.with_text(format!(
        "Service unavailable; client [{client}] blocked using {}",
        names.join(", ")
    ))
}

// --- Successful replies -------------------------------------------------------------------

pub const OK: Reply = Reply::new(250, "2.0.0", "Ok");
pub const SENDER_OK: Reply = Reply::new(250, "2.1.0", "Sender ok");
pub const RECIPIENT_OK: Reply = Reply::new(250, "2.1.5", "Recipient ok");
pub const RESET_OK: Reply = Reply::new(250, "2.0.0", "Reset");
pub const NOOP_OK: Reply = Reply::new(250, "2.0.0", "Ok");
/// The text is replaced with `Ok: queued as ID`.
pub const QUEUED: Reply = Reply::new(250, "2.0.0", "Ok: queued");
pub const START_DATA: Reply = Reply::new(354, "", "End data with <CR><LF>.<CR><LF>");
pub const READY_FOR_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");
pub const BYE: Reply = Reply::new(221, "2.0.0", "Bye");
pub const HELP: Reply = Reply::new(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY STARTTLS AUTH",
);
pub const CANNOT_VRFY: Reply = Reply::new(
    252,
    "2.5.0",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const AUTH_OK: Reply = Reply::new(235, "2.7.0", "Authentication successful");

// --- Temporary failures -------------------------------------------------------------------

pub const SHUTTING_DOWN: Reply = Reply::new(421, "4.3.0", "Service shutting down, try again later");
pub const TOO_MANY_CONNECTIONS: Reply =
    Reply::new(421, "4.3.2", "Too many connections, try again later");
/// `portcullis listeners pause` is in effect: every new connection gets this and is closed
/// (RFC 5321 §3.8 and §4.2.3; RFC 3463 4.3.2 "system not accepting network messages").
pub const PAUSED: Reply = Reply::new(
    421,
    "4.3.2",
    "Service not available, closing transmission channel",
);
pub const TOO_MANY_FROM_IP: Reply = Reply::new(
    421,
    "4.7.0",
    "Too many connections from your address, try again later",
);
pub const CONNECTION_RATE: Reply = Reply::new(
    421,
    "4.7.0",
    "Connection rate limit exceeded, try again later",
);
/// A session authenticated as a login that is now suspended (`[containment]` or `portcullis
/// user suspend`), at its next command or final dot; the session is closed.
pub const ACCOUNT_SUSPENDED: Reply =
    Reply::new(421, "4.7.0", "Account suspended, closing connection");
pub const TOO_MANY_ERRORS: Reply = Reply::new(421, "4.7.0", "Too many errors, closing connection");
pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Timeout exceeded, closing connection");
/// Stress mode: a second command that makes no progress (RFC 5321 §4.2.5 lets a server close
/// with `421` when it must shut a session down).
pub const TOO_MANY_JUNK_COMMANDS: Reply = Reply::new(
    421,
    "4.7.0",
    "Server busy, too many commands without progress, closing connection",
);
/// Stress mode: a message arriving slower than the minimum data rate.
pub const DATA_TOO_SLOW: Reply =
    Reply::new(421, "4.4.2", "Message data too slow, closing connection");
pub const SESSION_TOO_LONG: Reply = Reply::new(
    421,
    "4.4.2",
    "Session time limit exceeded, closing connection",
);
pub const LINE_FLOOD: Reply = Reply::new(
    421,
    "4.7.0",
    "Line too long without end, closing connection",
);
/// `[cluster] on_error = "tempfail"` with the shared store unavailable, at connect: the
/// session is closed (RFC 5321 §3.8; RFC 3463 4.3.0 "other or undefined mail system status").
/// At MAIL and RCPT the reply is [`LOCAL_ERROR`], to AUTH [`AUTH_TEMPORARY`] (RFC 4954 §6).
pub const STORE_UNAVAILABLE: Reply = Reply::new(
    421,
    "4.3.0",
    "Service temporarily unavailable, closing connection",
);
pub const LOCAL_ERROR: Reply =
    Reply::new(451, "4.3.0", "Local error in processing, try again later");
pub const RATE_LIMITED: Reply = Reply::new(451, "4.7.1", "Rate limit exceeded, try again later");
pub const INSUFFICIENT_STORAGE: Reply =
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later");
pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, "4.5.3", "Too many recipients");
pub const AUTH_LOCKED_OUT: Reply = Reply::new(
    454,
    "4.7.0",
    "Too many authentication failures, try again later",
);
pub const AUTH_TEMPORARY: Reply = Reply::new(
    454,
    "4.7.0",
    "Temporary authentication failure, try again later",
);
/// SPF `temperror` under `[spf] verify = "enforce"` (RFC 7372 §3.2: 4.7.24).
pub const SPF_TEMPERROR: Reply =
    Reply::new(451, "4.7.24", "SPF validation error (DNS), try again later");
/// No verification of the message's signatures could start in time (every slot busy).
pub const AUTHENTICATION_BUSY: Reply = Reply::new(
    451,
    "4.3.0",
    "Message authentication unavailable, try again later",
);

// --- Permanent failures -------------------------------------------------------------------

pub const UNKNOWN_COMMAND: Reply = Reply::new(500, "5.5.1", "Command unrecognized");
pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Line too long");
pub const BARE_LINE_ENDING: Reply = Reply::new(
    500,
    "5.5.2",
    "Command lines must end with <CR><LF>; bare <CR> or <LF> not allowed",
);
pub const NUL_IN_COMMAND: Reply = Reply::new(500, "5.5.2", "NUL character not allowed");
pub const AUTH_LINE_TOO_LONG: Reply =
    Reply::new(500, "5.5.6", "Authentication exchange line is too long");
pub const SYNTAX_ERROR: Reply = Reply::new(501, "5.5.2", "Syntax error in command or arguments");
pub const HELO_SYNTAX: Reply = Reply::new(501, "5.5.2", "Syntax: EHLO hostname");
pub const MAIL_SYNTAX: Reply = Reply::new(501, "5.5.2", "Syntax: MAIL FROM:<address>");
pub const RCPT_SYNTAX: Reply = Reply::new(501, "5.5.2", "Syntax: RCPT TO:<address>");
pub const BAD_SENDER_ADDRESS: Reply = Reply::new(553, "5.1.7", "Bad sender address syntax");
pub const BAD_RECIPIENT_ADDRESS: Reply = Reply::new(553, "5.1.3", "Bad recipient address syntax");
pub const NEED_SMTPUTF8: Reply = Reply::new(
    553,
    "5.6.7",
    "Non-ASCII address requires SMTPUTF8 on MAIL FROM",
);
// What the route to the recipient cannot carry (see `policy::capability`). Refused at SMTP
// time: accepting and bouncing later would send backscatter to possibly forged senders.
/// RFC 6531 §3.5: a non-ASCII address for a route without SMTPUTF8.
pub const ROUTE_NEEDS_SMTPUTF8: Reply = Reply::new(
    553,
    "5.6.7",
    "Non-ASCII address cannot be delivered to this recipient",
);
/// RFC 6531 §3.5, after the final dot: an address of the transaction needs SMTPUTF8 and the
/// route, as last seen, lacks it (learnt while the message was being received).
pub const ADDRESS_NEEDS_SMTPUTF8_AT_DATA: Reply = Reply::new(
    554,
    "5.6.7",
    "Non-ASCII address cannot be delivered to one or more recipients",
);
/// RFC 6152 / RFC 3463 5.6.3: 8-bit content for a route without 8BITMIME (never converted).
pub const ROUTE_NO_8BITMIME: Reply = Reply::new(
    550,
    "5.6.3",
    "8-bit MIME content cannot be delivered to this recipient",
);
/// RFC 6152 / RFC 3463 5.6.3: 8-bit octets in a message that did not declare `BODY=8BITMIME`,
/// for a route without 8BITMIME, after the final dot (never converted).
pub const UNDECLARED_8BIT_UNDELIVERABLE: Reply = Reply::new(
    554,
    "5.6.3",
    "8-bit content cannot be delivered to one or more recipients",
);
/// RFC 1870: the declared or received size is over what the route accepts.
pub const ROUTE_SIZE: Reply = Reply::new(552, "5.3.4", "Message too big for this recipient");
/// RFC 3463 5.4.4: no upstream serves the recipient's domain (no default route).
pub const NO_ROUTE: Reply = Reply::new(550, "5.4.4", "Unable to route to this recipient");
/// RFC 6531 §3.5: a UTF-8 header section for a route without SMTPUTF8, after the final dot.
pub const UTF8_HEADERS_UNDELIVERABLE: Reply = Reply::new(
    554,
    "5.6.9",
    "UTF-8 header message cannot be delivered to one or more recipients",
);
/// RFC 3207 §4: STARTTLS takes no parameters.
pub const STARTTLS_SYNTAX: Reply = Reply::new(501, "5.5.4", "Syntax: STARTTLS");
/// RFC 5321 §4.1.1.4: DATA takes no parameters.
pub const DATA_SYNTAX: Reply = Reply::new(501, "5.5.4", "Syntax: DATA");
/// RFC 5321 §4.1.1.5: RSET takes no parameters.
pub const RSET_SYNTAX: Reply = Reply::new(501, "5.5.4", "Syntax: RSET");
pub const BAD_BASE64: Reply = Reply::new(501, "5.5.2", "Invalid base64 data");
/// RFC 4954 §4: a response that decodes but is not a SASL message of the mechanism (RFC 4616
/// §2 for PLAIN: `authzid NUL authcid NUL passwd`, UTF-8, non-empty login and password).
pub const BAD_SASL_MESSAGE: Reply = Reply::new(501, "5.5.2", "Malformed SASL message");
pub const AUTH_CANCELLED: Reply = Reply::new(501, "5.7.0", "Authentication cancelled");
pub const NOT_IMPLEMENTED: Reply = Reply::new(502, "5.5.1", "Command not implemented");
pub const VRFY_DISABLED: Reply = Reply::new(502, "5.5.1", "VRFY command is disabled");
pub const BAD_SEQUENCE: Reply = Reply::new(503, "5.5.1", "Bad sequence of commands");
pub const NEED_HELO: Reply = Reply::new(503, "5.5.1", "Send EHLO or HELO first");
pub const NEED_MAIL: Reply = Reply::new(503, "5.5.1", "Send MAIL FROM first");
pub const NEED_RCPT: Reply = Reply::new(503, "5.5.1", "Send RCPT TO first");
pub const NESTED_MAIL: Reply = Reply::new(503, "5.5.1", "Sender already specified");
pub const ALREADY_AUTHENTICATED: Reply = Reply::new(503, "5.5.1", "Already authenticated");
pub const AUTH_IN_TRANSACTION: Reply =
    Reply::new(503, "5.5.1", "AUTH not allowed during a mail transaction");
pub const ALREADY_TLS: Reply = Reply::new(503, "5.5.1", "TLS already active");
pub const ACCESS_DENIED_AFTER_GREETING: Reply =
    Reply::new(503, "5.7.1", "Access denied, please disconnect");
pub const UNSUPPORTED_MECHANISM: Reply =
    Reply::new(504, "5.5.4", "Unrecognized authentication mechanism");
pub const UNSUPPORTED_PARAMETER: Reply =
    Reply::new(555, "5.5.4", "Unsupported MAIL or RCPT parameter");
pub const MUST_STARTTLS: Reply = Reply::new(530, "5.7.0", "Must issue a STARTTLS command first");
pub const AUTH_REQUIRED: Reply = Reply::new(530, "5.7.0", "Authentication required");
pub const AUTH_FAILED: Reply = Reply::new(535, "5.7.8", "Authentication credentials invalid");
pub const AUTH_NEEDS_TLS: Reply = Reply::new(
    538,
    "5.7.11",
    "Encryption required for requested authentication mechanism",
);
pub const STARTTLS_UNAVAILABLE: Reply = Reply::new(502, "5.5.1", "STARTTLS not available");
pub const AUTH_UNAVAILABLE: Reply = Reply::new(502, "5.5.1", "AUTH not available");
pub const MESSAGE_TOO_BIG: Reply = Reply::new(
    552,
    "5.3.4",
    "Message size exceeds fixed maximum message size",
);
/// A header field (or field name) longer than the header reader holds (64 KiB).
pub const HEADER_TOO_LARGE: Reply = Reply::new(552, "5.3.4", "Message header field too long");
pub const BARE_LINE_ENDING_IN_DATA: Reply = Reply::new(
    550,
    "5.5.2",
    "Message contains bare <CR> or <LF>; lines must end with <CR><LF>",
);
pub const TOO_MANY_HOPS: Reply = Reply::new(
    554,
    "5.4.6",
    "Too many hops (Received headers), mail loop suspected",
);
/// A spool error no retry cures (RFC 3463 X.3.0; the temporary kind is [`LOCAL_ERROR`]).
pub const LOCAL_ERROR_PERMANENT: Reply = Reply::new(
    554,
    "5.3.0",
    "Local error in processing, message not accepted",
);
pub const NO_VALID_RECIPIENTS: Reply = Reply::new(554, "5.5.1", "No valid recipients");
pub const ACCESS_DENIED: Reply = Reply::new(554, "5.7.1", "Access denied");
pub const EARLY_TALKER: Reply = Reply::new(
    554,
    "5.5.0",
    "Protocol error: client sent data before the server's reply",
);
pub const RELAY_DENIED: Reply = Reply::new(550, "5.7.1", "Relay access denied");
/// SPF `fail` under `[spf] verify = "enforce"` (RFC 7372 §3.2: 5.7.23).
pub const SPF_FAIL: Reply = Reply::new(
    550,
    "5.7.23",
    "SPF validation failed: sender not authorized",
);
/// The client is listed by DNS blocklists at or over `[dnsbl] threshold`; the text names the
/// lists' public names (see [`dnsbl_listed`]), so the sender can ask to be delisted.
pub const DNSBL_LISTED: Reply = Reply::new(550, "5.7.1", "Service unavailable; client blocked");
/// DMARC `fail` of a domain whose policy is `reject` (RFC 7489 §6.7).
pub const DMARC_REJECT: Reply = Reply::new(
    550,
    "5.7.1",
    "Message rejected: DMARC policy of the From: domain",
);
/// A message with no `From:` domain, several `From:` fields, or one naming several domains,
/// under `[dmarc] verify = "enforce"` (RFC 7489 §6.6.1: DMARC cannot judge it).
pub const DMARC_NO_SINGLE_FROM: Reply = Reply::new(
    550,
    "5.7.1",
    "Message rejected: exactly one From: domain is required",
);
pub const UNKNOWN_USER: Reply =
    Reply::new(550, "5.1.1", "Recipient address rejected: unknown user");
pub const SENDER_NOT_OWNED: Reply =
    Reply::new(553, "5.7.1", "Sender address rejected: not owned by user");
pub const FROM_HEADER_NOT_OWNED: Reply = Reply::new(
    550,
    "5.7.1",
    "From: header address rejected: not owned by user",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dnsbl_refusal_names_the_client_and_only_printable_list_names() {
        let v6: std::net::IpAddr = "2001:db8::9".parse().unwrap();
        assert_eq!(
            dnsbl_listed(v6, &["a.test", "b.test"]).to_string(),
            "550 5.7.1 Service unavailable; client [2001:db8::9] blocked using a.test, b.test"
        );
        let v4: std::net::IpAddr = "192.0.2.9".parse().unwrap();
        let r = dnsbl_listed(v4, &["bad\r\nname.test"]);
        assert_eq!(
            r.text,
            "Service unavailable; client [192.0.2.9] blocked using badname.test"
        );
    }

    #[test]
    fn wire_form_has_code_enhanced_and_crlf() {
        let mut out = Vec::new();
        RELAY_DENIED.write_to(&mut out);
        assert_eq!(out, b"550 5.7.1 Relay access denied\r\n");
        let mut out = Vec::new();
        START_DATA.write_to(&mut out);
        assert_eq!(out, b"354 End data with <CR><LF>.<CR><LF>\r\n");
    }

    #[test]
    fn multiline_uses_dash_until_last() {
        let mut out = Vec::new();
        write_multiline(250, &["a", "b", "c"], &mut out);
        assert_eq!(out, b"250-a\r\n250-b\r\n250 c\r\n");
    }

    #[test]
    fn codes_match_enhanced_class() {
        // The first digit of the enhanced code must agree with the reply class.
        for r in [
            OK,
            QUEUED,
            SHUTTING_DOWN,
            TOO_MANY_CONNECTIONS,
            LOCAL_ERROR,
            INSUFFICIENT_STORAGE,
            TOO_MANY_RECIPIENTS,
            UNKNOWN_COMMAND,
            LINE_TOO_LONG,
            MUST_STARTTLS,
            AUTH_NEEDS_TLS,
            MESSAGE_TOO_BIG,
            TOO_MANY_HOPS,
            EARLY_TALKER,
            RELAY_DENIED,
            TIMEOUT,
            TOO_MANY_JUNK_COMMANDS,
            DATA_TOO_SLOW,
            AUTH_LOCKED_OUT,
            STORE_UNAVAILABLE,
        ] {
            let class = (r.code / 100).to_string();
            assert!(r.enhanced.starts_with(&class), "{r}");
        }
    }
}
