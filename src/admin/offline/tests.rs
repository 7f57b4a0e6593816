use std::path::PathBuf;

use super::*;
use crate::envelope::{RcptStatus, ReversePath, sample_envelope};
use crate::queue::DeliveryState;

fn policy() -> Config {
    Config::from_toml(
        "[server]\nhostname = \"edge-1.test\"\n\
         [[listeners]]\nname = \"mx\"\nbind = \"127.0.0.1:2525\"\ntls = \"none\"\n\
         [[upstreams]]\nname = \"exchange\"\naddress = \"127.0.0.1:25\"\ntls = \"none\"\n\
         domains = [\"example.com\"]\n\
         [[upstreams]]\nname = \"smarthost\"\naddress = \"127.0.0.1:26\"\ntls = \"none\"\n\
         domains = [\"example.net\"]\n",
        None,
    )
    .expect("valid policy")
}

/// A message from `from` (`""`: the null sender) to `rcpts`, received at `at`.
fn message(from: &str, rcpts: &[&str], at: u64) -> QueuedMessage {
    let mut envelope = sample_envelope(rcpts);
    envelope.received_at = at;
    if from.is_empty() {
        envelope.mail_from = ReversePath::Null;
    } else {
        envelope.mail_from = ReversePath::Address(crate::envelope::Address::parse(from).unwrap());
    }
    QueuedMessage {
        envelope,
        state: DeliveryState::fresh(at),
        size: 100,
        path: PathBuf::from("/nonexistent"),
    }
}

#[test]
fn census_counts_by_the_route_of_the_first_pending_recipient_held_apart() {
    let config = policy();
    let mut partly = message("a@example.org", &["x@example.com", "y@example.net"], 500);
    partly.state.recipients = vec![RcptStatus::Delivered, RcptStatus::Pending];
    let mut held = message("a@example.org", &["z@example.com"], 100);
    held.state.hold(150, "account contained");
    let messages = vec![
        message("a@example.org", &["p@example.com"], 1_000),
        message("b@example.org", &["q@example.com"], 900),
        message("", &["r@unrouted.test"], 950),
        partly,
        held,
    ];
    let census = census(&messages, &config);
    let counts: Vec<(&str, u64, u64)> = census
        .by_upstream
        .iter()
        .map(|u| (u.upstream.as_str(), u.queued, u.held))
        .collect();
    assert_eq!(
        counts,
        [(NO_ROUTE, 1, 0), ("exchange", 2, 1), ("smarthost", 1, 0)]
    );
    // The held message (received first) is neither the oldest nor among the senders.
    assert_eq!(census.oldest, Some((messages[3].id().to_string(), 500)));
    assert_eq!(
        census.top_senders,
        [
            ("a@example.org".to_owned(), 2),
            ("<>".to_owned(), 1),
            ("b@example.org".to_owned(), 1)
        ]
    );
    assert_eq!((census.queued(), census.held()), (4, 1));
}

#[test]
fn top_senders_are_bounded() {
    let config = policy();
    let senders: Vec<String> = (0..TOP_SENDERS + 5)
        .map(|i| format!("s{i:02}@example.org"))
        .collect();
    let messages: Vec<QueuedMessage> = senders
        .iter()
        .map(|s| message(s, &["p@example.com"], 1_000))
        .collect();
    let census = census(&messages, &config);
    assert_eq!(census.top_senders.len(), TOP_SENDERS);
    assert_eq!(census.top_senders[0], ("s00@example.org".to_owned(), 1));
}

#[test]
fn paused_is_read_as_the_running_relay_reads_the_marker() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    assert!(!status(&policy(), &spool, 1_000).unwrap().paused);
    // The relay's watcher looks with lstat: a marker that is a dangling symlink pauses it,
    // so the status of a stopped relay must say paused too.
    std::os::unix::fs::symlink(dir.path().join("nowhere"), pause::marker_path(spool.root()))
        .unwrap();
    assert!(status(&policy(), &spool, 1_000).unwrap().paused);
}

#[test]
fn the_totals_oldest_gauge_agrees_with_the_oldest_message_found() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let mut envelope = sample_envelope(&["p@example.com"]);
    envelope.received_at = 1_000;
    spool
        .enqueue(&envelope, b"Subject: x\r\n\r\nx\r\n")
        .unwrap();
    let status = status(&policy(), &spool, 1_046).unwrap();
    assert_eq!(status.queue.oldest.as_ref().map(|(_, at)| *at), Some(1_000));
    assert_eq!(status.totals.queue_oldest_seconds, 46);
    // Everything else among the totals counts since a start a stopped relay does not have.
    assert_eq!(
        Totals {
            queue_oldest_seconds: 0,
            ..status.totals
        },
        Totals::default()
    );
}
