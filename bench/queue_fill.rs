//! `loadgen queue-fill --spool DIR --messages N [--user LOGIN] [--share PERCENT] [--threads T]`:
//! queues N synthetic 1 KB messages in the spool at DIR through the relay's own spool API
//! (`portcullis::queue::Spool::create` and `SpoolWriter::commit`: the same files, fsyncs and
//! renames as mail received over SMTP), for timing the `queue` commands on a large queue
//! (BENCHMARKS.md, "Queue commands at 100,000 messages").
//!
//! Every message was submitted by an authenticated login: PERCENT % of them (default 10) by
//! `--user` (default `alice`), the others by 500 other logins; each from its login's address
//! at example.com, to 1 to 3 recipients at 50 domains, received over the last two days. T
//! threads (default 16) commit at once, so the spool's shared directory fsyncs group their
//! commits as they do under load.
//!
//! Prints one JSON line: the count, how many are the user's, the time taken.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use portcullis::envelope::{
    Address, Envelope, MailParams, QueueId, Recipient, ReversePath, unix_now,
};
use portcullis::queue::Spool;
use serde_json::json;

use super::{Args, emit};

/// Message size, headers included.
const SIZE: usize = 1024;
/// Logins besides `--user`.
const OTHER_USERS: u64 = 500;
/// Recipient domains.
const DOMAINS: u64 = 50;

/// SplitMix64, for reproducible variety.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The login of message `n`.
fn login(n: u64, user: &str, share: u64) -> String {
    if mix(n) % 100 < share {
        user.to_owned()
    } else {
        format!("user{}", mix(n ^ 0x75) % OTHER_USERS)
    }
}

fn envelope(n: u64, login: &str, now: u64) -> anyhow::Result<Envelope> {
    let rcpts = (0..1 + mix(n ^ 0x2c) % 3)
        .map(|i| {
            let k = mix(n ^ (i << 40));
            Address::parse(&format!("r{}@dest{}.example", k % 5_000, k % DOMAINS))
                .map(Recipient::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Envelope {
        id: QueueId::generate(),
        received_at: now - mix(n ^ 0xa9) % (2 * 86_400),
        listener: "submission".into(),
        client_ip: IpAddr::V4(Ipv4Addr::new(10, 1, (n >> 8) as u8, n as u8)),
        client_port: 40_000,
        helo: "client.example".into(),
        tls: None,
        auth_user: Some(login.to_owned()),
        mail_from: ReversePath::Address(Address::parse(&format!("{login}@example.com"))?),
        mail_params: MailParams::default(),
        recipients: rcpts,
    })
}

/// A 1 KB message (CRLF line ends) from `from`.
fn message(n: u64, from: &str) -> Vec<u8> {
    let mut text = format!(
        "From: <{from}>\r\nTo: <undisclosed-recipients:;>\r\nSubject: queue fill {n}\r\n\
         Message-ID: <{n:016x}@example.com>\r\nDate: Tue, 1 Dec 2026 08:00:00 +0000\r\n\r\n"
    );
    while text.len() + 2 < SIZE {
        let line = "The quick brown fox jumps over the lazy dog. 0123456789";
        let room = SIZE - 2 - text.len();
        text.push_str(&line[..line.len().min(room.saturating_sub(2))]);
        text.push_str("\r\n");
    }
    text.truncate(SIZE - 2);
    text.push_str("\r\n");
    text.into_bytes()
}

/// `queue-fill`: see the module doc.
pub fn queue_fill(a: &Args) -> anyhow::Result<()> {
    let dir: PathBuf = a.get("spool")?;
    let messages: u64 = a.get("messages")?;
    let user: String = a.opt("user")?.unwrap_or_else(|| "alice".into());
    let share: u64 = a.opt("share")?.unwrap_or(10);
    let threads: u64 = a.opt("threads")?.unwrap_or(16).max(1);
    let spool = Spool::open(&dir).with_context(|| format!("cannot open {}", dir.display()))?;
    let now = unix_now();
    let next = AtomicU64::new(0);
    let users = AtomicU64::new(0);
    let began = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= messages {
                            return Ok(());
                        }
                        let login = login(n, &user, share);
                        if login == user {
                            users.fetch_add(1, Ordering::Relaxed);
                        }
                        let env = envelope(n, &login, now)?;
                        let mut w = spool.create(&env)?;
                        w.write(&message(n, &format!("{login}@example.com")))?;
                        w.commit()?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        }
        Ok(())
    })?;
    emit(json!({
        "messages": messages,
        "user": user,
        "user_messages": users.load(Ordering::Relaxed),
        "size": SIZE,
        "threads": threads,
        "seconds": began.elapsed().as_secs_f64(),
    }))
}
