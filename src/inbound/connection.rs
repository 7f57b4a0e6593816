//! Drives one SMTP session over any byte stream: plain, or TLS after STARTTLS or on an
//! implicit-TLS listener.
//!
//! The protocol lives in [`crate::smtp::Session`] and the decisions in
//! [`crate::policy::stage`]; this driver only moves bytes, applies timeouts and shutdown, and
//! dispatches each [`Event`] to one method per stage. Every stage runs through one method,
//! `SessionDriver::stage`, which hands the stage's facts to the effect runner
//! ([`super::effects`]) and returns the verdict; a stage handler only builds its input and
//! answers. A new check therefore never touches this file (see [`crate::policy::stage`]).
//! It is deliberately short and boring. Its log lines carry the peer through the `session`
//! span the listener opens, and those about one message its queue id through a `message`
//! span; every refusal is logged and recorded by one method, `SessionDriver::refused`
//! (see [`super::record`]).

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::Runtime;
use super::assembly::{Arrival, Assembly, Space};
use super::effects::Effects;
use super::record::{self, Refused};
use super::tls::session_info;
use super::verifier::Verifier;
use crate::config::{Config, Listener, ListenerTls};
use crate::envelope::{Address, ReversePath, TlsInfo};
use crate::observe::{Event as Recorded, EventKind};
use crate::policy::stage::{EndOfData, Input, RcptFacts, StageFacts, TransactionFacts};
use crate::policy::{Detail, Refusal, SessionFacts};
use crate::queue::{Committed, Spool};
use crate::routes::RouteCapabilities;
use crate::smtp::{Credentials, DataFault, Event, Reply, Session, SessionConfig, reply};
use crate::stream::{ServerStream, Stream, closed};

/// What the driver reads from and writes to: TCP on the wire, an in-memory pipe in tests.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Io for S {}

/// Size of each read from the client.
const READ_SIZE: usize = 8 * 1024;

thread_local! {
    /// The read buffer of plain connections, one per runtime thread instead of one per
    /// connection: a plain session waits for its stream to be readable without holding any
    /// buffer, then reads into this one and hands the octets to the session within the same
    /// poll (it is never held across an await). Ten thousand idle connections cost no read
    /// buffers.
    static READ_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; READ_SIZE].into_boxed_slice());
}

/// Read once from `io` into the thread's [`READ_BUF`] and hand the octets to `take`; the
/// number of octets, 0 at end of stream.
async fn read_plain<S: Io>(io: &mut S, mut take: impl FnMut(&[u8])) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        READ_BUF.with_borrow_mut(|buf| {
            let mut read = ReadBuf::new(buf);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    take(read.filled());
                    Poll::Ready(Ok(read.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

/// Read once from `stream` into `session`; the number of octets, 0 at end of stream. A TLS
/// stream reads through `tls_buf` (allocated at its first read): rustls keeps buffers of its
/// own per connection anyway.
async fn read_into<S: Io>(
    stream: &mut ServerStream<S>,
    session: &mut Session,
    tls_buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    match stream {
        Stream::Plain(io) => read_plain(io, |octets| session.receive(octets)).await,
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
    /// Where messages are written, and the free-space reserve of messages in flight.
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
    /// [`super::pressure`]).
    pub stress: tokio::sync::watch::Receiver<bool>,
    /// The slots of message verifications in flight (see
    /// [`super::effects::VERIFICATIONS_PER_CORE`]).
    pub verifications: Arc<tokio::sync::Semaphore>,
    /// Where session events are recorded (metrics, flow, journal) and whether the listeners
    /// are paused.
    pub telemetry: Arc<crate::observe::Telemetry>,
    /// `[containment]`'s counters and the suspended logins.
    pub containment: Arc<crate::policy::containment::Containment>,
    /// The store shared with the other nodes (`[cluster] redis`); `None`: this node's state
    /// is its own.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// What a refusal concerns besides the session, for its event (and so for `trace`).
#[derive(Clone, Copy)]
enum About<'a> {
    /// The session, and its transaction's sender if one is open (HELO, AUTH, the engine's
    /// own refusals, timeouts).
    Session,
    /// A MAIL command's sender.
    Mail(&'a ReversePath),
    /// A RCPT command's recipient, with the transaction's sender.
    Rcpt(&'a Address),
    /// The open transaction: its sender and every recipient (DATA).
    Transaction,
    /// A message whose spool file exists: its queue id, envelope and Message-ID.
    Message(&'a Assembly),
}

/// How a session ended, for the session log line.
#[derive(Debug, Default)]
struct SessionEnd {
    messages: u32,
    reason: &'static str,
}

/// One connection from accept to close.
pub struct SessionDriver {
    runtime: Arc<Runtime>,
    listener: Listener,
    shared: Arc<Shared>,
    peer: SocketAddr,
    session: Session,
    tls: Option<TlsInfo>,
    /// The message being received. Boxed: a session between messages carries only the
    /// pointer.
    assembly: Option<Box<Assembly>>,
    /// What the effects of the stages leave for later (the transaction's space reservation,
    /// lookups started at one stage and read at a later one).
    effects: Effects,
    started: Instant,
    end: SessionEnd,
    /// When the current command or message must be complete. `command_timeout` bounds each
    /// command and `data_timeout` the whole message, not each read: otherwise a client
    /// trickling one octet at a time keeps a session open until `session_timeout`. `None`:
    /// a new phase starts at the next read.
    deadline: Option<Instant>,
    /// When the current message's data started (first read after `354`) and the octets read
    /// since: the minimum data rate of stress mode ([`STRESS_MIN_DATA_RATE`]).
    data_progress: Option<(Instant, u64)>,
    /// A client refused at connect is disconnected at this time ([`REFUSED_LINGER`]).
    linger: Option<Instant>,
}

impl SessionDriver {
    pub fn new(
        runtime: Arc<Runtime>,
        listener: Listener,
        shared: Arc<Shared>,
        peer: SocketAddr,
    ) -> Self {
        let session = Session::new(session_config(
            &runtime.config,
            &listener,
            runtime.tls.is_some(),
        ));
        SessionDriver {
            runtime,
            listener,
            shared,
            peer,
            session,
            tls: None,
            assembly: None,
            effects: Effects::default(),
            started: Instant::now(),
            end: SessionEnd::default(),
            deadline: None,
            data_progress: None,
            linger: None,
        }
    }

    /// Run the session to its end: the connect stage first (a `421` there closes the
    /// connection at once, with no session start or end line), then the session. Takes
    /// `&mut self`, not `self`: an async fn keeps a by-value argument twice in its future,
    /// and an idle session's memory is mostly that future.
    pub async fn run<S: Io>(&mut self, io: S) {
        let refusal = Box::pin(self.stage(|_| Input::Connect)).await.err();
        if let Some(r) = refusal.as_ref().filter(|r| r.reply.code == 421) {
            return self.closed_at_connect(io, r).await;
        }
        if refusal.is_none() {
            let connected = self.client().event(EventKind::Connect);
            self.shared.telemetry.record(&connected);
        }
        info!("session start");
        // The session itself says `421 4.4.2` at `session_timeout` (see `read`); this bounds
        // everything else, e.g. a client that stops reading our replies.
        let limits = &self.runtime.config.limits;
        let backstop = limits.session_timeout + limits.command_timeout + SESSION_GRACE;
        let result = tokio::time::timeout(backstop, self.serve(io, refusal)).await;
        if result.is_err() {
            let what =
                "session closed without a reply: its time limit passed while it was not reading";
            self.refused(
                &Refused::unanswered("session_time_limit", what),
                About::Session,
            );
            self.end.reason = "session time limit";
        }
        // An unfinished message's spool file is removed with it.
        self.assembly = None;
        info!(
            tls = %self.tls.as_ref().map(|t| t.to_string()).unwrap_or_else(|| "none".into()),
            user = self.session.user().unwrap_or("-"),
            messages = self.end.messages,
            secs = self.started.elapsed().as_secs_f32(),
            reason = self.end.reason,
            "session end"
        );
        let tls = record::tls_version(self.tls.as_ref());
        (self.shared.telemetry.metrics).session_ended(&self.listener.name, tls);
    }

    /// A `421` closes the channel (RFC 5321 §3.8): a client the connect stage refuses so
    /// (over its connection rate) is refused like one over a connection cap, before any TLS
    /// handshake, with no session of its own (not counted in the sessions), and given the
    /// listener's `REFUSAL_WRITE_TIMEOUT` to read it.
    async fn closed_at_connect<S: Io>(&self, io: S, r: &Refusal) {
        let refused = Refused::of(r).warning().saying("rejected at connect");
        self.refused(&refused, About::Session);
        super::listener::refuse(io, &r.reply).await;
    }

    /// This session as its events name it.
    fn client(&self) -> record::Client<'_> {
        record::Client {
            listener: &self.listener.name,
            ip: self.peer.ip(),
            tls: self.tls.as_ref(),
            login: self.session.user(),
        }
    }

    /// The event of this session about `about` (sender, recipients, message), of `kind`.
    fn event_about(&self, kind: EventKind, about: About<'_>) -> Recorded {
        let mut event = self.client().event(kind);
        let tx = self.session.transaction();
        match about {
            About::Message(message) => {
                let envelope = message.envelope();
                event.id = Some(envelope.id.as_str().to_owned());
                event.message_id = message.message_id().map(str::to_owned);
                event.from = Some(envelope.mail_from.bare());
                event.rcpts = record::recipients(envelope.recipients.iter().map(|r| &r.address));
            }
            About::Mail(from) => event.from = Some(from.bare()),
            About::Rcpt(to) => {
                event.from = tx.map(|t| t.from.bare());
                event.rcpts = vec![to.to_string()];
            }
            About::Transaction => {
                event.from = tx.map(|t| t.from.bare());
                event.rcpts = tx
                    .map(|t| record::recipients(&t.recipients))
                    .unwrap_or_default();
            }
            About::Session => event.from = tx.map(|t| t.from.bare()),
        }
        event
    }

    /// Log and record the refusal `r` of this session, about `about`: the one way a
    /// refusal of a session is reported.
    fn refused(&self, r: &Refused<'_>, about: About<'_>) {
        let event = self.event_about(EventKind::Refused, about);
        record::refused(&self.shared.telemetry, event, r);
    }

    /// The session's main loop: open, then dispatch each event of the protocol engine.
    async fn serve<S: Io>(&mut self, io: S, refusal: Option<Refusal>) {
        let Some(mut stream) = Box::pin(self.open(io, refusal)).await else {
            return;
        };
        let mut tls_buf = Vec::new();
        loop {
            let event = self.session.poll();
            if self
                .dispatch(event, &mut stream, &mut tls_buf)
                .await
                .is_break()
            {
                return;
            }
        }
    }

    /// Carry out one event; `Break` ends the session.
    async fn dispatch<S: Io>(
        &mut self,
        event: Event,
        stream: &mut ServerStream<S>,
        tls_buf: &mut Vec<u8>,
    ) -> ControlFlow<()> {
        match event {
            Event::NeedInput => return self.need_input(stream, tls_buf).await,
            Event::Flush => return self.flush_or_end(stream).await,
            Event::Close => {
                self.close(stream).await;
                return ControlFlow::Break(());
            }
            Event::Rejected { reply, rule } => self.log_rejection(&reply, rule),
            Event::Helo { name, extended } => Box::pin(self.helo(&name, extended)).await,
            Event::StartTls { discarded } => {
                return Box::pin(self.starttls(stream, discarded)).await;
            }
            Event::Auth(credentials) => Box::pin(self.auth(credentials)).await,
            Event::Mail { from, params } => Box::pin(self.mail(&from, params.size)).await,
            Event::Rcpt(to) => Box::pin(self.rcpt(&to)).await,
            Event::DataStart => self.data_start(),
            Event::DataChunk => self.data_chunk(),
            Event::DataEnd => Box::pin(self.data_end()).await,
            Event::DataRejected(fault) => self.data_rejected(fault),
        }
        ControlFlow::Continue(())
    }

    /// Implicit TLS, the pause before the greeting, and the greeting (or the connect stage's
    /// `refusal`). `None`: the session is over.
    async fn open<S: Io>(&mut self, io: S, refusal: Option<Refusal>) -> Option<ServerStream<S>> {
        let mut stream = if self.listener.tls == ListenerTls::Implicit {
            self.handshake(io).await?
        } else {
            Stream::Plain(io)
        };
        let pregreet = self.phase_timeout(self.runtime.config.limits.pregreet_wait);
        if !pregreet.is_zero() && refusal.is_none() && talks_first(&mut stream, pregreet).await {
            let early = reply::EARLY_TALKER;
            self.refused(&Refused::rule("pregreet", &early).warning(), About::Session);
            self.session.close_with(&reply::EARLY_TALKER);
            self.end.reason = "client talked before greeting";
            let _ = self.flush(&mut stream).await;
            return None;
        }
        match refusal {
            Some(r) => {
                let refused = Refused::of(&r).warning().saying("rejected at connect");
                self.refused(&refused, About::Session);
                self.session.refuse(&r.reply);
                self.linger = Some(Instant::now() + REFUSED_LINGER);
            }
            None => self.session.greet(),
        }
        Some(stream)
    }

    /// Write what is pending and read more (RSET, or a refused or finished transaction,
    /// frees its space first).
    async fn need_input<S: Io>(
        &mut self,
        stream: &mut ServerStream<S>,
        tls_buf: &mut Vec<u8>,
    ) -> ControlFlow<()> {
        if self.session.transaction().is_none() {
            self.effects.transaction_ended();
        }
        self.flush_or_end(stream).await?;
        if self.read(stream, tls_buf).await == Some(0) {
            self.end.reason = "client closed";
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    async fn flush_or_end<S: Io>(&mut self, stream: &mut ServerStream<S>) -> ControlFlow<()> {
        if self.flush(stream).await.is_err() {
            self.end.reason = "write error";
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    async fn close<S: Io>(&mut self, stream: &mut ServerStream<S>) {
        if self.session.closed_for_junk() {
            self.end.reason = "too many commands without progress";
            self.log_rejection(&reply::TOO_MANY_JUNK_COMMANDS, "stress_junk_commands");
        } else if self.session.closed_for_errors() {
            self.end.reason = "too many errors";
            self.log_rejection(&reply::TOO_MANY_ERRORS, "max_errors");
        }
        let _ = self.flush(stream).await;
        let _ = stream.shutdown().await;
        if self.end.reason.is_empty() {
            self.end.reason = "closed";
        }
    }

    /// STARTTLS (RFC 3207): the `220` is flushed, then the handshake replaces the stream.
    async fn starttls<S: Io>(
        &mut self,
        stream: &mut ServerStream<S>,
        discarded: usize,
    ) -> ControlFlow<()> {
        if discarded > 0 {
            let detail = Detail::Text(format!("{discarded} octets pipelined after STARTTLS"));
            let what = "discarded commands pipelined after STARTTLS";
            let refused = Refused::unanswered("starttls_injection", what).with_detail(&detail);
            self.refused(&refused, About::Session);
        }
        if self.flush(stream).await.is_err() {
            return ControlFlow::Break(());
        }
        let Stream::Plain(io) = std::mem::replace(stream, Stream::Closed) else {
            return ControlFlow::Break(());
        };
        *stream = match self.handshake(io).await {
            Some(s) => s,
            None => return ControlFlow::Break(()),
        };
        self.session.tls_started();
        ControlFlow::Continue(())
    }

    /// Evaluate one stage: `input` builds what the stage is about (it may borrow the
    /// session: the transaction, the recipients), and the effect runner carries out the
    /// effects the stage asks for until its verdict. Every stage runs through here.
    async fn stage<'d>(
        &'d mut self,
        input: impl FnOnce(&'d Session) -> Input<'d>,
    ) -> Result<(), Refusal> {
        self.stage_of(None, input).await
    }

    /// [`SessionDriver::stage`] for the end-of-data stage of `message`, whose bytes the
    /// verification and signing effects read.
    async fn stage_message<'d>(
        &'d mut self,
        message: &Assembly,
        input: impl FnOnce(&'d Session) -> Input<'d>,
    ) -> Result<(), Refusal> {
        self.stage_of(Some(message), input).await
    }

    async fn stage_of<'d>(
        &'d mut self,
        message: Option<&Assembly>,
        input: impl FnOnce(&'d Session) -> Input<'d>,
    ) -> Result<(), Refusal> {
        // Borrowed field by field: the facts read the session while the effects change.
        let SessionDriver {
            runtime,
            listener,
            shared,
            peer,
            session,
            effects,
            ..
        } = self;
        let session: &'d Session = session;
        // Every stage of a login suspended meanwhile (a command read before the suspension,
        // the final dot) is refused before anything else is looked at.
        if login_suspended(session, shared) {
            return Err(suspended());
        }
        let facts = StageFacts {
            session: session_facts(*peer, session),
            listener,
            input: input(session),
        };
        match message {
            Some(message) => {
                effects
                    .decide_message(runtime, shared, &facts, message)
                    .await
            }
            None => effects.decide(runtime, shared, &facts).await,
        }
    }

    /// Accept the pending command, or refuse it as the verdict says (the refusal is about
    /// `about`).
    fn answer(&mut self, verdict: Result<(), Refusal>, about: About<'_>) {
        match verdict {
            Ok(()) => self.session.accept(),
            Err(r) => self.refuse(r, about),
        }
    }

    async fn helo(&mut self, name: &str, extended: bool) {
        debug!(helo = %name, extended, "helo");
        let verdict = self.stage(|_| Input::Helo { name }).await;
        self.answer(verdict, About::Session);
    }

    async fn auth(&mut self, credentials: Credentials) {
        let Credentials {
            login, password, ..
        } = credentials;
        let verdict = (self.stage(|_| Input::Auth {
            login: &login,
            password: &password,
        }))
        .await;
        if verdict.is_ok() {
            info!(user = %login, "authenticated");
        }
        record::auth_outcome(&self.shared.telemetry, &verdict);
        self.answer(verdict, About::Session);
    }

    async fn mail(&mut self, from: &ReversePath, size: Option<u64>) {
        let verdict = (self.stage(|session| Input::Mail {
            from,
            size,
            helo: session.helo().unwrap_or_default(),
        }))
        .await;
        if verdict.is_ok() {
            debug!(%from, "mail from");
        }
        self.answer(verdict, About::Mail(from));
    }

    async fn rcpt(&mut self, to: &Address) {
        let route = self.shared.capabilities.for_domain(to.domain());
        let verdict = (self.stage(|session| rcpt_input(session, to, route))).await;
        self.answer(verdict, About::Rcpt(to));
    }

    /// Log and record a refusal by `rule` with `reply` (the engine's own, timeouts): about
    /// the message being received, if any.
    fn log_rejection(&self, reply: &Reply, rule: &'static str) {
        self.refused(&Refused::rule(rule, reply), self.receiving());
    }

    /// What a refusal during DATA is about: the message being received, if any.
    fn receiving(&self) -> About<'_> {
        self.assembly
            .as_deref()
            .map_or(About::Session, About::Message)
    }

    /// Refuse the pending command with `r`, logged and recorded about `about`.
    fn refuse(&mut self, r: Refusal, about: About<'_>) {
        self.refused(&Refused::of(&r), about);
        self.reject(&r);
    }

    /// Refuse the pending command with `r`'s reply; a `421` also closes the session (RFC 5321
    /// §3.8), its rule the session's end reason.
    fn reject(&mut self, r: &Refusal) {
        if r.reply.code == 421 {
            self.end.reason = r.rule;
            self.session.close_with(&r.reply);
        } else {
            self.session.reject(&r.reply);
        }
    }

    /// Refuse the pending command with `r`, recorded as `event` (built before its message
    /// was consumed).
    fn refuse_as(&mut self, r: Refusal, event: Recorded) {
        record::refused(&self.shared.telemetry, event, &Refused::of(&r));
        self.reject(&r);
    }

    /// Sleep for `normal`, or until `limits.stress_timeout` after stress mode starts (from
    /// now if it is on already), whichever comes first: the timeout of a TLS handshake or of
    /// writing a reply (see [`super::pressure`]).
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

    /// Write pending replies.
    async fn flush<S: Io>(&mut self, stream: &mut ServerStream<S>) -> std::io::Result<()> {
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
    async fn read<S: Io>(
        &mut self,
        stream: &mut ServerStream<S>,
        tls_buf: &mut Vec<u8>,
    ) -> Option<usize> {
        // RFC 5321 §4.5.3.2: whatever the session is doing, at its time limit it is told
        // `421 4.4.2` before the connection closes.
        let session_end = self.started + self.runtime.config.limits.session_timeout;
        if session_end <= Instant::now() {
            return self.session_time_limit();
        }
        let mut stress = self.shared.stress.clone();
        let mut stressed = *stress.borrow_and_update();
        self.session.set_stressed(stressed);
        let in_data = self.session.in_data();
        let deadline = self.phase_deadline(in_data, stressed);
        let started = Instant::now();
        let mut watching = !stressed;
        loop {
            let (until, too_slow) = self.read_until(in_data, stressed, started, deadline);
            let session_ends = session_end <= until;
            // A session in DATA may finish its message during shutdown (the app bounds the
            // wait).
            let wake = tokio::select! {
                r = read_into(stream, &mut self.session, tls_buf) => Wake::Read(r),
                () = tokio::time::sleep_until(until.min(session_end)) => Wake::Deadline,
                () = self.shared.shutdown.cancelled(), if !in_data => Wake::Shutdown,
                // Stress starts while this session waits: its current deadline is cut short.
                r = stress.wait_for(|s| *s), if watching => Wake::Stress(r.is_ok()),
            };
            match wake {
                Wake::Read(r) => {
                    let read = self.count_read(r);
                    // The next command of a session whose login was suspended meanwhile is
                    // answered `421 4.7.0`, whatever it is.
                    if read.is_some_and(|n| n > 0) && !in_data && self.login_suspended() {
                        return None;
                    }
                    return read;
                }
                Wake::Deadline if session_ends => return self.session_time_limit(),
                Wake::Deadline if too_slow => return self.too_slow(),
                Wake::Deadline => return self.timed_out(stressed),
                Wake::Shutdown => {
                    self.end.reason = "shutdown";
                    self.session.close_with(&reply::SHUTTING_DOWN);
                    return None;
                }
                // Not started: the counter is gone (the relay is stopping); stop watching.
                Wake::Stress(started_now) => {
                    watching = false;
                    if started_now {
                        stressed = true;
                        self.stress_started(in_data, deadline);
                    }
                }
            }
        }
    }

    /// When the session's login is suspended: close it with `421 4.7.0` (logged, recorded)
    /// and say so.
    fn login_suspended(&mut self) -> bool {
        if !login_suspended(&self.session, &self.shared) {
            return false;
        }
        self.refuse(suspended(), About::Session);
        true
    }

    /// Stress mode started during a read: a command's deadline is cut to `stress_timeout`.
    fn stress_started(&mut self, in_data: bool, deadline: Instant) {
        self.session.set_stressed(true);
        if !in_data {
            let stress_timeout = self.runtime.config.limits.stress_timeout;
            self.deadline = Some(deadline.min(Instant::now() + stress_timeout));
        }
    }

    /// The deadline of the command or message being read (see [`SessionDriver::deadline`]),
    /// starting the data-rate count when a message starts.
    fn phase_deadline(&mut self, in_data: bool, stressed: bool) -> Instant {
        let limits = &self.runtime.config.limits;
        if !in_data {
            self.data_progress = None;
        } else if self.data_progress.is_none() {
            self.data_progress = Some((Instant::now(), 0));
        }
        let limit = match (in_data, stressed) {
            (true, _) => limits.data_timeout,
            (false, true) => limits.command_timeout.min(limits.stress_timeout),
            (false, false) => limits.command_timeout,
        };
        // Between commands (nothing partial buffered) the next command starts now; a partial
        // command or a message keeps its deadline (reset at DATA start and end).
        let deadline = match self.deadline {
            Some(d) if in_data || self.session.buffered_input() > 0 => d,
            _ => Instant::now() + limit,
        };
        self.deadline = Some(deadline);
        deadline
    }

    /// When the current read gives up, and whether that is the stress data rate.
    fn read_until(
        &self,
        in_data: bool,
        stressed: bool,
        started: Instant,
        deadline: Instant,
    ) -> (Instant, bool) {
        let stress_timeout = self.runtime.config.limits.stress_timeout;
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
        if let Some(linger) = self.linger {
            until = until.min(linger);
        }
        (until, too_slow)
    }

    fn count_read(&mut self, read: std::io::Result<usize>) -> Option<usize> {
        match read {
            Ok(n) => {
                if let Some((_, octets)) = &mut self.data_progress {
                    *octets += n as u64;
                }
                Some(n)
            }
            Err(e) => {
                debug!(error = %e, "read error");
                Some(0)
            }
        }
    }

    fn session_time_limit(&mut self) -> Option<usize> {
        self.end.reason = "session time limit";
        self.log_rejection(&reply::SESSION_TOO_LONG, "session_time_limit");
        self.session.close_with(&reply::SESSION_TOO_LONG);
        None
    }

    fn too_slow(&mut self) -> Option<usize> {
        self.end.reason = "data too slow";
        let (since, octets) = self.data_progress.unwrap_or((Instant::now(), 0));
        let secs = since.elapsed().as_secs_f32();
        let detail = Detail::Text(format!(
            "{octets} octets in {secs:.1} s, under {STRESS_MIN_DATA_RATE} octets/s"
        ));
        let slow = reply::DATA_TOO_SLOW;
        let refused = Refused::rule("stress_data_rate", &slow).warning();
        self.refused(&refused.with_detail(&detail), self.receiving());
        self.session.close_with(&reply::DATA_TOO_SLOW);
        None
    }

    fn timed_out(&mut self, stressed: bool) -> Option<usize> {
        self.end.reason = "timeout";
        let rule = if stressed {
            "stress_timeout"
        } else {
            "timeout"
        };
        self.log_rejection(&reply::TIMEOUT, rule);
        self.session.timeout();
        None
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

    async fn handshake<S: Io>(&mut self, io: S) -> Option<ServerStream<S>> {
        let Some(config) = self.runtime.tls.clone() else {
            warn!("TLS requested but no certificate is configured");
            return None;
        };
        let acceptor = TlsAcceptor::from(config);
        // The session's time limit holds during a handshake too; no SMTP reply can be sent
        // in the middle of one, so the connection is only closed (and logged).
        let session_end = self.started + self.runtime.config.limits.session_timeout;
        let session_left = session_end.saturating_duration_since(Instant::now());
        let accepted = tokio::select! {
            r = acceptor.accept(io) => Some(r),
            () = self.phase_sleep(HANDSHAKE_TIMEOUT.min(session_left)) => None,
        };
        match accepted {
            Some(Ok(tls)) => {
                self.tls = session_info(tls.get_ref().1);
                debug!(tls = ?self.tls, "TLS established");
                Some(Stream::Tls(Box::new(tls)))
            }
            Some(Err(e)) => {
                info!(error = %e, "TLS handshake failed");
                self.end.reason = "TLS handshake failed";
                None
            }
            None if Instant::now() >= session_end => {
                let what = "session time limit reached during the TLS handshake; closed";
                self.refused(
                    &Refused::unanswered("session_time_limit", what),
                    About::Session,
                );
                self.end.reason = "session time limit";
                None
            }
            None => {
                info!("TLS handshake timed out");
                self.end.reason = "TLS handshake timeout";
                None
            }
        }
    }

    /// DATA: start assembling the message (`354`), or refuse when its spool file cannot be
    /// created.
    fn data_start(&mut self) {
        // The message's own deadline (`data_timeout`) starts at its first read.
        self.deadline = None;
        let Some(tx) = self.session.transaction() else {
            return self.session.accept();
        };
        let rules = self
            .runtime
            .policy
            .data_start(&self.listener, &session_facts(self.peer, &self.session));
        let arrival = Arrival {
            listener: &self.listener.name,
            peer: self.peer,
            helo: self.session.helo().unwrap_or_default(),
            extended: self.session.is_extended(),
            tls: self.tls.as_ref(),
            auth_user: self.session.user(),
            transaction: tx,
            hostname: &self.runtime.config.server.hostname,
            node: &self.runtime.config.cluster.node,
        };
        let space = Space {
            reservation: &mut self.effects.reservation,
            min_free: self.runtime.config.limits.min_free_space,
        };
        let started = Assembly::start(
            &self.shared.spool,
            &arrival,
            rules.header_rules,
            rules.from_check,
            space,
        );
        match started {
            Ok(assembly) => {
                self.assembly = Some(Box::new(assembly));
                self.session.accept_data(rules.normalize_bare_lf);
            }
            Err(e) => {
                warn!(error = %e, "cannot create spool file");
                self.refuse(e.refusal(), About::Transaction);
            }
        }
    }

    fn data_chunk(&mut self) {
        if let Some(assembly) = self.assembly.as_mut() {
            assembly.push(self.session.data_chunk());
        }
    }

    /// The final dot: the end-of-data stage, then the commit and `250`. Every line about
    /// the message from here on is in its `message` span (its queue id).
    async fn data_end(&mut self) {
        self.message_ended();
        let Some(assembly) = self.assembly.take() else {
            let r = Refusal::new(reply::LOCAL_ERROR, "spool_write");
            return self.refuse(r, About::Transaction);
        };
        let span = info_span!("message", queue_id = %assembly.id().as_str());
        self.end_message(assembly).instrument(span).await;
    }

    /// [`SessionDriver::data_end`] of the message `assembly` received.
    async fn end_message(&mut self, mut assembly: Box<Assembly>) {
        assembly.finish();
        let verdict = self.end_of_data(&mut assembly).await;
        // Our Authentication-Results: (and quarantine field) or DKIM-Signature:s go above
        // our Received:; what the checks found is logged with the queue id, refused or not.
        let facts = session_facts(self.peer, &self.session);
        let fields = (self.effects)
            .message_fields(&self.runtime, &facts, assembly.id().as_str())
            .await;
        self.effects.message_ended();
        // Its event, queued or refused, is built before the commit consumes the assembly.
        let event = self.event_about(EventKind::Queued, About::Message(&assembly));
        // A refused message's spool file goes with its assembly.
        if let Err(r) = verdict {
            return self.refuse_as(r, event);
        }
        let size = assembly.size() + fields.len() as u64;
        match assembly.commit_with(fields).await {
            Ok(committed) => self.queued(committed, event, size),
            Err(e) => {
                warn!(error = %e, "spool commit failed");
                self.refuse_as(e.refusal(), event);
            }
        }
    }

    /// The message (`size` octets) is durable: log and record it (`event`), tell the
    /// session (`250`), hand it to delivery.
    fn queued(&mut self, committed: Committed, mut event: Recorded, size: u64) {
        let id = &committed.id;
        if let Some(tx) = self.session.transaction() {
            info!(
                queue_id = %id, from = %tx.from, rcpts = tx.recipients.len(), size, "queued"
            );
        }
        event.kind = EventKind::Queued;
        event.size = Some(size);
        self.shared.telemetry.record(&event);
        if let Some(user) = self.session.user() {
            (self.shared.containment).accepted(user, Instant::now().into_std());
        }
        self.end.messages += 1;
        self.session.queued(id.as_str());
        // After the 250 is queued for sending; a closed channel (shutdown) is fine: the
        // message is on disk and the next start delivers it.
        let _ = self.shared.queued.send(committed);
    }

    /// The message's data is over, whatever becomes of it: the next command has a deadline
    /// of its own, and the transaction's space reservation is given back (the
    /// transaction's SPF result stays for the end-of-data checks).
    fn message_ended(&mut self) {
        self.deadline = None;
        self.data_progress = None;
        self.effects.reservation = None;
    }

    fn data_rejected(&mut self, fault: DataFault) {
        self.message_ended();
        let (reply, rule) = match fault {
            DataFault::BareLineEnding => {
                (reply::BARE_LINE_ENDING_IN_DATA, "bare_line_ending_in_data")
            }
            DataFault::TooBig => (reply::MESSAGE_TOO_BIG, "max_message_size"),
        };
        // Logged while the assembly is there: the refusal names its queue id.
        self.log_rejection(&reply, rule);
        self.assembly = None;
    }

    /// The end-of-data stage over what the assembly found.
    async fn end_of_data(&mut self, assembly: &mut Assembly) -> Result<(), Refusal> {
        if self.session.transaction().is_none() {
            return Err(Refusal::new(reply::LOCAL_ERROR, "spool_write"));
        }
        let from_check = assembly.take_from_check();
        // Its own handle on the routes: the stage borrows the driver.
        let capabilities = self.shared.capabilities.clone();
        let route = move |domain: &str| capabilities.for_domain(domain);
        let assembly = &*assembly;
        (self.stage_message(assembly, |session| {
            let tx = session
                .transaction()
                .expect("a session in DATA has a transaction");
            Input::DataEnd(EndOfData {
                header_too_large: assembly.header_too_large(),
                received_count: assembly.received_count(),
                write_failed: assembly.write_failed(),
                from_check: from_check.as_ref(),
                header_utf8: assembly.header_utf8(),
                eight_bit: assembly.eight_bit(),
                size: assembly.size(),
                transaction: TransactionFacts {
                    from: &tx.from,
                    params: &tx.params,
                },
                recipients: &tx.recipients,
                helo: session.helo().unwrap_or_default(),
                route: &route,
            })
        }))
        .await
    }
}

/// Whether `session` authenticated as a login that is suspended now.
fn login_suspended(session: &Session, shared: &Shared) -> bool {
    (session.user()).is_some_and(|u| shared.containment.is_suspended(u))
}

/// The refusal of a command, or final dot, of a session whose login is suspended: `421 4.7.0`,
/// and the session closes.
fn suspended() -> Refusal {
    Refusal::new(reply::ACCOUNT_SUSPENDED, "account_suspended").warning()
}

/// What ended a wait in [`SessionDriver::read`].
enum Wake {
    Read(std::io::Result<usize>),
    Deadline,
    Shutdown,
    /// Stress mode started (false: its sender is gone).
    Stress(bool),
}

/// The protocol engine's settings for a session on `listener` under `c`; `tls_available`:
/// the relay has a certificate (STARTTLS may be offered).
/// The RCPT stage's input for `to` in `session` as it stands, `route` being what the route to
/// `to` can carry (a session and `policy explain` build it the same way).
pub(crate) fn rcpt_input<'a>(
    session: &'a Session,
    to: &'a Address,
    route: Option<crate::policy::capability::Capabilities>,
) -> Input<'a> {
    Input::Rcpt(RcptFacts {
        to,
        bare_postmaster: session.rcpt_is_postmaster(),
        transaction: session.transaction().map(|t| TransactionFacts {
            from: &t.from,
            params: &t.params,
        }),
        route,
    })
}

pub(crate) fn session_config(
    c: &Config,
    listener: &Listener,
    tls_available: bool,
) -> SessionConfig {
    SessionConfig {
        hostname: c.server.hostname.clone(),
        postmaster: c.relay.postmaster.clone(),
        max_command_length: c.limits.max_command_length,
        max_message_size: c.limits.max_message_size,
        max_recipients: c.limits.max_recipients,
        max_errors: c.limits.max_errors,
        starttls: listener.tls == ListenerTls::StartTls && tls_available,
        implicit_tls: listener.tls == ListenerTls::Implicit,
        require_tls: listener.require_tls,
        auth_enabled: listener.auth != crate::config::AuthMode::Off,
        auth_required: listener.auth == crate::config::AuthMode::Required,
    }
}

/// The facts every stage reads about the session: the client's address and its AUTH
/// identity, if any.
fn session_facts(peer: SocketAddr, session: &Session) -> SessionFacts<'_> {
    SessionFacts {
        client_ip: peer.ip(),
        user: session.user(),
    }
}

/// Before the greeting: true if the client sent anything within `wait`. What it sent is read
/// and dropped: a client that talks first is refused anyway.
async fn talks_first<S: Io>(stream: &mut ServerStream<S>, wait: Duration) -> bool {
    match stream {
        Stream::Plain(io) => matches!(
            tokio::time::timeout(wait, read_plain(io, |_| {})).await,
            Ok(Ok(n)) if n > 0
        ),
        // Implicit TLS: a client that completed the handshake speaks only after the banner.
        Stream::Tls(_) => {
            tokio::time::sleep(wait).await;
            false
        }
        Stream::Closed => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, F: std::future::Future>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle session is mostly its task's future: keep it small (scenario D of
    /// BENCHMARKS.md, ten thousand idle connections). Rare, large steps (TLS handshake, AUTH,
    /// end of DATA) are boxed and the message being received is behind a pointer. With
    /// `run(self)` instead of `run(&mut self)` the future was 4.4 KB.
    #[test]
    fn an_idle_session_stays_small() {
        let driver = std::mem::size_of::<SessionDriver>();
        let run = future_size(|d: &mut SessionDriver, tcp: tokio::net::TcpStream| d.run(tcp));
        assert!(driver <= 1024, "SessionDriver is {driver} bytes");
        assert!(run <= 1536, "the session future is {run} bytes");
    }
}
