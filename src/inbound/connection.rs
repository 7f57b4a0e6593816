//! Drives one SMTP session over a plain or TLS connection.
//!
//! The protocol lives in [`crate::smtp::Session`]; this driver only moves bytes, applies
//! timeouts and shutdown, and carries out the events: policy checks, the TLS handshake,
//! password checks off the reactor, and the spool. It is deliberately short and boring.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Runtime;
use super::assembly::{Arrival, Assembly, Space};
use super::tls::session_info;
use super::verifier::{Lane, Verifier};
use crate::config::{Listener, ListenerTls};
use crate::envelope::{Address, ReversePath, TlsInfo};
use crate::policy::capability;
use crate::policy::credentials::CheckError;
use crate::policy::limits::Limited;
use crate::policy::lockout::{Attempt, FailureReport, login_key};
use crate::policy::{AuthHold, Refusal, SessionFacts};
use crate::queue::reserve::Reservation;
use crate::queue::{Committed, Spool};
use crate::routes::RouteCapabilities;
use crate::smtp::headers::MAX_WHOLE_FIELD;
use crate::smtp::{Credentials, DataFault, Event, Reply, Session, SessionConfig, reply};
use crate::stream::{ServerStream as Stream, closed};

/// Size of each read from the client.
const READ_SIZE: usize = 8 * 1024;

thread_local! {
    /// The read buffer of plain connections, one per runtime thread instead of one per
    /// connection: a plain session waits for its socket to be readable without holding any
    /// buffer, then reads into this one and hands the octets to the session at once. Ten
    /// thousand idle connections cost no read buffers.
    static READ_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; READ_SIZE].into_boxed_slice());
}

/// Read once from `stream` into `session`; the number of octets, 0 at end of stream. A TLS
/// stream reads through `tls_buf` (allocated at its first read): rustls keeps buffers of its
/// own per connection anyway.
async fn read_into(
    stream: &mut Stream,
    session: &mut Session,
    tls_buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    match stream {
        Stream::Plain(tcp) => loop {
            tcp.readable().await?;
            let read = READ_BUF.with_borrow_mut(|buf| {
                let n = tcp.try_read(buf)?;
                session.receive(&buf[..n]);
                Ok::<usize, std::io::Error>(n)
            });
            match read {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        },
        Stream::Closed => Err(closed()),
        Stream::Tls(tls) => {
            if tls_buf.is_empty() {
                tls_buf.resize(READ_SIZE, 0);
            }
            let n = tls.read(tls_buf).await?;
            session.receive(&tls_buf[..n]);
            Ok(n)
        }
    }
}

/// How long past `[limits] session_timeout` a session may still run, a backstop for a
/// step that is not a read (a stalled write of the `421` itself is bounded by
/// `command_timeout`, added to this).
pub const SESSION_GRACE: Duration = Duration::from_secs(60);

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an AUTH waits for its client's verifications in flight before `454 4.7.0`, and
/// again how long it waits for its own verification to be run (rule `auth_busy` either way,
/// the failure budget given back): at most twice this in all.
pub const AUTH_WAIT: Duration = Duration::from_secs(10);

/// How often a waiting AUTH looks at the lockout table again even when no result was
/// announced (an attempt dropped by another session announces nothing).
pub const AUTH_RECHECK: Duration = Duration::from_millis(250);

/// The minimum data rate of a message in stress mode, in octets per second averaged since its
/// data started: a session in DATA must have received `(elapsed - stress_timeout) ×` this
/// many octets, or it is closed with `421 4.4.2` (rule `stress_data_rate`). Postfix's
/// `smtpd_min_data_rate` is the model. A client trickling one octet per `stress_timeout`
/// otherwise holds a slot for `data_timeout`; 1 KiB/s is slower than any real sender.
pub const STRESS_MIN_DATA_RATE: u64 = 1024;

/// How long a refused client may linger sending commands before it is disconnected.
pub const REFUSED_LINGER: Duration = Duration::from_secs(10);

/// Dependencies shared by every connection.
#[derive(Debug, Clone)]
pub struct Shared {
    pub spool: Spool,
    /// Stops accepting; idle sessions are told `421 4.3.0` at once.
    pub shutdown: CancellationToken,
    /// Verifies passwords on its own threads, in bounded memory, behind a bounded queue.
    pub verifier: Arc<Verifier>,
    /// Told of each committed message, so delivery starts at once.
    pub queued: tokio::sync::mpsc::UnboundedSender<Committed>,
    /// What the route to each recipient can carry (checked at RCPT and after the final dot).
    pub capabilities: RouteCapabilities,
    /// True in stress mode: timeouts shrink to `limits.stress_timeout` (see
    /// [`super::limits`]).
    pub stress: tokio::sync::watch::Receiver<bool>,
}

/// How a session ended, for the session log line.
#[derive(Debug, Default)]
struct Outcome {
    messages: u32,
    reason: &'static str,
}

/// One connection from accept to close.
pub struct Connection {
    runtime: Arc<Runtime>,
    listener: Listener,
    shared: Shared,
    peer: SocketAddr,
    session: Session,
    tls: Option<TlsInfo>,
    /// The message being received. Boxed: a session between messages carries only the
    /// pointer.
    assembly: Option<Box<Assembly>>,
    /// Free space held for the current transaction from MAIL until DATA hands it to the
    /// message's [`Assembly`] (see [`crate::queue::reserve`]).
    reservation: Option<Reservation>,
    started: Instant,
    outcome: Outcome,
    /// When the current command or message must be complete. `command_timeout` bounds each
    /// command and `data_timeout` the whole message, not each read: otherwise a client
    /// trickling one octet at a time keeps a session open until `session_timeout`. `None`:
    /// a new phase starts at the next read.
    deadline: Option<Instant>,
    /// When the current message's data started (first read after `354`) and the octets read
    /// since: the minimum data rate of stress mode ([`STRESS_MIN_DATA_RATE`]).
    data_progress: Option<(Instant, u64)>,
}

impl Connection {
    pub fn new(
        runtime: Arc<Runtime>,
        listener: Listener,
        shared: Shared,
        peer: SocketAddr,
    ) -> Self {
        let c = &runtime.config;
        let session = Session::new(SessionConfig {
            hostname: c.server.hostname.clone(),
            postmaster: c.relay.postmaster.clone(),
            max_command_length: c.limits.max_command_length,
            max_message_size: c.limits.max_message_size,
            max_recipients: c.limits.max_recipients,
            max_errors: c.limits.max_errors,
            starttls: listener.tls == ListenerTls::StartTls && runtime.tls.is_some(),
            implicit_tls: listener.tls == ListenerTls::Implicit,
            require_tls: listener.require_tls,
            auth_enabled: listener.auth != crate::config::AuthMode::Off,
            auth_required: listener.auth == crate::config::AuthMode::Required,
        });
        Connection {
            runtime,
            listener,
            shared,
            peer,
            session,
            tls: None,
            assembly: None,
            reservation: None,
            started: Instant::now(),
            outcome: Outcome::default(),
            deadline: None,
            data_progress: None,
        }
    }

    /// Run the session to its end. `refusal` is set when the connect-stage policy refused.
    /// Takes `&mut self`, not `self`: an async fn keeps a by-value argument twice in its
    /// future, and an idle session's memory is mostly that future.
    pub async fn run(&mut self, tcp: TcpStream, refusal: Option<Refusal>) {
        info!(
            peer = %self.peer, listener = %self.listener.name,
            "session start"
        );
        // The session itself says `421 4.4.2` at `session_timeout` (see `read`); this bounds
        // everything else, e.g. a client that stops reading our replies.
        let limits = &self.runtime.config.limits;
        let backstop = limits.session_timeout + limits.command_timeout + SESSION_GRACE;
        let result = tokio::time::timeout(backstop, self.serve(tcp, refusal)).await;
        if result.is_err() {
            warn!(peer = %self.peer, listener = %self.listener.name, rule = "session_time_limit",
                "session closed without a reply: its time limit passed while it was not reading");
            self.outcome.reason = "session time limit";
        }
        // An unfinished message's spool file is removed with it.
        self.assembly = None;
        info!(
            peer = %self.peer, listener = %self.listener.name,
            tls = %self.tls.as_ref().map(|t| t.to_string()).unwrap_or_else(|| "none".into()),
            user = self.session.user().unwrap_or("-"),
            messages = self.outcome.messages,
            secs = self.started.elapsed().as_secs_f32(),
            reason = self.outcome.reason,
            "session end"
        );
    }

    async fn serve(&mut self, tcp: TcpStream, refusal: Option<Refusal>) {
        let mut stream = if self.listener.tls == ListenerTls::Implicit {
            match Box::pin(self.handshake(tcp)).await {
                Some(s) => s,
                None => return,
            }
        } else {
            Stream::Plain(tcp)
        };
        let pregreet = self.phase_timeout(self.runtime.config.limits.pregreet_wait);
        if !pregreet.is_zero() && refusal.is_none() && self.talks_first(&mut stream, pregreet).await
        {
            warn!(peer = %self.peer, rule = "pregreet", reply = %reply::EARLY_TALKER, "rejected");
            self.session.close_with(&reply::EARLY_TALKER);
            self.outcome.reason = "client talked before greeting";
            let _ = self.flush(&mut stream).await;
            return;
        }
        let linger = match refusal {
            Some(r) => {
                warn!(peer = %self.peer, rule = r.rule, reply = %r.reply, "rejected at connect");
                self.session.refuse(&r.reply);
                Some(Instant::now() + REFUSED_LINGER)
            }
            None => {
                self.session.greet();
                None
            }
        };
        let mut tls_buf = Vec::new();
        loop {
            let event = self.session.poll();
            match event {
                Event::NeedInput => {
                    // RSET, or a refused or finished transaction: its space is free again.
                    if self.reservation.is_some() && self.session.transaction().is_none() {
                        self.reservation = None;
                    }
                    if self.flush(&mut stream).await.is_err() {
                        self.outcome.reason = "write error";
                        return;
                    }
                    if self.read(&mut stream, &mut tls_buf, linger).await == Some(0) {
                        self.outcome.reason = "client closed";
                        return;
                    }
                }
                Event::Flush => {
                    if self.flush(&mut stream).await.is_err() {
                        self.outcome.reason = "write error";
                        return;
                    }
                }
                Event::Close => {
                    if self.session.closed_for_junk() {
                        self.outcome.reason = "too many commands without progress";
                        self.log_rejection(&reply::TOO_MANY_JUNK_COMMANDS, "stress_junk_commands");
                    }
                    let _ = self.flush(&mut stream).await;
                    let _ = stream.shutdown().await;
                    if self.outcome.reason.is_empty() {
                        self.outcome.reason = "closed";
                    }
                    return;
                }
                Event::Rejected { reply, rule } => self.log_rejection(&reply, rule),
                Event::Helo { name, extended } => {
                    debug!(peer = %self.peer, helo = %name, extended, "helo");
                    self.session.accept();
                }
                Event::StartTls { discarded } => {
                    if discarded > 0 {
                        warn!(peer = %self.peer, discarded, rule = "starttls_injection",
                            "discarded commands pipelined after STARTTLS");
                    }
                    if self.flush(&mut stream).await.is_err() {
                        return;
                    }
                    let Stream::Plain(tcp) = stream else {
                        return;
                    };
                    match Box::pin(self.handshake(tcp)).await {
                        Some(s) => stream = s,
                        None => return,
                    }
                    self.session.tls_started();
                }
                Event::Auth(credentials) => Box::pin(self.auth(credentials)).await,
                Event::Mail { from, params } => self.mail(&from, &params),
                Event::Rcpt(to) => {
                    let facts = self.facts();
                    let policy = &self.runtime.policy;
                    let verdict = if policy.is_postmaster(&to, self.session.rcpt_is_postmaster()) {
                        debug!(peer = %self.peer, %to, "postmaster recipient");
                        Ok(())
                    } else {
                        policy.rcpt(&facts, &to)
                    };
                    match verdict.and_then(|()| self.route_carries(&to)) {
                        Err(r) => self.refuse(r),
                        Ok(()) => match policy.recipient_rate(&facts, Instant::now()) {
                            Err(l) => self.limited(l),
                            Ok(()) => self.session.accept(),
                        },
                    }
                }
                Event::DataStart => {
                    self.deadline = None;
                    self.data_start();
                }
                Event::DataChunk => self.data_chunk(),
                Event::DataEnd => {
                    self.deadline = None;
                    self.data_progress = None;
                    Box::pin(self.data_end()).await;
                    self.reservation = None;
                }
                Event::DataRejected(fault) => {
                    self.deadline = None;
                    self.data_progress = None;
                    self.data_rejected(fault);
                    self.reservation = None;
                }
            }
        }
    }

    /// RCPT: is there a route for `to`, and can it carry this transaction (SMTPUTF8,
    /// 8BITMIME, SIZE)? Decided now, since a message accepted for a route that cannot take it
    /// could only be bounced (or, without a route, wait in the queue until it expires).
    fn route_carries(&self, to: &Address) -> Result<(), Refusal> {
        let Some(tx) = self.session.transaction() else {
            return Ok(());
        };
        let Some(caps) = self.shared.capabilities.for_domain(to.domain()) else {
            return Err(Refusal {
                reply: reply::NO_ROUTE,
                rule: "no_route",
            });
        };
        capability::rcpt(&caps, &tx.from, &tx.params, to)
    }

    /// End of data: can the route of every recipient carry the message as received, by what
    /// is known of the routes now (the envelope is checked again: an upstream may have been
    /// seen with other capabilities while the message was being received)? `eight_bit`: the
    /// message has 8-bit octets.
    fn routes_carry(&self, header_utf8: bool, eight_bit: bool, size: u64) -> Result<(), Refusal> {
        let Some(tx) = self.session.transaction() else {
            return Ok(());
        };
        tx.recipients.iter().try_for_each(|to| {
            let Some(caps) = self.shared.capabilities.for_domain(to.domain()) else {
                return Ok(());
            };
            capability::rcpt_at_data(&caps, &tx.from, &tx.params, to)?;
            capability::data(&caps, &tx.params, header_utf8, eight_bit, size)
        })
    }

    fn log_rejection(&self, reply: &Reply, rule: &str) {
        info!(peer = %self.peer, listener = %self.listener.name, rule, reply = %reply, "rejected");
    }

    fn refuse(&mut self, r: Refusal) {
        self.log_rejection(&r.reply, r.rule);
        self.session.reject(&r.reply);
    }

    /// Refuse the pending command because a rate limit is exhausted; the log names the limit.
    fn limited(&mut self, l: Limited) {
        let reply = l.reply();
        warn!(
            peer = %self.peer, listener = %self.listener.name,
            user = self.session.user().unwrap_or("-"),
            rule = l.rule, limit = %l.limit_text(), reply = %reply, "rejected"
        );
        self.session.reject(&reply);
    }

    /// Sleep for `normal`, or until `limits.stress_timeout` after stress mode starts (from
    /// now if it is on already), whichever comes first: the timeout of a TLS handshake or of
    /// writing a reply (see [`super::limits`]).
    async fn phase_sleep(&self, normal: Duration) {
        let mut stress = self.shared.stress.clone();
        let stress_timeout = self.runtime.config.limits.stress_timeout;
        tokio::select! {
            _ = tokio::time::sleep(normal) => {}
            _ = async {
                let started = stress.wait_for(|s| *s).await.is_ok();
                if started {
                    tokio::time::sleep(stress_timeout).await;
                } else {
                    // The counter outlives every session; never cut short without it.
                    std::future::pending::<()>().await;
                }
            } => {}
        }
    }

    /// `normal`, or at most `limits.stress_timeout` in stress mode: the pause before the
    /// greeting, decided as it starts (it is short anyway).
    fn phase_timeout(&self, normal: Duration) -> Duration {
        if *self.shared.stress.borrow() {
            normal.min(self.runtime.config.limits.stress_timeout)
        } else {
            normal
        }
    }

    fn facts(&self) -> SessionFacts<'_> {
        SessionFacts {
            client_ip: self.peer.ip(),
            user: self.session.user(),
        }
    }

    /// Write pending replies.
    async fn flush(&mut self, stream: &mut Stream) -> std::io::Result<()> {
        if self.session.output().is_empty() {
            return Ok(());
        }
        let write = async {
            stream.write_all(self.session.output()).await?;
            stream.flush().await
        };
        tokio::select! {
            r = write => {
                self.session.clear_output();
                r
            }
            _ = self.phase_sleep(self.runtime.config.limits.command_timeout) => {
                Err(std::io::ErrorKind::TimedOut.into())
            }
        }
    }

    /// Read once into the session, under the command or DATA timeout. `None` means the
    /// session was told to close (timeout or shutdown): the next poll returns `Close`. In
    /// stress mode (also when it starts during the wait) a command has at most
    /// `stress_timeout` and a message may not pause longer than that.
    async fn read(
        &mut self,
        stream: &mut Stream,
        tls_buf: &mut Vec<u8>,
        linger: Option<Instant>,
    ) -> Option<usize> {
        let limits = &self.runtime.config.limits;
        // RFC 5321 §4.5.3.2: whatever the session is doing, at its time limit it is told
        // `421 4.4.2` before the connection closes.
        let session_end = self.started + limits.session_timeout;
        if session_end <= Instant::now() {
            self.outcome.reason = "session time limit";
            self.log_rejection(&reply::SESSION_TOO_LONG, "session_time_limit");
            self.session.close_with(&reply::SESSION_TOO_LONG);
            return None;
        }
        let stress_timeout = limits.stress_timeout;
        let mut stress = self.shared.stress.clone();
        let mut stressed = *stress.borrow_and_update();
        self.session.set_stressed(stressed);
        let in_data = self.session.in_data();
        if !in_data {
            self.data_progress = None;
        } else if self.data_progress.is_none() {
            self.data_progress = Some((Instant::now(), 0));
        }
        let limit = match (in_data, stressed) {
            (true, _) => limits.data_timeout,
            (false, true) => limits.command_timeout.min(stress_timeout),
            (false, false) => limits.command_timeout,
        };
        // Between commands (nothing partial buffered) the next command starts now; a partial
        // command or a message keeps its deadline (reset at DATA start and end).
        let deadline = match self.deadline {
            Some(d) if in_data || self.session.buffered_input() > 0 => d,
            _ => Instant::now() + limit,
        };
        self.deadline = Some(deadline);
        let started = Instant::now();
        let mut watching = !stressed;
        loop {
            let mut until = self.deadline.unwrap_or(deadline);
            let mut too_slow = false;
            if stressed && in_data {
                until = until.min(started + stress_timeout);
                if let Some(rate_deadline) = self.data_rate_deadline(stress_timeout)
                    && rate_deadline < until
                {
                    until = rate_deadline;
                    too_slow = true;
                }
            }
            if let Some(linger) = linger {
                until = until.min(linger);
            }
            let session_ends = session_end <= until;
            let timeout = until
                .min(session_end)
                .saturating_duration_since(Instant::now());
            // A session in DATA may finish its message during shutdown (the app bounds the
            // wait).
            tokio::select! {
                r = read_into(stream, &mut self.session, tls_buf) => return match r {
                    Ok(n) => {
                        if let Some((_, octets)) = &mut self.data_progress {
                            *octets += n as u64;
                        }
                        Some(n)
                    }
                    Err(e) => {
                        debug!(peer = %self.peer, error = %e, "read error");
                        Some(0)
                    }
                },
                _ = tokio::time::sleep(timeout), if session_ends => {
                    self.outcome.reason = "session time limit";
                    self.log_rejection(&reply::SESSION_TOO_LONG, "session_time_limit");
                    self.session.close_with(&reply::SESSION_TOO_LONG);
                    return None;
                }
                _ = tokio::time::sleep(timeout), if !session_ends => {
                    if too_slow {
                        self.outcome.reason = "data too slow";
                        let (since, octets) = self.data_progress.unwrap_or((Instant::now(), 0));
                        warn!(peer = %self.peer, listener = %self.listener.name,
                            octets, secs = since.elapsed().as_secs_f32(),
                            min_rate = STRESS_MIN_DATA_RATE, rule = "stress_data_rate",
                            reply = %reply::DATA_TOO_SLOW, "rejected");
                        self.session.close_with(&reply::DATA_TOO_SLOW);
                        return None;
                    }
                    self.outcome.reason = "timeout";
                    let rule = if stressed { "stress_timeout" } else { "timeout" };
                    self.log_rejection(&reply::TIMEOUT, rule);
                    self.session.timeout();
                    return None;
                }
                _ = self.shared.shutdown.cancelled(), if !in_data => {
                    self.outcome.reason = "shutdown";
                    self.session.close_with(&reply::SHUTTING_DOWN);
                    return None;
                }
                // Stress starts while this session waits: its current deadline is cut short.
                started_now = stress.wait_for(|s| *s), if watching => {
                    // Err: the counter is gone (the relay is stopping); stop watching.
                    watching = false;
                    if started_now.is_ok() {
                        stressed = true;
                        self.session.set_stressed(true);
                        if !in_data {
                            self.deadline = Some(deadline.min(Instant::now() + stress_timeout));
                        }
                    }
                }
            }
        }
    }

    /// In DATA: the instant the octets received so far fall below [`STRESS_MIN_DATA_RATE`]
    /// averaged since the data started, after `grace` (`stress_timeout`).
    fn data_rate_deadline(&self, grace: Duration) -> Option<Instant> {
        let (since, octets) = self.data_progress?;
        Some(
            since
                + grace
                + Duration::from_millis(octets.saturating_mul(1000) / STRESS_MIN_DATA_RATE),
        )
    }

    /// Before the greeting: true if the client sent anything within `wait`.
    async fn talks_first(&self, stream: &mut Stream, wait: Duration) -> bool {
        match stream {
            Stream::Plain(tcp) => {
                let mut probe = [0u8; 1];
                matches!(
                    tokio::time::timeout(wait, tcp.peek(&mut probe)).await,
                    Ok(Ok(n)) if n > 0
                )
            }
            // Implicit TLS: a client that completed the handshake speaks only after the banner.
            Stream::Tls(_) => {
                tokio::time::sleep(wait).await;
                false
            }
            Stream::Closed => false,
        }
    }

    async fn handshake(&mut self, tcp: TcpStream) -> Option<Stream> {
        let Some(config) = self.runtime.tls.clone() else {
            warn!(peer = %self.peer, "TLS requested but no certificate is configured");
            return None;
        };
        let acceptor = TlsAcceptor::from(config);
        // The session's time limit holds during a handshake too; no SMTP reply can be sent
        // in the middle of one, so the connection is only closed (and logged).
        let session_end = self.started + self.runtime.config.limits.session_timeout;
        let session_left = session_end.saturating_duration_since(Instant::now());
        let accepted = tokio::select! {
            r = acceptor.accept(tcp) => Ok(r),
            _ = self.phase_sleep(HANDSHAKE_TIMEOUT.min(session_left)) => Err(()),
        };
        match accepted {
            Ok(Ok(tls)) => {
                self.tls = session_info(tls.get_ref().1);
                debug!(peer = %self.peer, tls = ?self.tls, "TLS established");
                Some(Stream::Tls(Box::new(tls)))
            }
            Ok(Err(e)) => {
                info!(peer = %self.peer, error = %e, "TLS handshake failed");
                self.outcome.reason = "TLS handshake failed";
                None
            }
            Err(_) if Instant::now() >= session_end => {
                info!(peer = %self.peer, listener = %self.listener.name,
                    rule = "session_time_limit", "session time limit reached during the TLS handshake; closed");
                self.outcome.reason = "session time limit";
                None
            }
            Err(_) => {
                info!(peer = %self.peer, "TLS handshake timed out");
                self.outcome.reason = "TLS handshake timeout";
                None
            }
        }
    }

    async fn auth(&mut self, credentials: Credentials) {
        let Some(attempt) = self.auth_attempt(&credentials.login).await else {
            return;
        };
        let (hash, known) = self.runtime.policy.auth_hash(&credentials.login);
        let login = credentials.login;
        let delay = attempt.delay;
        let lane = if attempt.known {
            Lane::Known
        } else {
            Lane::Other
        };
        let answer_at = tokio::time::Instant::now() + delay;
        let verifier = Arc::clone(&self.shared.verifier);
        let Ok(result) = verifier.submit(hash, credentials.password, &login, lane) else {
            // Nothing was verified: the reservation is given back, not counted.
            attempt.release();
            verifier.notify_settled();
            return self.refuse(Refusal {
                reply: reply::AUTH_TEMPORARY,
                rule: "auth_busy",
            });
        };
        // The wait for a verifier thread is bounded too: under a flood that outlasts
        // AUTH_WAIT, `454 4.7.0` now. The verification may already be running, so its
        // reservation is not given back here: it is kept until the result is known and then
        // recorded like any other (a failure counts), so a client cannot have more checks in
        // flight than the lockout allows by letting earlier ones time out.
        let mut result = result;
        let Ok(result) = tokio::time::timeout(AUTH_WAIT, &mut result).await else {
            let verifier = Arc::clone(&verifier);
            tokio::spawn(async move {
                match result.await {
                    Ok(Ok(ok)) => {
                        attempt.settle(ok && known, Instant::now());
                    }
                    // Not verified (a local failure): nothing to count.
                    _ => attempt.release(),
                }
                verifier.notify_settled();
            });
            return self.refuse(Refusal {
                reply: reply::AUTH_TEMPORARY,
                rule: "auth_busy",
            });
        };
        // `Err`: the check itself failed (argon2 refused the stored parameters, the verifier
        // panicked, or its thread is gone and dropped the sender): not the client's fault.
        let checked =
            result.unwrap_or_else(|_| Err(CheckError::Verifier("verifier thread gone".into())));
        let ok = match checked {
            Ok(ok) => ok,
            Err(error) => {
                // RFC 4954 §6: 454 4.7.0 for a temporary failure; the reservation is given
                // back, not recorded as a failure, so a broken verifier cannot lock users out.
                attempt.release();
                verifier.notify_settled();
                warn!(peer = %self.peer, listener = %self.listener.name,
                    login = login_key(&login), %error, rule = "auth_verifier_failed",
                    reply = %reply::AUTH_TEMPORARY, "rejected");
                return self.session.reject(&reply::AUTH_TEMPORARY);
            }
        };
        let success = ok && known;
        let report = attempt.settle(success, Instant::now());
        verifier.notify_settled();
        // A sprayed login is answered no sooner than `delay`, right password or wrong.
        tokio::time::sleep_until(answer_at).await;
        self.log_auth_report(&login, &report, delay);
        if success {
            info!(peer = %self.peer, user = %login, "authenticated");
            self.session.accept();
        } else {
            self.refuse(Refusal {
                reply: reply::AUTH_FAILED,
                rule: if known {
                    "auth_bad_password"
                } else {
                    "auth_unknown_user"
                },
            });
        }
    }

    /// The AUTH gate: refuse a locked-out client; while the client's failure budget is held
    /// by verifications in flight, wait for them to settle (re-checking at least every
    /// [`AUTH_RECHECK`], for at most [`AUTH_WAIT`], then `454 4.7.0`, rule `auth_busy`).
    async fn auth_attempt(&mut self, login: &str) -> Option<Attempt> {
        let ip = self.peer.ip();
        let verifier = Arc::clone(&self.shared.verifier);
        let deadline = tokio::time::Instant::now() + AUTH_WAIT;
        loop {
            // Registered before the check, so a result recorded in between is not missed.
            let settled = verifier.settled();
            tokio::pin!(settled);
            settled.as_mut().enable();
            match self.runtime.policy.auth_gate(ip, login, Instant::now()) {
                Ok(attempt) => return Some(attempt),
                Err(AuthHold::Refused(r)) => {
                    warn!(peer = %self.peer, listener = %self.listener.name,
                        login = login_key(login), rule = r.rule, reply = %r.reply, "rejected");
                    self.session.reject(&r.reply);
                    return None;
                }
                Err(AuthHold::Wait) => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                self.refuse(Refusal {
                    reply: reply::AUTH_TEMPORARY,
                    rule: "auth_busy",
                });
                return None;
            }
            let _ = tokio::time::timeout_at(deadline.min(now + AUTH_RECHECK), settled).await;
        }
    }

    /// Log what an AUTH outcome led to: a lockout, a spraying alert, a delayed answer. The
    /// login is shown cut to a bounded length (a SASL response may be 12 KiB).
    fn log_auth_report(&self, login: &str, report: &FailureReport, delay: Duration) {
        let login = login_key(login);
        if let Some(failures) = report.locked_out {
            warn!(peer = %self.peer, listener = %self.listener.name, login, failures,
                rule = "auth_lockout", "client locked out after repeated AUTH failures");
        }
        if let Some((failures, clients)) = report.spraying {
            warn!(login, failures, distinct_ips = clients, last_peer = %self.peer,
                rule = "auth_spraying", "password spraying against one login from several clients");
        }
        if !delay.is_zero() {
            info!(peer = %self.peer, login, delay_ms = delay.as_millis() as u64,
                rule = "auth_spraying", "AUTH answer delayed");
        }
    }

    fn mail(&mut self, from: &ReversePath, params: &crate::envelope::MailParams) {
        let facts = self.facts();
        if let Err(r) = self.runtime.policy.mail(&facts, from) {
            info!(peer = %self.peer, user = facts.user.unwrap_or("-"), %from,
                rule = r.rule, reply = %r.reply, "rejected");
            return self.session.reject(&r.reply);
        }
        if let Err(l) = self.runtime.policy.message_rate(&facts, Instant::now()) {
            return self.limited(l);
        }
        // The most this transaction may write, held until it ends (see queue::reserve).
        self.reservation = None;
        let limits = &self.runtime.config.limits;
        let bytes = params
            .size
            .map_or(limits.max_message_size, |s| s.min(limits.max_message_size));
        match self.shared.spool.reserve(bytes, limits.min_free_space) {
            Ok(Ok(reservation)) => self.reservation = Some(reservation),
            Ok(Err(short)) => {
                warn!(peer = %self.peer, free = short.free, reserved = short.reserved,
                    bytes = short.bytes, min_free = short.min_free, rule = "min_free_space",
                    reply = %reply::INSUFFICIENT_STORAGE,
                    "rejected: spool free space, minus messages in flight, below min_free_space");
                return self.session.reject(&reply::INSUFFICIENT_STORAGE);
            }
            Err(e) => {
                warn!(error = %e, "cannot read spool free space");
                return self.refuse(Refusal {
                    reply: reply::LOCAL_ERROR,
                    rule: "spool_statvfs",
                });
            }
        }
        debug!(peer = %self.peer, %from, "mail from");
        self.session.accept();
    }

    /// DATA: start assembling the message (`354`), or refuse when its spool file cannot be
    /// created.
    fn data_start(&mut self) {
        let Some(tx) = self.session.transaction() else {
            return self.session.accept();
        };
        // Fields, not `self.facts()`: the reservation is borrowed apart from the rest.
        let facts = SessionFacts {
            client_ip: self.peer.ip(),
            user: self.session.user(),
        };
        let policy = &self.runtime.policy;
        let arrival = Arrival {
            listener: &self.listener.name,
            peer: self.peer,
            helo: self.session.helo().unwrap_or_default(),
            extended: self.session.is_extended(),
            tls: self.tls.as_ref(),
            auth_user: self.session.user(),
            transaction: tx,
            hostname: &self.runtime.config.server.hostname,
        };
        let space = Space {
            reservation: &mut self.reservation,
            min_free: self.runtime.config.limits.min_free_space,
        };
        let started = Assembly::start(
            &self.shared.spool,
            &arrival,
            policy.header_rules(&facts),
            policy.from_check(&facts),
            space,
        );
        match started {
            Ok(assembly) => {
                self.assembly = Some(Box::new(assembly));
                let normalize = policy.normalize_bare_lf(&self.listener, &self.facts());
                self.session.accept_data(normalize);
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "cannot create spool file");
                self.refuse(e.refusal());
            }
        }
    }

    fn data_chunk(&mut self) {
        if let Some(assembly) = self.assembly.as_mut() {
            assembly.push(self.session.data_chunk());
        }
    }

    /// The final dot: the end-of-data checks, then the commit and `250`.
    async fn data_end(&mut self) {
        let Some(mut assembly) = self.assembly.take() else {
            return self.session.reject(&reply::LOCAL_ERROR);
        };
        assembly.finish();
        // A refused message's spool file goes with its assembly.
        if !self.end_of_data(&mut assembly) {
            return;
        }
        let size = assembly.size();
        match assembly.commit().await {
            Ok(committed) => self.queued(committed, size),
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "spool commit failed");
                self.refuse(e.refusal());
            }
        }
    }

    /// The end-of-data checks, in order: header field size, hop count, the spool writes, the
    /// `From:` check, the routes. False when the message was refused (the reply is queued).
    fn end_of_data(&mut self, assembly: &mut Assembly) -> bool {
        if let Some(name) = assembly.header_too_large() {
            info!(peer = %self.peer, field = name, max = MAX_WHOLE_FIELD, "header field too large");
            self.refuse(Refusal {
                reply: reply::HEADER_TOO_LARGE,
                rule: "header_too_large",
            });
            return false;
        }
        if assembly.received_count() > self.runtime.config.limits.hop_limit as usize {
            self.refuse(Refusal {
                reply: reply::TOO_MANY_HOPS,
                rule: "hop_limit",
            });
            return false;
        }
        if let Some(failure) = assembly.write_failed() {
            self.refuse(failure.refusal());
            return false;
        }
        if let Err((r, address)) = self.runtime.policy.data(assembly.take_from_check()) {
            info!(peer = %self.peer, user = self.session.user().unwrap_or("-"),
                from_header = address.as_deref().unwrap_or("-"),
                rule = r.rule, reply = %r.reply, "rejected");
            self.session.reject(&r.reply);
            return false;
        }
        let carried = self.routes_carry(
            assembly.header_utf8(),
            assembly.eight_bit(),
            assembly.size(),
        );
        if let Err(r) = carried {
            self.refuse(r);
            return false;
        }
        true
    }

    /// The message (`size` octets) is durable: log it, tell the session (`250`), hand it to
    /// delivery.
    fn queued(&mut self, committed: Committed, size: u64) {
        let id = &committed.id;
        if let Some(tx) = self.session.transaction() {
            info!(
                queue_id = %id, peer = %self.peer, listener = %self.listener.name,
                from = %tx.from, rcpts = tx.recipients.len(), size, "queued"
            );
        }
        self.outcome.messages += 1;
        self.session.queued(id.as_str());
        // After the 250 is queued for sending; a closed channel (shutdown) is fine: the
        // message is on disk and the next start delivers it.
        let _ = self.shared.queued.send(committed);
    }

    fn data_rejected(&mut self, fault: DataFault) {
        self.assembly = None;
        let (reply, rule) = match fault {
            DataFault::BareLineEnding => {
                (reply::BARE_LINE_ENDING_IN_DATA, "bare_line_ending_in_data")
            }
            DataFault::TooBig => (reply::MESSAGE_TOO_BIG, "max_message_size"),
        };
        self.log_rejection(&reply, rule);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle session is mostly its task's future: keep it small (scenario D of
    /// BENCHMARKS.md, ten thousand idle connections). Rare, large steps (TLS handshake, AUTH,
    /// end of DATA) are boxed and the message being received is behind a pointer. With
    /// `run(self)` instead of `run(&mut self)` the future was 4.4 KB.
    #[test]
    fn an_idle_session_stays_small() {
        let connection = std::mem::size_of::<Connection>();
        let run = future_size(
            |c: &mut Connection, tcp: TcpStream, refusal: Option<Refusal>| c.run(tcp, refusal),
        );
        assert!(connection <= 1024, "Connection is {connection} bytes");
        assert!(run <= 1536, "the session future is {run} bytes");
    }
}
