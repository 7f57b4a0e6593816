//! Loopback tests of `portcullis queue retry|delete|purge` against a running relay's spool:
//! exact output, exit codes (0 / 1 unknown id / 2 bad input) and what is left on disk. The
//! relay's upstream is a closed port, so accepted mail stays queued.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::process::Output;

use common::*;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Ids of the message files left in the spool, sorted.
fn queued(relay: &Relay) -> Vec<String> {
    relay
        .spool_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn delete_removes_the_message_and_its_state() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org", "b@example.org"]);
    let state = relay.spool.join("queue").join(format!("{}.state", ids[0]));
    fs::write(&state, br#"{"attempts":1,"next_attempt":1}"#).unwrap();

    let out = relay.command(&["queue", "delete", &ids[0].to_lowercase()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!("deleted {}\n1 message deleted\n", ids[0])
    );
    assert_eq!(queued(&relay), [ids[1].clone()]);
    assert!(!state.exists(), "state file left behind");
}

#[test]
fn delete_of_an_unknown_id_is_exit_1_and_still_deletes_the_others() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org"]);
    let unknown = "0000000000000000";
    let out = relay.command(&["queue", "delete", unknown, &ids[0]]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!("deleted {}\n1 message deleted, 1 not found\n", ids[0])
    );
    assert!(
        stderr(&out).contains(&format!("no message {unknown}")),
        "{}",
        show(&out)
    );
    assert!(queued(&relay).is_empty());
}

#[test]
fn invalid_id_is_a_usage_error_and_changes_nothing() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org"]);
    for args in [
        &["queue", "delete", ids[0].as_str(), "../../etc/passwd"][..],
        &["queue", "retry", "not-an-id"],
        &["queue", "delete"],
        &["queue", "retry"],
        &["queue", "retry", ids[0].as_str(), "--all"],
    ] {
        let out = relay.command(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(stdout(&out).is_empty(), "{args:?}: {}", show(&out));
    }
    let out = relay.command(&["queue", "delete", &ids[0], "../../etc/passwd"]);
    assert!(stderr(&out).contains("not a queue id"), "{}", show(&out));
    assert_eq!(queued(&relay), ids, "a usage error deleted something");
    assert!(
        fs::read_dir(relay.spool.join("control"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn bare_purge_is_a_usage_error() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org"]);
    for args in [
        &["queue", "purge"][..],
        &["queue", "purge", "--dry-run"],
        &["queue", "purge", "--from", "a@example.org", "--all"],
        &["queue", "purge", "--from", "not an address"],
        &["queue", "purge", "--from", "@"],
    ] {
        let out = relay.command(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(stdout(&out).is_empty(), "{args:?}: {}", show(&out));
    }
    assert_eq!(queued(&relay), ids);
}

#[test]
fn purge_from_an_address_takes_only_the_junk_senders_mail() {
    let relay = example_com_relay("");
    let ids = send_from(
        &relay,
        &[
            "spammer@junk.example",
            "boss@example.org",
            "spammer@JUNK.example",
            "Spammer@junk.example",
            "other@junk.example",
        ],
    );

    // A dry run lists and deletes nothing.
    let out = relay.command(&[
        "queue",
        "purge",
        "--from",
        "spammer@junk.example",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "would delete {} from spammer@junk.example\n\
             would delete {} from spammer@junk.example\n\
             would delete {} from Spammer@junk.example\n\
             3 messages would be deleted (dry run)\n",
            ids[0], ids[2], ids[3]
        )
    );
    assert_eq!(queued(&relay), ids, "dry run deleted something");

    let out = relay.command(&["queue", "purge", "--from", "spammer@junk.example"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "deleted {} from spammer@junk.example\n\
             deleted {} from spammer@junk.example\n\
             deleted {} from Spammer@junk.example\n\
             3 messages deleted\n",
            ids[0], ids[2], ids[3]
        )
    );
    // Addresses are shown in their canonical form (domain lower case) and compared like the
    // policy does: an ASCII local part ignoring case.
    assert_eq!(queued(&relay), [ids[1].clone(), ids[4].clone()]);

    // Nothing left to match: still success, with a zero summary.
    let out = relay.command(&["queue", "purge", "--from", "spammer@junk.example"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), "0 messages deleted\n");
}

#[test]
fn purge_from_a_domain_and_of_bounces_and_all() {
    let relay = example_com_relay("");
    let ids = send_from(
        &relay,
        &[
            "a@junk.example",
            "real@example.org",
            "b@Junk.Example",
            "c@sub.junk.example",
            "",
        ],
    );
    let out = relay.command(&["queue", "purge", "--from", "@JUNK.example"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "deleted {} from a@junk.example\ndeleted {} from b@junk.example\n2 messages deleted\n",
            ids[0], ids[2]
        )
    );
    assert_eq!(
        queued(&relay),
        [ids[1].clone(), ids[3].clone(), ids[4].clone()]
    );

    let out = relay.command(&["queue", "purge", "--from", "<>"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!("deleted {} from <>\n1 message deleted\n", ids[4])
    );

    let out = relay.command(&["queue", "purge", "--all", "--dry-run"]);
    assert_eq!(
        stdout(&out),
        format!(
            "would delete {} from real@example.org\nwould delete {} from c@sub.junk.example\n\
             2 messages would be deleted (dry run)\n",
            ids[1], ids[3]
        )
    );
    let out = relay.command(&["queue", "purge", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out).ends_with("2 messages deleted\n"),
        "{}",
        show(&out)
    );
    assert!(queued(&relay).is_empty());
    assert!(
        fs::read_dir(relay.spool.join("queue"))
            .unwrap()
            .next()
            .is_none(),
        "state files left behind"
    );
}

#[test]
fn retry_writes_one_request_per_message() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org", "b@example.org"]);
    let control = relay.spool.join("control");

    let out = relay.command(&["queue", "retry", &ids[0], &ids[1]]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let lines: Vec<String> = stdout(&out).lines().map(String::from).collect();
    assert_eq!(
        lines[..2],
        [
            format!("retry requested for {}", ids[0]),
            format!("retry requested for {}", ids[1]),
        ]
    );
    assert!(lines[2].contains("within a second"), "{}", show(&out));
    assert_eq!(lines.len(), 3);
    let names = |dir: &std::path::Path| {
        sorted(
            fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
        )
    };
    assert_eq!(
        names(&control),
        sorted(ids.iter().map(|id| format!("retry.{id}")).collect())
    );

    let out = relay.command(&["queue", "retry", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out).starts_with("retry requested for all queued messages (2 now)\n"),
        "{}",
        show(&out)
    );
    assert!(control.join("retry.all").is_file());

    // An unknown id: exit 1, no request for it, the known one still requested.
    fs::remove_dir_all(&control).unwrap();
    fs::create_dir(&control).unwrap();
    let out = relay.command(&["queue", "retry", "0000000000000000", &ids[1]]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains("no message 0000000000000000"),
        "{}",
        show(&out)
    );
    assert!(stdout(&out).starts_with(&format!("retry requested for {}\n", ids[1])));
    assert_eq!(names(&control), [format!("retry.{}", ids[1])]);
    // The requests touched neither the messages nor their state.
    assert_eq!(queued(&relay), ids);
    assert!(names(&relay.spool.join("tmp")).is_empty());
}

#[test]
fn delete_during_a_final_dot_says_it_may_have_been_delivered() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org", "spam@junk.example"]);
    // What a delivery worker holds while its final dot is on the wire: a shared lock on the
    // open message file.
    let _held: Vec<fs::File> = ids
        .iter()
        .map(|id| {
            let file = fs::File::open(relay.spool.join("queue").join(id)).unwrap();
            // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
            let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) };
            assert_eq!(locked, 0);
            file
        })
        .collect();
    let out = relay.command(&["queue", "delete", &ids[0]]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "deleted {} (its final dot had already been sent upstream; it may have been delivered)\n\
             1 message deleted, 1 possibly delivered\n",
            ids[0]
        )
    );
    let out = relay.command(&["queue", "purge", "--from", "@junk.example"]);
    assert_eq!(
        stdout(&out),
        format!(
            "deleted {} from spam@junk.example (its final dot had already been sent upstream; \
             it may have been delivered)\n1 message deleted, 1 possibly delivered\n",
            ids[1]
        )
    );
    assert!(queued(&relay).is_empty());
}
