//! `loadgen journal-fill --spool DIR --messages N [--days D]`: writes the journal of N
//! synthetic messages received over the last D days (default 7) into `DIR/journal/`, through
//! the relay's own journal writer (`portcullis::queue::journal::writer::Writer`: the same
//! segments, rotation and sidecars), for `bench/journal.py`, which then times
//! `portcullis trace` on it.
//!
//! Each message is one SMTP session: `connect`, `queued` (Message-ID, sender, 1 to 3
//! recipients, client, listener, TLS, size), `delivered` (upstream, an Exchange-style
//! `250 2.6.0 <…> [InternalId=…] Queued mail for delivery`, its id, seconds) and `finished`;
//! one in 20 is first `deferred` for a minute; one session in 20 also has a refused RCPT
//! without queue id. Senders come from 200,000 addresses, recipients from 5,000, clients from
//! 50,000 IPs, so an address or IP query matches many messages, as in life.
//!
//! Prints one JSON line: counts, bytes on disk, the time taken, and sample queries (queue ids
//! and Message-IDs of an old and a recent message, a sender, a recipient, a client IP).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use portcullis::config::Log;
use portcullis::envelope::QueueId;
use portcullis::observe::event::unix_millis;
use portcullis::observe::{Event, EventKind};
use portcullis::queue::journal::{self, writer};
use serde_json::json;

use super::{Args, emit};

const SENDERS: u64 = 200_000;
const RECIPIENTS: u64 = 5_000;
const CLIENTS: u64 = 50_000;

/// SplitMix64: the synthetic data's only source of variety, so runs are reproducible.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A queue id as the relay makes them (`QueueId::generate`): microseconds of creation, then
/// 30 bits of variety.
fn queue_id(ms: u64, n: u64) -> String {
    let micros = (ms * 1000 + n % 1000).wrapping_sub(1_700_000_000_000_000) & ((1 << 50) - 1);
    QueueId::from_bits((u128::from(micros) << 30) | u128::from(mix(n) & ((1 << 30) - 1)))
        .to_string()
}

fn sender(n: u64) -> String {
    let k = mix(n ^ 0x5e) % SENDERS;
    format!("sender{k}@domain{}.example", k % 9_000)
}

fn recipient(n: u64, i: u64) -> String {
    format!("user{}@corp.example", mix(n ^ (i << 40)) % RECIPIENTS)
}

fn client(n: u64) -> IpAddr {
    let k = mix(n ^ 0xc1) % CLIENTS;
    let h = mix(k);
    IpAddr::V4(Ipv4Addr::new(
        (h % 200) as u8 + 11,
        (h >> 8) as u8,
        (h >> 16) as u8,
        (h >> 24) as u8 % 250 + 1,
    ))
}

fn message_id(n: u64) -> String {
    format!(
        "<CAF{:016x}{:08x}@mail.domain{}.example>",
        mix(n),
        n,
        mix(n) % 9_000
    )
}

/// The events of message `n` received at `at` (Unix ms).
fn message(n: u64, at: u64) -> Vec<Event> {
    let id = queue_id(at, n);
    let rcpt_count = match mix(n ^ 0x7) % 20 {
        0 => 3,
        1..=3 => 2,
        _ => 1,
    };
    let rcpts: Vec<String> = (0..rcpt_count).map(|i| recipient(n, i)).collect();
    let ip = client(n);
    let with = |kind, at: u64| {
        let mut e = Event::at(kind, at);
        e.id = Some(id.clone());
        e
    };
    let mut connect = Event::at(EventKind::Connect, at.saturating_sub(300));
    connect.client = Some(ip);
    connect.listener = Some("mx".into());
    let mut queued = with(EventKind::Queued, at);
    queued.message_id = Some(message_id(n));
    queued.from = Some(sender(n));
    queued.rcpts = rcpts.clone();
    queued.client = Some(ip);
    queued.listener = Some("mx".into());
    queued.tls = Some(if n.is_multiple_of(3) { "1.2" } else { "1.3" }.into());
    queued.size = Some(2_000 + mix(n) % 60_000);
    let mut events = vec![connect, queued];
    let mut sent_at = at + 400;
    if n % 20 == 7 {
        let mut deferred = with(EventKind::Deferred, sent_at);
        deferred.upstream = Some("exchange".into());
        deferred.rcpts = rcpts.clone();
        deferred.reply = Some("451 4.4.0 Primary target IP address responded with 421".into());
        events.push(deferred);
        sent_at += 60_000;
    }
    let internal = format!("{}", 100_000_000 + mix(n) % 900_000_000);
    let mut delivered = with(EventKind::Delivered, sent_at);
    delivered.upstream = Some("exchange".into());
    delivered.rcpts = rcpts;
    delivered.upstream_id = Some(internal.clone());
    delivered.reply = Some(format!(
        "250 2.6.0 {} [InternalId={internal}, Hostname=EX01.corp.example] Queued mail for \
         delivery",
        message_id(n)
    ));
    delivered.seconds = Some(0.120);
    events.push(delivered);
    events.push(with(EventKind::Finished, sent_at + 1));
    if n % 20 == 3 {
        let mut refused = Event::at(EventKind::Refused, at + 100);
        refused.client = Some(ip);
        refused.listener = Some("mx".into());
        refused.from = Some(sender(n));
        refused.rcpts = vec![format!("nobody{}@corp.example", n % 1000)];
        refused.rule = Some("recipients_file".into());
        refused.reply = Some("550 5.1.1 Recipient address rejected: no such user".into());
        events.push(refused);
    }
    events
}

/// `journal-fill`: see the module doc.
pub fn journal_fill(a: &Args) -> anyhow::Result<()> {
    let spool: PathBuf = a.get("spool")?;
    let messages: u64 = a.get("messages")?;
    let days: u64 = a.opt("days")?.unwrap_or(7);
    let dir = journal::dir(&spool);
    let log = Log {
        journal_keep: std::time::Duration::from_secs(365 * 86_400),
        journal_max_size: u64::MAX,
        ..Log::default()
    };
    let limits = writer::Limits::new(&log, 0);
    let mut w = writer::Writer::open(&dir, limits, Box::new(|| Ok(u64::MAX)))
        .with_context(|| format!("cannot open {}", dir.display()))?;
    let end = unix_millis();
    let span = days * 86_400_000;
    let start = end - span;
    let began = Instant::now();
    let mut events = 0u64;
    let mut next_tick = start;
    for n in 0..messages {
        let at = start + n * span / messages.max(1);
        if at >= next_tick {
            // What the relay's writer thread does every second: seal a segment an hour old.
            w.tick(at)?;
            next_tick = at + 60_000;
        }
        for e in message(n, at) {
            w.write(&e, at)?;
            events += 1;
        }
    }
    w.seal()?;
    let seconds = began.elapsed().as_secs_f64();
    let (old, recent) = (messages / 100, messages - messages / 100 - 1);
    let at = |n: u64| start + n * span / messages.max(1);
    emit(json!({
            "messages": messages,
            "events": events,
            "bytes": w.total_size(),
            "segments": journal::segment::segment_paths(&dir)?.len(),
            "seconds": seconds,
            "queries": {
                "old_id": queue_id(at(old), old),
                "recent_id": queue_id(at(recent), recent),
                "old_message_id": message_id(old),
                "recent_message_id": message_id(recent),
                "sender": sender(recent),
                "recipient": recipient(recent, 0),
                "client": client(recent).to_string(),
        },
    }))
}
