//! End to end: a SIGHUP that changes a setting read only at start says so in the log, and the
//! running relay goes on as it started (here: the admin listener stays where it was bound).

mod common;

use std::time::Duration;

use common::{Relay, free_port, http, listener};

const WAIT: Duration = Duration::from_secs(10);

fn config(admin: u16, journal_keep: &str) -> String {
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n\
         [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n\n\
         [log]\njournal_keep = \"{journal_keep}\"\n\n[admin]\nbind = \"127.0.0.1:{admin}\"\n",
        listener("mx", free_port(), "none"),
        free_port()
    )
}

#[test]
fn a_reload_that_moves_the_admin_listener_or_changes_the_journal_keys_warns_that_it_takes_a_restart()
 {
    let admin = free_port();
    let relay = Relay::start(&config(admin, "7d"));
    assert!(http::wait_accepting(admin, WAIT));
    // Keep the same listener and upstream ports: only [admin] bind and journal_keep change.
    let text = std::fs::read_to_string(relay.config_path()).unwrap();
    let moved = free_port();
    let changed = text
        .replace(&format!("127.0.0.1:{admin}"), &format!("127.0.0.1:{moved}"))
        .replace("journal_keep = \"7d\"", "journal_keep = \"1d\"");
    std::fs::write(relay.config_path(), changed).unwrap();
    relay.sighup();
    assert!(relay.wait_for_log("configuration reloaded", WAIT));
    let log = relay.log();
    assert!(
        log.contains("reload: [admin] bind changed") && log.contains("that takes a restart"),
        "{log}"
    );
    assert!(
        log.contains("reload: [log] journal_keep or journal_max_size changed"),
        "{log}"
    );
    // The admin listener is where it started.
    assert_eq!(http::get(admin, "/healthz", &[]).status, 200);
}
