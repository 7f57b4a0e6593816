//! One SMTP client connection to an upstream.
//!
//! [`UpstreamConnection::open`] connects, reads the greeting, says EHLO (HELO when EHLO is
//! refused), upgrades with STARTTLS per the upstream's `tls` policy, says EHLO again and
//! authenticates when `auth_user` is set (only ever over TLS). [`UpstreamConnection::send`]
//! runs one transaction: MAIL, RCPT for each recipient and DATA, pipelined when the upstream
//! offers PIPELINING, then the message dot-stuffed with CRLF line endings, then the final dot,
//! and returns the outcome for each recipient. A connection that completed a transaction
//! cleanly can carry the next one (it starts with RSET).
//!
//! The envelope sent upstream is rebuilt from parsed values ([`Address`], [`MailParams`]),
//! never copied from the client's command text.
//!
//! Errors that concern the connection or the upstream as a whole (refused connection,
//! timeout, broken TLS, a 421 or `452 4.3.1` back-pressure reply, a garbled reply) are a
//! [`ClientError`] (kinds in [`super::error`]): every recipient of the transaction stays
//! pending. Replies that concern this message are per-recipient [`RcptOutcome`]s carrying the
//! upstream's reply as received ([`UpstreamReply`]), from the wire to the DSN.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::error::{ClientError, Direction, TlsFailure, Unsupported, UpstreamStage, Wait};
use super::tls::ClientTls;
use crate::config::{Upstream, UpstreamTls};
use crate::envelope::{Address, Body, MailParams, ReversePath};
use crate::policy::capability::Capabilities;
use crate::queue::bounce::Diagnostic;
use crate::smtp::upstream_reply::{MAX_REPLY_LINE, ReplyReader, UpstreamReply};
use crate::stream::{ClientStream, Stream};

/// Size of the chunks the message is read and written in.
const CHUNK: usize = 64 * 1024;

/// The outcome for one recipient of a transaction.
#[derive(Debug, Clone)]
pub enum RcptOutcome {
    /// The upstream took responsibility (its reply to the final dot).
    Delivered(UpstreamReply),
    /// Try again later.
    Deferred(Deferral),
    /// Refused for good.
    Failed(Rejection),
}

impl RcptOutcome {
    /// The outcome of a refusal `reply` at `stage`: deferred when it is a 4xx, failed for
    /// good otherwise (RFC 5321 §4.2.1).
    fn from_reply(stage: UpstreamStage, reply: &UpstreamReply) -> RcptOutcome {
        if reply.is_transient() {
            RcptOutcome::Deferred(Deferral::Reply {
                stage,
                reply: reply.clone(),
            })
        } else {
            RcptOutcome::Failed(Rejection::Reply {
                stage,
                reply: reply.clone(),
            })
        }
    }

    fn is_delivered(&self) -> bool {
        matches!(self, RcptOutcome::Delivered(_))
    }
}

/// Why a recipient waits for the next attempt. `Display` is the text of the log line and of
/// the queue's `last_error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Deferral {
    /// A 4xx to `stage`, or a too-many-recipients reply to RCPT (RFC 5321 §4.5.3.1.10).
    #[error("{stage}: {reply}")]
    Reply {
        stage: UpstreamStage,
        reply: UpstreamReply,
    },
    /// Not asked for: the upstream refused an earlier recipient of the transaction as too
    /// many recipients with `after` (without pipelining the rest is not sent).
    #[error("RCPT not sent after: {after}")]
    NotSent { after: UpstreamReply },
    /// The final dot was not sent (the message was deleted meanwhile).
    #[error("aborted")]
    Aborted,
    /// The continuation transaction for recipients left over as too many failed.
    #[error(transparent)]
    ContinuationFailed(Arc<ClientError>),
}

/// Why a recipient failed for good: the upstream's reply, or a reason of our own found
/// before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A 5xx to `stage`, as the upstream sent it.
    Reply {
        stage: UpstreamStage,
        reply: UpstreamReply,
    },
    /// The upstream cannot carry the message as it is.
    Incapable(Incapable),
}

impl Rejection {
    /// The RFC 3463 status for the DSN: the reply's enhanced code (or `X.0.0`), or ours.
    pub fn status(&self) -> String {
        match self {
            Rejection::Reply { reply, .. } => reply.status(),
            Rejection::Incapable(why) => why.status().to_owned(),
        }
    }

    /// True when the upstream answered (the DSN names it as `Remote-MTA`, RFC 3464 §2.3.5).
    pub fn is_remote(&self) -> bool {
        matches!(self, Rejection::Reply { .. })
    }

    /// The DSN's `Diagnostic-Code` (RFC 3464 §2.3.6): the upstream's reply unchanged, or our
    /// reason.
    pub fn diagnostic(&self) -> Diagnostic {
        match self {
            Rejection::Reply { reply, .. } => Diagnostic::Smtp(reply.clone()),
            Rejection::Incapable(why) => Diagnostic::Local(why.to_string()),
        }
    }
}

impl std::fmt::Display for Rejection {
    /// The reply (`550 5.1.1 …`) or our reason, as logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Reply { reply, .. } => reply.fmt(f),
            Rejection::Incapable(why) => why.fmt(f),
        }
    }
}

/// Why an upstream cannot take a message as it is, decided from its EHLO before anything is
/// sent. portcullis never converts a message, so each is permanent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Incapable {
    /// Larger than the upstream's SIZE (RFC 1870), in octets.
    #[error("message size {size} exceeds the upstream's limit of {limit} octets")]
    TooBig { size: u64, limit: u64 },
    /// `BODY=8BITMIME` and no 8BITMIME (RFC 6152).
    #[error("the message is 8-bit MIME and the upstream does not accept 8BITMIME")]
    EightBitMime,
    /// Needs SMTPUTF8 (RFC 6531) and the upstream does not offer it.
    #[error("the message needs SMTPUTF8 and the upstream does not support it")]
    SmtpUtf8,
}

impl Incapable {
    /// The RFC 3463 status: `5.3.4` (too big), `5.6.3` (8-bit), `5.6.7` (SMTPUTF8, RFC 6531
    /// §3.7.5).
    pub fn status(self) -> &'static str {
        match self {
            Incapable::TooBig { .. } => "5.3.4",
            Incapable::EightBitMime => "5.6.3",
            Incapable::SmtpUtf8 => "5.6.7",
        }
    }
}

/// ESMTP extensions the upstream announced in its EHLO reply (RFC 5321 §4.1.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// 8BITMIME (RFC 6152).
    pub eightbitmime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// SIZE limit in octets (RFC 1870); `Some(0)` means "SIZE supported, no fixed limit",
    /// also when the parameter is not a number.
    pub size: Option<u64>,
    /// AUTH with PLAIN among its mechanisms (RFC 4954, RFC 4616).
    pub auth_plain: bool,
    /// AUTH with LOGIN among its mechanisms.
    pub auth_login: bool,
}

impl Extensions {
    /// The extensions in a positive EHLO reply: each line after the first starts with a
    /// keyword, matched without regard to case; unknown keywords are ignored. Never fails:
    /// the reply has been bounded and cleaned by [`crate::smtp::upstream_reply`] already.
    pub fn parse(reply: &UpstreamReply) -> Extensions {
        let mut ext = Extensions::default();
        // The first line is the greeting name; each further line is one extension.
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "STARTTLS" => ext.starttls = true,
                "8BITMIME" => ext.eightbitmime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => {
                    for mech in words {
                        match mech.to_ascii_uppercase().as_str() {
                            "PLAIN" => ext.auth_plain = true,
                            "LOGIN" => ext.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        ext
    }
}

/// One transaction's envelope, from parsed values.
#[derive(Debug, Clone, Copy)]
pub struct MailTransaction<'a> {
    pub from: &'a ReversePath,
    pub params: &'a MailParams,
    pub rcpts: &'a [&'a Address],
    /// Size of the message in octets (before dot-stuffing).
    pub size: u64,
}

impl MailTransaction<'_> {
    /// True when the message needs SMTPUTF8 (RFC 6531 §3.4): its envelope says so (the relay
    /// keeps SMTPUTF8 there only for a message whose envelope or header section is not
    /// ASCII, decided once at the final dot), or an address is non-ASCII.
    fn needs_smtputf8(&self) -> bool {
        self.params.smtputf8
            || self.from.address().is_some_and(Address::is_utf8)
            || self.rcpts.iter().any(|a| a.is_utf8())
    }
}

/// The message bytes, in memory (small messages) or read from the spool file as sent.
pub enum MessageSource {
    Memory(std::sync::Arc<Vec<u8>>),
    /// The spool file, positioned at the message's first octet `start`; `sent` once it has
    /// been read through, so a second transaction on the same connection (too many
    /// recipients) seeks back first, and the usual single send costs no seek.
    File {
        file: tokio::fs::File,
        start: u64,
        sent: bool,
    },
}

/// Called right before the final dot: `false` aborts the transaction (the connection is then
/// dropped, since DATA cannot be cancelled otherwise).
pub trait DotGate {
    fn allow(&mut self) -> bool;
}

/// The result of [`UpstreamConnection::send`].
#[derive(Debug, Clone)]
pub struct Sent {
    /// One outcome per recipient, in the order given.
    pub rcpts: Vec<RcptOutcome>,
    /// The gate refused the final dot: nothing was delivered, the connection is gone.
    pub aborted: bool,
}

/// One transaction's result, before the continuation for recipients refused as too many.
struct Once {
    sent: Sent,
    /// Indexes (into the transaction's recipients) of those the upstream refused as too many
    /// recipients ([`UpstreamReply::is_too_many_recipients`]), or did not ask for after such
    /// a refusal: they go in the next transaction.
    too_many: Vec<usize>,
}

impl Once {
    fn done(sent: Sent) -> Once {
        Once {
            sent,
            too_many: Vec::new(),
        }
    }
}

/// An open, greeted (and possibly TLS-protected and authenticated) upstream connection.
pub struct UpstreamConnection {
    io: ClientStream,
    /// Received bytes not yet consumed.
    rbuf: Vec<u8>,
    /// Extensions from the last EHLO.
    pub ext: Extensions,
    /// STARTTLS completed.
    pub tls: bool,
    /// Per-reply time limit.
    timeout: Duration,
    /// Transactions started on this connection. Any but the first begins with RSET: the
    /// previous one may have left the upstream's transaction open (MAIL accepted, every RCPT
    /// refused), and a MAIL then would be a nested MAIL.
    pub transactions: u32,
    /// When the connection last finished a transaction.
    pub idle_since: Instant,
    /// False once anything went wrong: never reuse it.
    pub reusable: bool,
}

impl UpstreamConnection {
    /// What the upstream's last EHLO said about the messages it can carry.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            smtputf8: self.ext.smtputf8,
            eightbitmime: self.ext.eightbitmime,
            size: self.ext.size.filter(|&n| n > 0),
        }
    }

    /// Connect to `upstream` and prepare it for transactions. With `allow_tls` false an
    /// opportunistic upstream is used in plaintext (the retry after a failed handshake).
    ///
    /// # Errors
    /// Any [`ClientError`] but [`ClientError::Stale`] and [`ClientError::Local`]; a TLS
    /// handshake failure is [`ClientError::is_tls_handshake`].
    pub async fn open(
        upstream: &Upstream,
        tls: Option<&ClientTls>,
        hostname: &str,
        allow_tls: bool,
    ) -> Result<UpstreamConnection, ClientError> {
        let mut conn = UpstreamConnection::connect(upstream).await?;
        let greeting = conn
            .read_reply(UpstreamStage::Greeting, conn.timeout)
            .await?;
        if !greeting.is_positive() {
            return Err(ClientError::Refused {
                stage: UpstreamStage::Greeting,
                reply: greeting,
            });
        }
        conn.hello(hostname).await?;
        let wants_tls = upstream.tls != UpstreamTls::None && allow_tls;
        if let (true, Some(tls)) = (wants_tls, tls) {
            if conn.ext.starttls {
                conn.starttls(tls, upstream.tls).await?;
                if conn.tls {
                    conn.hello(hostname).await?;
                }
            } else if upstream.tls == UpstreamTls::Required {
                return Err(TlsFailure::NotOffered.into());
            }
        }
        if let (Some(user), Some(password)) = (&upstream.auth_user, &upstream.auth_password) {
            if !conn.tls {
                return Err(Unsupported::AuthWithoutTls.into());
            }
            conn.authenticate(user, password).await?;
        }
        Ok(conn)
    }

    /// The TCP connection, within `connect_timeout`, not yet greeted.
    async fn connect(upstream: &Upstream) -> Result<UpstreamConnection, ClientError> {
        let connecting = TcpStream::connect(upstream.address.as_str());
        let tcp = match tokio::time::timeout(upstream.connect_timeout, connecting).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(ClientError::Connect(e)),
            Err(_) => {
                return Err(ClientError::Timeout {
                    stage: UpstreamStage::Connect,
                    wait: Wait::Connect,
                    after: upstream.connect_timeout,
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        Ok(UpstreamConnection {
            io: Stream::Plain(tcp),
            rbuf: Vec::new(),
            ext: Extensions::default(),
            tls: false,
            timeout: upstream.timeout,
            transactions: 0,
            idle_since: Instant::now(),
            reusable: true,
        })
    }

    async fn hello(&mut self, hostname: &str) -> Result<(), ClientError> {
        let reply = self
            .command(UpstreamStage::Ehlo, &format!("EHLO {hostname}\r\n"))
            .await?;
        if reply.is_positive() {
            self.ext = Extensions::parse(&reply);
            return Ok(());
        }
        if reply.code == 421 || reply.is_transient() {
            return Err(ClientError::Refused {
                stage: UpstreamStage::Ehlo,
                reply,
            });
        }
        // RFC 5321 §4.1.4: a server that does not know EHLO; no extensions then.
        let reply = self
            .command(UpstreamStage::Helo, &format!("HELO {hostname}\r\n"))
            .await?;
        if !reply.is_positive() {
            return Err(ClientError::Refused {
                stage: UpstreamStage::Helo,
                reply,
            });
        }
        self.ext = Extensions::default();
        Ok(())
    }

    async fn starttls(&mut self, tls: &ClientTls, policy: UpstreamTls) -> Result<(), ClientError> {
        let reply = self
            .command(UpstreamStage::StartTls, "STARTTLS\r\n")
            .await?;
        if !reply.is_positive() {
            if policy == UpstreamTls::Required {
                return Err(ClientError::Refused {
                    stage: UpstreamStage::StartTls,
                    reply,
                });
            }
            return Ok(());
        }
        if !self.rbuf.is_empty() {
            // Bytes after the 220 were sent before the handshake: an injection attempt
            // (the mirror image of the inbound STARTTLS rule). Never read them as TLS-era
            // replies.
            return Err(TlsFailure::TalkedEarly.into());
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.io, Stream::Closed) else {
            unreachable!("STARTTLS is sent once, on the plaintext connection");
        };
        let connector = TlsConnector::from(tls.config.clone());
        let handshake = connector.connect(tls.server_name.clone(), tcp);
        match tokio::time::timeout(self.timeout, handshake).await {
            Ok(Ok(stream)) => {
                self.io = Stream::Tls(Box::new(stream));
                self.tls = true;
                Ok(())
            }
            Ok(Err(e)) => Err(TlsFailure::from_handshake(e).into()),
            Err(_) => Err(TlsFailure::TimedOut.into()),
        }
    }

    async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        let refused = |reply| ClientError::Refused {
            stage: UpstreamStage::Auth,
            reply,
        };
        let reply = if self.ext.auth_plain {
            let token = BASE64.encode(format!("\0{user}\0{password}"));
            self.command(UpstreamStage::Auth, &format!("AUTH PLAIN {token}\r\n"))
                .await?
        } else if self.ext.auth_login {
            // RFC 4954 §4 with the LOGIN mechanism: a 334 challenge before each value.
            for line in ["AUTH LOGIN".to_owned(), BASE64.encode(user)] {
                let reply = self
                    .command(UpstreamStage::Auth, &format!("{line}\r\n"))
                    .await?;
                if reply.code != 334 {
                    return Err(refused(reply));
                }
            }
            self.command(
                UpstreamStage::Auth,
                &format!("{}\r\n", BASE64.encode(password)),
            )
            .await?
        } else {
            return Err(Unsupported::AuthMechanism.into());
        };
        match reply.is_positive() {
            true => Ok(()),
            false => Err(refused(reply)),
        }
    }

    /// Run one transaction for `tx`, sending `message`. `gate` is asked right before the final
    /// dot whether to go on.
    ///
    /// Recipients the upstream refused as too many (RFC 5321 §4.5.3.1.10) are deferred, never
    /// bounced. While a transaction delivered at least one recipient, those left over go at
    /// once in a new transaction on the same connection; an upstream that refuses every RCPT
    /// of a transaction is not asked again (they wait for the next retry).
    ///
    /// # Errors
    /// A [`ClientError`] when the first transaction fails as a whole: every recipient is
    /// still pending. [`ClientError::Stale`] when this was a pooled connection the upstream
    /// had closed (found at RSET): retry on a new one.
    pub async fn send(
        &mut self,
        tx: &MailTransaction<'_>,
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
    ) -> Result<Sent, ClientError> {
        let Once {
            mut sent,
            too_many: mut left,
        } = self.send_once(tx, message, gate).await?;
        let mut delivered_last = sent.rcpts.iter().any(RcptOutcome::is_delivered);
        while !left.is_empty() && delivered_last && !sent.aborted && self.reusable {
            let rcpts: Vec<&Address> = left.iter().map(|&i| tx.rcpts[i]).collect();
            let next = MailTransaction {
                rcpts: &rcpts,
                ..*tx
            };
            match self.send_once(&next, message, gate).await {
                Ok(more) => {
                    delivered_last = more.sent.rcpts.iter().any(RcptOutcome::is_delivered);
                    sent.aborted |= more.sent.aborted;
                    for (&i, outcome) in left.iter().zip(more.sent.rcpts) {
                        sent.rcpts[i] = outcome;
                    }
                    left = more.too_many.into_iter().map(|k| left[k]).collect();
                }
                // The first transaction's outcomes stand (they are delivered); the rest wait
                // for the next attempt, with this failure as their reason.
                Err(e) => {
                    let e = Arc::new(e);
                    for &i in &left {
                        sent.rcpts[i] =
                            RcptOutcome::Deferred(Deferral::ContinuationFailed(e.clone()));
                    }
                    break;
                }
            }
        }
        Ok(sent)
    }

    /// One transaction: [`UpstreamConnection::send`] without the continuation.
    async fn send_once(
        &mut self,
        tx: &MailTransaction<'_>,
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
    ) -> Result<Once, ClientError> {
        if let Some(why) = self.cannot_carry(tx) {
            let rejected = RcptOutcome::Failed(Rejection::Incapable(why));
            return Ok(Once::done(Sent {
                rcpts: vec![rejected; tx.rcpts.len()],
                aborted: false,
            }));
        }
        let reused = self.transactions > 0;
        self.transactions += 1;
        self.reusable = false;
        let result = self.transaction(tx, message, gate, reused).await;
        self.idle_since = Instant::now();
        match result {
            // Anything going wrong at the RSET that opens a reused connection: the upstream
            // closed it while it was idle (a restart, its own idle timeout).
            Err(e) if reused && e.stage() == UpstreamStage::Rset => {
                Err(ClientError::Stale(Box::new(e)))
            }
            other => other,
        }
    }

    /// A reason this upstream cannot take the message as it is, before anything is sent.
    fn cannot_carry(&self, tx: &MailTransaction<'_>) -> Option<Incapable> {
        if let Some(limit) = self.ext.size
            && limit > 0
            && tx.size > limit
        {
            return Some(Incapable::TooBig {
                size: tx.size,
                limit,
            });
        }
        if tx.params.body == Some(Body::EightBitMime) && !self.ext.eightbitmime {
            return Some(Incapable::EightBitMime);
        }
        if tx.needs_smtputf8() && !self.ext.smtputf8 {
            return Some(Incapable::SmtpUtf8);
        }
        None
    }

    fn mail_command(&self, tx: &MailTransaction<'_>) -> String {
        let mut line = match tx.from {
            ReversePath::Null => "MAIL FROM:<>".to_owned(),
            ReversePath::Address(a) => format!("MAIL FROM:<{a}>"),
        };
        if tx.params.body == Some(Body::EightBitMime) {
            line.push_str(" BODY=8BITMIME");
        }
        if tx.needs_smtputf8() {
            line.push_str(" SMTPUTF8");
        }
        if self.ext.size.is_some() {
            line.push_str(&format!(" SIZE={}", tx.size));
        }
        line.push_str("\r\n");
        line
    }

    async fn transaction(
        &mut self,
        tx: &MailTransaction<'_>,
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
        reused: bool,
    ) -> Result<Once, ClientError> {
        let mail = self.mail_command(tx);
        let rcpts: Vec<String> = tx
            .rcpts
            .iter()
            .map(|a| format!("RCPT TO:<{a}>\r\n"))
            .collect();
        if self.ext.pipelining {
            return self.pipelined(&mail, &rcpts, message, gate, reused).await;
        }
        if reused {
            self.write(UpstreamStage::Rset, b"RSET\r\n").await?;
            self.expect_rset().await?;
        }
        let mail_reply = self.command(UpstreamStage::Mail, &mail).await?;
        let mut rcpt_replies = Vec::new();
        if mail_reply.is_positive() {
            for r in &rcpts {
                let reply = self.command(UpstreamStage::Rcpt, r).await?;
                // The upstream has said this transaction takes no more recipients (RFC 5321
                // §4.5.3.1.10): asking for each of the rest would only draw the same reply,
                // quadratically many RCPTs over the continuation transactions. The rest wait
                // for the next transaction ([`EnvelopeReplies::settle`]).
                let full = reply.is_too_many_recipients();
                rcpt_replies.push(reply);
                if full {
                    break;
                }
            }
        }
        let mut replies = EnvelopeReplies::new(tx.rcpts.len());
        if let Some(done) = replies.settle(&mail_reply, &rcpt_replies)? {
            self.reusable = true;
            return Ok(done);
        }
        let data_reply = self.command(UpstreamStage::Data, "DATA\r\n").await?;
        self.data(message, gate, data_reply, replies).await
    }

    /// [`UpstreamConnection::transaction`] with PIPELINING (RFC 2920): [RSET], MAIL, RCPT…
    /// and DATA sent at once, then their replies read in order.
    async fn pipelined(
        &mut self,
        mail: &str,
        rcpts: &[String],
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
        reused: bool,
    ) -> Result<Once, ClientError> {
        let mut batch = String::new();
        if reused {
            batch.push_str("RSET\r\n");
        }
        batch.push_str(mail);
        rcpts.iter().for_each(|r| batch.push_str(r));
        batch.push_str("DATA\r\n");
        self.write(UpstreamStage::Mail, batch.as_bytes()).await?;
        if reused {
            self.expect_rset().await?;
        }
        let mail_reply = self.read_reply(UpstreamStage::Mail, self.timeout).await?;
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        for _ in rcpts {
            rcpt_replies.push(self.read_reply(UpstreamStage::Rcpt, self.timeout).await?);
        }
        let data_reply = self.read_reply(UpstreamStage::Data, self.timeout).await?;
        let mut replies = EnvelopeReplies::new(rcpts.len());
        if let Some(done) = replies.settle(&mail_reply, &rcpt_replies)? {
            // A 354 here means the upstream wants a message for a transaction it refused;
            // the state of the session is unknown, so drop it rather than send anything.
            self.reusable = data_reply.code != 354;
            return Ok(done);
        }
        self.data(message, gate, data_reply, replies).await
    }

    async fn expect_rset(&mut self) -> Result<(), ClientError> {
        let reply = self.read_reply(UpstreamStage::Rset, self.timeout).await?;
        if reply.is_positive() {
            Ok(())
        } else {
            Err(ClientError::Refused {
                stage: UpstreamStage::Rset,
                reply,
            })
        }
    }

    async fn data(
        &mut self,
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
        data_reply: UpstreamReply,
        replies: EnvelopeReplies,
    ) -> Result<Once, ClientError> {
        if data_reply.code == 421 {
            return Err(ClientError::BackPressure {
                stage: UpstreamStage::Data,
                reply: data_reply,
            });
        }
        if data_reply.code != 354 {
            self.reusable = !data_reply.is_positive();
            let refused = RcptOutcome::from_reply(UpstreamStage::Data, &data_reply);
            return Ok(replies.finish(refused, false));
        }
        let mut tail = self.write_message(message).await?;
        if !gate.allow() {
            self.reusable = false;
            self.io = Stream::Closed;
            return Ok(replies.finish(RcptOutcome::Deferred(Deferral::Aborted), true));
        }
        // The message's last chunk and the final dot in one write (one segment for a small
        // message): the gate above still comes before any of the dot leaves.
        let stage = if tail.is_empty() {
            UpstreamStage::Dot
        } else {
            UpstreamStage::Data
        };
        tail.extend_from_slice(b".\r\n");
        self.write(stage, &tail).await?;
        let reply = self
            .read_reply(UpstreamStage::Dot, self.timeout * 2)
            .await?;
        if reply.code == 421 {
            return Err(ClientError::BackPressure {
                stage: UpstreamStage::Dot,
                reply,
            });
        }
        let accepted = if reply.is_positive() {
            RcptOutcome::Delivered(reply)
        } else {
            RcptOutcome::from_reply(UpstreamStage::Dot, &reply)
        };
        self.reusable = true;
        Ok(replies.finish(accepted, false))
    }

    /// Send the message dot-stuffed (RFC 5321 §4.5.2), ending in CRLF, all but its last
    /// chunk: that one (at most [`CHUNK`] octets of message, stuffed, and the CRLF it may
    /// need) is returned, to go out with the final dot. The spool holds CRLF line endings
    /// only (a bare CR is refused at DATA, a bare LF refused or stored as CRLF), so stuffing
    /// after each LF is exact.
    async fn write_message(&mut self, message: &mut MessageSource) -> Result<Vec<u8>, ClientError> {
        let mut stuffer = Stuffer::default();
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 8 + 5);
        match message {
            MessageSource::Memory(bytes) => {
                let mut chunks = bytes.as_slice().chunks(CHUNK).peekable();
                while let Some(chunk) = chunks.next() {
                    out.clear();
                    stuffer.push(chunk, &mut out);
                    if chunks.peek().is_some() {
                        self.write(UpstreamStage::Data, &out).await?;
                    }
                }
            }
            MessageSource::File { file, start, sent } => {
                let local = |source| ClientError::Local {
                    stage: UpstreamStage::Data,
                    source,
                };
                if std::mem::replace(sent, true) {
                    file.seek(std::io::SeekFrom::Start(*start))
                        .await
                        .map_err(local)?;
                }
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = file.read(&mut buf).await.map_err(local)?;
                    if n == 0 {
                        break;
                    }
                    // The chunk before this one was not the last: send it.
                    if !out.is_empty() {
                        self.write(UpstreamStage::Data, &out).await?;
                        out.clear();
                    }
                    stuffer.push(&buf[..n], &mut out);
                }
            }
        }
        if stuffer.last_two != [b'\r', b'\n'] {
            out.extend_from_slice(b"\r\n");
        }
        Ok(out)
    }

    /// Send `line` and read its reply.
    async fn command(
        &mut self,
        stage: UpstreamStage,
        line: &str,
    ) -> Result<UpstreamReply, ClientError> {
        self.write(stage, line.as_bytes()).await?;
        self.read_reply(stage, self.timeout).await
    }

    async fn write(&mut self, stage: UpstreamStage, bytes: &[u8]) -> Result<(), ClientError> {
        let io = &mut self.io;
        let result = tokio::time::timeout(self.timeout, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => {
                self.reusable = false;
                Err(ClientError::Io {
                    stage,
                    direction: Direction::Write,
                    source,
                })
            }
            Err(_) => {
                self.reusable = false;
                Err(ClientError::Timeout {
                    stage,
                    wait: Wait::Write,
                    after: self.timeout,
                })
            }
        }
    }

    /// Read one complete (possibly multi-line) reply within `limit`. Any error leaves the
    /// connection not reusable.
    async fn read_reply(
        &mut self,
        stage: UpstreamStage,
        limit: Duration,
    ) -> Result<UpstreamReply, ClientError> {
        let result = self.read_reply_within(stage, limit).await;
        if result.is_err() {
            self.reusable = false;
        }
        result
    }

    async fn read_reply_within(
        &mut self,
        stage: UpstreamStage,
        limit: Duration,
    ) -> Result<UpstreamReply, ClientError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut reader = ReplyReader::default();
        let garbled = |kind| ClientError::Garbled { stage, kind };
        loop {
            while let Some(end) = self.rbuf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.rbuf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if let Some(reply) = reader.push_line(&line).map_err(garbled)? {
                    return Ok(reply);
                }
            }
            if self.rbuf.len() > MAX_REPLY_LINE {
                return Err(garbled(
                    crate::smtp::upstream_reply::GarbledReply::LineTooLong,
                ));
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) => return Err(ClientError::Closed { stage }),
                Ok(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
                Ok(Err(source)) => {
                    return Err(ClientError::Io {
                        stage,
                        direction: Direction::Read,
                        source,
                    });
                }
                Err(_) => {
                    return Err(ClientError::Timeout {
                        stage,
                        wait: Wait::Reply,
                        after: limit,
                    });
                }
            }
        }
    }

    /// Say QUIT and close (best effort, bounded).
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if self.write(UpstreamStage::Quit, b"QUIT\r\n").await.is_ok() {
                let _ = self
                    .read_reply(UpstreamStage::Quit, Duration::from_secs(5))
                    .await;
            }
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// The outcomes of one transaction's recipients as the MAIL and RCPT replies decide them;
/// `None` for a recipient the upstream accepted (decided by the reply to DATA or the dot).
struct EnvelopeReplies {
    outcomes: Vec<Option<RcptOutcome>>,
    too_many: Vec<usize>,
}

impl EnvelopeReplies {
    fn new(rcpts: usize) -> EnvelopeReplies {
        EnvelopeReplies {
            outcomes: vec![None; rcpts],
            too_many: Vec::new(),
        }
    }

    /// Apply the MAIL and RCPT replies. `Some` when the transaction ends here (MAIL refused
    /// or no recipient accepted), with every outcome filled in. `rcpts` may be shorter than
    /// the recipients only when its last reply is too many recipients: the recipients not
    /// asked for are then deferred to the continuation like the refused one.
    fn settle(
        &mut self,
        mail: &UpstreamReply,
        rcpts: &[UpstreamReply],
    ) -> Result<Option<Once>, ClientError> {
        let back_pressure = |stage, reply: &UpstreamReply| ClientError::BackPressure {
            stage,
            reply: reply.clone(),
        };
        if mail.is_back_pressure() {
            return Err(back_pressure(UpstreamStage::Mail, mail));
        }
        if !mail.is_positive() {
            let outcome = RcptOutcome::from_reply(UpstreamStage::Mail, mail);
            return Ok(Some(Once::done(Sent {
                rcpts: vec![outcome; self.outcomes.len()],
                aborted: false,
            })));
        }
        for (i, (slot, reply)) in self.outcomes.iter_mut().zip(rcpts).enumerate() {
            if reply.is_back_pressure() {
                return Err(back_pressure(UpstreamStage::Rcpt, reply));
            }
            if reply.is_too_many_recipients() {
                self.too_many.push(i);
                *slot = Some(RcptOutcome::Deferred(Deferral::Reply {
                    stage: UpstreamStage::Rcpt,
                    reply: reply.clone(),
                }));
            } else if !reply.is_positive() {
                *slot = Some(RcptOutcome::from_reply(UpstreamStage::Rcpt, reply));
            }
        }
        // Recipients not asked for, after an RCPT refused as too many recipients (only
        // without pipelining): they wait for the next transaction, like the refused one.
        if let Some(last) = rcpts.last().filter(|r| r.is_too_many_recipients()) {
            for (i, slot) in self.outcomes.iter_mut().enumerate().skip(rcpts.len()) {
                self.too_many.push(i);
                *slot = Some(RcptOutcome::Deferred(Deferral::NotSent {
                    after: last.clone(),
                }));
            }
        }
        // Every recipient refused: the transaction ends here.
        if self.outcomes.iter().all(Option::is_some) {
            let rcpts = self.outcomes.iter().flatten().cloned().collect();
            return Ok(Some(Once {
                sent: Sent {
                    rcpts,
                    aborted: false,
                },
                too_many: std::mem::take(&mut self.too_many),
            }));
        }
        Ok(None)
    }

    /// The outcomes of the transaction: those already decided (refused recipients), and
    /// `accepted` for the recipients the upstream had accepted.
    fn finish(self, accepted: RcptOutcome, aborted: bool) -> Once {
        Once {
            sent: Sent {
                rcpts: self
                    .outcomes
                    .into_iter()
                    .map(|o| o.unwrap_or_else(|| accepted.clone()))
                    .collect(),
                aborted,
            },
            too_many: self.too_many,
        }
    }
}

/// Dot-stuffing across chunks (RFC 5321 §4.5.2), remembering the last two octets written to
/// know whether the message ended in CRLF.
struct Stuffer {
    at_line_start: bool,
    last_two: [u8; 2],
}

impl Default for Stuffer {
    fn default() -> Stuffer {
        Stuffer {
            at_line_start: true,
            last_two: [b'\r', b'\n'],
        }
    }
}

impl Stuffer {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        stuff(chunk, &mut self.at_line_start, out);
        remember_tail(chunk, &mut self.last_two);
    }
}

/// Append `chunk` to `out`, doubling a `.` at the start of each line.
fn stuff(chunk: &[u8], at_line_start: &mut bool, out: &mut Vec<u8>) {
    let mut rest = chunk;
    while !rest.is_empty() {
        if *at_line_start && rest[0] == b'.' {
            out.push(b'.');
        }
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                out.extend_from_slice(&rest[..=i]);
                rest = &rest[i + 1..];
                *at_line_start = true;
            }
            None => {
                out.extend_from_slice(rest);
                *at_line_start = false;
                return;
            }
        }
    }
}

/// Track the last two octets written, to know whether the message ended in CRLF.
fn remember_tail(chunk: &[u8], last_two: &mut [u8; 2]) {
    match chunk {
        [] => {}
        [b] => *last_two = [last_two[1], *b],
        [.., a, b] => *last_two = [*a, *b],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuffed(parts: &[&[u8]]) -> Vec<u8> {
        let mut at = true;
        let mut out = Vec::new();
        for p in parts {
            stuff(p, &mut at, &mut out);
        }
        out
    }

    #[test]
    fn dots_at_line_start_are_doubled_across_chunks() {
        assert_eq!(stuffed(&[b".a\r\nb.\r\n.\r\n"]), b"..a\r\nb.\r\n..\r\n");
        assert_eq!(stuffed(&[b"x\r\n", b".y\r\n"]), b"x\r\n..y\r\n");
        assert_eq!(stuffed(&[b"x\r", b"\n.", b"y"]), b"x\r\n..y");
        assert_eq!(stuffed(&[b"ab", b".c"]), b"ab.c");
        assert_eq!(stuffed(&[b""]), b"");
    }

    #[test]
    fn tail_tracking() {
        let mut t = [b'\r', b'\n'];
        remember_tail(b"abc", &mut t);
        assert_eq!(&t, b"bc");
        remember_tail(b"\r", &mut t);
        remember_tail(b"\n", &mut t);
        assert_eq!(&t, b"\r\n");
    }

    #[test]
    fn extensions_from_an_exchange_ehlo() {
        let reply = UpstreamReply {
            code: 250,
            lines: [
                "EXCH01.example.internal Hello [10.0.0.9]",
                "SIZE 37748736",
                "PIPELINING",
                "DSN",
                "ENHANCEDSTATUSCODES",
                "STARTTLS",
                "AUTH NTLM LOGIN",
                "8BITMIME",
                "BINARYMIME",
                "CHUNKING",
                "SMTPUTF8",
            ]
            .map(String::from)
            .to_vec(),
        };
        let ext = Extensions::parse(&reply);
        assert_eq!(
            ext,
            Extensions {
                pipelining: true,
                starttls: true,
                eightbitmime: true,
                smtputf8: true,
                size: Some(37748736),
                auth_plain: false,
                auth_login: true,
            }
        );
    }
}
