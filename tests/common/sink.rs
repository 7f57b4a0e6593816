//! A real SMTP server for delivery tests: the upstream the relay forwards to.
//!
//! [`Sink::start`] binds a loopback port and serves each connection on its own thread (std,
//! blocking, like the rest of the harness). It speaks enough ESMTP to stand in for Exchange or
//! Postfix: EHLO (or HELO only), PIPELINING, SIZE, 8BITMIME, SMTPUTF8, STARTTLS (rustls),
//! AUTH PLAIN and LOGIN, RSET, NOOP, QUIT. [`SinkConfig`] chooses its answers (per recipient, to
//! MAIL, to the final dot) and its failures (drop the connection or stop answering at a
//! [`Stage`]); [`Sink::set_config`] changes them for the following commands.
//!
//! It records every accepted message ([`Received`]), every command line, and every protocol
//! violation it notices in what the client sent ([`Sink::violations`]): bare CR or LF, lines
//! over 998 octets, 8-bit data or UTF-8 addresses the server did not allow, commands pipelined
//! without PIPELINING, bytes after STARTTLS or DATA sent before the reply. Tests assert that
//! list is empty to prove the relay sends clean SMTP.
//!
//! Every read times out after [`SINK_READ_TIMEOUT`]; a client that disconnects ends its thread
//! quietly. Dropping the sink (or [`Sink::stop`]) closes the listener and every connection, so
//! the port refuses connections afterwards.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle, sleep};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig, ServerConnection, StreamOwned};

/// Read timeout of every sink connection; on expiry the sink answers `421` and closes.
pub const SINK_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest command line accepted (RFC 5321 allows 512 octets; this leaves room for
/// extension parameters and AUTH responses).
const MAX_COMMAND_LINE: usize = 4096;

/// Longest message accepted, a guard against a runaway client filling memory.
const MAX_MESSAGE: usize = 64 << 20;

/// RFC 5321 4.5.3.1.6: at most 998 octets per line before the CRLF.
const MAX_TEXT_LINE: usize = 998;

/// Interval of the accept loop and of the polling waits.
const POLL: Duration = Duration::from_millis(10);

/// How long [`Sink::stop`] waits for connection threads to end after closing their sockets.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long [`Sink::start_on`] retries binding a port that is still in use.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// A point in the SMTP dialogue where the sink can drop the connection or stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Right after accepting the connection, before the 220 greeting.
    Greeting,
    /// On EHLO or HELO, before the reply.
    Ehlo,
    /// On MAIL, before the reply.
    Mail,
    /// On every RCPT, before the reply.
    Rcpt,
    /// On DATA, before the 354.
    Data,
    /// After receiving the message and its final dot, before replying.
    Dot,
}

/// What a [`Sink`] does after accepting a message at its final dot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AfterDot {
    /// Reply and go on.
    #[default]
    Reply,
    /// Reply, then close the connection (the client learns it only at its next command).
    ReplyThenClose,
    /// Close without replying: the message is recorded, the client never hears of it (a
    /// delivery cut after the final dot, which the client must retry: a duplicate).
    CloseWithoutReply,
}

/// How a [`Sink`] behaves. `SinkConfig::default()` is a plain, accepting ESMTP server.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Advertise STARTTLS (needs `cert`).
    pub starttls: bool,
    /// Refuse MAIL before STARTTLS with `530 5.7.0`.
    pub require_tls: bool,
    /// PEM certificate and key files (e.g. from `write_certs(dir)`).
    pub cert: Option<(PathBuf, PathBuf)>,
    /// Advertise AUTH PLAIN LOGIN and require these credentials (user, password) before MAIL;
    /// wrong ones get `535 5.7.8`.
    pub auth: Option<(String, String)>,
    /// Advertise PIPELINING.
    pub pipelining: bool,
    /// Advertise 8BITMIME.
    pub eightbitmime: bool,
    /// Advertise SMTPUTF8.
    pub smtputf8: bool,
    /// Advertise `SIZE n`; refuse a bigger `MAIL SIZE=` (or message) with `552 5.3.4`.
    pub size: Option<u64>,
    /// False: answer EHLO with `500 5.5.1`, so the client must fall back to HELO.
    pub ehlo: bool,
    /// The greeting line.
    pub greeting: String,
    /// Lowercased address -> full reply line (`"550 5.1.1 no such user"`); others get
    /// `250 2.1.5 Ok`.
    pub rcpt_replies: HashMap<String, String>,
    /// Reply to MAIL instead of `250 2.1.0 Ok`.
    pub mail_reply: Option<String>,
    /// Reply to the final dot instead of `250 2.6.0 <id@sink.test> Queued mail for delivery`.
    pub data_reply: Option<String>,
    /// Close the connection when this stage is reached.
    pub drop_after: Option<Stage>,
    /// Stop answering (keep the socket open until the client or the sink closes it) when this
    /// stage is reached.
    pub stall_at: Option<Stage>,
    /// Wait this long before answering the final dot (holds the client's connection busy).
    pub dot_delay: Option<Duration>,
    /// `(n, reply)`: once a transaction has `n` recipients, every further RCPT in it gets
    /// `reply` (e.g. `"552 5.5.3 Too many recipients"`, as older servers send).
    pub max_rcpts: Option<(usize, String)>,
    /// After accepting a message at its final dot.
    pub after_dot: AfterDot,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            starttls: false,
            require_tls: false,
            cert: None,
            auth: None,
            pipelining: true,
            eightbitmime: true,
            smtputf8: true,
            size: None,
            ehlo: true,
            greeting: "220 sink.test ESMTP".to_owned(),
            rcpt_replies: HashMap::new(),
            mail_reply: None,
            data_reply: None,
            drop_after: None,
            stall_at: None,
            dot_delay: None,
            max_rcpts: None,
            after_dot: AfterDot::Reply,
        }
    }
}

/// One message the sink accepted (final reply 2xx).
#[derive(Clone, Debug)]
pub struct Received {
    /// The EHLO or HELO argument.
    pub helo: String,
    /// Whether the transaction ran over TLS.
    pub tls: bool,
    /// The authenticated user, if the client authenticated.
    pub auth: Option<String>,
    /// The address inside `MAIL FROM:<...>`, as sent.
    pub mail_from: String,
    /// The MAIL parameters (`SIZE=123`, `BODY=8BITMIME`), as sent.
    pub mail_params: Vec<String>,
    /// The recipients accepted with a 2xx, as sent.
    pub rcpts: Vec<String>,
    /// The message, dot-stuffing removed, line ends exactly as received.
    pub data: Vec<u8>,
    /// The bytes between the 354 and the final `.CRLF` inclusive, still dot-stuffed.
    pub raw_data: Vec<u8>,
    /// Number of the connection it came on (1 for the first), to check connection reuse.
    pub conn: usize,
}

/// State shared by the sink handle, its accept loop and its connection threads.
struct Shared {
    config: Mutex<SinkConfig>,
    messages: Mutex<Vec<Received>>,
    commands: Mutex<Vec<String>>,
    violations: Mutex<Vec<String>>,
    /// Connections accepted so far.
    connections: AtomicUsize,
    /// Connection threads still running.
    active: AtomicUsize,
    stop: AtomicBool,
    /// A clone of every open connection's socket, by connection number, to shut them all
    /// down on stop (removed when its connection ends: a long test makes many thousands).
    sockets: Mutex<HashMap<usize, TcpStream>>,
}

/// Lock a mutex, ignoring poison: a panicking test thread must not hide the sink's records.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running SMTP sink on a loopback port. Stopped on drop.
pub struct Sink {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Sink {
    /// Start on a free port of 127.0.0.1.
    pub fn start(config: SinkConfig) -> Sink {
        Sink::start_on(0, config)
    }

    /// Start on 127.0.0.1:`port` (0 for any), e.g. to bring an upstream back up on the port
    /// it had. Retries the bind for a few seconds while the port is still in use.
    pub fn start_on(port: u16, config: SinkConfig) -> Sink {
        assert!(
            !config.starttls || config.cert.is_some(),
            "SinkConfig: starttls needs cert"
        );
        let deadline = Instant::now() + BIND_RETRY;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(_) if port != 0 && Instant::now() < deadline => sleep(POLL),
                Err(e) => panic!("sink: bind 127.0.0.1:{port}: {e}"),
            }
        };
        let port = listener.local_addr().expect("sink local addr").port();
        listener
            .set_nonblocking(true)
            .expect("sink listener nonblocking");
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            messages: Mutex::default(),
            commands: Mutex::default(),
            violations: Mutex::default(),
            connections: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sockets: Mutex::default(),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("sink-{port}"))
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn sink accept thread")
        };
        Sink {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Messages accepted so far (final reply 2xx), in order.
    pub fn messages(&self) -> Vec<Received> {
        lock(&self.shared.messages).clone()
    }

    /// Remove and return the messages accepted so far, in order (a long test keeps its memory
    /// bounded this way).
    pub fn take_messages(&self) -> Vec<Received> {
        std::mem::take(&mut *lock(&self.shared.messages))
    }

    /// Connections still open (their threads not yet ended).
    pub fn active(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Wait until at least `count` messages were accepted; false after `timeout`.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> bool {
        super::wait_until(timeout, || lock(&self.shared.messages).len() >= count)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every command line received (without CRLF), in order, over all connections. AUTH
    /// continuation lines and message data are not commands and are not included.
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.commands).clone()
    }

    /// Protocol violations noticed in what clients sent, each as
    /// `"connection N: what"`. Empty when the client spoke clean SMTP.
    pub fn violations(&self) -> Vec<String> {
        lock(&self.shared.violations).clone()
    }

    /// Change the behaviour for every command from now on (connections already open included).
    pub fn set_config(&self, config: SinkConfig) {
        assert!(
            !config.starttls || config.cert.is_some(),
            "SinkConfig: starttls needs cert"
        );
        *lock(&self.shared.config) = config;
    }

    /// Stop accepting, close every connection (the port refuses connections afterwards).
    pub fn stop(self) {
        drop(self);
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            // The accept loop polls the stop flag; once it returns, the listener is closed
            // and every open connection's socket is in `sockets`.
            let _ = acceptor.join();
        }
        for (_, socket) in lock(&self.shared.sockets).drain() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while self.shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            sleep(POLL);
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let n = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                if stream.set_nonblocking(false).is_err() {
                    continue;
                }
                match stream.try_clone() {
                    Ok(clone) => _ = lock(&shared.sockets).insert(n, clone),
                    Err(_) => continue,
                }
                shared.active.fetch_add(1, Ordering::SeqCst);
                let conn_shared = Arc::clone(&shared);
                let spawned =
                    thread::Builder::new()
                        .name(format!("sink-conn-{n}"))
                        .spawn(move || {
                            serve(stream, n, &conn_shared);
                            lock(&conn_shared.sockets).remove(&n);
                            conn_shared.active.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    lock(&shared.sockets).remove(&n);
                    shared.active.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => sleep(POLL),
            Err(_) => sleep(POLL),
        }
    }
}

/// The connection's byte stream: plain until STARTTLS, then TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.write(buf),
            Io::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Plain(s) => s.flush(),
            Io::Tls(s) => s.flush(),
        }
    }
}

/// Whether the session goes on after a command.
#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    End,
}

/// What a client's AUTH exchange came to.
enum AuthOutcome {
    /// `*`, or the connection closed.
    Cancelled,
    /// Not base64, or not the mechanism's format.
    Malformed,
    /// User name and password as sent.
    Credentials(Vec<u8>, Vec<u8>),
}

/// The open mail transaction (after an accepted MAIL).
struct Txn {
    mail_from: String,
    params: Vec<String>,
    rcpts: Vec<String>,
}

/// One connection's state.
struct Session<'a> {
    shared: &'a Shared,
    conn: usize,
    tcp: TcpStream,
    io: Io,
    /// Received, not yet consumed.
    buf: Vec<u8>,
    helo: Option<String>,
    /// EHLO (not HELO) was accepted: extensions are in effect.
    esmtp: bool,
    tls: bool,
    auth: Option<String>,
    txn: Option<Txn>,
}

fn serve(tcp: TcpStream, conn: usize, shared: &Shared) {
    let _ = tcp.set_read_timeout(Some(SINK_READ_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(SINK_READ_TIMEOUT));
    let _ = tcp.set_nodelay(true);
    let Ok(plain) = tcp.try_clone() else {
        return;
    };
    let mut session = Session {
        shared,
        conn,
        tcp,
        io: Io::Plain(plain),
        buf: Vec::new(),
        helo: None,
        esmtp: false,
        tls: false,
        auth: None,
        txn: None,
    };
    match session.run() {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            let _ = session.reply("421 4.4.2 sink.test Error: timeout exceeded");
        }
        Err(e) => {
            if !shared.stop.load(Ordering::SeqCst)
                && !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                )
            {
                eprintln!("sink: connection {conn}: {e}");
            }
        }
    }
    let _ = session.tcp.shutdown(Shutdown::Both);
}

impl Session<'_> {
    fn config(&self) -> SinkConfig {
        lock(&self.shared.config).clone()
    }

    fn violation(&self, what: impl std::fmt::Display) {
        lock(&self.shared.violations).push(format!("connection {}: {what}", self.conn));
    }

    fn reply(&mut self, line: &str) -> io::Result<()> {
        self.io.write_all(format!("{line}\r\n").as_bytes())?;
        self.io.flush()
    }

    /// One line including its LF (or what came before EOF); `None` at EOF with nothing
    /// buffered. Longer than `max` without a LF is an error.
    fn read_line(&mut self, max: usize) -> io::Result<Option<Vec<u8>>> {
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos + 1;
                return Ok(Some(self.buf.drain(..end).collect()));
            }
            scanned = self.buf.len();
            if self.buf.len() > max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("line longer than {max} octets"),
                ));
            }
            let mut chunk = [0u8; 16384];
            match self.io.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Ok(Some(std::mem::take(&mut self.buf))),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Carry out `drop_after` / `stall_at` for `stage`; `Flow::End` when the session is over.
    fn at(&mut self, stage: Stage) -> io::Result<Flow> {
        let config = self.config();
        if config.drop_after == Some(stage) {
            let _ = self.tcp.shutdown(Shutdown::Both);
            return Ok(Flow::End);
        }
        if config.stall_at == Some(stage) {
            self.stall();
            return Ok(Flow::End);
        }
        Ok(Flow::Go)
    }

    /// Say nothing more; discard what arrives until the client closes or the sink stops.
    fn stall(&mut self) {
        let _ = self.tcp.set_read_timeout(Some(POLL * 5));
        let mut chunk = [0u8; 4096];
        while !self.shared.stop.load(Ordering::SeqCst) {
            match (&self.tcp).read(&mut chunk) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
    }

    fn run(&mut self) -> io::Result<()> {
        if self.at(Stage::Greeting)? == Flow::End {
            return Ok(());
        }
        let greeting = self.config().greeting;
        self.reply(&greeting)?;
        loop {
            let Some(raw) = self.read_line(MAX_COMMAND_LINE)? else {
                return Ok(());
            };
            let line = match raw.strip_suffix(b"\r\n") {
                Some(l) => l,
                None => {
                    self.violation(format!(
                        "command line not ended by CRLF: {:?}",
                        String::from_utf8_lossy(&raw)
                    ));
                    raw.strip_suffix(b"\n").unwrap_or(&raw)
                }
            };
            let line = String::from_utf8_lossy(line).into_owned();
            lock(&self.shared.commands).push(line.clone());
            let config = self.config();
            let may_pipeline = config.pipelining && self.esmtp;
            if !may_pipeline && !self.buf.is_empty() {
                self.violation(format!(
                    "command sent before the reply to {line:?} without PIPELINING"
                ));
            }
            let (verb, arg) = match line.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_owned()),
                None => (line.to_ascii_uppercase(), String::new()),
            };
            let flow = match verb.as_str() {
                "EHLO" => self.ehlo(&arg, &config)?,
                "HELO" => self.helo(&arg)?,
                "STARTTLS" => self.starttls(&config)?,
                "AUTH" => self.auth(&arg, &config)?,
                "MAIL" => self.mail(&arg, &config)?,
                "RCPT" => self.rcpt(&arg, &config)?,
                "DATA" => self.data(&config)?,
                "RSET" => {
                    self.txn = None;
                    self.reply("250 2.0.0 Ok")?;
                    Flow::Go
                }
                "NOOP" => {
                    self.reply("250 2.0.0 Ok")?;
                    Flow::Go
                }
                "VRFY" => {
                    self.reply("252 2.0.0 Cannot VRFY user")?;
                    Flow::Go
                }
                "QUIT" => {
                    self.reply("221 2.0.0 Bye")?;
                    Flow::End
                }
                "" => {
                    self.reply("500 5.5.2 Error: bad syntax")?;
                    Flow::Go
                }
                _ => {
                    self.reply("502 5.5.2 Error: command not recognized")?;
                    Flow::Go
                }
            };
            if flow == Flow::End {
                return Ok(());
            }
        }
    }

    fn ehlo(&mut self, arg: &str, config: &SinkConfig) -> io::Result<Flow> {
        if self.at(Stage::Ehlo)? == Flow::End {
            return Ok(Flow::End);
        }
        if !config.ehlo {
            self.reply("500 5.5.1 Command unrecognized")?;
            return Ok(Flow::Go);
        }
        if arg.is_empty() {
            self.reply("501 5.5.4 Syntax: EHLO hostname")?;
            return Ok(Flow::Go);
        }
        self.helo = Some(arg.to_owned());
        self.esmtp = true;
        self.txn = None;
        let mut lines = vec![format!("sink.test Hello {arg}")];
        if config.pipelining {
            lines.push("PIPELINING".into());
        }
        if let Some(n) = config.size {
            lines.push(format!("SIZE {n}"));
        }
        if config.eightbitmime {
            lines.push("8BITMIME".into());
        }
        if config.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if config.starttls && !self.tls {
            lines.push("STARTTLS".into());
        }
        if config.auth.is_some() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        let last = lines.len() - 1;
        let text: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect();
        self.reply(&text.join("\r\n"))?;
        Ok(Flow::Go)
    }

    fn helo(&mut self, arg: &str) -> io::Result<Flow> {
        if self.at(Stage::Ehlo)? == Flow::End {
            return Ok(Flow::End);
        }
        if arg.is_empty() {
            self.reply("501 5.5.4 Syntax: HELO hostname")?;
            return Ok(Flow::Go);
        }
        self.helo = Some(arg.to_owned());
        self.esmtp = false;
        self.txn = None;
        self.reply("250 sink.test")?;
        Ok(Flow::Go)
    }

    fn starttls(&mut self, config: &SinkConfig) -> io::Result<Flow> {
        if self.tls {
            self.reply("503 5.5.1 Error: TLS already active")?;
            return Ok(Flow::Go);
        }
        let tls_config = match (&config.cert, config.starttls && self.esmtp) {
            (Some((cert, key)), true) => server_tls(cert, key),
            _ => Err("STARTTLS not offered".to_owned()),
        };
        let tls_config = match tls_config {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sink: connection {}: {e}", self.conn);
                self.reply("454 4.7.0 TLS not available")?;
                return Ok(Flow::Go);
            }
        };
        if !self.buf.is_empty() {
            // RFC 3207 section 6: anything after STARTTLS must be discarded (command injection).
            self.violation("bytes sent after STARTTLS before the TLS handshake");
            self.buf.clear();
        }
        self.reply("220 2.0.0 Ready to start TLS")?;
        let conn = ServerConnection::new(tls_config).map_err(io::Error::other)?;
        let mut tls = StreamOwned::new(conn, self.tcp.try_clone()?);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        self.io = Io::Tls(Box::new(tls));
        self.tls = true;
        // RFC 3207 section 4.2: forget everything learnt before TLS.
        self.helo = None;
        self.esmtp = false;
        self.auth = None;
        self.txn = None;
        Ok(Flow::Go)
    }

    /// One AUTH response, decoded: `initial` if the client gave one on the AUTH line, else
    /// read after sending `prompt`.
    fn auth_response(
        &mut self,
        initial: Option<&str>,
        prompt: &str,
    ) -> io::Result<Result<Vec<u8>, AuthOutcome>> {
        let text = match initial {
            Some(text) => text.to_owned(),
            None => {
                self.reply(prompt)?;
                match self.read_line(MAX_COMMAND_LINE)? {
                    Some(raw) => String::from_utf8_lossy(&raw).trim_end().to_owned(),
                    None => return Ok(Err(AuthOutcome::Cancelled)),
                }
            }
        };
        Ok(match text.as_str() {
            "*" => Err(AuthOutcome::Cancelled),
            "=" => Ok(Vec::new()),
            _ => BASE64
                .decode(text.as_bytes())
                .map_err(|_| AuthOutcome::Malformed),
        })
    }

    /// The exchange of one AUTH mechanism; `None` for a mechanism the sink does not know.
    fn auth_exchange(
        &mut self,
        mechanism: &str,
        initial: Option<&str>,
    ) -> io::Result<Option<AuthOutcome>> {
        let outcome = match mechanism {
            "PLAIN" => match self.auth_response(initial, "334 ")? {
                Err(outcome) => outcome,
                Ok(bytes) => match bytes.split(|&b| b == 0).collect::<Vec<_>>().as_slice() {
                    [_authzid, user, password] => {
                        AuthOutcome::Credentials(user.to_vec(), password.to_vec())
                    }
                    _ => AuthOutcome::Malformed,
                },
            },
            "LOGIN" => match self.auth_response(initial, "334 VXNlcm5hbWU6")? {
                Err(outcome) => outcome,
                Ok(user) => match self.auth_response(None, "334 UGFzc3dvcmQ6")? {
                    Err(outcome) => outcome,
                    Ok(password) => AuthOutcome::Credentials(user, password),
                },
            },
            _ => return Ok(None),
        };
        Ok(Some(outcome))
    }

    fn auth(&mut self, arg: &str, config: &SinkConfig) -> io::Result<Flow> {
        let Some((user, password)) = config.auth.clone() else {
            self.reply("503 5.5.1 Error: authentication not enabled")?;
            return Ok(Flow::Go);
        };
        if self.auth.is_some() || self.txn.is_some() || !self.esmtp {
            self.reply("503 5.5.1 Error: AUTH not allowed now")?;
            return Ok(Flow::Go);
        }
        let (mechanism, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m.to_ascii_uppercase(), Some(i.trim())),
            None => (arg.to_ascii_uppercase(), None),
        };
        match self.auth_exchange(&mechanism, initial)? {
            None => self.reply("504 5.5.4 Unrecognized authentication type")?,
            Some(AuthOutcome::Cancelled) => self.reply("501 5.7.0 Authentication cancelled")?,
            Some(AuthOutcome::Malformed) => self.reply("501 5.5.2 Cannot decode response")?,
            Some(AuthOutcome::Credentials(u, p))
                if u == user.as_bytes() && p == password.as_bytes() =>
            {
                self.auth = Some(user);
                self.reply("235 2.7.0 Authentication successful")?;
            }
            Some(AuthOutcome::Credentials(..)) => {
                self.reply("535 5.7.8 Authentication credentials invalid")?;
            }
        }
        Ok(Flow::Go)
    }

    fn mail(&mut self, arg: &str, config: &SinkConfig) -> io::Result<Flow> {
        if self.at(Stage::Mail)? == Flow::End {
            return Ok(Flow::End);
        }
        let refusal = if self.helo.is_none() {
            Some("503 5.5.1 Error: send HELO/EHLO first")
        } else if config.require_tls && !self.tls {
            Some("530 5.7.0 Must issue a STARTTLS command first")
        } else if config.auth.is_some() && self.auth.is_none() {
            Some("530 5.7.0 Authentication required")
        } else if self.txn.is_some() {
            Some("503 5.5.1 Error: nested MAIL command")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.reply(refusal)?;
            return Ok(Flow::Go);
        }
        let Some((address, params)) = parse_path(arg, "FROM:") else {
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")?;
            return Ok(Flow::Go);
        };
        if let Some(reply) = self.check_mail_params(&address, &params, config) {
            self.reply(&reply)?;
            return Ok(Flow::Go);
        }
        let reply = config
            .mail_reply
            .clone()
            .unwrap_or_else(|| "250 2.1.0 Ok".to_owned());
        if reply.starts_with('2') {
            self.txn = Some(Txn {
                mail_from: address,
                params,
                rcpts: Vec::new(),
            });
        }
        self.reply(&reply)?;
        Ok(Flow::Go)
    }

    /// The refusal for MAIL parameters the server did not offer, or a size over its limit.
    fn check_mail_params(
        &self,
        address: &str,
        params: &[String],
        config: &SinkConfig,
    ) -> Option<String> {
        let mut utf8 = false;
        for param in params {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let key = key.to_ascii_uppercase();
            let offered = self.esmtp
                && match key.as_str() {
                    "SIZE" => config.size.is_some(),
                    "BODY" => {
                        value.eq_ignore_ascii_case("7BIT")
                            || (config.eightbitmime && value.eq_ignore_ascii_case("8BITMIME"))
                    }
                    "SMTPUTF8" => config.smtputf8,
                    "AUTH" => config.auth.is_some(),
                    _ => false,
                };
            if !offered {
                self.violation(format!("MAIL parameter {param:?} was not offered"));
                return Some("555 5.5.4 Unsupported option".to_owned());
            }
            if key == "SMTPUTF8" {
                utf8 = true;
            }
            if key == "SIZE" {
                let limit = config.size.unwrap_or(u64::MAX);
                match value.parse::<u64>() {
                    Ok(n) if n > limit => {
                        return Some(
                            "552 5.3.4 Message size exceeds fixed maximum message size".into(),
                        );
                    }
                    Ok(_) => {}
                    Err(_) => return Some("501 5.5.4 Bad SIZE parameter".into()),
                }
            }
        }
        if !utf8 && !address.is_ascii() {
            self.violation(format!("non-ASCII address {address:?} without SMTPUTF8"));
            return Some("553 5.6.7 Address requires SMTPUTF8".into());
        }
        None
    }

    fn rcpt(&mut self, arg: &str, config: &SinkConfig) -> io::Result<Flow> {
        if self.at(Stage::Rcpt)? == Flow::End {
            return Ok(Flow::End);
        }
        let Some(txn) = &self.txn else {
            self.reply("503 5.5.1 Error: need MAIL command")?;
            return Ok(Flow::Go);
        };
        let utf8 = txn
            .params
            .iter()
            .any(|p| p.eq_ignore_ascii_case("SMTPUTF8"));
        let Some((address, _params)) = parse_path(arg, "TO:") else {
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")?;
            return Ok(Flow::Go);
        };
        if !utf8 && !address.is_ascii() {
            self.violation(format!("non-ASCII address {address:?} without SMTPUTF8"));
            self.reply("553 5.6.7 Address requires SMTPUTF8")?;
            return Ok(Flow::Go);
        }
        let reply = match &config.max_rcpts {
            Some((n, reply)) if txn.rcpts.len() >= *n => reply.clone(),
            _ => config
                .rcpt_replies
                .get(&address.to_lowercase())
                .cloned()
                .unwrap_or_else(|| "250 2.1.5 Ok".to_owned()),
        };
        if reply.starts_with('2')
            && let Some(txn) = &mut self.txn
        {
            txn.rcpts.push(address);
        }
        self.reply(&reply)?;
        Ok(Flow::Go)
    }

    fn data(&mut self, config: &SinkConfig) -> io::Result<Flow> {
        if self.at(Stage::Data)? == Flow::End {
            return Ok(Flow::End);
        }
        match &self.txn {
            None => {
                self.reply("503 5.5.1 Error: need RCPT command")?;
                return Ok(Flow::Go);
            }
            Some(txn) if txn.rcpts.is_empty() => {
                self.reply("554 5.5.1 Error: no valid recipients")?;
                return Ok(Flow::Go);
            }
            Some(_) => {}
        }
        if !self.buf.is_empty() {
            self.violation("message data sent before the 354 reply to DATA");
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>")?;
        let (mut data, mut raw_data) = (Vec::new(), Vec::new());
        let mut line_no = 0;
        loop {
            let Some(line) = self.read_line(MAX_MESSAGE)? else {
                return Ok(Flow::End);
            };
            raw_data.extend_from_slice(&line);
            if line == b".\r\n" {
                break;
            }
            if !line.ends_with(b"\n") {
                // Closed in the middle of a line.
                return Ok(Flow::End);
            }
            line_no += 1;
            self.check_data_line(&line, line_no);
            data.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
            if raw_data.len() > MAX_MESSAGE {
                self.reply("552 5.3.4 Message too big for the test sink")?;
                return Ok(Flow::End);
            }
        }
        let eight_bit_ok = self.esmtp && config.eightbitmime;
        if !eight_bit_ok && !data.is_ascii() {
            self.violation("8-bit message data but 8BITMIME was not in effect");
        }
        if self.at(Stage::Dot)? == Flow::End {
            return Ok(Flow::End);
        }
        let config = self.config();
        if let Some(delay) = config.dot_delay {
            sleep(delay);
        }
        let Some(txn) = self.txn.take() else {
            return Ok(Flow::End);
        };
        let reply = match config.size {
            Some(limit) if data.len() as u64 > limit => {
                "552 5.3.4 Message size exceeds fixed maximum message size".to_owned()
            }
            _ => config
                .data_reply
                .clone()
                .unwrap_or_else(|| "250 2.6.0 <id@sink.test> Queued mail for delivery".to_owned()),
        };
        let accepted = reply.starts_with('2');
        if accepted {
            lock(&self.shared.messages).push(Received {
                helo: self.helo.clone().unwrap_or_default(),
                tls: self.tls,
                auth: self.auth.clone(),
                mail_from: txn.mail_from,
                mail_params: txn.params,
                rcpts: txn.rcpts,
                data,
                raw_data,
                conn: self.conn,
            });
        }
        match (accepted, config.after_dot) {
            (true, AfterDot::CloseWithoutReply) => Ok(Flow::End),
            (true, AfterDot::ReplyThenClose) => {
                self.reply(&reply)?;
                Ok(Flow::End)
            }
            _ => {
                self.reply(&reply)?;
                Ok(Flow::Go)
            }
        }
    }

    /// Record bare CR, bare LF and over-long lines in one line of message data (with its LF).
    fn check_data_line(&self, line: &[u8], line_no: usize) {
        let text = match line.strip_suffix(b"\r\n") {
            Some(t) => t,
            None => {
                self.violation(format!("bare LF ending message line {line_no}"));
                line.strip_suffix(b"\n").unwrap_or(line)
            }
        };
        if text.contains(&b'\r') {
            self.violation(format!("bare CR in message line {line_no}"));
        }
        if text.len() > MAX_TEXT_LINE {
            self.violation(format!(
                "message line {line_no} is {} octets, over {MAX_TEXT_LINE}",
                text.len()
            ));
        }
    }
}

/// `FROM:<addr> PARAMS` (or `TO:`): the address inside the brackets and the parameters.
fn parse_path(arg: &str, keyword: &str) -> Option<(String, Vec<String>)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start().strip_prefix('<')?;
    let end = rest.find('>')?;
    let params = rest[end + 1..]
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    Some((rest[..end].to_owned(), params))
}

/// A rustls server configuration (aws-lc-rs) for the PEM `cert` chain and `key`.
fn server_tls(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}
