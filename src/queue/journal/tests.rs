//! The journal fed with events directly: writing, rotation, retention, space, recovery,
//! hostile lines, the index, and a query of each kind.

use std::collections::HashSet;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::index::{self, KeyKind, Sidecar, Span};
use super::query::{self, Query};
use super::segment::{self, Segment};
use super::writer::{Limits, Room, SPACE_MARGIN_MIN, Writer, room};
use super::{Journal, show};
use crate::observe::{Event, EventKind};

const T0: u64 = 1_780_000_000_000;
const ID_A: &str = "0AB1CD2EF3GH4JK5";
const ID_B: &str = "1MN2PQ3RS4TV5WX6";
const MIB: u64 = 1 << 20;

fn limits() -> Limits {
    Limits {
        keep_ms: 7 * 86_400_000,
        max_size: 1 << 30,
        min_free: 0,
        segment_size: 64 * MIB,
        segment_age_ms: 3_600_000,
    }
}

fn plenty() -> super::writer::FreeSpace {
    Box::new(|| Ok(u64::MAX))
}

fn writer(dir: &Path, limits: Limits) -> Writer {
    Writer::open(dir, limits, plenty()).unwrap()
}

fn queued(id: &str, at: u64, mid: &str, from: &str, rcpt: &str, ip: &str) -> Event {
    let mut e = Event::at(EventKind::Queued, at);
    e.id = Some(id.into());
    e.message_id = Some(mid.into());
    e.from = Some(from.into());
    e.rcpts = vec![rcpt.into()];
    e.client = Some(ip.parse().unwrap());
    e.listener = Some("mx".into());
    e.tls = Some("1.3".into());
    e.size = Some(1834);
    e
}

fn delivered(id: &str, at: u64, rcpt: &str) -> Event {
    let mut e = Event::at(EventKind::Delivered, at);
    e.id = Some(id.into());
    e.rcpts = vec![rcpt.into()];
    e.upstream = Some("exchange".into());
    e.upstream_id = Some("4bf3c2a1".into());
    e.reply = Some("250 2.6.0 <m1@ex> [InternalId=4bf3c2a1] Queued mail for delivery".into());
    e
}

fn finished(id: &str, at: u64) -> Event {
    let mut e = Event::at(EventKind::Finished, at);
    e.id = Some(id.into());
    e
}

fn refused(at: u64, ip: &str, rcpt: &str) -> Event {
    let mut e = Event::at(EventKind::Refused, at);
    e.client = Some(ip.parse().unwrap());
    e.from = Some("spam@bad.example".into());
    e.rcpts = vec![rcpt.into()];
    e.rule = Some("recipients_file".into());
    e.reply = Some("550 5.1.1 no such user".into());
    e
}

/// Message A (from 192.0.2.7 to bob@example.com) queued, delivered, finished; message B (from
/// 198.51.100.9 to carol@example.com) queued only; a refusal for bob from 203.0.113.5.
fn two_messages() -> Vec<Event> {
    vec![
        queued(
            ID_A,
            T0,
            "<m1@ex>",
            "alice@sender.example",
            "bob@example.com",
            "192.0.2.7",
        ),
        queued(
            ID_B,
            T0 + 5,
            "<m2@ex>",
            "dave@other.example",
            "carol@example.com",
            "198.51.100.9",
        ),
        refused(T0 + 7, "203.0.113.5", "bob@example.com"),
        delivered(ID_A, T0 + 10, "bob@example.com"),
        finished(ID_A, T0 + 11),
    ]
}

fn write_all(dir: &Path, events: &[Event], seal: bool) {
    let mut w = writer(dir, limits());
    for e in events {
        assert!(w.write(e, e.at).unwrap());
    }
    if seal {
        w.seal().unwrap();
    } else {
        w.flush().unwrap();
    }
}

fn find(dir: &Path, q: &str) -> query::Found {
    query::find(dir, &q.parse().unwrap(), 0).unwrap()
}

fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn events_are_one_json_line_each_in_private_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    write_all(&dir, &two_messages(), true);
    let segs = files(&dir, "jsonl");
    assert_eq!(segs.len(), 1);
    let name = segs[0].file_name().unwrap().to_str().unwrap();
    assert_eq!(name, segment::name_at(T0));
    assert_eq!(name, "20260528T202640.000Z.jsonl");
    let text = fs::read_to_string(&segs[0]).unwrap();
    let back: Vec<Event> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, two_messages());
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&segs[0]), 0o600);
    assert_eq!(mode(&Segment::index_path(&segs[0])), 0o600);
}

#[test]
fn a_full_segment_is_sealed_with_its_index_and_the_next_one_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = limits();
    l.segment_size = 600;
    let mut w = writer(tmp.path(), l);
    for (i, e) in two_messages().iter().enumerate() {
        w.write(e, T0 + i as u64 * 1000).unwrap();
    }
    w.flush().unwrap();
    let segs = files(tmp.path(), "jsonl");
    let idx = files(tmp.path(), "idx");
    assert!(segs.len() >= 2, "{segs:?}");
    // Every segment but the open one is sealed.
    assert_eq!(idx.len(), segs.len() - 1);
    let first = Sidecar::open(&idx[0]).unwrap();
    assert_eq!(first.span.first_at, T0);
    assert!(first.span.length >= 600);
    assert_eq!(first.span.length, fs::metadata(&segs[0]).unwrap().len());
    // Every event is still found, across segments.
    let found = find(tmp.path(), ID_A);
    assert_eq!(
        kinds(&found.messages[0].1),
        ["queued", "delivered", "finished"]
    );
}

#[test]
fn a_segment_open_for_an_hour_is_sealed_at_the_next_tick() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = writer(tmp.path(), limits());
    w.write(&finished(ID_A, T0), T0).unwrap();
    w.tick(T0 + 3_599_999).unwrap();
    assert!(files(tmp.path(), "idx").is_empty());
    w.tick(T0 + 3_600_000).unwrap();
    assert_eq!(files(tmp.path(), "idx").len(), 1);
    w.write(&finished(ID_B, T0 + 3_600_001), T0 + 3_600_001)
        .unwrap();
    assert_eq!(files(tmp.path(), "jsonl").len(), 2);
}

#[test]
fn segments_older_than_journal_keep_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut l = limits();
    l.keep_ms = 86_400_000;
    let mut w = writer(tmp.path(), l);
    w.write(&finished(ID_A, T0), T0).unwrap();
    w.seal().unwrap();
    w.write(&finished(ID_B, T0 + 3_600_000), T0 + 3_600_000)
        .unwrap();
    w.seal().unwrap();
    // The first segment's last event is exactly keep old: kept.
    w.tick(T0 + 86_400_000).unwrap();
    assert_eq!(files(tmp.path(), "jsonl").len(), 2);
    w.tick(T0 + 86_400_001).unwrap();
    let left = files(tmp.path(), "jsonl");
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].file_name().unwrap().to_str().unwrap(),
        segment::name_at(T0 + 3_600_000)
    );
    assert_eq!(files(tmp.path(), "idx").len(), 1);
    assert!(find(tmp.path(), ID_A).is_empty());
    assert_eq!(find(tmp.path(), ID_B).messages.len(), 1);
}

#[test]
fn the_oldest_segments_go_first_beyond_journal_max_size() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = writer(tmp.path(), limits());
    for i in 0..4 {
        w.write(&finished(ID_A, T0 + i), T0 + i).unwrap();
        w.seal().unwrap();
    }
    let total = w.total_size();
    let each = total / 4;
    assert_eq!(total, each * 4, "equal segments");
    let mut l = limits();
    l.max_size = each * 2;
    drop(w);
    let mut w = writer(tmp.path(), l);
    assert_eq!(w.total_size(), total, "recovered from the sidecars");
    w.tick(T0 + 10).unwrap();
    assert_eq!(w.total_size(), each * 2);
    let left: Vec<String> = files(tmp.path(), "jsonl")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [segment::name_at(T0 + 2), segment::name_at(T0 + 3)]);
}

#[test]
fn room_leaves_min_free_space_and_a_margin_to_mail() {
    let min = 100 * MIB;
    // The margin is min_free itself when larger than SPACE_MARGIN_MIN.
    assert_eq!(room(u64::MAX, min), Room::Plenty);
    assert_eq!(room(300 * MIB, min), Room::Plenty);
    assert_eq!(room(300 * MIB - 1, min), Room::Trim);
    assert_eq!(room(200 * MIB, min), Room::Trim);
    assert_eq!(room(200 * MIB - 1, min), Room::Stop);
    assert_eq!(room(0, min), Room::Stop);
    // min_free_space = 0 (mail's check off): the journal still keeps the minimum margin.
    assert_eq!(room(SPACE_MARGIN_MIN - 1, 0), Room::Stop);
    assert_eq!(room(SPACE_MARGIN_MIN, 0), Room::Trim);
    assert_eq!(room(2 * SPACE_MARGIN_MIN, 0), Room::Plenty);
}

/// A writer whose free space the test sets.
fn writer_with_free(dir: &Path, free: &Arc<AtomicU64>) -> Writer {
    let f = free.clone();
    let mut l = limits();
    l.min_free = 100 * MIB;
    Writer::open(dir, l, Box::new(move || Ok(f.load(Ordering::SeqCst)))).unwrap()
}

#[test]
fn short_of_space_the_journal_trims_its_oldest_files_then_stops_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let free = Arc::new(AtomicU64::new(u64::MAX));
    let mut w = writer_with_free(tmp.path(), &free);
    for i in 0..3 {
        w.write(&finished(ID_A, T0 + i), T0 + i).unwrap();
        w.seal().unwrap();
    }
    w.write(&finished(ID_B, T0 + 5), T0 + 5).unwrap();
    // Near the floor: trims every sealed file, keeps writing.
    free.store(250 * MIB, Ordering::SeqCst);
    w.tick(T0 + 6).unwrap();
    assert!(files(tmp.path(), "idx").is_empty());
    assert_eq!(
        files(tmp.path(), "jsonl").len(),
        1,
        "the open segment stays"
    );
    assert!(w.write(&finished(ID_B, T0 + 7), T0 + 7).unwrap());
    // Below it: the open segment goes too, and nothing is written.
    free.store(150 * MIB, Ordering::SeqCst);
    w.tick(T0 + 8).unwrap();
    assert!(w.stopped());
    assert!(files(tmp.path(), "jsonl").is_empty());
    assert!(!w.write(&finished(ID_B, T0 + 9), T0 + 9).unwrap());
    assert!(files(tmp.path(), "jsonl").is_empty());
    // Trim level is not enough to resume (no flapping); plenty is.
    free.store(250 * MIB, Ordering::SeqCst);
    w.tick(T0 + 10).unwrap();
    assert!(w.stopped());
    free.store(400 * MIB, Ordering::SeqCst);
    w.tick(T0 + 11).unwrap();
    assert!(!w.stopped());
    assert!(w.write(&finished(ID_B, T0 + 12), T0 + 12).unwrap());
    w.flush().unwrap();
    assert_eq!(find(tmp.path(), ID_B).messages[0].1.len(), 1);
}

#[test]
fn corrupt_cut_and_oversized_lines_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    write_all(tmp.path(), &two_messages(), false);
    let seg = files(tmp.path(), "jsonl").remove(0);
    let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"not json at all\n{\"at\":1,\"kind\":\"no_such_kind\"}\n\xff\xfe\n")
        .unwrap();
    f.write_all(&vec![b'{'; segment::MAX_LINE + 10]).unwrap();
    f.write_all(b"\n").unwrap();
    let late = finished(ID_A, T0 + 20);
    f.write_all(serde_json::to_string(&late).unwrap().as_bytes())
        .unwrap();
    f.write_all(b"\n{\"at\":5,\"kind\":\"finis").unwrap();
    drop(f);
    let found = find(tmp.path(), ID_A);
    assert_eq!(
        kinds(&found.messages[0].1),
        ["queued", "delivered", "finished", "finished"]
    );
    let spool = crate::queue::Spool::open(tmp.path()).unwrap();
    let mut n = 0;
    super::scan(&spool, 0, &mut |_| n += 1).unwrap();
    assert_eq!(n, 0, "the spool's journal is SPOOL/journal, not SPOOL");
    let mut n = 0;
    segment::lines(&seg, &mut |l| n += usize::from(segment::parse(l).is_some())).unwrap();
    assert_eq!(n, 6);
}

#[test]
fn the_index_has_every_key_and_few_false_hits() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.idx");
    let keys: HashSet<u64> = (0..10_000)
        .map(|i| index::key_hash(KeyKind::Address, &format!("user{i}@example.com")))
        .collect();
    let span = Span {
        first_at: 1,
        last_at: 2,
        events: 3,
        length: 4,
    };
    index::write(&path, &keys, span).unwrap();
    let side = Sidecar::open(&path).unwrap();
    assert_eq!(side.span, span);
    let filter = side.load().unwrap();
    for &k in &keys {
        assert!(side.may_contain(k).unwrap());
        assert!(filter.may_contain(k));
    }
    let false_hits = (0..10_000)
        .map(|i| index::key_hash(KeyKind::Address, &format!("other{i}@example.com")))
        .filter(|&k| side.may_contain(k).unwrap())
        .count();
    assert!(
        false_hits < 60,
        "{false_hits} false hits in 10,000 (expected about 0.2 %)"
    );
    // The kind is part of the key: an id is not an address of the same text.
    let as_id = index::key_hash(KeyKind::Id, "user1@example.com");
    assert_ne!(
        as_id,
        index::key_hash(KeyKind::Address, "user1@example.com")
    );
    // A cut sidecar is refused (its segment is then scanned in full).
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    assert_eq!(
        Sidecar::open(&path).unwrap_err().kind(),
        std::io::ErrorKind::InvalidData
    );
}

#[test]
fn a_sealed_segment_without_the_key_is_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    write_all(tmp.path(), &two_messages(), true);
    let seg = files(tmp.path(), "jsonl").remove(0);
    // Replace the segment's content (same name, index kept): a query the index says is
    // absent must not find it, one it says is present must.
    let mut other = finished("ZZZZZZZZZZZZZZZZ", T0);
    other.id = Some("ZZZZZZZZZZZZZZZZ".into());
    let mut text = serde_json::to_string(&other).unwrap();
    text.push('\n');
    text.push_str(&serde_json::to_string(&finished(ID_A, T0 + 1)).unwrap());
    text.push('\n');
    fs::write(&seg, text).unwrap();
    assert!(
        find(tmp.path(), "ZZZZZZZZZZZZZZZZ").is_empty(),
        "index miss: not scanned"
    );
    assert_eq!(kinds(&find(tmp.path(), ID_A).messages[0].1), ["finished"]);
}

#[test]
fn a_segment_left_unsealed_is_searched_and_indexed_at_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    write_all(tmp.path(), &two_messages(), false);
    assert!(files(tmp.path(), "idx").is_empty());
    // Found by a full scan while unsealed (the open segment of a running relay).
    assert_eq!(find(tmp.path(), "<m2@ex>").messages[0].0, ID_B);
    fs::write(tmp.path().join("stray.idx.tmp"), b"half").unwrap();
    let w = writer(tmp.path(), limits());
    drop(w);
    let idx = files(tmp.path(), "idx");
    assert_eq!(idx.len(), 1);
    assert!(!tmp.path().join("stray.idx.tmp").exists());
    let side = Sidecar::open(&idx[0]).unwrap();
    assert_eq!(
        (side.span.first_at, side.span.last_at, side.span.events),
        (T0, T0 + 11, 5)
    );
    assert_eq!(find(tmp.path(), "<m2@ex>").messages[0].0, ID_B);
}

#[test]
fn queries_are_told_apart_and_bad_ones_refused() {
    let id: Query = "0ab1cd2ef3gh4jk5".parse().unwrap();
    assert_eq!(id, Query::Id(ID_A.parse().unwrap()));
    assert_eq!(
        "<M1@Ex>".parse::<Query>().unwrap(),
        Query::MessageId("m1@ex".into())
    );
    assert_eq!(
        "Bob@Bücher.EXAMPLE".parse::<Query>().unwrap(),
        Query::AddressOrMessageId {
            address: "bob@xn--bcher-kva.example".into(),
            message_id: "bob@bücher.example".into(),
        }
    );
    assert_eq!(
        "2001:DB8::1".parse::<Query>().unwrap(),
        Query::Client("2001:db8::1".parse().unwrap())
    );
    for bad in [
        "",
        "  ",
        "hello",
        "<>",
        "0AB1CD2EF3GH4JK",
        "a b@c",
        "1.2.3.4.5",
    ] {
        assert!(bad.parse::<Query>().is_err(), "{bad:?} accepted");
    }
}

#[test]
fn each_kind_of_query_finds_the_whole_timeline() {
    let tmp = tempfile::tempdir().unwrap();
    let mut events = two_messages();
    // Two segments: message A's delivery is in the second one.
    let later = events.split_off(3);
    write_all(tmp.path(), &events, true);
    write_all(tmp.path(), &later, false);
    let a = ["queued", "delivered", "finished"];
    for q in [
        ID_A,
        "<m1@ex>",
        "m1@ex",
        "192.0.2.7",
        "alice@SENDER.example",
    ] {
        let found = find(tmp.path(), q);
        assert_eq!(found.messages.len(), 1, "{q}");
        assert_eq!(found.messages[0].0, ID_A, "{q}");
        assert_eq!(kinds(&found.messages[0].1), a, "{q}");
        assert!(found.refusals.is_empty(), "{q}");
    }
    // bob@example.com: message A and the refusal without queue id.
    let found = find(tmp.path(), "BOB@example.COM");
    assert_eq!(found.messages.len(), 1);
    assert_eq!(found.refusals.len(), 1);
    assert_eq!(found.refusals[0].rule.as_deref(), Some("recipients_file"));
    let found = find(tmp.path(), "203.0.113.5");
    assert!(found.messages.is_empty());
    assert_eq!(found.refusals.len(), 1);
    // Near misses find nothing.
    for q in [
        "192.0.2.70",
        "<m1@ex.org>",
        "bob@example.co",
        "2AB1CD2EF3GH4JK5",
    ] {
        assert!(find(tmp.path(), q).is_empty(), "{q}");
    }
    // --since: only events at or after it.
    let since = query::find(tmp.path(), &ID_A.parse().unwrap(), T0 + 10).unwrap();
    assert_eq!(kinds(&since.messages[0].1), ["delivered", "finished"]);
}

#[test]
fn messages_are_in_order_of_their_first_event() {
    let tmp = tempfile::tempdir().unwrap();
    // Both from 192.0.2.7; B was queued first but written after A's first event.
    let events = vec![
        queued(
            ID_A,
            T0 + 50,
            "<m1@ex>",
            "a@x.example",
            "bob@example.com",
            "192.0.2.7",
        ),
        queued(
            ID_B,
            T0,
            "<m2@ex>",
            "b@x.example",
            "carol@example.com",
            "192.0.2.7",
        ),
        finished(ID_A, T0 + 60),
        finished(ID_B, T0 + 40),
    ];
    write_all(tmp.path(), &events, true);
    let found = find(tmp.path(), "192.0.2.7");
    let ids: Vec<&str> = found.messages.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(ids, [ID_B, ID_A]);
    assert_eq!(kinds(&found.messages[0].1), ["queued", "finished"]);
}

#[test]
fn trace_prints_timelines_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    write_all(tmp.path(), &two_messages(), true);
    let text = show::text(&find(tmp.path(), "bob@example.com"));
    let expected = format!(
        "message {ID_A}  Message-ID <m1@ex>\n\
         \x20 2026-05-28T20:26:40.000Z  queued      client=192.0.2.7 listener=mx tls=1.3 \
         from=<alice@sender.example> rcpts=<bob@example.com> message_id=<m1@ex> size=1834\n\
         \x20 2026-05-28T20:26:40.010Z  delivered   rcpts=<bob@example.com> upstream=exchange \
         upstream_id=4bf3c2a1 reply=\"250 2.6.0 <m1@ex> [InternalId=4bf3c2a1] Queued mail for \
         delivery\"\n\
         \x20 2026-05-28T20:26:40.011Z  finished\n\n\
         refused without a queue id\n\
         \x20 2026-05-28T20:26:40.007Z  refused     client=203.0.113.5 \
         from=<spam@bad.example> rcpts=<bob@example.com> rule=recipients_file \
         reply=\"550 5.1.1 no such user\"\n\n\
         1 message, 1 refusal without a queue id\n"
    );
    assert_eq!(text, expected);
    let json = show::json_lines(&find(tmp.path(), ID_A));
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["time"], "2026-05-28T20:26:40.000Z");
    assert_eq!(lines[1]["kind"], "delivered");
    assert_eq!(lines[1]["upstream_id"], "4bf3c2a1");
}

#[test]
fn text_from_the_network_cannot_forge_lines() {
    let mut e = refused(T0, "192.0.2.1", "x@example.com");
    e.reply = Some("550 a\nmessage FAKE\u{202e}".into());
    let line = show::event_line(&e);
    assert!(!line.contains('\n') && !line.contains('\u{202e}'), "{line}");
    assert!(line.ends_with("reply=\"550 a?message FAKE?\""), "{line}");
}

#[test]
fn the_journal_thread_writes_every_appended_event_and_seals_on_close() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = crate::queue::Spool::open(tmp.path()).unwrap();
    let journal = Journal::start(super::dir(spool.root()), limits(), plenty());
    use crate::observe::EventSink as _;
    for e in two_messages() {
        journal.append(&e);
    }
    assert_eq!(journal.dropped(), 0);
    journal.close();
    let mut seen = Vec::new();
    super::scan(&spool, 0, &mut |e| seen.push(e.clone())).unwrap();
    assert_eq!(seen, two_messages());
    assert_eq!(
        files(&super::dir(spool.root()), "idx").len(),
        1,
        "sealed on close"
    );
    let mut recent = Vec::new();
    super::scan(&spool, T0 + 10, &mut |e| recent.push(e.kind)).unwrap();
    assert_eq!(recent, [EventKind::Delivered, EventKind::Finished]);
}

#[test]
fn a_journal_that_cannot_open_drops_and_counts_every_event() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    // The journal directory would be under a regular file: it cannot be made.
    let journal = Journal::start(file.join("journal"), limits(), plenty());
    use crate::observe::EventSink as _;
    for e in two_messages() {
        journal.append(&e);
    }
    let dropped = journal.dropped.clone();
    journal.close();
    assert_eq!(dropped.load(Ordering::SeqCst), 5);
}

/// A free-space source that blocks its caller (the writer thread) until released, and says
/// when it is entered.
fn blocking_space(
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
) -> super::writer::FreeSpace {
    let release = std::sync::Mutex::new(release);
    Box::new(move || {
        let _ = entered.send(());
        let _ = release.lock().unwrap().recv();
        Ok(u64::MAX)
    })
}

#[test]
fn appending_never_waits_for_a_stuck_writer_and_every_event_is_kept_or_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let journal = Journal::start(
        dir.clone(),
        limits(),
        blocking_space(entered_tx, release_rx),
    );
    use crate::observe::EventSink as _;
    // About 300 octets each: past 1 MiB the writer looks at the free space, and is stuck.
    let mut event = delivered(ID_A, T0, "bob@example.com");
    event.reply = Some("x".repeat(200));
    let mut sent = 0u64;
    while entered.try_recv().is_err() {
        journal.append(&event);
        sent += 1;
        assert!(
            sent < 1_000_000,
            "the writer never looked at the free space"
        );
        if sent.is_multiple_of(1000) {
            std::thread::yield_now();
        }
    }
    // Stuck: a channel's worth and more are appended without waiting; the excess is dropped.
    for _ in 0..super::CHANNEL_CAPACITY + 100 {
        journal.append(&event);
        sent += 1;
    }
    assert!(journal.dropped() >= 100, "dropped {}", journal.dropped());
    let dropped = journal.dropped.clone();
    drop(release);
    journal.close();
    let mut written = 0u64;
    for seg in files(&dir, "jsonl") {
        segment::lines(&seg, &mut |l| {
            written += u64::from(segment::parse(l).is_some())
        })
        .unwrap();
    }
    assert_eq!(written + dropped.load(Ordering::SeqCst), sent);
}

/// A client with more messages and refusals than a query returns: the most recent of each
/// are kept (refusals cut back while the segments are read), the count left out is said.
#[test]
fn a_query_keeps_the_most_recent_messages_and_refusals_and_counts_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [
        "0AB1CD2EF3GH4JK1",
        "0AB1CD2EF3GH4JK2",
        "0AB1CD2EF3GH4JK3",
        "0AB1CD2EF3GH4JK4",
        "0AB1CD2EF3GH4JK5",
    ];
    let mut events = Vec::new();
    for (i, id) in (0u64..).zip(ids) {
        let at = T0 + i * 10;
        events.push(queued(
            id,
            at,
            "<m@ex>",
            "a@x.example",
            "b@y.example",
            "192.0.2.7",
        ));
        events.push(refused(at + 1, "192.0.2.7", &format!("r{i}@y.example")));
        events.push(refused(at + 2, "192.0.2.7", &format!("s{i}@y.example")));
    }
    write_all(tmp.path(), &events, true);
    let found = query::find_at_most(tmp.path(), &"192.0.2.7".parse().unwrap(), 0, 3, 3).unwrap();
    let kept: Vec<&str> = found.messages.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(kept, ids[2..]);
    assert_eq!(found.truncated, 2);
    let rcpts: Vec<&str> = found.refusals.iter().map(|e| e.rcpts[0].as_str()).collect();
    assert_eq!(rcpts, ["s3@y.example", "r4@y.example", "s4@y.example"]);
}

#[test]
fn a_journal_stopped_for_space_leaves_a_marker_then_a_gap_when_it_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let free = Arc::new(AtomicU64::new(u64::MAX));
    let mut w = writer_with_free(tmp.path(), &free);
    w.write(&finished(ID_A, T0), T0).unwrap();
    w.seal().unwrap();
    assert_eq!(super::state::read(tmp.path()).unwrap().stopped, None);
    free.store(150 * MIB, Ordering::SeqCst);
    w.tick(T0 + 1).unwrap();
    let disk = super::state::read(tmp.path()).unwrap();
    let stop = disk.stopped.expect("a stopped marker");
    assert_eq!(stop.reason, super::state::Reason::Space);
    assert_eq!(disk.oldest_ms, None, "its history went for the space");
    // A writer opened on it (the relay restarted, still short) carries the stop on, with
    // its first time.
    drop(w);
    let mut w = writer_with_free(tmp.path(), &free);
    assert!(w.stopped());
    assert_eq!(w.stop().map(|s| s.since_ms), Some(stop.since_ms));
    free.store(400 * MIB, Ordering::SeqCst);
    w.tick(T0 + 2).unwrap();
    assert!(!w.stopped());
    assert!(w.write(&finished(ID_B, T0 + 3), T0 + 3).unwrap());
    w.seal().unwrap();
    let disk = super::state::read(tmp.path()).unwrap();
    assert_eq!(disk.stopped, None);
    assert_eq!(disk.gaps.len(), 1, "{disk:?}");
    assert_eq!(disk.gaps[0].since_ms, stop.since_ms);
    assert_eq!(disk.oldest_ms, Some(T0 + 3));
    // Markers are no segments: queries read past them.
    assert_eq!(find(tmp.path(), ID_B).messages.len(), 1);
}

#[test]
fn a_journal_with_no_room_at_start_writes_not_even_its_first_event() {
    let tmp = tempfile::tempdir().unwrap();
    let free = Arc::new(AtomicU64::new(150 * MIB));
    let mut w = writer_with_free(tmp.path(), &free);
    assert!(!w.write(&finished(ID_A, T0), T0).unwrap());
    assert!(files(tmp.path(), "jsonl").is_empty());
    assert!(super::state::stopped(tmp.path()).unwrap().is_some());
}

#[test]
fn the_running_journal_reports_its_stop_and_drops_in_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let journal = Journal::start(tmp.path().join("journal"), limits(), Box::new(|| Ok(MIB)));
    use crate::observe::EventSink as _;
    for e in two_messages() {
        journal.append(&e);
    }
    let stopped = (0..500).any(|_| {
        let state = journal.state();
        std::thread::sleep(std::time::Duration::from_millis(10));
        state.stopped_since.is_some() && state.dropped == Some(5)
    });
    let state = journal.state();
    assert!(stopped, "{state:?}");
    assert!(
        state
            .why
            .as_deref()
            .is_some_and(|w| w.contains("short of space"))
    );
    assert!(!state.writing());
    journal.close();
    let (on_disk, _) = super::state_on_disk(&tmp.path().join("journal")).unwrap();
    assert_eq!(on_disk.stopped_since, state.stopped_since);
    assert_eq!(on_disk.dropped, None);
}

#[test]
fn closing_through_the_telemetry_seals_the_open_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let telemetry = crate::observe::Telemetry::new("n").with_journal(Box::new(Journal::start(
        dir.clone(),
        limits(),
        plenty(),
    )));
    for e in two_messages() {
        telemetry.record(&e);
    }
    telemetry.close_journal();
    assert_eq!(files(&dir, "jsonl").len(), 1);
    assert_eq!(files(&dir, "idx").len(), 1, "sealed on close");
    // Closed twice is closed once; later events are counted as dropped, not written.
    telemetry.close_journal();
    telemetry.record(&finished(ID_A, T0 + 100));
    assert_eq!(telemetry.journal_state().and_then(|s| s.dropped), Some(1));
}

#[test]
fn a_quoted_local_part_is_queried_in_its_canonical_form() {
    for (text, canonical) in [
        ("\"john doe\"@Example.com", "\"john doe\"@example.com"),
        (
            "\"<script>alert(1)</script>\"@x.example",
            "\"<script>alert(1)</script>\"@x.example",
        ),
        // Quotes that are not needed are not part of the canonical form.
        ("\"bob\"@example.com", "bob@example.com"),
    ] {
        match text.parse::<Query>() {
            Ok(Query::AddressOrMessageId { address, .. }) => assert_eq!(address, canonical),
            other => panic!("{text}: {other:?}"),
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut w = writer(tmp.path(), limits());
    let mut e = queued(ID_A, T0, "m@x", "", "\"john doe\"@example.com", "192.0.2.1");
    e.rcpts = vec!["\"john doe\"@example.com".into()];
    w.write(&e, T0).unwrap();
    w.seal().unwrap();
    assert_eq!(
        find(tmp.path(), "\"John Doe\"@EXAMPLE.com").messages.len(),
        1
    );
    let line = show::event_line(&e);
    assert!(line.contains(" from=<> "), "{line}");
}

#[test]
fn the_null_sender_shows_as_brackets_in_old_and_new_journals() {
    for stored in ["", "<>"] {
        let mut e = Event::at(EventKind::Bounced, T0);
        e.from = Some(stored.into());
        let line = show::event_line(&e);
        assert!(line.ends_with(" from=<>"), "{stored:?}: {line}");
    }
}

#[test]
fn check_config_warns_when_the_spool_file_system_is_too_small_for_the_journal() {
    use super::writer::space_warning_for;
    let spool = Path::new("/var/spool/portcullis");
    // 20 MiB with the default floor: the journal would never write.
    let w = space_warning_for(spool, 20 * MIB, 0).expect("a warning");
    assert!(
        w.contains("of 20 MiB") && w.contains("would never write"),
        "{w}"
    );
    assert!(w.contains("more than 64 MiB"), "{w}");
    // Above the stop level, below the trim level: it would keep deleting its history.
    let w = space_warning_for(spool, 100 * MIB, 0).expect("a warning");
    assert!(w.contains("would keep deleting"), "{w}");
    // The margin follows min_free_space when that is larger.
    assert!(space_warning_for(spool, 250 * MIB, 100 * MIB).is_some());
    assert_eq!(space_warning_for(spool, 128 * MIB, 0), None);
    assert_eq!(space_warning_for(spool, 300 * MIB, 100 * MIB), None);
    // The real file system of a temporary directory is measured.
    let tmp = tempfile::tempdir().unwrap();
    assert!(super::writer::file_system_size(tmp.path()).unwrap() > 0);
}

#[test]
fn a_write_error_stop_ends_at_the_next_write_and_a_space_stop_takes_over_its_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let free = Arc::new(AtomicU64::new(u64::MAX));
    let mut w = writer_with_free(tmp.path(), &free);
    w.failed(T0);
    let stop = super::state::stopped(tmp.path()).unwrap().expect("marked");
    assert_eq!(stop.reason, super::state::Reason::WriteError);
    assert!(!w.stopped(), "a write error does not refuse the next event");
    assert!(w.write(&finished(ID_A, T0 + 1), T0 + 1).unwrap());
    assert_eq!(super::state::stopped(tmp.path()).unwrap(), None);
    assert_eq!(super::state::read(tmp.path()).unwrap().gaps.len(), 1);
    // Failing, then short of space: one marker, the first time, the new reason.
    w.failed(T0 + 2);
    free.store(150 * MIB, Ordering::SeqCst);
    w.tick(T0 + 3).unwrap();
    let stop = super::state::stopped(tmp.path()).unwrap().expect("marked");
    assert_eq!(stop.reason, super::state::Reason::Space);
    assert!(w.stopped());
}

#[test]
fn a_node_named_journal_records_the_node_and_trace_shows_it_while_old_lines_still_read() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = crate::queue::Spool::open(tmp.path()).unwrap();
    let dir = super::dir(spool.root());
    // An older segment, written before events named their node.
    write_all(&dir, &[finished(ID_B, T0 - 5)], true);
    let journal = Journal::start(dir.clone(), limits(), plenty()).with_node(Some("edge-2".into()));
    use crate::observe::EventSink as _;
    journal.append(&finished(ID_A, T0));
    journal.close();
    let text = fs::read_to_string(files(&dir, "jsonl").last().unwrap()).unwrap();
    assert!(text.contains(r#""node":"edge-2""#), "{text}");
    let found = find(&dir, ID_A);
    let event = &found.messages[0].1[0];
    assert_eq!(event.node.as_deref(), Some("edge-2"));
    assert!(
        show::event_line(event).ends_with(" node=edge-2"),
        "{}",
        show::event_line(event)
    );
    let json: serde_json::Value =
        serde_json::from_str(show::json_lines(&found).lines().next().unwrap()).unwrap();
    assert_eq!(json["node"], "edge-2");
    let old = find(&dir, ID_B);
    assert_eq!(old.messages[0].1[0].node, None);
    assert!(!show::event_line(&old.messages[0].1[0]).contains("node="));
}
