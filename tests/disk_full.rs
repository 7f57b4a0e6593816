//! A full disk on a real file system: the spool on a 24 MiB tmpfs, mounted by the test (root
//! only: without root it is skipped, unless `PORTCULLIS_REQUIRE_ROOT=1`, set by `.ci/run`, makes
//! that a failure; the mount is removed when the test ends, passed or failed).
//!
//! Concurrent sessions fill it with 1 MB messages while the upstream refuses (mail stays
//! queued): every refusal is temporary (`452 4.3.1` or `451 4.3.0`), never a false `250`. A
//! message that outgrows its declared SIZE while another writer has taken every block left is
//! refused at the final dot (`452 4.3.1`: the relay checks the free space as the message grows,
//! before a write could meet `ENOSPC`; a failing write itself is the failpoint tests' part), and
//! the relay keeps serving. Once space returns
//! and the upstream takes mail, every message acknowledged with `250` is delivered with its
//! bytes, new mail is accepted again, and the queue empties: by itself, no restart.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::queue::{accept, delivery_counts, refusing_sink};
use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// The tmpfs the spool lives on.
const SIZE: &str = "24m";
/// One message's body: about 1 MB (17,000 lines of 60 octets).
const BODY_LINES: usize = 17_000;

/// A size-limited tmpfs mounted at `path`, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// `None` (skipped, with a message) when not root, unless required.
    fn mount(path: &Path) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var("PORTCULLIS_REQUIRE_ROOT").as_deref() != Ok("1"),
                "mounting a tmpfs needs root (PORTCULLIS_REQUIRE_ROOT=1)"
            );
            eprintln!("not root: the disk-full test is skipped");
            return None;
        }
        fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={SIZE},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Some(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the relay may still hold files there if the test failed before stopping it.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A message of about 1 MB whose every line names `tag`.
fn body(tag: &str) -> String {
    let mut body = format!("From: <a@example.org>\r\nSubject: {tag}\r\n\r\n");
    for i in 0..BODY_LINES {
        body.push_str(&format!(
            "{tag} line {i:05} ........................................\r\n"
        ));
    }
    body
}

/// Send messages of about 1 MB from `ip` until three in a row are refused: each tag with the
/// reply it got.
fn fill(port: u16, ip: &str, client: usize) -> Vec<(String, (u16, String))> {
    let mut replies = Vec::new();
    let mut refused_in_a_row = 0;
    for n in 0.. {
        let tag = format!("c{client}-m{n:02}");
        let mut c = SmtpClient::connect_from(ip, port);
        c.expect_reply(220);
        c.expect("EHLO filler.test", 250);
        let reply = c.send_message("a@example.org", &["b@example.com"], &body(&tag));
        let _ = c.cmd("QUIT");
        refused_in_a_row = if reply.0 == 250 {
            0
        } else {
            refused_in_a_row + 1
        };
        replies.push((tag, reply));
        if refused_in_a_row == 3 || n == 40 {
            break;
        }
    }
    replies
}

/// Whether `reply` is one of the temporary refusals a full disk may give.
fn temporary(reply: &(u16, String)) -> bool {
    reply.1.starts_with("452 4.3.1 ") || reply.1.starts_with("451 4.3.0 ")
}

/// Fill the file system holding `dir` to its last block with one file; its path.
fn take_every_block(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            break;
        }
    }
    // The last partial chunk, to the byte.
    while file.write_all(&[0u8]).is_ok() {}
    path
}

#[test]
fn a_full_disk_never_gets_a_false_250_and_the_relay_recovers_by_itself() {
    let dir = TestDir::new();
    let Some(_tmpfs) = Tmpfs::mount(&dir.join("spool")) else {
        return;
    };
    let sink = refusing_sink();
    let port = free_port();
    let toml = config(
        &[listener("mx", port, "none")],
        sink.port(),
        "[relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n\
         [limits]\nmax_message_size = \"2MiB\"\nmin_free_space = \"2MiB\"\n\n\
         [queue]\nretry = [\"1s\"]\n",
    );
    let relay = Relay::start_in(dir, &toml);

    // Six clients at once until the disk is full.
    let fillers: Vec<_> = (0..6)
        .map(|i| std::thread::spawn(move || fill(port, &format!("127.0.0.{}", i + 2), i)))
        .collect();
    let mut acknowledged = BTreeMap::new();
    let mut refusals = 0;
    for filler in fillers {
        for (tag, reply) in filler.join().unwrap() {
            if reply.0 == 250 {
                acknowledged.insert(tag, reply.1);
            } else {
                assert!(temporary(&reply), "{tag}: {reply:?}\n{}", relay.log());
                refusals += 1;
            }
        }
    }
    assert!(
        refusals >= 18,
        "every client ends on three refusals: {refusals}"
    );
    assert!(
        (12..=23).contains(&acknowledged.len()),
        "a 24 MiB spool holds about twenty 1 MB messages: {}",
        acknowledged.len()
    );
    assert_log_fields(&relay, &[("rule", "min_free_space")]);

    // A transaction that declared 1,000 octets sends 1 MB while another writer takes every
    // block left: the final dot is refused, temporarily.
    let spool = relay.dir().join("spool");
    let mut c = SmtpClient::connect_from("127.0.0.20", port);
    c.expect_reply(220);
    c.expect("EHLO late.test", 250);
    // Whatever the fillers left, free some room for the reservation of 1,000 octets.
    let filler = take_every_block(&spool);
    fs::remove_file(&filler).unwrap();
    c.expect("MAIL FROM:<a@example.org> SIZE=1000", 250);
    c.expect("RCPT TO:<b@example.com>", 250);
    c.expect("DATA", 354);
    let filler = take_every_block(&spool);
    c.send_raw(&dot_stuff(&body("late")));
    c.send_raw(b".\r\n");
    let reply = c.read_reply();
    assert_eq!(
        reply.1,
        "452 4.3.1 Insufficient system storage, try again later",
        "{}",
        relay.log()
    );
    assert!(relay.wait_for_log("message outgrew its SIZE and the spool has no room", WAIT));
    // The relay keeps serving this session and new ones.
    c.expect("NOOP", 250);
    c.expect("QUIT", 221);
    let mut other = SmtpClient::connect_from("127.0.0.21", port);
    other.expect_reply(220);
    other.expect("QUIT", 221);

    // Space returns, the upstream takes mail: everything acknowledged is delivered, intact.
    fs::remove_file(&filler).unwrap();
    accept(&sink);
    assert!(
        sink.wait_for(acknowledged.len(), Duration::from_secs(30)),
        "{} of {} delivered\n{}",
        sink.messages().len(),
        acknowledged.len(),
        relay.log()
    );
    for m in sink.messages() {
        let text = String::from_utf8_lossy(&m.data).into_owned();
        let tag = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .expect("a Subject");
        let sent = body(tag);
        assert!(
            text.ends_with(&sent[sent.find("\r\n\r\n").unwrap() + 4..]),
            "{tag}"
        );
    }
    let expected: BTreeMap<String, usize> = acknowledged.keys().map(|t| (t.clone(), 1)).collect();
    assert_eq!(
        delivery_counts(&sink),
        expected,
        "delivered exactly the acknowledged, once each"
    );

    // New mail is accepted again and the queue empties, with no restart.
    let mut c = SmtpClient::greeted(port);
    let (code, text) = c.send_message("a@example.org", &["b@example.com"], &body("after"));
    assert_eq!(code, 250, "{text}");
    assert!(sink.wait_for(acknowledged.len() + 1, Duration::from_secs(15)));
    assert!(
        wait_until(Duration::from_secs(15), || fs::read_dir(
            spool.join("queue")
        )
        .unwrap()
        .next()
        .is_none()),
        "the queue did not empty"
    );
}
