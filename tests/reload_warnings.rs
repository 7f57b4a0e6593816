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

#[test]
fn a_reload_that_renames_the_node_or_changes_the_store_keeps_the_cluster_it_started_with() {
    use common::SmtpClient;
    use common::sink::{Sink, SinkConfig};
    let sink = Sink::start(SinkConfig::default());
    let port = free_port();
    let policy = |node: &str, on_error: &str| {
        format!(
            "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n\
             [relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n\
             [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n\n\
             [cluster]\nnode = \"{node}\"\non_error = \"{on_error}\"\n",
            listener("mx", port, "none"),
            sink.port()
        )
    };
    let relay = Relay::start(&policy("edge-1", "local"));
    let text = std::fs::read_to_string(relay.config_path()).unwrap();
    let renamed = text
        .replace("node = \"edge-1\"", "node = \"edge-2\"")
        .replace("on_error = \"local\"", "on_error = \"tempfail\"");
    std::fs::write(relay.config_path(), renamed).unwrap();
    relay.sighup();
    assert!(relay.wait_for_log("configuration reloaded", WAIT));
    let log = relay.log();
    assert!(
        log.contains("reload: server.hostname or [cluster] node changed"),
        "{log}"
    );
    assert!(
        log.contains("reload: [cluster] redis, on_error or timeout changed; that takes a restart"),
        "{log}"
    );
    // What runs is what started: the node's own name in what it writes.
    let mut client = SmtpClient::greeted(port);
    let (code, text) = client.send_message(
        "a@example.org",
        &["b@example.com"],
        "From: <a@example.org>\r\nSubject: reload\r\n\r\nhello\r\n",
    );
    assert_eq!(code, 250, "{text}");
    client.cmd("QUIT");
    assert!(sink.wait_for(1, WAIT));
    let delivered = String::from_utf8_lossy(&sink.messages()[0].data).into_owned();
    assert!(
        delivered.contains("by relay.test (portcullis node edge-1)"),
        "{delivered}"
    );
}
