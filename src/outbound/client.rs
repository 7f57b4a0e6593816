//! One SMTP client connection to an upstream.
//!
//! [`Connection::open`] connects, reads the greeting, says EHLO (HELO when EHLO is refused),
//! upgrades with STARTTLS per the upstream's `tls` policy, says EHLO again and authenticates
//! when `auth_user` is set (only ever over TLS). [`Connection::send`] runs one transaction:
//! MAIL, RCPT for each recipient and DATA, pipelined when the upstream offers PIPELINING, then
//! the message dot-stuffed with CRLF line endings, then the final dot, and returns the outcome
//! for each recipient. A connection that completed a transaction cleanly can carry the next
//! one (it starts with RSET).
//!
//! The envelope sent upstream is rebuilt from parsed values ([`Address`], [`MailParams`]),
//! never copied from the client's command text.
//!
//! Errors that concern the connection or the upstream as a whole (refused connection,
//! timeout, broken TLS, a 421 or `452 4.3.1` back-pressure reply, a garbled reply) are a
//! [`Failure`]: every recipient of the transaction stays pending, the caller counts it against
//! the upstream's circuit breaker and may try the next upstream. Replies that concern this
//! message are per-recipient [`RcptOutcome`]s.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::reply::{MAX_REPLY_LINE, MAX_REPLY_LINES, Reply, parse_line};
use super::tls::ClientTls;
use crate::config::{Upstream, UpstreamTls};
use crate::envelope::{Address, Body, MailParams, ReversePath};
use crate::policy::capability::Capabilities;
use crate::stream::{ClientStream, Stream};

/// Size of the chunks the message is read and written in.
const CHUNK: usize = 64 * 1024;

/// What went wrong with a connection or with the upstream as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The step that failed (`connect`, `greeting`, `EHLO`, `STARTTLS`, `AUTH`, `MAIL`, …).
    pub stage: &'static str,
    /// What happened, for logs and the queue's `last_error`.
    pub detail: String,
    /// True when nothing was received on a reused connection before it failed: the upstream
    /// most likely closed it while idle, which says nothing about the upstream's health.
    pub stale: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.stage, self.detail)
    }
}

fn failure(stage: &'static str, detail: impl Into<String>) -> Failure {
    Failure {
        stage,
        detail: detail.into(),
        stale: false,
    }
}

/// The outcome for one recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The upstream took responsibility (its reply to the final dot).
    Delivered(Reply),
    /// Try again later (a 4xx, or a recipient never reached because the transaction stopped).
    Deferred(String),
    /// Refused for good: `status` is the enhanced code for the bounce, `text` the upstream's
    /// reply (`550 5.1.1 …`) or, when the upstream cannot take the message at all, our reason.
    /// `remote`: the upstream answered this (the DSN's `Remote-MTA`); false for our own
    /// reason, decided before sending anything.
    Failed {
        status: String,
        text: String,
        remote: bool,
    },
}

impl RcptOutcome {
    fn from_reply(stage: &str, reply: &Reply) -> RcptOutcome {
        if reply.is_transient() {
            RcptOutcome::Deferred(format!("{stage}: {reply}"))
        } else {
            RcptOutcome::Failed {
                status: reply.status(),
                text: reply.to_string(),
                remote: true,
            }
        }
    }
}

/// ESMTP extensions the upstream announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub starttls: bool,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    /// SIZE limit; `Some(0)` means "SIZE supported, no fixed limit".
    pub size: Option<u64>,
    pub auth_plain: bool,
    pub auth_login: bool,
}

impl Extensions {
    fn parse(reply: &Reply) -> Extensions {
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
pub struct Transaction<'a> {
    pub from: &'a ReversePath,
    pub params: &'a MailParams,
    pub rcpts: &'a [&'a Address],
    /// Size of the message in octets (before dot-stuffing).
    pub size: u64,
}

impl Transaction<'_> {
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

/// The result of [`Connection::send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// One outcome per recipient, in the order given.
    pub rcpts: Vec<RcptOutcome>,
    /// The gate refused the final dot: nothing was delivered, the connection is gone.
    pub aborted: bool,
}

/// An open, greeted (and possibly TLS-protected and authenticated) upstream connection.
pub struct Connection {
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
    /// Indexes (into the transaction's recipients) of those the last transaction's upstream
    /// refused as too many recipients ([`Reply::is_too_many_recipients`]).
    too_many: Vec<usize>,
}

impl Connection {
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
    pub async fn open(
        upstream: &Upstream,
        tls: Option<&ClientTls>,
        hostname: &str,
        allow_tls: bool,
    ) -> Result<Connection, Failure> {
        let tcp = match tokio::time::timeout(
            upstream.connect_timeout,
            TcpStream::connect(upstream.address.as_str()),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(failure("connect", e.to_string())),
            Err(_) => {
                return Err(failure(
                    "connect",
                    format!("timed out after {:?}", upstream.connect_timeout),
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut conn = Connection {
            io: Stream::Plain(tcp),
            rbuf: Vec::new(),
            ext: Extensions::default(),
            tls: false,
            timeout: upstream.timeout,
            transactions: 0,
            idle_since: Instant::now(),
            reusable: true,
            too_many: Vec::new(),
        };
        let greeting = conn.read_reply("greeting", conn.timeout).await?;
        if !greeting.is_positive() {
            return Err(failure("greeting", greeting.to_string()));
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
                return Err(failure(
                    "STARTTLS",
                    "the upstream does not offer STARTTLS and tls = \"required\"",
                ));
            }
        }
        if let (Some(user), Some(password)) = (&upstream.auth_user, &upstream.auth_password) {
            if !conn.tls {
                return Err(failure(
                    "AUTH",
                    "no TLS to the upstream: portcullis does not send the password in plaintext",
                ));
            }
            conn.authenticate(user, password).await?;
        }
        Ok(conn)
    }

    async fn hello(&mut self, hostname: &str) -> Result<(), Failure> {
        let reply = self
            .command("EHLO", &format!("EHLO {hostname}\r\n"))
            .await?;
        if reply.is_positive() {
            self.ext = Extensions::parse(&reply);
            return Ok(());
        }
        if reply.code == 421 || reply.is_transient() {
            return Err(failure("EHLO", reply.to_string()));
        }
        // RFC 5321 §4.1.4: a server that does not know EHLO; no extensions then.
        let reply = self
            .command("HELO", &format!("HELO {hostname}\r\n"))
            .await?;
        if !reply.is_positive() {
            return Err(failure("HELO", reply.to_string()));
        }
        self.ext = Extensions::default();
        Ok(())
    }

    async fn starttls(&mut self, tls: &ClientTls, policy: UpstreamTls) -> Result<(), Failure> {
        let reply = self.command("STARTTLS", "STARTTLS\r\n").await?;
        if !reply.is_positive() {
            if policy == UpstreamTls::Required {
                return Err(failure("STARTTLS", reply.to_string()));
            }
            return Ok(());
        }
        if !self.rbuf.is_empty() {
            // Bytes after the 220 were sent before the handshake: an injection attempt
            // (the mirror image of the inbound STARTTLS rule). Never read them as TLS-era
            // replies.
            return Err(failure(
                "STARTTLS",
                "the upstream sent data after its 220 before the TLS handshake",
            ));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.io, Stream::Closed) else {
            return Err(failure("STARTTLS", "connection already upgraded"));
        };
        let connector = TlsConnector::from(tls.config.clone());
        match tokio::time::timeout(
            self.timeout,
            connector.connect(tls.server_name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(stream)) => {
                self.io = Stream::Tls(Box::new(stream));
                self.tls = true;
                Ok(())
            }
            Ok(Err(e)) => Err(failure("TLS handshake", e.to_string())),
            Err(_) => Err(failure("TLS handshake", "timed out")),
        }
    }

    async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), Failure> {
        let reply = if self.ext.auth_plain {
            let token = BASE64.encode(format!("\0{user}\0{password}"));
            self.command("AUTH", &format!("AUTH PLAIN {token}\r\n"))
                .await?
        } else if self.ext.auth_login {
            let reply = self.command("AUTH", "AUTH LOGIN\r\n").await?;
            if reply.code != 334 {
                return Err(failure("AUTH", reply.to_string()));
            }
            let reply = self
                .command("AUTH", &format!("{}\r\n", BASE64.encode(user)))
                .await?;
            if reply.code != 334 {
                return Err(failure("AUTH", reply.to_string()));
            }
            self.command("AUTH", &format!("{}\r\n", BASE64.encode(password)))
                .await?
        } else {
            return Err(failure(
                "AUTH",
                "the upstream offers neither AUTH PLAIN nor AUTH LOGIN",
            ));
        };
        if reply.is_positive() {
            Ok(())
        } else {
            Err(failure("AUTH", reply.to_string()))
        }
    }

    /// Run one transaction for `tx`, sending `message`. `gate` is asked right before the final
    /// dot whether to go on.
    ///
    /// Recipients the upstream refused as too many (RFC 5321 §4.5.3.1.10) are deferred, never
    /// bounced. While a transaction delivered at least one recipient, those left over go at
    /// once in a new transaction on the same connection; an upstream that refuses every RCPT
    /// of a transaction is not asked again (they wait for the next retry).
    pub async fn send(
        &mut self,
        tx: &Transaction<'_>,
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
    ) -> Result<Sent, Failure> {
        let mut sent = self.send_once(tx, message, gate).await?;
        let mut left: Vec<usize> = std::mem::take(&mut self.too_many);
        let mut delivered_last = sent
            .rcpts
            .iter()
            .any(|o| matches!(o, RcptOutcome::Delivered(_)));
        while !left.is_empty() && delivered_last && !sent.aborted && self.reusable {
            let rcpts: Vec<&Address> = left.iter().map(|&i| tx.rcpts[i]).collect();
            let next = Transaction {
                rcpts: &rcpts,
                ..*tx
            };
            match self.send_once(&next, message, gate).await {
                Ok(more) => {
                    delivered_last = more
                        .rcpts
                        .iter()
                        .any(|o| matches!(o, RcptOutcome::Delivered(_)));
                    sent.aborted |= more.aborted;
                    for (&i, outcome) in left.iter().zip(more.rcpts) {
                        sent.rcpts[i] = outcome;
                    }
                    left = std::mem::take(&mut self.too_many)
                        .into_iter()
                        .map(|k| left[k])
                        .collect();
                }
                // The first transaction's outcomes stand (they are delivered); the rest wait
                // for the next attempt, with this failure as their reason.
                Err(f) => {
                    for &i in &left {
                        sent.rcpts[i] = RcptOutcome::Deferred(f.to_string());
                    }
                    break;
                }
            }
        }
        Ok(sent)
    }

    /// One transaction: [`Connection::send`] without the continuation.
    async fn send_once(
        &mut self,
        tx: &Transaction<'_>,
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
    ) -> Result<Sent, Failure> {
        self.too_many.clear();
        if let Some(refusal) = self.cannot_carry(tx) {
            let (status, text) = refusal;
            return Ok(Sent {
                rcpts: tx
                    .rcpts
                    .iter()
                    .map(|_| RcptOutcome::Failed {
                        status: status.to_owned(),
                        text: text.clone(),
                        remote: false,
                    })
                    .collect(),
                aborted: false,
            });
        }
        let reused = self.transactions > 0;
        self.transactions += 1;
        self.reusable = false;
        let result = self.transaction(tx, message, gate, reused).await;
        self.idle_since = Instant::now();
        if let Err(f) = &result
            && reused
            && f.stage == "RSET"
        {
            return Err(Failure {
                stale: true,
                ..f.clone()
            });
        }
        result
    }

    /// A reason this upstream cannot take the message as it is, before anything is sent:
    /// `(enhanced status, text)`. portcullis never converts a message, so these are permanent.
    fn cannot_carry(&self, tx: &Transaction<'_>) -> Option<(&'static str, String)> {
        if let Some(limit) = self.ext.size
            && limit > 0
            && tx.size > limit
        {
            return Some((
                "5.3.4",
                format!(
                    "message size {} exceeds the upstream's limit of {limit} octets",
                    tx.size
                ),
            ));
        }
        if tx.params.body == Some(Body::EightBitMime) && !self.ext.eightbitmime {
            return Some((
                "5.6.3",
                "the message is 8-bit MIME and the upstream does not accept 8BITMIME".into(),
            ));
        }
        if tx.needs_smtputf8() && !self.ext.smtputf8 {
            return Some((
                "5.6.7",
                "the message needs SMTPUTF8 and the upstream does not support it".into(),
            ));
        }
        None
    }

    fn mail_command(&self, tx: &Transaction<'_>) -> String {
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
        tx: &Transaction<'_>,
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
        reused: bool,
    ) -> Result<Sent, Failure> {
        let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; tx.rcpts.len()];
        let mail = self.mail_command(tx);
        let rcpts: Vec<String> = tx
            .rcpts
            .iter()
            .map(|a| format!("RCPT TO:<{a}>\r\n"))
            .collect();

        // Replies, in order: [RSET], MAIL, RCPT…, DATA. Pipelined: all sent at once.
        if self.ext.pipelining {
            let mut batch = String::new();
            if reused {
                batch.push_str("RSET\r\n");
            }
            batch.push_str(&mail);
            rcpts.iter().for_each(|r| batch.push_str(r));
            batch.push_str("DATA\r\n");
            self.write("MAIL", batch.as_bytes()).await?;
            if reused {
                self.expect_rset().await?;
            }
            let mail_reply = self.read_reply("MAIL", self.timeout).await?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                rcpt_replies.push(self.read_reply("RCPT", self.timeout).await?);
            }
            let data_reply = self.read_reply("DATA", self.timeout).await?;
            if let Some(done) = self.envelope_outcome(&mail_reply, &rcpt_replies, &mut outcomes)? {
                // A 354 here means the upstream wants a message for a transaction it refused;
                // the state of the session is unknown, so drop it rather than send anything.
                self.reusable = data_reply.code != 354;
                return Ok(done);
            }
            return self.data(message, gate, data_reply, outcomes).await;
        }

        if reused {
            self.write("RSET", b"RSET\r\n").await?;
            self.expect_rset().await?;
        }
        let mail_reply = self.command("MAIL", &mail).await?;
        let mut rcpt_replies = Vec::new();
        if mail_reply.is_positive() {
            for r in &rcpts {
                let reply = self.command("RCPT", r).await?;
                // The upstream has said this transaction takes no more recipients (RFC 5321
                // §4.5.3.1.10): asking for each of the rest would only draw the same reply,
                // quadratically many RCPTs over the continuation transactions. The rest wait
                // for the next transaction ([`Connection::envelope_outcome`]).
                let full = reply.is_too_many_recipients();
                rcpt_replies.push(reply);
                if full {
                    break;
                }
            }
        }
        if let Some(done) = self.envelope_outcome(&mail_reply, &rcpt_replies, &mut outcomes)? {
            self.reusable = true;
            return Ok(done);
        }
        let data_reply = self.command("DATA", "DATA\r\n").await?;
        self.data(message, gate, data_reply, outcomes).await
    }

    async fn expect_rset(&mut self) -> Result<(), Failure> {
        let reply = self.read_reply("RSET", self.timeout).await?;
        if reply.is_positive() {
            Ok(())
        } else {
            Err(failure("RSET", reply.to_string()))
        }
    }

    /// Apply the MAIL and RCPT replies. `Some` when the transaction ends here (MAIL refused
    /// or no recipient accepted), with every outcome filled in. `rcpts` may be shorter than
    /// `outcomes` only when its last reply is too many recipients: the recipients not asked
    /// for are then deferred to the continuation like the refused one.
    fn envelope_outcome(
        &mut self,
        mail: &Reply,
        rcpts: &[Reply],
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Result<Option<Sent>, Failure> {
        if mail.is_back_pressure() {
            return Err(failure("MAIL", mail.to_string()));
        }
        if !mail.is_positive() {
            let outcome = RcptOutcome::from_reply("MAIL", mail);
            return Ok(Some(Sent {
                rcpts: vec![outcome; outcomes.len()],
                aborted: false,
            }));
        }
        for (i, (slot, reply)) in outcomes.iter_mut().zip(rcpts).enumerate() {
            if reply.is_back_pressure() {
                return Err(failure("RCPT", reply.to_string()));
            }
            if reply.is_too_many_recipients() {
                self.too_many.push(i);
                *slot = Some(RcptOutcome::Deferred(format!("RCPT: {reply}")));
            } else if !reply.is_positive() {
                *slot = Some(RcptOutcome::from_reply("RCPT", reply));
            }
        }
        // Recipients not asked for, after an RCPT refused as too many recipients (only
        // without pipelining): they wait for the next transaction, like the refused one.
        if let Some(last) = rcpts.last().filter(|r| r.is_too_many_recipients()) {
            for (i, slot) in outcomes.iter_mut().enumerate().skip(rcpts.len()) {
                self.too_many.push(i);
                *slot = Some(RcptOutcome::Deferred(format!(
                    "RCPT not sent after: {last}"
                )));
            }
        }
        // Every recipient refused: the transaction ends here.
        Ok(outcomes
            .iter()
            .cloned()
            .collect::<Option<Vec<_>>>()
            .map(|rcpts| Sent {
                rcpts,
                aborted: false,
            }))
    }

    async fn data(
        &mut self,
        message: &mut MessageSource,
        gate: &mut (dyn DotGate + Send),
        data_reply: Reply,
        outcomes: Vec<Option<RcptOutcome>>,
    ) -> Result<Sent, Failure> {
        if data_reply.code == 421 {
            return Err(failure("DATA", data_reply.to_string()));
        }
        if data_reply.code != 354 {
            self.reusable = !data_reply.is_positive();
            return Ok(settle(
                outcomes,
                RcptOutcome::from_reply("DATA", &data_reply),
                false,
            ));
        }
        self.write_message(message).await?;
        if !gate.allow() {
            self.reusable = false;
            self.io = Stream::Closed;
            return Ok(settle(
                outcomes,
                RcptOutcome::Deferred("aborted".into()),
                true,
            ));
        }
        self.write("end of data", b".\r\n").await?;
        let reply = self.read_reply("end of data", self.timeout * 2).await?;
        if reply.code == 421 {
            return Err(failure("end of data", reply.to_string()));
        }
        let accepted = if reply.is_positive() {
            RcptOutcome::Delivered(reply)
        } else {
            RcptOutcome::from_reply("end of data", &reply)
        };
        self.reusable = true;
        Ok(settle(outcomes, accepted, false))
    }

    /// Send the message dot-stuffed (RFC 5321 §4.5.2), ending in CRLF. The spool holds CRLF
    /// line endings only (a bare CR is refused at DATA, a bare LF refused or stored as CRLF), so stuffing after each LF is exact.
    async fn write_message(&mut self, message: &mut MessageSource) -> Result<(), Failure> {
        let mut at_line_start = true;
        let mut last_two = [b'\r', b'\n'];
        let mut out = Vec::with_capacity(CHUNK + CHUNK / 8);
        match message {
            MessageSource::Memory(bytes) => {
                for chunk in bytes.as_slice().chunks(CHUNK) {
                    out.clear();
                    stuff(chunk, &mut at_line_start, &mut out);
                    remember_tail(chunk, &mut last_two);
                    self.write("DATA", &out).await?;
                }
            }
            MessageSource::File { file, start, sent } => {
                if std::mem::replace(sent, true) {
                    file.seek(std::io::SeekFrom::Start(*start))
                        .await
                        .map_err(|e| failure("DATA", format!("reading the spool file: {e}")))?;
                }
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = file
                        .read(&mut buf)
                        .await
                        .map_err(|e| failure("DATA", format!("reading the spool file: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    out.clear();
                    stuff(&buf[..n], &mut at_line_start, &mut out);
                    remember_tail(&buf[..n], &mut last_two);
                    self.write("DATA", &out).await?;
                }
            }
        }
        if last_two != [b'\r', b'\n'] {
            self.write("DATA", b"\r\n").await?;
        }
        Ok(())
    }

    /// Send `line` and read its reply.
    async fn command(&mut self, stage: &'static str, line: &str) -> Result<Reply, Failure> {
        self.write(stage, line.as_bytes()).await?;
        self.read_reply(stage, self.timeout).await
    }

    async fn write(&mut self, stage: &'static str, bytes: &[u8]) -> Result<(), Failure> {
        let io = &mut self.io;
        let result = tokio::time::timeout(self.timeout, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.reusable = false;
                Err(failure(stage, format!("write: {e}")))
            }
            Err(_) => {
                self.reusable = false;
                Err(failure(stage, "write timed out"))
            }
        }
    }

    /// Read one complete (possibly multi-line) reply within `limit`.
    async fn read_reply(&mut self, stage: &'static str, limit: Duration) -> Result<Reply, Failure> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            while let Some(end) = self.rbuf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.rbuf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let parsed = parse_line(&line).map_err(|e| {
                    self.reusable = false;
                    failure(stage, e)
                })?;
                if code.is_some_and(|c| c != parsed.code) || lines.len() >= MAX_REPLY_LINES {
                    self.reusable = false;
                    return Err(failure(stage, "inconsistent multi-line reply"));
                }
                code = Some(parsed.code);
                lines.push(parsed.text);
                if parsed.last {
                    return Ok(Reply {
                        code: parsed.code,
                        lines,
                    });
                }
            }
            if self.rbuf.len() > MAX_REPLY_LINE {
                self.reusable = false;
                return Err(failure(stage, "reply line too long"));
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await;
            match read {
                Ok(Ok(0)) => {
                    self.reusable = false;
                    return Err(failure(stage, "connection closed by the upstream"));
                }
                Ok(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => {
                    self.reusable = false;
                    return Err(failure(stage, format!("read: {e}")));
                }
                Err(_) => {
                    self.reusable = false;
                    return Err(failure(stage, format!("no reply within {limit:?}")));
                }
            }
        }
    }

    /// Say QUIT and close (best effort, bounded).
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if self.write("QUIT", b"QUIT\r\n").await.is_ok() {
                let _ = self.read_reply("QUIT", Duration::from_secs(5)).await;
            }
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}

/// The outcomes of a transaction: those already decided (refused recipients), and `accepted`
/// for the recipients the upstream had accepted.
fn settle(outcomes: Vec<Option<RcptOutcome>>, accepted: RcptOutcome, aborted: bool) -> Sent {
    Sent {
        rcpts: outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| accepted.clone()))
            .collect(),
        aborted,
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
        let reply = Reply {
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
