//! The session state machine. See the module docs of [`crate::smtp`].

use smtp_proto::{Error as ProtoError, MailFrom, RcptTo, Request};

use super::data::{DataDecoder, DataFault};
use super::line::{Frame, LineFramer};
use super::reply::{self, Reply};
use super::sasl::{self, Credentials, Mechanism, SaslError};
use crate::envelope::{Address, AddressError, Body, MailParams, ReversePath};

/// Pending output above which [`Session::poll`] asks the driver to flush before it reads more
/// commands, so a client that pipelines without reading replies cannot grow our buffer.
const OUTPUT_HIGH_WATER: usize = 16 * 1024;

/// Once this much consumed input sits at the front of the buffer, it is compacted.
const COMPACT_AT: usize = 8 * 1024;

/// Commands without progress a session may send while the relay is in stress mode (see
/// [`Session::set_stressed`]); the next one is answered `421 4.7.0` and the session closes.
/// Postfix's `smtpd_junk_command_limit = ${stress?1}` is the model.
pub const STRESS_JUNK_LIMIT: u32 = 1;

/// Per-session protocol settings, taken from the listener and `[limits]`.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Name in the banner and the EHLO reply.
    pub hostname: String,
    /// Where `RCPT TO:<postmaster>` (RFC 5321 §4.5.1: no domain, any case) is delivered: the
    /// `[relay] postmaster` address.
    pub postmaster: Address,
    /// Octets per command line, including CRLF.
    pub max_command_length: usize,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Error replies (4xx/5xx) before the session is closed with `421 4.7.0`.
    pub max_errors: u32,
    /// STARTTLS may be offered (a `starttls` listener before the handshake).
    pub starttls: bool,
    /// The session starts inside TLS (an `implicit` listener).
    pub implicit_tls: bool,
    /// MAIL and AUTH need TLS first.
    pub require_tls: bool,
    /// AUTH is offered (once TLS is up).
    pub auth_enabled: bool,
    /// MAIL needs AUTH first.
    pub auth_required: bool,
}

/// One mail transaction: the sender and the recipients accepted so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub from: ReversePath,
    pub params: MailParams,
    pub recipients: Vec<Address>,
    /// Recipients refused so far (decides between `503` and `554` at DATA).
    pub refused: u32,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write the pending output, then read more input (under the command or DATA timeout).
    NeedInput,
    /// Write the pending output before polling again.
    Flush,
    /// Write the pending output and close the connection.
    Close,
    /// The engine refused a command by itself; the reply is already queued. For the log.
    Rejected { reply: Reply, rule: &'static str },
    /// EHLO (`extended`) or HELO. Answer with `accept` or `reject`.
    Helo { name: String, extended: bool },
    /// `220` is queued: flush it, run the TLS handshake on the raw connection, then call
    /// [`Session::tls_started`]. `discarded` octets the client pipelined after STARTTLS were
    /// thrown away unexecuted (STARTTLS injection).
    StartTls { discarded: usize },
    /// A complete SASL exchange: verify, then `accept` or `reject`.
    Auth(Credentials),
    /// MAIL FROM passed protocol checks: `accept` or `reject`.
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    /// RCPT TO passed protocol checks: `accept` or `reject`.
    Rcpt(Address),
    /// DATA: prepare the spool, then `accept` (354) or `reject`.
    DataStart,
    /// Message octets are ready in [`Session::data_chunk`] (un-dot-stuffed, in order).
    DataChunk,
    /// The message ended cleanly: commit it, then `queued(id)` or `reject`.
    DataEnd,
    /// The message ended but is refused; the reply is queued. Discard what was spooled.
    DataRejected(DataFault),
}

/// SASL exchange in progress.
#[derive(Debug)]
enum SaslStep {
    PlainResponse,
    LoginUser,
    LoginPassword { login: String },
}

/// Where the session is in the protocol.
#[derive(Debug)]
enum SessionState {
    /// Refused at connect: only QUIT is answered with anything but `503 5.7.1`.
    Refused,
    /// Connected (or just through STARTTLS): EHLO/HELO needed.
    Fresh,
    /// Greeted, no transaction.
    Idle,
    /// MAIL accepted, collecting recipients.
    Mail(Transaction),
    /// Receiving message octets.
    Data {
        tx: Transaction,
        decoder: DataDecoder,
        finished: bool,
    },
    /// In a SASL exchange.
    Sasl(SaslStep),
    /// Done: nothing more is read.
    Closed,
}

/// A question put to the driver, waiting for its answer.
#[derive(Debug)]
enum Pending {
    Helo {
        name: String,
        extended: bool,
    },
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    Rcpt {
        address: Address,
        /// Written as `<postmaster>`, without a domain.
        postmaster: bool,
    },
    DataStart,
    DataEnd,
    /// The login being checked.
    Auth(String),
}

/// One SMTP server session, sans I/O.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: SessionState,
    pending: Option<Pending>,
    helo: Option<String>,
    extended: bool,
    tls: bool,
    user: Option<String>,
    errors: u32,
    /// Commands without progress since the session started or last queued a message (see
    /// [`Session::set_stressed`]).
    junk: u32,
    /// The relay is in stress mode: at most [`STRESS_JUNK_LIMIT`] junk commands.
    stressed: bool,
    /// The session was closed for too many junk commands (for the driver's log).
    junk_closed: bool,
    /// The session was closed for reaching `max_errors`.
    errors_closed: bool,
    input: Vec<u8>,
    start: usize,
    framer: LineFramer,
    out: Vec<u8>,
    chunk: Vec<u8>,
}

impl Session {
    /// A new session; nothing is queued until [`Session::greet`] or [`Session::refuse`].
    pub fn new(config: SessionConfig) -> Session {
        let tls = config.implicit_tls;
        Session {
            config,
            state: SessionState::Fresh,
            pending: None,
            helo: None,
            extended: false,
            tls,
            user: None,
            errors: 0,
            junk: 0,
            stressed: false,
            junk_closed: false,
            errors_closed: false,
            input: Vec::new(),
            start: 0,
            framer: LineFramer::default(),
            out: Vec::new(),
            chunk: Vec::new(),
        }
    }

    /// Queue the `220` banner.
    pub fn greet(&mut self) {
        let banner = Reply {
            code: 220,
            enhanced: "",
            text: format!("{} ESMTP ready", self.config.hostname).into(),
        };
        banner.write_to(&mut self.out);
    }

    /// Refuse the client at connect: queue `reply` (normally `554 5.7.1`) as the greeting and
    /// answer every later command but QUIT with `503 5.7.1` (RFC 5321 §3.1).
    pub fn refuse(&mut self, reply: &Reply) {
        reply.write_to(&mut self.out);
        self.state = SessionState::Refused;
    }

    /// Queue `reply` and close (timeouts, shutdown, early talkers, connection caps).
    pub fn close_with(&mut self, reply: &Reply) {
        if matches!(self.state, SessionState::Closed) {
            return;
        }
        reply.write_to(&mut self.out);
        self.state = SessionState::Closed;
        self.pending = None;
    }

    /// Append octets read from the client.
    pub fn receive(&mut self, data: &[u8]) {
        if matches!(self.state, SessionState::Closed) {
            return;
        }
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
        } else if self.start >= COMPACT_AT {
            self.input.drain(..self.start);
            self.start = 0;
        }
        self.input.extend_from_slice(data);
    }

    /// Octets received but not yet processed.
    pub fn buffered_input(&self) -> usize {
        self.input.len() - self.start
    }

    /// Replies waiting to be written.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Mark the output as written.
    pub fn clear_output(&mut self) {
        self.out.clear();
        if self.out.capacity() > 4 * OUTPUT_HIGH_WATER {
            self.out.shrink_to(1024);
        }
    }

    /// The EHLO/HELO name, once given.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// True when the client greeted with EHLO rather than HELO.
    pub fn is_extended(&self) -> bool {
        self.extended
    }

    /// The authenticated login, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// True while the pending RCPT was written `<postmaster>` (RFC 5321 §4.5.1): the address of
    /// its [`Event::Rcpt`] is then the configured postmaster, which must be accepted whatever
    /// the relay rules say.
    pub fn rcpt_is_postmaster(&self) -> bool {
        matches!(
            self.pending,
            Some(Pending::Rcpt {
                postmaster: true,
                ..
            })
        )
    }

    /// True once TLS is active.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// True while message octets are being received (the driver applies the DATA timeout
    /// and lets a shutdown wait for it).
    pub fn in_data(&self) -> bool {
        matches!(self.state, SessionState::Data { .. })
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, SessionState::Closed)
    }

    /// The current transaction (valid from MAIL until the end of DATA).
    pub fn transaction(&self) -> Option<&Transaction> {
        match &self.state {
            SessionState::Mail(tx) | SessionState::Data { tx, .. } => Some(tx),
            _ => None,
        }
    }

    /// The TLS handshake after STARTTLS succeeded: the session starts over (RFC 3207 §4.2).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.extended = false;
        self.user = None;
        self.state = SessionState::Fresh;
    }

    /// Whether the relay is in stress mode, set by the driver before each read. While it is,
    /// a session may send at most [`STRESS_JUNK_LIMIT`] commands that make no progress; the
    /// next is answered `421 4.7.0` ([`reply::TOO_MANY_JUNK_COMMANDS`]) and the session
    /// closes, so a client cannot hold a scarce connection slot by renewing its per-command
    /// timeout. Junk commands are NOOP, RSET, HELP, VRFY, EXPN and the other commands not
    /// implemented, EHLO/HELO after one was accepted (until STARTTLS), and every command
    /// refused (by the engine or the driver, AUTH included). They are counted over the whole
    /// session, also before stress mode started, and the count starts over when a message is
    /// queued (progress).
    pub fn set_stressed(&mut self, stressed: bool) {
        self.stressed = stressed;
    }

    /// True when the session was closed by the junk-command limit of stress mode.
    pub fn closed_for_junk(&self) -> bool {
        self.junk_closed
    }

    /// True when the session was closed for reaching `max_errors` (`421 4.7.0`).
    pub fn closed_for_errors(&self) -> bool {
        self.errors_closed
    }

    /// Count a command that makes no progress; true when it passes the stress-mode limit,
    /// in which case `421 4.7.0` is queued and the session is closed.
    fn junk(&mut self) -> bool {
        self.junk = self.junk.saturating_add(1);
        if self.stressed
            && self.junk > STRESS_JUNK_LIMIT
            && !matches!(self.state, SessionState::Closed)
        {
            self.close_with(&reply::TOO_MANY_JUNK_COMMANDS);
            self.junk_closed = true;
            return true;
        }
        false
    }

    /// The client was silent too long.
    pub fn timeout(&mut self) {
        self.close_with(&reply::TIMEOUT);
    }

    /// Next thing for the driver to do.
    pub fn poll(&mut self) -> Event {
        debug_assert!(self.pending.is_none(), "poll() while a verdict is pending");
        loop {
            if self.pending.is_some() {
                return Event::NeedInput;
            }
            if matches!(self.state, SessionState::Closed) {
                return Event::Close;
            }
            if self.out.len() >= OUTPUT_HIGH_WATER {
                return Event::Flush;
            }
            let step = if matches!(self.state, SessionState::Data { .. }) {
                self.poll_data()
            } else {
                self.poll_command()
            };
            if let Some(event) = step {
                return event;
            }
        }
    }

    /// The message octets announced by the last [`Event::DataChunk`].
    pub fn data_chunk(&self) -> &[u8] {
        &self.chunk
    }

    // --- Verdicts ------------------------------------------------------------------------

    /// The driver accepts the pending request.
    pub fn accept(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        match pending {
            Pending::Helo { name, extended } => {
                self.helo = Some(name);
                self.extended = extended;
                self.state = SessionState::Idle;
                if extended {
                    self.write_ehlo();
                } else {
                    reply::Reply {
                        code: 250,
                        enhanced: "",
                        text: self.config.hostname.clone().into(),
                    }
                    .write_to(&mut self.out);
                }
            }
            Pending::Mail { from, params } => {
                self.state = SessionState::Mail(Transaction {
                    from,
                    params,
                    recipients: Vec::new(),
                    refused: 0,
                });
                reply::SENDER_OK.write_to(&mut self.out);
            }
            Pending::Rcpt { address, .. } => {
                if let SessionState::Mail(tx) = &mut self.state {
                    tx.recipients.push(address);
                }
                reply::RECIPIENT_OK.write_to(&mut self.out);
            }
            // Bare LF refused: what `accept_data(false)` does.
            Pending::DataStart => self.start_data(false),
            Pending::DataEnd => {
                // A DataEnd must be answered with `queued` or `reject`; treat a bare accept
                // as a local error rather than claim the message was queued.
                self.state = SessionState::Idle;
                self.count_error(&reply::LOCAL_ERROR);
            }
            Pending::Auth(login) => {
                self.user = Some(login);
                self.state = SessionState::Idle;
                reply::AUTH_OK.write_to(&mut self.out);
            }
        }
    }

    /// The driver accepts a pending DATA (`354`); a bare LF in the message is stored as CRLF
    /// when `normalize_bare_lf`, else it is refused (`550 5.5.2`) like a bare CR. Any other
    /// pending request is accepted as by [`Session::accept`].
    pub fn accept_data(&mut self, normalize_bare_lf: bool) {
        if !matches!(self.pending, Some(Pending::DataStart)) {
            return self.accept();
        }
        self.pending = None;
        self.start_data(normalize_bare_lf);
    }

    /// The one way into DATA: the decoder (see [`Session::accept_data`]), the state, `354`.
    fn start_data(&mut self, normalize_bare_lf: bool) {
        let max = self.config.max_message_size;
        let decoder = if normalize_bare_lf {
            DataDecoder::normalizing(max)
        } else {
            DataDecoder::new(max)
        };
        if let SessionState::Mail(tx) = std::mem::replace(&mut self.state, SessionState::Idle) {
            self.state = SessionState::Data {
                tx,
                decoder,
                finished: false,
            };
        }
        reply::START_DATA.write_to(&mut self.out);
    }

    /// The driver refuses the pending request with `reply` (which counts as an error).
    pub fn reject(&mut self, reply: &Reply) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        match pending {
            Pending::Rcpt { .. } => {
                if let SessionState::Mail(tx) = &mut self.state {
                    tx.refused += 1;
                }
            }
            Pending::DataEnd | Pending::Auth(_) => self.state = SessionState::Idle,
            Pending::Helo { .. } | Pending::Mail { .. } | Pending::DataStart => {}
        }
        self.count_error(reply);
    }

    /// The message of the pending DataEnd is durable under `id`.
    pub fn queued(&mut self, id: &str) {
        if matches!(self.pending.take(), Some(Pending::DataEnd)) {
            self.state = SessionState::Idle;
            self.junk = 0;
            reply::QUEUED
                .with_text(format!("Ok: queued as {id}"))
                .write_to(&mut self.out);
        }
    }

    // --- Internals -----------------------------------------------------------------------

    fn write_ehlo(&mut self) {
        let mut lines = vec![
            self.config.hostname.clone(),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.config.starttls && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        if self.config.auth_enabled && self.tls {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        lines.push("HELP".to_string());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        reply::write_multiline(250, &refs, &mut self.out);
    }

    /// Queue an error reply and count it; past the budget, close with `421 4.7.0`.
    fn count_error(&mut self, reply: &Reply) {
        reply.write_to(&mut self.out);
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.errors_closed = !self.is_closed();
            self.close_with(&reply::TOO_MANY_ERRORS);
        } else {
            // A refused command made no progress.
            self.junk();
        }
    }

    /// Refuse a command: queue the reply, count it, report it for the log.
    fn refuse_command(&mut self, reply: Reply, rule: &'static str) -> Option<Event> {
        self.count_error(&reply);
        Some(Event::Rejected { reply, rule })
    }

    /// Close at once with `reply`, reporting it for the log.
    fn fatal(&mut self, reply: Reply, rule: &'static str) -> Option<Event> {
        self.close_with(&reply);
        Some(Event::Rejected { reply, rule })
    }

    fn poll_data(&mut self) -> Option<Event> {
        let SessionState::Data {
            decoder, finished, ..
        } = &mut self.state
        else {
            return Some(Event::NeedInput);
        };
        if *finished {
            self.pending = Some(Pending::DataEnd);
            return Some(Event::DataEnd);
        }
        if self.start == self.input.len() {
            return Some(Event::NeedInput);
        }
        self.chunk.clear();
        let r = decoder.decode(&self.input[self.start..], &mut self.chunk);
        self.start += r.consumed;
        if r.finished {
            if let Some(fault) = decoder.fault() {
                self.state = SessionState::Idle;
                let reply = match fault {
                    DataFault::BareLineEnding => reply::BARE_LINE_ENDING_IN_DATA,
                    DataFault::TooBig => reply::MESSAGE_TOO_BIG,
                };
                self.count_error(&reply);
                return Some(Event::DataRejected(fault));
            }
            *finished = true;
            if self.chunk.is_empty() {
                self.pending = Some(Pending::DataEnd);
                return Some(Event::DataEnd);
            }
        }
        if self.chunk.is_empty() {
            return Some(Event::NeedInput);
        }
        Some(Event::DataChunk)
    }

    fn poll_command(&mut self) -> Option<Event> {
        let sasl = matches!(self.state, SessionState::Sasl(_));
        let (frame, consumed) = self.framer.next(
            &self.input[self.start..],
            self.config.max_command_length,
            sasl,
        );
        let base = self.start;
        self.start += consumed;
        let (line_start, line_end) = match frame {
            Frame::Incomplete => return Some(Event::NeedInput),
            Frame::Line { start, end } => (base + start, base + end),
            Frame::Flood => return self.fatal(reply::LINE_FLOOD, "line_flood"),
            other => {
                if sasl {
                    self.state = SessionState::Idle;
                }
                let (reply, rule) = match other {
                    Frame::Nul => (reply::NUL_IN_COMMAND, "nul_in_command"),
                    Frame::BareCr => (reply::BARE_LINE_ENDING, "bare_cr_in_command"),
                    Frame::BareLf => (reply::BARE_LINE_ENDING, "bare_lf_in_command"),
                    Frame::TooLong { auth: true } => {
                        (reply::AUTH_LINE_TOO_LONG, "auth_line_too_long")
                    }
                    _ => (reply::LINE_TOO_LONG, "command_too_long"),
                };
                return self.refuse_command(reply, rule);
            }
        };
        match &self.state {
            SessionState::Sasl(_) => {
                let line = self.input[line_start..line_end].to_vec();
                self.sasl_response(&line)
            }
            SessionState::Refused => {
                if self.input[line_start..line_end].eq_ignore_ascii_case(b"QUIT") {
                    self.close_with(&reply::BYE);
                    return Some(Event::Close);
                }
                self.refuse_command(reply::ACCESS_DENIED_AFTER_GREETING, "access_denied")
            }
            _ => {
                // smtp-proto wants the line with its line end.
                let parsed = Request::parse(&mut self.input[line_start..line_end + 2].iter())
                    .map(Request::into_owned);
                let line = &self.input[line_start..line_end];
                // The path as the client wrote it: the address is parsed from this text by
                // our own grammar, not taken from smtp-proto, which removes quotes.
                let path = path_text(line).map(str::to_owned);
                let declared = declared_size(line);
                if has_argument(line)
                    && let Ok(request) = &parsed
                    && let Some((reply, rule)) = no_argument_allowed(request)
                {
                    return self.refuse_command(reply, rule);
                }
                self.command(parsed, path, declared)
            }
        }
    }

    fn command(
        &mut self,
        parsed: Result<Request<String>, ProtoError>,
        path: Option<String>,
        declared: Option<u64>,
    ) -> Option<Event> {
        let request = match parsed {
            Ok(r) => r,
            // smtp-proto refuses a SIZE of usize::MAX or more as an invalid parameter; that
            // is a message too big, once the sequence checks have passed.
            Err(ProtoError::InvalidParameter { param: "SIZE" })
                if declared.is_some_and(|n| n > self.config.max_message_size) =>
            {
                let (reply, rule) = self
                    .mail_gate()
                    .unwrap_or((reply::MESSAGE_TOO_BIG, "declared_size"));
                return self.refuse_command(reply, rule);
            }
            Err(e) => return self.parse_error(e),
        };
        match request {
            Request::Ehlo { host } => self.helo_command(host, true),
            Request::Helo { host } => self.helo_command(host, false),
            Request::Mail { from } => self.mail(from, path, declared),
            Request::Rcpt { to } => self.rcpt(to, path),
            Request::Data => self.data(),
            Request::Rset | Request::Noop { .. } | Request::Help { .. } | Request::Vrfy { .. }
                if self.junk() =>
            {
                // Closed: the driver logs why (`closed_for_junk`).
                None
            }
            Request::Rset => {
                self.state = if self.helo.is_some() {
                    SessionState::Idle
                } else {
                    SessionState::Fresh
                };
                reply::RESET_OK.write_to(&mut self.out);
                None
            }
            Request::Noop { .. } => {
                reply::NOOP_OK.write_to(&mut self.out);
                None
            }
            Request::Help { .. } => {
                reply::HELP.write_to(&mut self.out);
                None
            }
            Request::Vrfy { .. } => {
                reply::CANNOT_VRFY.write_to(&mut self.out);
                None
            }
            Request::Quit => {
                self.close_with(&reply::BYE);
                Some(Event::Close)
            }
            Request::StartTls => self.starttls(),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response),
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Bdat { .. }
            | Request::Burl { .. }
            | Request::Lhlo { .. } => {
                self.refuse_command(reply::NOT_IMPLEMENTED, "not_implemented")
            }
        }
    }

    fn parse_error(&mut self, e: ProtoError) -> Option<Event> {
        let (reply, rule) = match e {
            ProtoError::UnknownCommand => (reply::UNKNOWN_COMMAND, "unknown_command"),
            ProtoError::InvalidSenderAddress => (reply::BAD_SENDER_ADDRESS, "bad_sender_syntax"),
            ProtoError::InvalidRecipientAddress => {
                (reply::BAD_RECIPIENT_ADDRESS, "bad_recipient_syntax")
            }
            ProtoError::SyntaxError { syntax } => (
                reply::SYNTAX_ERROR.with_text(format!("Syntax: {syntax}")),
                "syntax_error",
            ),
            ProtoError::InvalidParameter { .. } | ProtoError::UnsupportedParameter { .. } => {
                (reply::UNSUPPORTED_PARAMETER, "unsupported_parameter")
            }
            _ => (reply::SYNTAX_ERROR, "syntax_error"),
        };
        self.refuse_command(reply, rule)
    }

    /// RFC 2920 §3.1: EHLO, HELO and DATA end a pipelined group; a client that sent more
    /// before seeing their reply is not a conforming SMTP client (or is a spam engine).
    fn early_talker(&self) -> bool {
        self.start < self.input.len()
    }

    fn helo_command(&mut self, host: String, extended: bool) -> Option<Event> {
        if self.early_talker() {
            return self.fatal(reply::EARLY_TALKER, "early_talker");
        }
        // Greeting again (RFC 5321 §4.1.4 allows it) resets nothing a client needs twice.
        if self.helo.is_some() && self.junk() {
            return None;
        }
        if host.is_empty() || host.chars().any(|c| c.is_control()) {
            return self.refuse_command(reply::HELO_SYNTAX, "helo_syntax");
        }
        self.pending = Some(Pending::Helo {
            name: host.clone(),
            extended,
        });
        Some(Event::Helo {
            name: host,
            extended,
        })
    }

    /// Sequence and gate checks for MAIL FROM, before its arguments are looked at.
    fn mail_gate(&self) -> Option<(Reply, &'static str)> {
        if self.helo.is_none() {
            Some((reply::NEED_HELO, "need_helo"))
        } else if matches!(self.state, SessionState::Mail(_)) {
            Some((reply::NESTED_MAIL, "nested_mail"))
        } else if self.config.require_tls && !self.tls {
            Some((reply::MUST_STARTTLS, "require_tls"))
        } else if self.config.auth_required && self.user.is_none() {
            Some((reply::AUTH_REQUIRED, "auth_required"))
        } else {
            None
        }
    }

    fn mail(
        &mut self,
        from: MailFrom<String>,
        path: Option<String>,
        declared: Option<u64>,
    ) -> Option<Event> {
        if let Some((reply, rule)) = self.mail_gate() {
            return self.refuse_command(reply, rule);
        }
        let params = match mail_params(&from, declared, self.extended) {
            Ok(p) => p,
            // Both kinds: `555 5.5.4` (RFC 5321 §4.1.1.11), rule `mail_parameter`.
            Err(MailParamError::Unsupported | MailParamError::WithoutEhlo) => {
                return self.refuse_command(reply::UNSUPPORTED_PARAMETER, "mail_parameter");
            }
        };
        if params
            .size
            .is_some_and(|s| s > self.config.max_message_size)
        {
            return self.refuse_command(reply::MESSAGE_TOO_BIG, "declared_size");
        }
        // No readable path text (not UTF-8): a syntax error, like a path read two ways.
        let Some(raw) = path.as_deref() else {
            return self.refuse_command(reply::MAIL_SYNTAX, "path_syntax");
        };
        let path = if raw.is_empty() && from.address.is_empty() {
            ReversePath::Null
        } else {
            match path_address(raw, &from.address) {
                Ok(a) => ReversePath::Address(a),
                Err(PathFault::Syntax) => {
                    return self.refuse_command(reply::MAIL_SYNTAX, "path_syntax");
                }
                Err(PathFault::Address(AddressError::BadIdna)) => {
                    return self.refuse_command(reply::BAD_SENDER_ADDRESS, "bad_idna");
                }
                Err(PathFault::Address(_)) => {
                    return self.refuse_command(reply::BAD_SENDER_ADDRESS, "bad_sender");
                }
            }
        };
        // The text as sent decides: a U-label domain needs SMTPUTF8 although the canonical
        // form is its A-label.
        if !raw.is_ascii() && !params.smtputf8 {
            return self.refuse_command(reply::NEED_SMTPUTF8, "utf8_without_smtputf8");
        }
        self.pending = Some(Pending::Mail {
            from: path.clone(),
            params: params.clone(),
        });
        Some(Event::Mail { from: path, params })
    }

    fn rcpt(&mut self, to: RcptTo<String>, path: Option<String>) -> Option<Event> {
        let SessionState::Mail(tx) = &self.state else {
            return if self.helo.is_none() {
                self.refuse_command(reply::NEED_HELO, "need_helo")
            } else {
                self.refuse_command(reply::NEED_MAIL, "need_mail")
            };
        };
        if to.flags != 0 || to.orcpt.is_some() || to.rrvs != 0 {
            return self.refuse_command(reply::UNSUPPORTED_PARAMETER, "rcpt_parameter");
        }
        let smtputf8 = tx.params.smtputf8;
        let count = tx.recipients.len();
        let Some(raw) = path.as_deref() else {
            return self.refuse_command(reply::RCPT_SYNTAX, "path_syntax");
        };
        // `<postmaster>` without a domain (RFC 5321 §4.5.1, any case) goes to the configured
        // `[relay] postmaster`; smtp-proto reports it as an empty address.
        let postmaster = to.address.is_empty() && raw.eq_ignore_ascii_case("postmaster");
        let parsed = if postmaster {
            Ok(self.config.postmaster.clone())
        } else {
            path_address(raw, &to.address)
        };
        let address = match parsed {
            Ok(a) => a,
            Err(PathFault::Syntax) => {
                return self.refuse_command(reply::RCPT_SYNTAX, "path_syntax");
            }
            Err(PathFault::Address(AddressError::BadIdna)) => {
                return self.refuse_command(reply::BAD_RECIPIENT_ADDRESS, "bad_idna");
            }
            Err(PathFault::Address(_)) => {
                return self.refuse_command(reply::BAD_RECIPIENT_ADDRESS, "bad_recipient");
            }
        };
        if !raw.is_ascii() && !smtputf8 {
            return self.refuse_command(reply::NEED_SMTPUTF8, "utf8_without_smtputf8");
        }
        if count >= self.config.max_recipients {
            return self.refuse_command(reply::TOO_MANY_RECIPIENTS, "max_recipients");
        }
        self.pending = Some(Pending::Rcpt {
            address: address.clone(),
            postmaster,
        });
        Some(Event::Rcpt(address))
    }

    fn data(&mut self) -> Option<Event> {
        if self.early_talker() {
            return self.fatal(reply::EARLY_TALKER, "early_talker");
        }
        let (reply, rule) = match &self.state {
            SessionState::Mail(tx) if !tx.recipients.is_empty() => {
                self.pending = Some(Pending::DataStart);
                return Some(Event::DataStart);
            }
            SessionState::Mail(tx) if tx.refused > 0 => {
                (reply::NO_VALID_RECIPIENTS, "no_valid_rcpt")
            }
            SessionState::Mail(_) => (reply::NEED_RCPT, "need_rcpt"),
            _ if self.helo.is_none() => (reply::NEED_HELO, "need_helo"),
            _ => (reply::NEED_MAIL, "need_mail"),
        };
        self.refuse_command(reply, rule)
    }

    fn starttls(&mut self) -> Option<Event> {
        if self.tls {
            return self.refuse_command(reply::ALREADY_TLS, "tls_active");
        }
        if !self.config.starttls {
            return self.refuse_command(reply::STARTTLS_UNAVAILABLE, "starttls_unavailable");
        }
        // STARTTLS injection: whatever followed STARTTLS in the plaintext stream must never be
        // executed, before or after the handshake.
        let discarded = self.input.len() - self.start;
        self.start = self.input.len();
        reply::READY_FOR_TLS.write_to(&mut self.out);
        Some(Event::StartTls { discarded })
    }

    fn auth(&mut self, mechanism: u64, initial: String) -> Option<Event> {
        if !self.config.auth_enabled {
            return self.refuse_command(reply::AUTH_UNAVAILABLE, "auth_unavailable");
        }
        if self.config.require_tls && !self.tls {
            return self.refuse_command(reply::MUST_STARTTLS, "require_tls");
        }
        if !self.tls {
            return self.refuse_command(reply::AUTH_NEEDS_TLS, "auth_without_tls");
        }
        if self.helo.is_none() {
            return self.refuse_command(reply::NEED_HELO, "need_helo");
        }
        if self.user.is_some() {
            return self.refuse_command(reply::ALREADY_AUTHENTICATED, "already_authenticated");
        }
        if matches!(self.state, SessionState::Mail(_)) {
            return self.refuse_command(reply::AUTH_IN_TRANSACTION, "auth_in_transaction");
        }
        let mechanism = match mechanism {
            smtp_proto::AUTH_PLAIN => Mechanism::Plain,
            smtp_proto::AUTH_LOGIN => Mechanism::Login,
            _ => return self.refuse_command(reply::UNSUPPORTED_MECHANISM, "auth_mechanism"),
        };
        match (mechanism, initial.is_empty()) {
            (Mechanism::Plain, true) => {
                self.state = SessionState::Sasl(SaslStep::PlainResponse);
                Reply::new(334, "", "").write_to(&mut self.out);
                None
            }
            (Mechanism::Login, true) => {
                self.state = SessionState::Sasl(SaslStep::LoginUser);
                Reply::new(334, "", "VXNlcm5hbWU6").write_to(&mut self.out);
                None
            }
            (Mechanism::Plain, false) => {
                self.state = SessionState::Sasl(SaslStep::PlainResponse);
                self.sasl_response(initial.as_bytes())
            }
            (Mechanism::Login, false) => {
                self.state = SessionState::Sasl(SaslStep::LoginUser);
                self.sasl_response(initial.as_bytes())
            }
        }
    }

    fn sasl_response(&mut self, line: &[u8]) -> Option<Event> {
        let SessionState::Sasl(step) = std::mem::replace(&mut self.state, SessionState::Idle)
        else {
            return Some(Event::NeedInput);
        };
        let result = sasl::decode_response(line).and_then(|decoded| match step {
            SaslStep::PlainResponse => sasl::parse_plain(&decoded).map(Some),
            SaslStep::LoginUser => {
                let login = sasl::parse_login_field(decoded)?;
                self.state = SessionState::Sasl(SaslStep::LoginPassword { login });
                Ok(None)
            }
            SaslStep::LoginPassword { login } => Ok(Some(Credentials {
                mechanism: Mechanism::Login,
                login,
                password: sasl::parse_login_field(decoded)?,
            })),
        });
        match result {
            Ok(Some(credentials)) => {
                // Only the login is kept for the verdict; the password goes to the driver.
                self.pending = Some(Pending::Auth(credentials.login.clone()));
                Some(Event::Auth(credentials))
            }
            Ok(None) => {
                Reply::new(334, "", "UGFzc3dvcmQ6").write_to(&mut self.out);
                None
            }
            Err(e) => {
                self.state = SessionState::Idle;
                let (reply, rule) = match e {
                    SaslError::Cancelled => (reply::AUTH_CANCELLED, "auth_cancelled"),
                    SaslError::BadBase64 => (reply::BAD_BASE64, "auth_bad_base64"),
                    SaslError::Malformed => (reply::BAD_SASL_MESSAGE, "auth_malformed"),
                    SaslError::AuthzidMismatch => (reply::AUTH_FAILED, "auth_authzid_mismatch"),
                };
                self.refuse_command(reply, rule)
            }
        }
    }
}

/// The text between `<` and `>` of a MAIL FROM or RCPT TO line, as sent, without a source
/// route (`@a,@b:`, which RFC 5321 §4.1.2 says to accept and ignore). `None` when the line
/// has no complete path or it is not UTF-8.
///
/// The end of the path is found the way smtp-proto finds it (a `"` toggles quoting, `\`
/// inside quotes escapes the next octet, the first `>` outside quotes ends the path), and
/// [`path_address`] then checks that both read the same address, so the parameters that
/// smtp-proto parsed after its `>` are the ones after ours.
fn path_text(line: &[u8]) -> Option<&str> {
    let start = line.iter().position(|&b| b == b'<')? + 1;
    let mut quoted = false;
    let mut escaped = false;
    let mut end = None;
    for (i, &b) in line.iter().enumerate().skip(start) {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => {
                end = Some(i);
                break;
            }
            _ => {}
        }
    }
    let text = std::str::from_utf8(&line[start..end?])
        .ok()?
        .trim_matches(' ');
    Some(match text.strip_prefix('@') {
        Some(route) => route.split_once(':').map_or(text, |(_, rest)| rest),
        None => text,
    })
}

/// Why a path's address is refused.
#[derive(Debug, PartialEq, Eq)]
enum PathFault {
    /// Our reading of the path and smtp-proto's differ, or there is no path text: a syntax
    /// error (501), never a guess at which reading the next hop would take.
    Syntax,
    /// The path is not an acceptable address (553).
    Address(AddressError),
}

/// The address of a path: `raw` (from [`path_text`]) parsed by [`Address::parse`], which keeps
/// the local part's quoting information, after checking that smtp-proto's unquoted reading
/// `proto` names the same local part and domain text.
fn path_address(raw: &str, proto: &str) -> Result<Address, PathFault> {
    let address = Address::parse(raw).map_err(PathFault::Address)?;
    let (_, domain) = raw.rsplit_once('@').ok_or(PathFault::Syntax)?;
    match proto.rsplit_once('@') {
        Some((local, d)) if local == address.local() && d == domain => Ok(address),
        _ => Err(PathFault::Syntax),
    }
}

/// True when a command line carries anything after its verb but trailing blanks. smtp-proto
/// skips whatever follows STARTTLS, DATA and RSET, so the session looks itself.
fn has_argument(line: &[u8]) -> bool {
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    line[verb_end..].iter().any(|&b| b != b' ' && b != b'\t')
}

/// The refusal for a verb whose grammar has no argument, when one was given: STARTTLS
/// (RFC 3207 §4: `501` and the session stays in plaintext), DATA and RSET (RFC 5321 §4.1.1.4,
/// §4.1.1.5). QUIT is answered whatever follows it: refusing it would only keep the session.
fn no_argument_allowed(request: &Request<String>) -> Option<(Reply, &'static str)> {
    match request {
        Request::StartTls => Some((reply::STARTTLS_SYNTAX, "starttls_argument")),
        Request::Data => Some((reply::DATA_SYNTAX, "data_argument")),
        Request::Rset => Some((reply::RSET_SYNTAX, "rset_argument")),
        _ => None,
    }
}

/// The `SIZE=` value of a MAIL FROM line, read with saturation at `u64::MAX`. `None` when the
/// line is not MAIL or has no well-formed SIZE parameter (smtp-proto reports the syntax).
fn declared_size(line: &[u8]) -> Option<u64> {
    if line.len() < 5 || !line[..5].eq_ignore_ascii_case(b"MAIL ") {
        return None;
    }
    // Parameters follow the path; an address cannot contain `>` outside a quoted local
    // part, and a SIZE inside one must not count, so look only after the last `>`.
    let params = &line[line.iter().rposition(|&b| b == b'>')? + 1..];
    params.split(|&b| b == b' ').find_map(|token| {
        let value = token
            .get(..5)
            .filter(|k| k.eq_ignore_ascii_case(b"SIZE="))
            .map(|_| &token[5..])?;
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(value.iter().fold(0u64, |n, &d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        }))
    })
}

/// Why MAIL FROM parameters are refused (`555 5.5.4`, RFC 5321 §4.1.1.11 and §4.1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum MailParamError {
    /// A parameter portcullis does not advertise (DSN's ENVID, DELIVERBY, FUTURERELEASE, …).
    #[error("MAIL parameter not advertised")]
    Unsupported,
    /// A parameter after HELO: service extensions need EHLO (RFC 5321 §4.1.1.1).
    #[error("MAIL parameter after HELO")]
    WithoutEhlo,
}

/// Translate MAIL FROM parameters into the ones portcullis honours; anything it does not
/// advertise is refused rather than silently dropped. `declared` is the SIZE value read by
/// [`declared_size`]: smtp-proto's own `size` wraps past `usize::MAX` (26 nines read as
/// 999999), so it is never used.
fn mail_params(
    from: &MailFrom<String>,
    declared: Option<u64>,
    extended: bool,
) -> Result<MailParams, MailParamError> {
    use smtp_proto::{MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8};
    let known = MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_SMTPUTF8;
    let unsupported = from.flags & !known != 0
        || from.env_id.is_some()
        || from.trans_id.is_some()
        || from.solicit.is_some()
        || from.mtrk.is_some()
        || from.by != 0
        || from.hold_for != 0
        || from.hold_until != 0
        || from.mt_priority != 0;
    if unsupported {
        return Err(MailParamError::Unsupported);
    }
    if !extended && (from.flags != 0 || declared.is_some() || from.auth.is_some()) {
        return Err(MailParamError::WithoutEhlo);
    }
    let body = if from.flags & MAIL_BODY_8BITMIME != 0 {
        Some(Body::EightBitMime)
    } else if from.flags & MAIL_BODY_7BIT != 0 {
        Some(Body::SevenBit)
    } else {
        None
    };
    Ok(MailParams {
        body,
        smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
        size: declared.filter(|&n| n != 0),
    })
}

#[cfg(test)]
mod tests;
