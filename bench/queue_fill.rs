//! `cargo run --example queue_fill -- --spool DIR --messages N [--size BYTES] [--user LOGIN]
//! [--share PERCENT]`: fills `DIR/queue/` with N committed messages of about BYTES octets each
//! (default 1024), in the relay's spool format, for timing the `queue` commands on a big queue
//! (BENCHMARKS.md, "Quarantine at 100,000 queued messages").
//!
//! Every message is authenticated: PERCENT % of them (default 10, spread evenly) as LOGIN
//! (default `mallory`, sender `LOGIN@corp.example`), the others as one of 1,000 other users
//! (sender `userK@corp.example`), so `queue purge --user LOGIN` and `--from LOGIN@corp.example`
//! select the same messages. Files are written without fsync (a fill, not mail anyone was
//! promised): sync the file system before timing. The spool directory is created private
//! (0700) as `Spool::open` makes it. Prints one JSON line: the counts, the time taken.

use std::fs;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use portcullis::envelope::{Address, Envelope, MailParams, QueueId, Recipient, ReversePath};
use portcullis::queue::{MAGIC, Spool};

struct Args {
    spool: PathBuf,
    messages: u64,
    size: usize,
    user: String,
    share: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut out = Args {
        spool: PathBuf::new(),
        messages: 0,
        size: 1024,
        user: "mallory".to_owned(),
        share: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--spool" => out.spool = value.into(),
            "--messages" => out.messages = value.parse()?,
            "--size" => out.size = value.parse()?,
            "--user" => out.user = value,
            "--share" => out.share = value.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    if out.spool.as_os_str().is_empty() || out.messages == 0 {
        bail!(
            "usage: queue_fill --spool DIR --messages N [--size BYTES] [--user LOGIN] [--share PERCENT]"
        );
    }
    Ok(out)
}

/// The envelope of message `n`: its login and sender as the module docs say.
fn envelope(args: &Args, n: u64, now: u64) -> anyhow::Result<Envelope> {
    let every = 100 / args.share.clamp(1, 100);
    let login = if n.is_multiple_of(every) {
        args.user.clone()
    } else {
        format!("user{}", n % 1000)
    };
    Ok(Envelope {
        id: QueueId::generate(),
        received_at: now - 3600 + n % 3600,
        listener: "submission".into(),
        client_ip: std::net::IpAddr::from([10, 0, (n >> 8) as u8, n as u8]),
        client_port: 40_000,
        helo: "client.corp.example".into(),
        tls: None,
        auth_user: Some(login.clone()),
        mail_from: ReversePath::Address(Address::parse(&format!("{login}@corp.example"))?),
        mail_params: MailParams::default(),
        recipients: vec![Recipient::new(Address::parse(&format!(
            "rcpt{}@example.net",
            n % 5000
        ))?)],
    })
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let spool = Spool::open(&args.spool).context("open the spool")?;
    let queue = spool.root().join("queue");
    let now = portcullis::envelope::unix_now();
    let line = "The quick brown fox jumps over the lazy dog, again and again.\r\n";
    let started = Instant::now();
    for n in 0..args.messages {
        let env = envelope(&args, n, now)?;
        let mut body = format!(
            "From: {}\r\nTo: rcpt@example.net\r\nSubject: message {n}\r\n\r\n",
            env.mail_from
        )
        .into_bytes();
        while body.len() + line.len() <= args.size {
            body.extend_from_slice(line.as_bytes());
        }
        let mut file = fs::File::create(queue.join(env.id.as_str()))?;
        file.write_all(MAGIC)?;
        serde_json::to_writer(&mut file, &env)?;
        file.write_all(b"\n")?;
        file.write_all(&body)?;
    }
    println!(
        "{}",
        serde_json::json!({
            "messages": args.messages,
            "size": args.size,
            "user": args.user,
            "user_messages": args.messages.div_ceil(100 / args.share.clamp(1, 100)),
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
