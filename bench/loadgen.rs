//! Load generator for `bench/run`: scenarios C, D, E and A-TLS of BENCHMARKS.md.
//!
//! One binary, several subcommands; each prints exactly one JSON line on stdout (the figures)
//! and writes nothing else there, so `bench/bench.py` can parse it (`sink` excepted: it prints
//! counters in smtp-sink's manner).
//!
//! - `openloop --target ADDR --rate R --seconds S [--sink ADDR] [--wait S]`: starts one SMTP
//!   session (new connection, EHLO, MAIL, RCPT, DATA, a 1 KB message, QUIT) every 1/R s on a
//!   fixed schedule, whatever the server does, and measures from the *scheduled* start to the
//!   250 after the final dot. With `--sink` the same process is also the relay's upstream: an
//!   ESMTP sink that finds each message's `X-Bench-Seq` header and notes when its final dot
//!   arrived, giving scheduled start → arrived at the sink. With `--ca PEM [--name HOST]` each
//!   session uses STARTTLS (see "STARTTLS client" below).
//! - `send --target ADDR --sessions S --messages N [--ca PEM [--name HOST]]`: closed loop, as
//!   `smtp-source -s S -m N` (a new connection per 1 KB message, S at a time); with `--ca`,
//!   STARTTLS in every session (scenario A-TLS: smtp-source has no TLS).
//! - `sink --listen ADDR [--cert PEM --key PEM]`: an ESMTP sink offering STARTTLS (scenario
//!   A-TLS's one upstream for both relays: smtp-sink has no TLS). It prints
//!   `mesg=N tls=M sessions=S failed=F` whenever its counts move (at most every 10 ms), in the
//!   manner of `smtp-sink -c`, until SIGTERM.
//! - `idle --target ADDR --count N [--parallel P]`: opens N sessions, reads the banner, sends
//!   EHLO, reads the reply, and holds them; prints its line once all are open, then waits for
//!   stdin to reach EOF (or SIGTERM/SIGINT) and closes them.
//! - `tls-server --listen ADDR --cert PEM --key PEM`: the bare baseline for scenario E. A
//!   tokio-rustls server that speaks just enough SMTP to reach STARTTLS, handshakes, answers the
//!   client's one line (QUIT) with 221 and closes. Prints its counters when terminated.
//! - `tls --target ADDR --conns C --seconds S [--name HOST] [--cert PEM]`: C concurrent loops of
//!   connect, banner, EHLO, STARTTLS, a full TLS handshake (resumption disabled), QUIT over TLS,
//!   221, close. The same client drives portcullis and `tls-server`.
//! - `dkim-sign --rsa-key PEM [--size BYTES] [--count N]`: DKIM signing cost (issue 14's goal:
//!   under 0.5 ms of CPU per 10 KB message). Signs one message of `--size` bytes (default
//!   10,240) `--count` times (default 2,000) with the RSA-2048 key in PEM (PKCS#8 or PKCS#1) and
//!   with a freshly generated Ed25519 key, relaxed/relaxed over the default header list of
//!   `[[dkim.sign]]`, on one thread; reports that thread's CPU time (getrusage RUSAGE_THREAD)
//!   and the wall time per signature, each including the `DKIM-Signature:` field's formatting.
//! - `journal-fill --spool DIR --messages N [--days D]`: a synthetic message journal for
//!   `bench/journal.py` (see `bench/journal_fill.rs`).
//! - `queue-fill --spool DIR --messages N [--user LOGIN] [--share PERCENT] [--threads T]`: a
//!   queue of N 1 KB messages, PERCENT % of them LOGIN's, for timing the `queue` commands
//!   (see `bench/queue_fill.rs`).
//!
//! TLS on both sides is portcullis's own: `tls-server` builds its configuration with
//! `portcullis::inbound::tls::server_config` (`[tls] cert` and `key`, `min_version = "1.2"`),
//! and the client is `portcullis::outbound::tls::unverified_client_config` (the opportunistic
//! upstream client: any certificate, handshake signatures verified) with resumption disabled,
//! so every handshake is a full one against either server. With `--cert` the client also fails
//! a session whose server presented another certificate.
//!
//! The STARTTLS client of `openloop` and `send` verifies the relay's certificate against the
//! benchmark's CA (`--ca`) for `--name` (default bench.portcullis.test) and keeps one rustls
//! client configuration, hence one session store, for the whole run: sessions are resumed as a
//! busy sending MTA resumes them; the JSON line counts full and resumed handshakes.
//!
//! It is a measuring tool: a failure is counted (and the first one described in the JSON line),
//! never retried, so a struggling server shows up in the figures.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::json;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::{ClientConfig, HandshakeKind, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Longest reply or command line accepted, CRLF included (message lines too, at the sink).
const MAX_LINE: u64 = 64 * 1024;
/// Time allowed for one whole session (openloop, tls) or one idle session's greeting.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed, after QUIT, for the server to close its side.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Delay before the first scheduled session, so spawning the runtime is not measured.
const SCHEDULE_LEAD: Duration = Duration::from_millis(100);
/// Default `--wait`: how long `openloop --sink` waits for the last arrivals after the sends.
const DEFAULT_SINK_WAIT_S: f64 = 30.0;
/// Default `--parallel` for `idle`: sessions being opened at once. The listen backlog here is
/// 1024 (tokio's default), so this stays far below it and no SYN is dropped.
const DEFAULT_IDLE_PARALLEL: usize = 64;
/// Message size of `openloop`, headers included.
const MESSAGE_SIZE: usize = 1024;

#[path = "journal_fill.rs"]
mod journal_fill;
#[path = "queue_fill.rs"]
mod queue_fill;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        usage();
    };
    let result = Args::parse(rest).and_then(|a| match command.as_str() {
        "openloop" => openloop(&a),
        "send" => send(&a),
        "sink" => sink(&a),
        "idle" => idle(&a),
        "tls-server" => tls_server(&a),
        "tls" => tls_client(&a),
        "dkim-sign" => dkim_sign(&a),
        "journal-fill" => journal_fill::journal_fill(&a),
        "queue-fill" => queue_fill::queue_fill(&a),
        _ => usage(),
    });
    if let Err(e) = result {
        eprintln!("loadgen {command}: {e:#}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen openloop --target ADDR --rate R --seconds S [--sink ADDR] [--wait S]\n\
         \x20                       [--ca PEM [--name HOST]]\n\
         \x20      loadgen send --target ADDR --sessions S --messages N [--ca PEM [--name HOST]]\n\
         \x20      loadgen sink --listen ADDR [--cert PEM --key PEM]\n\
         \x20      loadgen idle --target ADDR --count N [--parallel P]\n\
         \x20      loadgen tls-server --listen ADDR --cert PEM --key PEM\n\
         \x20      loadgen tls --target ADDR --conns C --seconds S [--name HOST] [--cert PEM]\n\
         \x20      loadgen dkim-sign --rsa-key PEM [--size BYTES] [--count N]\n\
         \x20      loadgen journal-fill --spool DIR --messages N [--days D]\n\
         \x20      loadgen queue-fill --spool DIR --messages N [--user LOGIN] [--share PERCENT] [--threads T]"
    );
    std::process::exit(2);
}

// ---- arguments -----------------------------------------------------------------------------

/// `--key value` pairs.
struct Args(HashMap<String, String>);

impl Args {
    fn parse(args: &[String]) -> anyhow::Result<Args> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(key) = it.next() {
            let name = key
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("unexpected argument {key:?}"))?;
            let value = it.next().ok_or_else(|| anyhow!("{key} needs a value"))?;
            map.insert(name.to_owned(), value.clone());
        }
        Ok(Args(map))
    }

    fn opt<T: FromStr>(&self, name: &str) -> anyhow::Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.0
            .get(name)
            .map(|v| v.parse().map_err(|e| anyhow!("--{name} {v:?}: {e}")))
            .transpose()
    }

    fn get<T: FromStr>(&self, name: &str) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        self.opt(name)?
            .ok_or_else(|| anyhow!("--{name} is required"))
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Print the one result line and make sure it leaves the process now (a pipe is block-buffered).
fn emit(value: serde_json::Value) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{value}")?;
    out.flush()?;
    Ok(())
}

/// The first failure of a run, kept for the JSON line (later ones are only counted).
#[derive(Default)]
struct FirstError(Mutex<Option<String>>);

impl FirstError {
    fn note(&self, e: &anyhow::Error) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(format!("{e:#}"));
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Nearest-rank percentile of sorted durations, in milliseconds (`null` when empty).
fn percentile_ms(sorted: &[Duration], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let i = ((p * sorted.len() as f64) as usize).min(last);
    Some(sorted[i].as_secs_f64() * 1000.0)
}

// ---- SMTP lines ----------------------------------------------------------------------------

/// Read one line (up to and including LF) into `buf`; EOF and an over-long line are errors.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    let n = AsyncReadExt::take(&mut *r, MAX_LINE)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
    }
    Ok(())
}

/// Read a whole (possibly multi-line) reply and return its code.
async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    loop {
        read_line(r, buf).await?;
        let code = buf
            .get(..3)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("malformed reply {:?}", String::from_utf8_lossy(buf)))?;
        if buf.get(3) != Some(&b'-') {
            return Ok(code);
        }
    }
}

/// Read a reply and require the class of `expected` (2 for 2xx, 3 for 3xx).
async fn expect<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    expected: u16,
    after: &str,
) -> anyhow::Result<()> {
    let code = read_reply(r, buf)
        .await
        .with_context(|| format!("after {after}"))?;
    if code / 100 != expected {
        bail!("{} after {after}", String::from_utf8_lossy(buf).trim_end());
    }
    Ok(())
}

/// Send `cmd` and require a reply of class `expected`.
async fn command<S: AsyncBufRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    cmd: &str,
    expected: u16,
) -> anyhow::Result<()> {
    s.write_all(cmd.as_bytes()).await?;
    s.flush().await?;
    expect(s, buf, expected, cmd.trim_end()).await
}

/// After QUIT: read the 221, then wait for the server to close first, so the TIME_WAIT state
/// stays on the server's side and thousands of short sessions do not exhaust the client's
/// ephemeral ports. Errors here do not fail a session whose work is done.
async fn quit<S: AsyncBufRead + AsyncWrite + Unpin>(s: &mut S, buf: &mut Vec<u8>) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        s.write_all(b"QUIT\r\n").await?;
        s.flush().await?;
        read_reply(s, buf).await?;
        let mut rest = [0u8; 256];
        while s.read(&mut rest).await? > 0 {}
        anyhow::Ok(())
    })
    .await;
}

async fn connect(target: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = TcpStream::connect(target)
        .await
        .with_context(|| format!("connect {target}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

// ---- openloop ------------------------------------------------------------------------------

/// Per scheduled session: when it got its 250 and when its message reached the sink, each as
/// nanoseconds since the schedule's start plus one (0: not yet, or never).
struct Timeline {
    start: Instant,
    run: String,
    replied: Vec<AtomicU64>,
    arrived: Vec<AtomicU64>,
    arrivals: AtomicU64,
    /// Messages at the sink that are not this run's (or a second copy of one of them).
    stray: AtomicU64,
}

impl Timeline {
    fn stamp(&self, slot: &AtomicU64, at: Instant) -> bool {
        let ns = at.saturating_duration_since(self.start).as_nanos() as u64 + 1;
        slot.compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// Note the arrival at the sink of the message carrying `X-Bench-Seq: <value>`.
    fn arrival(&self, value: Option<&str>, at: Instant) {
        let seq = value
            .and_then(|v| v.rsplit_once('-'))
            .filter(|(run, _)| *run == self.run)
            .and_then(|(_, n)| n.parse::<usize>().ok());
        match seq.and_then(|n| self.arrived.get(n)) {
            Some(slot) if self.stamp(slot, at) => {
                self.arrivals.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Latencies of the stamped sessions in `slots`, measured from each one's scheduled start.
    fn latencies(&self, slots: &[AtomicU64], rate: f64) -> Vec<Duration> {
        let mut out: Vec<Duration> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let ns = s.load(Ordering::Relaxed).checked_sub(1)?;
                Some(Duration::from_nanos(ns).saturating_sub(scheduled(i, rate)))
            })
            .collect();
        out.sort_unstable();
        out
    }
}

/// Offset of session `i` from the schedule's start.
fn scheduled(i: usize, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// The 1 KB message of session `seq`, dot included: the sink recognises it by `X-Bench-Seq`.
fn message(run: &str, seq: usize) -> Vec<u8> {
    let mut m = format!(
        "From: <bench@example.com>\r\nTo: <rcpt@example.net>\r\nSubject: open loop {seq}\r\n\
         Message-ID: <{seq}.{run}@loadgen.bench>\r\nX-Bench-Seq: {run}-{seq}\r\n\r\n"
    )
    .into_bytes();
    let line = [b"x".repeat(78).as_slice(), b"\r\n"].concat();
    while m.len() + line.len() <= MESSAGE_SIZE {
        m.extend_from_slice(&line);
    }
    m.extend_from_slice(b".\r\n");
    m
}

fn openloop(a: &Args) -> anyhow::Result<()> {
    let target: SocketAddr = a.get("target")?;
    let rate: f64 = a.get("rate")?;
    let seconds: f64 = a.get("seconds")?;
    let sink: Option<SocketAddr> = a.opt("sink")?;
    let wait = Duration::from_secs_f64(a.opt("wait")?.unwrap_or(DEFAULT_SINK_WAIT_S));
    let tls = Starttls::from_args(a)?;
    if !(rate > 0.0 && seconds > 0.0) {
        bail!("--rate and --seconds must be positive");
    }
    let n = (rate * seconds).round() as usize;
    let rt = runtime()?;
    let run = format!(
        "{:x}{:x}",
        std::process::id(),
        UnixTime::now().as_secs() & 0xffff_ffff
    );
    let timeline = Arc::new(Timeline {
        start: Instant::now() + SCHEDULE_LEAD,
        run,
        replied: (0..n).map(|_| AtomicU64::new(0)).collect(),
        arrived: (0..n).map(|_| AtomicU64::new(0)).collect(),
        arrivals: AtomicU64::new(0),
        stray: AtomicU64::new(0),
    });
    if let Some(addr) = sink {
        let listener = rt.block_on(bind_retrying(addr))?;
        rt.spawn(sink_accept(listener, timeline.clone()));
    }
    let errors = Arc::new(FirstError::default());

    // The schedule is kept by this thread, not by a tokio timer (whose resolution is 1 ms):
    // each session is handed to the runtime at its scheduled instant, or at once if late.
    let mut sessions = Vec::with_capacity(n);
    let mut max_lag = Duration::ZERO;
    for seq in 0..n {
        let at = timeline.start + scheduled(seq, rate);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        } else {
            max_lag = max_lag.max(now - at);
        }
        let (timeline, errors, tls) = (timeline.clone(), errors.clone(), tls.clone());
        sessions.push(rt.spawn(async move {
            let msg = message(&timeline.run, seq);
            let once = send_one(target, &msg, tls.as_deref());
            match tokio::time::timeout(SESSION_TIMEOUT, once).await {
                Ok(Ok(t250)) => {
                    timeline.stamp(&timeline.replied[seq], t250);
                }
                Ok(Err(e)) => errors.note(&e),
                Err(_) => errors.note(&anyhow!("session timed out")),
            }
        }));
    }
    let sends_done = Instant::now();
    rt.block_on(async {
        for s in sessions {
            let _ = s.await;
        }
    });
    let lat = timeline.latencies(&timeline.replied, rate);
    let ok = lat.len();
    let mut out = json!({
        "sent": n,
        "ok": ok,
        "failed": n - ok,
        "p50_ms": percentile_ms(&lat, 0.50),
        "p99_ms": percentile_ms(&lat, 0.99),
        "max_ms": lat.last().map(|d| d.as_secs_f64() * 1000.0),
        "rate": rate,
        "seconds": seconds,
        "schedule_lag_max_ms": max_lag.as_secs_f64() * 1000.0,
        "first_error": errors.get(),
    });
    if sink.is_some() {
        let deadline = sends_done.max(Instant::now()) + wait;
        while (timeline.arrivals.load(Ordering::Relaxed) as usize) < ok && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let arr = timeline.latencies(&timeline.arrived, rate);
        out["arrived"] = json!(arr.len());
        out["stray"] = json!(timeline.stray.load(Ordering::Relaxed));
        out["sink_p50_ms"] = json!(percentile_ms(&arr, 0.50));
        out["sink_p99_ms"] = json!(percentile_ms(&arr, 0.99));
    }
    if let Some(tls) = &tls {
        tls.report(&mut out);
    }
    emit(out)?;
    // Sessions still held by the relays at the sink are simply dropped with the runtime.
    rt.shutdown_background();
    Ok(())
}

/// One session: returns the instant the 250 after the final dot was read. With `tls`, STARTTLS
/// after the first EHLO, then EHLO again and the transaction over TLS.
async fn send_one(
    target: SocketAddr,
    msg: &[u8],
    tls: Option<&Starttls>,
) -> anyhow::Result<Instant> {
    let mut s = BufReader::with_capacity(1024, connect(target).await?);
    let mut buf = Vec::with_capacity(256);
    expect(&mut s, &mut buf, 2, "connect").await?;
    command(&mut s, &mut buf, "EHLO loadgen.bench\r\n", 2).await?;
    let Some(tls) = tls else {
        return transaction(&mut s, &mut buf, msg).await;
    };
    command(&mut s, &mut buf, "STARTTLS\r\n", 2).await?;
    if !s.buffer().is_empty() {
        bail!("server sent data after its STARTTLS reply");
    }
    let mut s = BufReader::with_capacity(1024, tls.handshake(s.into_inner()).await?);
    command(&mut s, &mut buf, "EHLO loadgen.bench\r\n", 2).await?;
    transaction(&mut s, &mut buf, msg).await
}

/// MAIL, RCPT, DATA, the message, QUIT; the instant the 250 after the final dot was read.
async fn transaction<S: AsyncBufRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    msg: &[u8],
) -> anyhow::Result<Instant> {
    command(s, buf, "MAIL FROM:<bench@example.com>\r\n", 2).await?;
    command(s, buf, "RCPT TO:<rcpt@example.net>\r\n", 2).await?;
    command(s, buf, "DATA\r\n", 3).await?;
    s.write_all(msg).await?;
    s.flush().await?;
    expect(s, buf, 2, "the final dot").await?;
    let t250 = Instant::now();
    quit(s, buf).await;
    Ok(t250)
}

// ---- STARTTLS client (openloop and send with --ca) -------------------------------------------

/// `--ca PEM [--name HOST]`: STARTTLS to the relay, its certificate verified against the
/// benchmark's CA for HOST. One rustls client configuration for the whole run, so one session
/// store: every connection after the first few resumes a session (TLS 1.3 tickets or TLS 1.2
/// session IDs), as a busy sending MTA does.
struct Starttls {
    connector: TlsConnector,
    name: ServerName<'static>,
    full: AtomicU64,
    resumed: AtomicU64,
    negotiated: Negotiated,
}

/// Sessions kept by the client's store (rustls's default size).
const CLIENT_SESSIONS: usize = 256;

impl Starttls {
    fn from_args(a: &Args) -> anyhow::Result<Option<Arc<Starttls>>> {
        let Some(ca) = a.opt::<String>("ca")? else {
            return Ok(None);
        };
        let mut roots = RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(&ca).with_context(|| format!("cannot read {ca}"))?
        {
            roots.add(cert.with_context(|| format!("{ca}: bad certificate"))?)?;
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.resumption = Resumption::in_memory_sessions(CLIENT_SESSIONS);
        let name = a
            .opt::<String>("name")?
            .unwrap_or_else(|| "bench.portcullis.test".to_owned());
        Ok(Some(Arc::new(Starttls {
            connector: TlsConnector::from(Arc::new(config)),
            name: ServerName::try_from(name)?,
            full: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            negotiated: Negotiated::default(),
        })))
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tls = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .context("TLS handshake")?;
        let conn = tls.get_ref().1;
        if conn.handshake_kind() == Some(HandshakeKind::Resumed) {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.full.fetch_add(1, Ordering::Relaxed);
        }
        let mut slot = self.negotiated.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(json!({
                "version": conn.protocol_version().map(|v| format!("{v:?}")),
                "suite": conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())),
                "kx": conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
            }));
        }
        drop(slot);
        Ok(tls)
    }

    /// Adds the handshake counts to a result line.
    fn report(&self, out: &mut serde_json::Value) {
        out["tls_full"] = json!(self.full.load(Ordering::Relaxed));
        out["tls_resumed"] = json!(self.resumed.load(Ordering::Relaxed));
        out["negotiated"] = json!(
            self.negotiated
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        );
    }
}

// ---- send ----------------------------------------------------------------------------------

/// Closed loop, as smtp-source without -d: `--sessions` concurrent loops each sending one
/// 1 KB message per new connection until `--messages` have been started. With `--ca`, every
/// session uses STARTTLS (scenario A-TLS; smtp-source has no TLS).
fn send(a: &Args) -> anyhow::Result<()> {
    let target: SocketAddr = a.get("target")?;
    let sessions: usize = a.get::<usize>("sessions")?.max(1);
    let messages: usize = a.get("messages")?;
    let tls = Starttls::from_args(a)?;
    let rt = runtime()?;
    let run = format!("{:x}", std::process::id());
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(FirstError::default());
    let t0 = Instant::now();
    rt.block_on(async {
        let loops: Vec<_> = (0..sessions)
            .map(|_| {
                let (next, ok, errors, tls, run) = (
                    next.clone(),
                    ok.clone(),
                    errors.clone(),
                    tls.clone(),
                    run.clone(),
                );
                tokio::spawn(async move {
                    loop {
                        let seq = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if seq >= messages {
                            break;
                        }
                        let msg = message(&run, seq);
                        let once = send_one(target, &msg, tls.as_deref());
                        match tokio::time::timeout(SESSION_TIMEOUT, once).await {
                            Ok(Ok(_)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(e)) => errors.note(&e),
                            Err(_) => errors.note(&anyhow!("session timed out")),
                        }
                    }
                })
            })
            .collect();
        for l in loops {
            let _ = l.await;
        }
    });
    let seconds = t0.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed) as usize;
    let mut out = json!({
        "sent": messages,
        "ok": ok,
        "failed": messages - ok,
        "seconds": seconds,
        "per_sec": ok as f64 / seconds,
        "sessions": sessions,
        "first_error": errors.get(),
    });
    if let Some(tls) = &tls {
        tls.report(&mut out);
    }
    emit(out)
}

// ---- sink ----------------------------------------------------------------------------------

/// How often `sink` prints its count when it has moved.
const SINK_REPORT: Duration = Duration::from_millis(10);

#[derive(Default)]
struct SinkCounters {
    messages: AtomicU64,
    over_tls: AtomicU64,
    sessions: AtomicU64,
    failed: AtomicU64,
}

impl SinkCounters {
    fn line(&self) -> String {
        format!(
            "mesg={} tls={} sessions={} failed={}",
            self.messages.load(Ordering::Relaxed),
            self.over_tls.load(Ordering::Relaxed),
            self.sessions.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

/// The TLS-capable upstream of scenario A-TLS (smtp-sink has no TLS): an ESMTP sink offering
/// STARTTLS with `--cert`/`--key` (the relay's own server configuration, as `tls-server`),
/// discarding messages. Its counts go to stdout as `mesg=N tls=M sessions=S failed=F` lines
/// (smtp-sink -c's `mesg=` field, so bench.py reads both alike), at most every `SINK_REPORT`
/// and whenever they move, and once more at SIGTERM or SIGINT, when it exits.
fn sink(a: &Args) -> anyhow::Result<()> {
    let listen: SocketAddr = a.get("listen")?;
    let acceptor = match (a.opt::<String>("cert")?, a.opt::<String>("key")?) {
        (Some(cert), Some(key)) => Some(TlsAcceptor::from(server_config(&cert, &key)?)),
        (None, None) => None,
        _ => bail!("--cert and --key go together"),
    };
    let rt = runtime()?;
    let counters = Arc::new(SinkCounters::default());
    rt.block_on(async {
        let listener = bind_retrying(listen).await?;
        let printer = counters.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                tokio::time::sleep(SINK_REPORT).await;
                let line = printer.line();
                if line != last {
                    let mut out = io::stdout().lock();
                    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
                    last = line;
                }
            }
        });
        let mut stop = Stop::new()?;
        while let Some(tcp) = stop.accept(&listener, Duration::from_millis(10)).await {
            let _ = tcp.set_nodelay(true);
            let (acceptor, counters) = (acceptor.clone(), counters.clone());
            tokio::spawn(async move {
                counters.sessions.fetch_add(1, Ordering::Relaxed);
                if sink_connection(tcp, acceptor, &counters).await.is_err() {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        anyhow::Ok(())
    })?;
    let mut out = io::stdout().lock();
    writeln!(out, "{}", counters.line())?;
    out.flush()?;
    Ok(())
}

/// One relay connection to `sink`: plaintext until STARTTLS, then the rest over TLS.
async fn sink_connection(
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    counters: &SinkCounters,
) -> anyhow::Result<()> {
    let mut s = BufReader::with_capacity(16 * 1024, tcp);
    let mut plain = |_: Option<String>| {
        counters.messages.fetch_add(1, Ordering::Relaxed);
    };
    let end = sink_dialogue(&mut s, SINK_BANNER.to_vec(), acceptor.is_some(), &mut plain).await?;
    let (SinkEnd::StartTls, Some(acceptor)) = (end, acceptor) else {
        return Ok(());
    };
    let tls = tokio::time::timeout(SESSION_TIMEOUT, acceptor.accept(s.into_inner()))
        .await
        .context("TLS handshake timed out")??;
    let mut s = BufReader::with_capacity(16 * 1024, tls);
    let mut encrypted = |_: Option<String>| {
        counters.messages.fetch_add(1, Ordering::Relaxed);
        counters.over_tls.fetch_add(1, Ordering::Relaxed);
    };
    sink_dialogue(&mut s, Vec::new(), false, &mut encrypted).await?;
    s.get_mut().shutdown().await?;
    Ok(())
}

/// Bind the sink's port, retrying for a few seconds: the previous sink on that port may still be
/// exiting. (tokio sets SO_REUSEADDR, so its old connections in TIME_WAIT are no obstacle.)
async fn bind_retrying(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("sink: cannot bind {addr}")),
        }
    }
}

async fn sink_accept(listener: TcpListener, timeline: Arc<Timeline>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let timeline = timeline.clone();
        // A broken relay connection only loses its own messages, which then never arrive.
        tokio::spawn(async move {
            let _ = sink_session(tcp, &timeline).await;
        });
    }
}

/// One relay connection to openloop's sink: plaintext, each message noted in the timeline.
async fn sink_session(tcp: TcpStream, timeline: &Timeline) -> anyhow::Result<()> {
    let mut s = BufReader::with_capacity(16 * 1024, tcp);
    let mut arrived = |seq: Option<String>| timeline.arrival(seq.as_deref(), Instant::now());
    sink_dialogue(&mut s, SINK_BANNER.to_vec(), false, &mut arrived).await?;
    Ok(())
}

const SINK_BANNER: &[u8] = b"220 loadgen.sink ESMTP\r\n";
const SINK_EHLO: &[u8] =
    b"250-loadgen.sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n";
const SINK_EHLO_TLS: &[u8] = b"250-loadgen.sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
    250-STARTTLS\r\n250 SIZE 104857600\r\n";

/// How a sink dialogue ended.
enum SinkEnd {
    Quit,
    /// The client asked for STARTTLS and got its 220: the handshake comes next.
    StartTls,
}

/// The sink's side of one connection (after `out`, the banner if any): any number of
/// transactions, pipelined commands answered in order; STARTTLS offered and accepted when
/// `offer_tls`. Replies are gathered and written when no more input is buffered, so a pipelined
/// group gets its replies in one write and a lone command is answered at once. `arrived` is
/// called at each final dot with the message's `X-Bench-Seq` value.
async fn sink_dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    mut out: Vec<u8>,
    offer_tls: bool,
    arrived: &mut (dyn FnMut(Option<String>) + Send),
) -> anyhow::Result<SinkEnd> {
    let mut line = Vec::with_capacity(1024);
    loop {
        if s.buffer().is_empty() && !out.is_empty() {
            s.get_mut().write_all(&out).await?;
            out.clear();
        }
        read_line(s, &mut line).await?;
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        match verb.as_slice() {
            b"EHLO" if offer_tls => out.extend_from_slice(SINK_EHLO_TLS),
            b"EHLO" => out.extend_from_slice(SINK_EHLO),
            b"HELO" => out.extend_from_slice(b"250 loadgen.sink\r\n"),
            b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => out.extend_from_slice(b"250 2.0.0 Ok\r\n"),
            b"STAR" if offer_tls => {
                // Nothing may be pipelined after STARTTLS (it would be plaintext injection).
                if !s.buffer().is_empty() {
                    bail!("data pipelined after STARTTLS");
                }
                out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
                s.get_mut().write_all(&out).await?;
                return Ok(SinkEnd::StartTls);
            }
            b"DATA" => {
                out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                s.get_mut().write_all(&out).await?;
                out.clear();
                arrived(sink_data(s, &mut line).await?);
                out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
            }
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                s.get_mut().write_all(&out).await?;
                return Ok(SinkEnd::Quit);
            }
            _ => out.extend_from_slice(b"502 5.5.2 Command not recognized\r\n"),
        }
    }
}

/// Read a message up to its final dot; return the value of its `X-Bench-Seq` header.
async fn sink_data<S: AsyncRead + Unpin>(
    s: &mut BufReader<S>,
    line: &mut Vec<u8>,
) -> anyhow::Result<Option<String>> {
    const HEADER: &[u8] = b"x-bench-seq:";
    let mut in_headers = true;
    let mut seq = None;
    loop {
        read_line(s, line).await?;
        if line.as_slice() == b".\r\n" {
            return Ok(seq);
        }
        if in_headers {
            if line.as_slice() == b"\r\n" {
                in_headers = false;
            } else if line.len() > HEADER.len() && line[..HEADER.len()].eq_ignore_ascii_case(HEADER)
            {
                seq = Some(
                    String::from_utf8_lossy(&line[HEADER.len()..])
                        .trim()
                        .to_owned(),
                );
            }
        }
    }
}

// ---- idle ----------------------------------------------------------------------------------

/// Raise the soft RLIMIT_NOFILE to the hard limit and return the new limit.
fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

fn idle(a: &Args) -> anyhow::Result<()> {
    let target: SocketAddr = a.get("target")?;
    let count: usize = a.get("count")?;
    let parallel: usize = a.opt("parallel")?.unwrap_or(DEFAULT_IDLE_PARALLEL).max(1);
    let nofile = raise_nofile().context("cannot raise RLIMIT_NOFILE")?;
    let rt = runtime()?;
    rt.block_on(async {
        let t0 = Instant::now();
        let gate = Arc::new(Semaphore::new(parallel));
        let errors = Arc::new(FirstError::default());
        let tasks: Vec<_> = (0..count)
            .map(|_| {
                let (gate, errors) = (gate.clone(), errors.clone());
                tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await.ok()?;
                    match tokio::time::timeout(SESSION_TIMEOUT, open_idle(target)).await {
                        Ok(Ok(tcp)) => Some(tcp),
                        Ok(Err(e)) => {
                            errors.note(&e);
                            None
                        }
                        Err(_) => {
                            errors.note(&anyhow!("greeting timed out"));
                            None
                        }
                    }
                })
            })
            .collect();
        let mut held = Vec::with_capacity(count);
        for t in tasks {
            if let Ok(Some(tcp)) = t.await {
                held.push(tcp);
            }
        }
        emit(json!({
            "opened": held.len(),
            "refused": count - held.len(),
            "seconds": t0.elapsed().as_secs_f64(),
            "nofile": nofile,
            "first_error": errors.get(),
        }))?;
        wait_for_release().await?;
        drop(held);
        anyhow::Ok(())
    })
}

/// Connect, read the banner, EHLO, read the reply: a session now idle after EHLO.
async fn open_idle(target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = BufReader::with_capacity(512, connect(target).await?);
    let mut buf = Vec::with_capacity(256);
    expect(&mut s, &mut buf, 2, "connect").await?;
    command(&mut s, &mut buf, "EHLO idle.loadgen.bench\r\n", 2).await?;
    // The small read buffer goes; the socket stays open.
    Ok(s.into_inner())
}

/// Until stdin reaches EOF (the parent closed it or died), SIGTERM or SIGINT.
async fn wait_for_release() -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    // tokio's stdin needs a feature this crate does not enable; a plain thread does the job.
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = [0u8; 256];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = rx => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// SIGTERM and SIGINT, which end the servers of `sink` and `tls-server`.
struct Stop {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Stop> {
        Ok(Stop {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next connection on `listener`, or `None` once either signal arrives. A failed
    /// accept (out of descriptors, say) waits `pause` and tries again.
    async fn accept(&mut self, listener: &TcpListener, pause: Duration) -> Option<TcpStream> {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, _)) => return Some(tcp),
                    Err(_) => tokio::time::sleep(pause).await,
                },
                _ = self.term.recv() => return None,
                _ = self.int.recv() => return None,
            }
        }
    }
}

// ---- tls-server ----------------------------------------------------------------------------

/// The server configuration portcullis itself builds for `[tls] cert`, `key` and
/// `min_version = "1.2"` (its default): the same function, so the two servers differ only in
/// what they do around the handshake.
fn server_config(cert: &str, key: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let tls = portcullis::config::Tls {
        source: portcullis::config::CertSource::Files {
            cert: cert.into(),
            key: key.into(),
        },
        min_version: portcullis::config::TlsVersion::Tls12,
    };
    Ok(portcullis::inbound::tls::server_config(
        &tls,
        "bench.portcullis.test",
    )?)
}

#[derive(Default)]
struct ServerCounters {
    accepted: AtomicU64,
    handshakes: AtomicU64,
    failed: AtomicU64,
}

fn tls_server(a: &Args) -> anyhow::Result<()> {
    let listen: SocketAddr = a.get("listen")?;
    let acceptor = TlsAcceptor::from(server_config(
        &a.get::<String>("cert")?,
        &a.get::<String>("key")?,
    )?);
    let rt = runtime()?;
    let counters = Arc::new(ServerCounters::default());
    rt.block_on(async {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot bind {listen}"))?;
        let mut stop = Stop::new()?;
        while let Some(tcp) = stop.accept(&listener, Duration::from_millis(100)).await {
            counters.accepted.fetch_add(1, Ordering::Relaxed);
            let (acceptor, counters) = (acceptor.clone(), counters.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(SESSION_TIMEOUT, starttls_session(tcp, acceptor)).await {
                    Ok(Ok(true)) => counters.handshakes.fetch_add(1, Ordering::Relaxed),
                    Ok(Ok(false)) => 0, // QUIT before STARTTLS (a readiness probe)
                    _ => counters.failed.fetch_add(1, Ordering::Relaxed),
                };
            });
        }
        anyhow::Ok(())
    })?;
    emit(json!({
        "accepted": counters.accepted.load(Ordering::Relaxed),
        "handshakes": counters.handshakes.load(Ordering::Relaxed),
        "failed": counters.failed.load(Ordering::Relaxed),
    }))
}

/// Banner, EHLO, STARTTLS, handshake, one line, 221. Ok(false) if the client quit before TLS.
async fn starttls_session(tcp: TcpStream, acceptor: TlsAcceptor) -> anyhow::Result<bool> {
    tcp.set_nodelay(true)?;
    let mut s = BufReader::with_capacity(1024, tcp);
    let mut line = Vec::with_capacity(256);
    s.get_mut()
        .write_all(b"220 bench-tls.loadgen ESMTP\r\n")
        .await?;
    loop {
        read_line(&mut s, &mut line).await?;
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-bench-tls.loadgen\r\n250 STARTTLS\r\n",
            b"HELO" => b"250 bench-tls.loadgen\r\n",
            b"STAR" => break,
            b"QUIT" => {
                s.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(false);
            }
            _ => b"502 5.5.2 Command not recognized\r\n",
        };
        s.get_mut().write_all(reply).await?;
    }
    // As portcullis: nothing may be pipelined after STARTTLS (it would be plaintext injection).
    if !s.buffer().is_empty() {
        bail!("data pipelined after STARTTLS");
    }
    s.get_mut()
        .write_all(b"220 2.0.0 Ready to start TLS\r\n")
        .await?;
    let tls = acceptor.accept(s.into_inner()).await?;
    let mut s = BufReader::with_capacity(1024, tls);
    read_line(&mut s, &mut line).await?;
    s.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
    s.get_mut().shutdown().await?;
    Ok(true)
}

// ---- tls -----------------------------------------------------------------------------------

/// portcullis's own opportunistic client configuration (any certificate, handshake signatures
/// verified), with resumption off so that every handshake is a full one.
fn client_config() -> anyhow::Result<Arc<ClientConfig>> {
    let mut config = portcullis::outbound::tls::unverified_client_config()?;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// `--cert`: the one certificate the server may present (checked after each handshake).
fn pinned(path: Option<&str>) -> anyhow::Result<Option<CertificateDer<'static>>> {
    path.map(|path| {
        CertificateDer::from_pem_file(path).with_context(|| format!("cannot read {path}"))
    })
    .transpose()
}

/// What the first successful handshake negotiated, for the JSON line.
#[derive(Default)]
struct Negotiated(Mutex<Option<serde_json::Value>>);

#[derive(Default)]
struct ClientCounters {
    handshakes: AtomicU64,
    failed: AtomicU64,
}

fn tls_client(a: &Args) -> anyhow::Result<()> {
    let target: SocketAddr = a.get("target")?;
    let conns: usize = a.get("conns")?;
    let seconds: f64 = a.get("seconds")?;
    let name = ServerName::try_from(
        a.opt::<String>("name")?
            .unwrap_or_else(|| "bench.portcullis.test".to_owned()),
    )?;
    let connector = TlsConnector::from(client_config()?);
    let pinned = Arc::new(pinned(a.opt::<String>("cert")?.as_deref())?);
    let rt = runtime()?;
    let counters = Arc::new(ClientCounters::default());
    let errors = Arc::new(FirstError::default());
    let negotiated = Arc::new(Negotiated::default());
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(seconds);
    rt.block_on(async {
        let loops: Vec<_> = (0..conns.max(1))
            .map(|_| {
                let (connector, name) = (connector.clone(), name.clone());
                let (counters, errors, negotiated, pinned) = (
                    counters.clone(),
                    errors.clone(),
                    negotiated.clone(),
                    pinned.clone(),
                );
                tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let once = starttls_once(
                            target,
                            &connector,
                            name.clone(),
                            pinned.as_ref().as_ref(),
                            &negotiated,
                        );
                        match tokio::time::timeout(SESSION_TIMEOUT, once).await {
                            Ok(Ok(())) => counters.handshakes.fetch_add(1, Ordering::Relaxed),
                            Ok(Err(e)) => {
                                errors.note(&e);
                                counters.failed.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(_) => {
                                errors.note(&anyhow!("session timed out"));
                                counters.failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        for l in loops {
            let _ = l.await;
        }
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let handshakes = counters.handshakes.load(Ordering::Relaxed);
    let negotiated = negotiated
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    emit(json!({
        "handshakes": handshakes,
        "failed": counters.failed.load(Ordering::Relaxed),
        "seconds": elapsed,
        "per_sec": handshakes as f64 / elapsed,
        "conns": conns,
        "negotiated": negotiated,
        "first_error": errors.get(),
    }))
}

/// One STARTTLS session: banner, EHLO, STARTTLS, full handshake, QUIT over TLS, 221, close.
async fn starttls_once(
    target: SocketAddr,
    connector: &TlsConnector,
    name: ServerName<'static>,
    pinned: Option<&CertificateDer<'static>>,
    negotiated: &Negotiated,
) -> anyhow::Result<()> {
    let mut s = BufReader::with_capacity(1024, connect(target).await?);
    let mut buf = Vec::with_capacity(256);
    expect(&mut s, &mut buf, 2, "connect").await?;
    command(&mut s, &mut buf, "EHLO tls.loadgen.bench\r\n", 2).await?;
    command(&mut s, &mut buf, "STARTTLS\r\n", 2).await?;
    if !s.buffer().is_empty() {
        bail!("server sent data after its STARTTLS reply");
    }
    let tls = connector
        .connect(name, s.into_inner())
        .await
        .context("TLS handshake")?;
    if let Some(pinned) = pinned {
        let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        if presented != Some(pinned) {
            bail!("the server presented another certificate than --cert");
        }
    }
    {
        let mut slot = negotiated.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let conn = tls.get_ref().1;
            *slot = Some(json!({
                "version": conn.protocol_version().map(|v| format!("{v:?}")),
                "suite": conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())),
                "kx": conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())),
            }));
        }
    }
    let mut s = BufReader::with_capacity(1024, tls);
    s.write_all(b"QUIT\r\n").await?;
    s.flush().await?;
    expect(&mut s, &mut buf, 2, "QUIT over TLS").await?;
    // Let the server close first (TIME_WAIT on its side); its close_notify or FIN ends this.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let mut rest = [0u8; 256];
        while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

// ---- dkim-sign ---------------------------------------------------------------------------

/// Default `dkim-sign --size`: the 10 KB message, headers included.
const DKIM_MESSAGE_SIZE: usize = 10 * 1024;
/// Default `dkim-sign --count`: signatures per key type.
const DKIM_DEFAULT_COUNT: u32 = 2000;
/// Signatures made before the measured ones (page faults, lazy initialisation).
const DKIM_WARMUP: u32 = 50;

fn dkim_sign(a: &Args) -> anyhow::Result<()> {
    let size: usize = a.opt("size")?.unwrap_or(DKIM_MESSAGE_SIZE);
    let count: u32 = a.opt("count")?.unwrap_or(DKIM_DEFAULT_COUNT);
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let rsa = dkim_entry(&a.get::<String>("rsa-key")?)?;
    let ed = dkim_entry(&a.get::<String>("ed25519-key")?)?;
    let message = dkim_message(size);
    let rsa_figures = time_signing(&rsa, &message, count)?;
    let ed_figures = time_signing(&ed, &message, count)?;
    println!(
        "{}",
        json!({
            "message_bytes": message.len(),
            "count": count,
            "rsa2048": rsa_figures,
            "ed25519": ed_figures,
        })
    );
    Ok(())
}

/// A `[[dkim.sign]]` entry for `sign.test` with the key at `path` and the default headers,
/// loaded as the relay loads it.
fn dkim_entry(path: &str) -> anyhow::Result<portcullis::config::DkimSign> {
    let key = portcullis::dns::keys::SigningKey::load(std::path::Path::new(path))?;
    Ok(portcullis::config::DkimSign {
        domain: "sign.test".into(),
        selector: "bench".into(),
        key_path: path.into(),
        key: std::sync::Arc::new(key),
        headers: portcullis::config::DEFAULT_DKIM_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
    })
}

/// A message of `size` bytes (at least the header section): the signed header fields, then
/// 76-character body lines.
fn dkim_message(size: usize) -> Vec<u8> {
    let mut m = b"From: Bench Sender <sender@sign.test>\r\n\
        To: rcpt@example.net\r\n\
        Subject: DKIM signing cost\r\n\
        Date: Tue, 01 Dec 2026 00:00:00 +0000\r\n\
        Message-ID: <dkim-sign-bench@sign.test>\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        .to_vec();
    let line = [b'x'; 76];
    while m.len() + line.len() + 2 <= size {
        m.extend_from_slice(&line);
        m.extend_from_slice(b"\r\n");
    }
    let rest = size.saturating_sub(m.len() + 2);
    if rest > 0 {
        m.extend(std::iter::repeat_n(b'y', rest));
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// Signs `message` `count` times with `entry` through the relay's own signing
/// (`portcullis::dns::sign::sign`) after a warm-up; {"cpu_ms", "wall_ms"} per signature.
fn time_signing(
    entry: &portcullis::config::DkimSign,
    message: &[u8],
    count: u32,
) -> anyhow::Result<serde_json::Value> {
    let mut sink = 0usize;
    let mut once = || -> anyhow::Result<()> {
        let fields = portcullis::dns::sign::sign(message, &[entry])?;
        sink = sink.wrapping_add(fields.len());
        Ok(())
    };
    for _ in 0..DKIM_WARMUP {
        once()?;
    }
    let (cpu0, wall0) = (thread_cpu()?, Instant::now());
    for _ in 0..count {
        once()?;
    }
    let (cpu, wall) = (thread_cpu()? - cpu0, wall0.elapsed());
    std::hint::black_box(sink);
    Ok(json!({
        "cpu_ms": cpu.as_secs_f64() * 1000.0 / f64::from(count),
        "wall_ms": wall.as_secs_f64() * 1000.0 / f64::from(count),
    }))
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> anyhow::Result<Duration> {
    // SAFETY: getrusage only writes the struct it is given, which is zero-initialised plain data.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to an rusage struct that lives across the call.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut ru) } != 0 {
        return Err(io::Error::last_os_error()).context("getrusage(RUSAGE_THREAD)");
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}
