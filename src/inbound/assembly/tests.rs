use std::fs;
use std::io;
use std::path::Path;

use super::*;
use crate::envelope::ReversePath;
use crate::smtp::headers::NamePattern;

fn spool() -> (tempfile::TempDir, Spool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    (dir, spool)
}

fn transaction(params: MailParams, rcpts: &[&str]) -> Transaction {
    Transaction {
        from: ReversePath::Address(Address::parse("sender@example.org").unwrap()),
        params,
        recipients: rcpts.iter().map(|r| Address::parse(r).unwrap()).collect(),
        refused: 0,
    }
}

fn arrival(tx: &Transaction) -> Arrival<'_> {
    Arrival {
        listener: "mx",
        peer: "192.0.2.7:40000".parse().unwrap(),
        helo: "client.example.org",
        extended: true,
        tls: None,
        auth_user: None,
        transaction: tx,
        hostname: "relay.example.net",
        node: "relay.example.net",
    }
}

/// Header fields named `X-Internal-*` are removed.
fn strip_internal() -> Arc<StripRules> {
    Arc::new(StripRules {
        names: vec![NamePattern::new("X-Internal-*")],
        auth_results_for: None,
    })
}

/// An assembly of `tx` with no reservation and no From: check.
fn start(spool: &Spool, tx: &Transaction) -> Assembly {
    let mut none = None;
    let space = Space {
        reservation: &mut none,
        min_free: 0,
    };
    Assembly::start(spool, &arrival(tx), strip_internal(), None, space).unwrap()
}

/// Push `message` in chunks of 5 octets (header fields split across chunks), then the final
/// dot.
fn receive(assembly: &mut Assembly, message: &[u8]) {
    for chunk in message.chunks(5) {
        assembly.push(chunk);
    }
    assembly.finish();
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_spool_file_holds_received_first_and_no_stripped_header() {
    let (_d, spool) = spool();
    let tx = transaction(MailParams::default(), &["rcpt@example.net"]);
    let mut assembly = start(&spool, &tx);
    let message = b"Subject: hi\r\nX-Internal-Route: secret\r\n\tfolded\r\nFrom: sender@example.org\r\n\r\nbody\r\n";
    receive(&mut assembly, message);
    assert_eq!(assembly.write_failed(), None);
    let committed = assembly.commit().await.unwrap();
    let stored = spool.read_message(&committed.id).unwrap();
    let text = String::from_utf8(stored).unwrap();
    assert!(
        text.starts_with("Received: from client.example.org"),
        "{text}"
    );
    assert!(text.contains(&format!("id {}", committed.id)), "{text}");
    // One recipient: named in the trace header (RFC 5321 §4.4 `for`).
    assert!(text.contains("for <rcpt@example.net>"), "{text}");
    let after_trace = &text[text.find("Subject:").unwrap()..];
    assert_eq!(
        after_trace,
        "Subject: hi\r\nFrom: sender@example.org\r\n\r\nbody\r\n"
    );
    let loaded = committed.loaded.expect("a small message is kept in memory");
    assert_eq!(loaded.body.as_deref(), Some(text.as_bytes()));
    assert_eq!(loaded.msg.size, text.len() as u64);
}

#[tokio::test]
async fn the_envelope_records_the_session_and_transaction() {
    let (_d, spool) = spool();
    let tx = transaction(MailParams::default(), &["a@example.net", "b@example.net"]);
    let mut assembly = start(&spool, &tx);
    let id = assembly.id().clone();
    receive(&mut assembly, b"Subject: x\r\n\r\ny\r\n");
    assert_eq!(assembly.commit().await.unwrap().id, id);
    let env = spool.load(&id).unwrap().envelope;
    assert_eq!(env.listener, "mx");
    assert_eq!(env.client_ip.to_string(), "192.0.2.7");
    assert_eq!(env.client_port, 40000);
    assert_eq!(env.helo, "client.example.org");
    assert_eq!(env.mail_from, tx.from);
    let rcpts: Vec<String> = env
        .recipients
        .iter()
        .map(|r| r.address.to_string())
        .collect();
    assert_eq!(rcpts, ["a@example.net", "b@example.net"]);
    // Several recipients: none named in the trace header (Bcc).
    let text = String::from_utf8(spool.read_message(&id).unwrap()).unwrap();
    assert!(!text.contains("for <"), "{text}");
}

#[tokio::test]
async fn an_undeclared_8bit_message_is_spooled_as_8bitmime() {
    let (_d, spool) = spool();
    let tx = transaction(MailParams::default(), &["rcpt@example.net"]);
    let mut assembly = start(&spool, &tx);
    receive(&mut assembly, "Subject: x\r\n\r\ncaf\u{e9}\r\n".as_bytes());
    assert!(assembly.eight_bit());
    assert!(!assembly.header_utf8());
    let id = assembly.commit().await.unwrap().id;
    let env = spool.load(&id).unwrap().envelope;
    assert_eq!(env.mail_params.body, Some(Body::EightBitMime));
    // The rewritten envelope line is still followed by the message, untouched.
    let text = String::from_utf8(spool.read_message(&id).unwrap()).unwrap();
    assert!(text.ends_with("Subject: x\r\n\r\ncaf\u{e9}\r\n"), "{text}");
}

#[tokio::test]
async fn smtputf8_is_dropped_when_envelope_and_header_are_ascii() {
    let (_d, spool) = spool();
    let declared = MailParams {
        smtputf8: true,
        ..MailParams::default()
    };
    let tx = transaction(declared.clone(), &["rcpt@example.net"]);
    let mut ascii = start(&spool, &tx);
    receive(&mut ascii, b"Subject: x\r\n\r\ny\r\n");
    let id = ascii.commit().await.unwrap().id;
    assert!(!spool.load(&id).unwrap().envelope.mail_params.smtputf8);

    let mut utf8 = start(&spool, &tx);
    receive(&mut utf8, "Subject: \u{fc}ber\r\n\r\ny\r\n".as_bytes());
    assert!(utf8.header_utf8());
    let id = utf8.commit().await.unwrap().id;
    let kept = spool.load(&id).unwrap().envelope.mail_params;
    assert!(kept.smtputf8);
    assert_eq!(kept.body, Some(Body::EightBitMime));
}

#[test]
fn needed_params_follow_what_the_message_holds() {
    let (_d, spool) = spool();
    let utf8_rcpt = transaction(
        MailParams {
            smtputf8: true,
            ..MailParams::default()
        },
        &["j\u{f6}rg@example.net"],
    );
    let ascii = transaction(
        MailParams {
            smtputf8: true,
            body: Some(Body::SevenBit),
            size: Some(10),
        },
        &["rcpt@example.net"],
    );
    let plain = transaction(MailParams::default(), &["rcpt@example.net"]);
    let envelope_of = |tx: &Transaction| start(&spool, tx).envelope.clone();
    // (transaction, header_utf8, eight_bit) → (body, smtputf8)
    let table = [
        (&plain, false, false, None, false),
        (&plain, false, true, Some(Body::EightBitMime), false),
        // Not declared: a UTF-8 header section does not add SMTPUTF8.
        (&plain, true, true, Some(Body::EightBitMime), false),
        (&ascii, false, false, Some(Body::SevenBit), false),
        (&ascii, true, true, Some(Body::EightBitMime), true),
        (&utf8_rcpt, false, false, None, true),
    ];
    for (tx, header_utf8, eight_bit, body, smtputf8) in table {
        let needed = needed_params(&envelope_of(tx), header_utf8, eight_bit);
        assert_eq!(
            (needed.body, needed.smtputf8, needed.size),
            (body, smtputf8, tx.params.size),
            "{:?} header_utf8={header_utf8} eight_bit={eight_bit}",
            tx.params
        );
    }
}

#[test]
fn the_hop_count_and_a_too_large_field_are_reported_not_decided() {
    let (_d, spool) = spool();
    let tx = transaction(MailParams::default(), &["rcpt@example.net"]);
    let mut hops = start(&spool, &tx);
    receive(
        &mut hops,
        b"Received: from a\r\nReceived: from b\r\nSubject: x\r\n\r\nReceived: in the body\r\n",
    );
    // The relay's own Received: does not count; one in the body is no field.
    assert_eq!(hops.received_count(), 2);
    assert_eq!(hops.header_too_large(), None);

    let mut large = start(&spool, &tx);
    let mut field = b"From: ".to_vec();
    field.resize(crate::smtp::headers::MAX_WHOLE_FIELD + 10, b'a');
    field.extend_from_slice(b"\r\n\r\nbody\r\n");
    receive(&mut large, &field);
    assert_eq!(large.header_too_large(), Some("From"));
}

/// A message that outgrows its reservation when the reserve has no room is refused with
/// `452 4.3.1`; dropping it leaves nothing in `tmp/` or `queue/`.
#[test]
fn a_write_failure_commits_nothing() {
    let (_d, spool) = spool();
    let tx = transaction(MailParams::default(), &["rcpt@example.net"]);
    // Reserved at MAIL with the reserve on (1 octet declared); the reserve now asks for more
    // than any file system has.
    let mut reservation = Some(spool.reserve(1, 1).unwrap().unwrap());
    let space = Space {
        reservation: &mut reservation,
        min_free: u64::MAX,
    };
    let mut assembly =
        Assembly::start(&spool, &arrival(&tx), strip_internal(), None, space).unwrap();
    assert!(reservation.is_none(), "the assembly holds the reservation");
    receive(&mut assembly, b"Subject: x\r\n\r\nmore than one octet\r\n");
    let failure = assembly.write_failed().unwrap();
    assert_eq!(failure, WriteFailure::StorageFull);
    drop(assembly);
    assert!(names(&spool.root().join("tmp")).is_empty());
    assert!(names(&spool.root().join("queue")).is_empty());
}

/// A commit that fails (here: its id taken in `queue/` meanwhile) leaves neither a temp file
/// nor a changed `queue/` entry, and is answered `451 4.3.0` (rule `spool_commit`).
#[tokio::test]
async fn a_failed_commit_leaves_nothing_half_visible() {
    let (_d, spool) = spool();
    let tx = transaction(MailParams::default(), &["rcpt@example.net"]);
    let mut assembly = start(&spool, &tx);
    let id = assembly.id().clone();
    receive(&mut assembly, b"Subject: x\r\n\r\ny\r\n");
    let taken = spool.root().join("queue").join(id.as_str());
    fs::write(&taken, b"not ours").unwrap();
    let error = assembly.commit().await.unwrap_err();
    assert!(
        matches!(error, AssemblyError::Commit(SpoolError::AlreadyExists(_))),
        "{error:?}"
    );
    let refusal = error.refusal();
    assert_eq!(
        (refusal.reply, refusal.rule),
        (reply::LOCAL_ERROR, "spool_commit")
    );
    assert!(names(&spool.root().join("tmp")).is_empty());
    assert_eq!(names(&spool.root().join("queue")), [id.to_string()]);
    assert_eq!(fs::read(&taken).unwrap(), b"not ours");
}

fn io_error(errno: i32) -> SpoolError {
    SpoolError::Io {
        op: "write",
        path: "tmp/x".into(),
        source: io::Error::from_raw_os_error(errno),
    }
}

/// `(reply, rule)` of a refusal, for comparing.
fn answer(refusal: &Refusal) -> (u16, &'static str, &'static str) {
    (refusal.reply.code, refusal.reply.enhanced, refusal.rule)
}

/// A full file system or quota is `452 4.3.1` (rule `min_free_space`) at every step, while
/// receiving too.
#[test]
fn a_full_file_system_or_quota_is_insufficient_storage() {
    let full = (452, "4.3.1", "min_free_space");
    for errno in [libc::ENOSPC, libc::EDQUOT] {
        for error in [
            AssemblyError::Create(io_error(errno)),
            AssemblyError::Rewrite(io_error(errno)),
            AssemblyError::Commit(io_error(errno)),
        ] {
            assert_eq!(answer(&error.refusal()), full, "{error:?}");
        }
        assert_eq!(write_failure(&io_error(errno)), WriteFailure::StorageFull);
    }
}

/// Trouble a retry may cure is `451 4.3.0` with the rule of the step that failed; an error
/// no retry cures is `554 5.3.0`.
#[tokio::test]
async fn other_spool_errors_answer_by_their_class_with_the_rule_of_their_step() {
    let encode = SpoolError::Encode {
        what: "envelope",
        source: serde_json::from_str::<u8>("x").unwrap_err(),
    };
    let task = tokio::spawn(std::future::pending::<()>());
    task.abort();
    let join = task.await.unwrap_err();
    let id = QueueId::generate();
    let table = [
        (
            AssemblyError::Create(io_error(libc::EIO)),
            (451, "4.3.0", "spool_create"),
        ),
        (
            AssemblyError::Create(SpoolError::AlreadyExists(id)),
            (451, "4.3.0", "spool_create"),
        ),
        (
            AssemblyError::Rewrite(io_error(libc::EIO)),
            (451, "4.3.0", "spool_write"),
        ),
        (
            AssemblyError::Commit(io_error(libc::EIO)),
            (451, "4.3.0", "spool_commit"),
        ),
        (
            AssemblyError::CommitTask(join),
            (451, "4.3.0", "spool_commit"),
        ),
        (
            AssemblyError::Create(encode),
            (554, "5.3.0", "spool_create"),
        ),
    ];
    for (error, want) in table {
        assert_eq!(answer(&error.refusal()), want, "{error:?}");
    }
    assert_eq!(write_failure(&io_error(libc::EIO)), WriteFailure::Io);
}
