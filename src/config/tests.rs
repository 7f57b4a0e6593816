//! Table-driven tests of the policy compiler: defaults, collected errors with their keys,
//! unknown keys, the committed policy files, the files a policy names, and warnings.

use std::path::Path;

use super::*;

/// The smallest valid policy; tests append tables to it.
const MINIMAL: &str = r#"
[server]
hostname = "relay.example.com"

[[listeners]]
bind = "127.0.0.1:2525"
tls = "none"

[[upstreams]]
address = "10.0.0.5:25"
"#;

fn ok(text: &str) -> Config {
    match Config::from_toml(text, None) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid policy, got:\n{e}\n--- policy:\n{text}"),
    }
}

fn errors(text: &str) -> Vec<(String, String)> {
    match Config::from_toml(text, None) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0.into_iter().map(|e| (e.key, e.message)).collect(),
    }
}

fn keys(text: &str) -> Vec<String> {
    let mut keys: Vec<String> = errors(text).into_iter().map(|(k, _)| k).collect();
    keys.sort();
    keys
}

/// An argon2id PHC string for `password` with the default parameters (only the format matters
/// here, but weaker parameters would be warned about).
fn argon2id_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::default();
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::from_b64("c29tZXNhbHRzYWx0").expect("valid salt");
    hasher
        .hash_password(password.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write fixture");
    path.display().to_string()
}

#[test]
fn embedded_default_parses_and_says_what_it_is() {
    let c = Config::embedded_default();
    assert_eq!(c.server.hostname, "localhost");
    assert_eq!(c.server.spool_dir, Path::new("./spool"));
    assert_eq!(
        c.tls.as_ref().map(|t| &t.source),
        Some(&CertSource::SelfSigned)
    );
    let names: Vec<(&str, String, bool, AuthMode)> = c
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.bind.to_string(), l.require_tls, l.auth))
        .collect();
    assert_eq!(
        names,
        [
            ("mx", "127.0.0.1:2525".to_owned(), false, AuthMode::Off),
            (
                "submission",
                "127.0.0.1:2587".to_owned(),
                true,
                AuthMode::Required
            ),
        ]
    );
    assert_eq!(c.relay.accepted_domains, ["example.com", "localhost"]);
    assert_eq!(c.upstreams[0].address, "127.0.0.1:25");
    assert_eq!(c.upstreams[0].tls, UpstreamTls::Opportunistic);
    assert!(
        c.auth
            .as_ref()
            .is_some_and(|a| a.users.is_empty() && a.users_file.is_none())
    );
    let warnings = c.warnings().join("\n");
    assert!(warnings.contains("self-signed"), "{warnings}");
    assert!(warnings.contains("nobody can authenticate"), "{warnings}");
    assert!(c.summary().contains("embedded default"));
}

#[test]
fn defaults_are_applied() {
    let c = ok(MINIMAL);
    // No accepted domain: postmaster@ the server's hostname.
    assert_eq!(
        c.relay.postmaster.to_string(),
        format!("postmaster@{}", c.server.hostname)
    );
    let with_domains = ok(&format!(
        "{MINIMAL}\n[relay]\naccepted_domains = [\"Example.COM\", \"example.org\"]\n"
    ));
    assert_eq!(
        with_domains.relay.postmaster.to_string(),
        "postmaster@example.com"
    );
    assert_eq!(c.server.spool_dir, Path::new("/var/spool/portcullis"));
    assert!(c.tls.is_none() && c.auth.is_none() && c.source.is_none());
    let l = &c.listeners[0];
    assert_eq!(l.name, "listener0");
    assert_eq!(
        (l.tls, l.require_tls, l.auth),
        (ListenerTls::None, false, AuthMode::Off)
    );
    assert_eq!(l.bare_lf, super::BareLf::Trusted);
    assert_eq!(
        l.allow,
        [
            "0.0.0.0/0".parse::<IpNet>().unwrap(),
            "::/0".parse().unwrap()
        ]
    );
    assert!(l.deny.is_empty());
    assert!(c.relay.accepted_domains.is_empty() && c.relay.relay_networks.is_empty());
    assert!(c.relay.recipients.is_none());
    let lim = &c.limits;
    assert_eq!(lim.max_message_size, 25 << 20);
    assert_eq!(lim.min_free_space, (25 << 20) * 3 / 2);
    assert_eq!(
        (
            lim.max_recipients,
            lim.max_connections,
            lim.max_connections_per_ip
        ),
        (100, 1000, 20)
    );
    assert_eq!(
        (lim.max_errors, lim.max_command_length, lim.hop_limit),
        (10, 1024, 100)
    );
    assert_eq!(lim.pregreet_wait, Duration::ZERO);
    assert_eq!(lim.command_timeout, Duration::from_secs(300));
    assert_eq!(lim.data_timeout, Duration::from_secs(600));
    assert_eq!(lim.session_timeout, Duration::from_secs(3600));
    assert_eq!(lim.shutdown_grace, Duration::from_secs(30));
    assert!(
        c.rate_limits.connections_per_ip.is_none() && c.rate_limits.messages_per_user.is_none()
    );
    let u = &c.upstreams[0];
    assert_eq!(u.name, "upstream0");
    assert_eq!((u.tls, u.max_connections), (UpstreamTls::Required, 20));
    assert!(u.domains.is_empty() && u.auth_user.is_none() && u.auth_password.is_none());
    assert_eq!(
        c.headers.strip_untrusted,
        [
            "X-MS-Exchange-Organization-*",
            "X-MS-Exchange-Forest-*",
            "X-MS-Exchange-CrossPremises-*",
            "X-MS-Exchange-CrossTenant-*"
        ]
    );
    assert_eq!(c.server.authserv_id, c.server.hostname);
    assert!(c.auth.as_ref().is_none_or(|a| a.check_display_name));
    let minutes: Vec<u64> = c.queue.retry.iter().map(|d| d.as_secs() / 60).collect();
    assert_eq!(minutes, [1, 5, 15, 30, 60, 120, 240]);
    assert_eq!(c.queue.max_age, Duration::from_secs(5 * 86_400));
    assert!(c.queue.bounces);
    assert_eq!(c.queue.delivery_grace, Duration::from_secs(10));
    assert_eq!(c.queue.quarantine_keep, Duration::from_secs(7 * 86_400));
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
}

#[test]
fn min_free_space_follows_max_message_size() {
    let c = ok(&format!(
        "{MINIMAL}\n[limits]\nmax_message_size = \"10MiB\"\n"
    ));
    assert_eq!(c.limits.min_free_space, 15 << 20);
    let c = ok(&format!(
        "{MINIMAL}\n[limits]\nmax_message_size = 1000\nmin_free_space = 0\n"
    ));
    assert_eq!(
        (c.limits.max_message_size, c.limits.min_free_space),
        (1000, 0)
    );
}

#[test]
fn every_error_is_collected_in_one_pass() {
    let text = r#"
[server]
hostname = "relay..example.com"

[[listeners]]
bind = "127.0.0.1:2525"
tls = "none"
require_tls = true

[limits]
max_message_size = "25 megabytes"
command_timeout = "5 minutes"

[[upstreams]]
address = "exchange.example.internal"

[queue]
retry = []
"#;
    let errs = errors(text);
    let mut keys: Vec<&str> = errs.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "limits.command_timeout",
            "limits.max_message_size",
            "listeners[0].require_tls",
            "queue.retry",
            "server.hostname",
            "upstreams[0].address",
        ]
    );
    let timeout = errs
        .iter()
        .find(|(k, _)| k == "limits.command_timeout")
        .unwrap();
    assert_eq!(
        timeout.1,
        r#""5 minutes" is not a duration (use e.g. 30s, 5m, 1h, 5d)"#
    );
}

#[test]
fn required_parts_missing() {
    assert_eq!(keys(""), ["listeners", "server.hostname", "upstreams"]);
    assert_eq!(
        keys("[server]\nhostname = \"x.example\"\n[[listeners]]\nname = \"a\"\n[[upstreams]]\n"),
        [
            "listeners[0].bind",
            "listeners[0].tls",
            "upstreams[0].address"
        ]
    );
}

#[test]
fn unknown_keys_are_all_reported_with_dotted_paths() {
    let text = r#"
bogus = 1
[server]
hostname = "relay.example.com"
hostnme = "typo"

[[listeners]]
bind = "127.0.0.1:2525"
tls = "none"

[[listeners]]
bind = "127.0.0.1:2526"
tls = "none"
requir_tls = true

[limits]
max_mesage_size = "1MiB"

[extra.nested]
x = 1

[[upstreams]]
address = "10.0.0.5:25"
[upstreams.deep]
y = 2
"#;
    let errs = errors(text);
    assert!(errs.iter().all(|(_, m)| m == "unknown key"), "{errs:?}");
    let mut keys: Vec<&str> = errs.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "bogus",
            "extra",
            "limits.max_mesage_size",
            "listeners[1].requir_tls",
            "server.hostnme",
            "upstreams[0].deep",
        ]
    );
}

#[test]
fn syntax_error_is_one_error_with_position() {
    let errs = errors("[server]\nhostname = \"a\"\n[[listeners]\n");
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, "(syntax)");
    assert!(errs[0].1.starts_with("line 3, column"), "{}", errs[0].1);
}

#[test]
fn type_errors_name_their_keys_and_do_not_hide_others() {
    let text = format!(
        "{MINIMAL}\n[limits]\nmax_recipients = \"lots\"\nmax_errors = true\n\
         command_timeout = \"5 minutes\"\n[queue]\nbounces = \"no\"\n\
         [relay]\naccepted_domains = \"example.com\"\n\
         [[upstreams]]\naddress = 25\nbogus = 1\n"
    );
    // Every type error in a table is found, the table's other keys still compile, and a key
    // with a type error is not reported a second time as missing.
    assert_eq!(
        keys(&text),
        [
            "limits.command_timeout",
            "limits.max_errors",
            "limits.max_recipients",
            "queue.bounces",
            "relay.accepted_domains",
            "upstreams[1].address",
            "upstreams[1].bogus",
        ]
    );
    let errs = errors(&text);
    let recipients = errs
        .iter()
        .find(|(k, _)| k == "limits.max_recipients")
        .unwrap();
    assert!(
        recipients.1.contains("expected an integer"),
        "{}",
        recipients.1
    );
    // A table where an array of tables belongs, and a value where a table belongs.
    assert_eq!(
        keys("server = 5\n[listeners]\nbind = \"x\"\n[[upstreams]]\naddress = \"a:1\"\n"),
        ["listeners", "server"]
    );
}

#[test]
fn value_errors_table() {
    // (snippet appended to MINIMAL, expected key of the single error)
    let cases: &[(&str, &str)] = &[
        (
            "[limits]\nmax_command_length = 511",
            "limits.max_command_length",
        ),
        (
            "[limits]\nmax_command_length = 65537",
            "limits.max_command_length",
        ),
        ("[limits]\nmax_message_size = 0", "limits.max_message_size"),
        ("[limits]\nmax_message_size = -1", "limits.max_message_size"),
        (
            "[limits]\nmax_message_size = \"99999999999999TiB\"",
            "limits.max_message_size",
        ),
        ("[limits]\nmax_recipients = 0", "limits.max_recipients"),
        ("[limits]\nmax_connections = -5", "limits.max_connections"),
        ("[limits]\nhop_limit = 0", "limits.hop_limit"),
        ("[limits]\nmax_errors = 4294967296", "limits.max_errors"),
        ("[limits]\ndata_timeout = \"0s\"", "limits.data_timeout"),
        (
            "[limits]\nshutdown_grace = \"soon\"",
            "limits.shutdown_grace",
        ),
        (
            "[limits]\nsession_timeout = \"0s\"",
            "limits.session_timeout",
        ),
        (
            "[limits]\ncommand_timeout = \"99999999999999999999s\"",
            "limits.command_timeout",
        ),
        (
            "[rate_limits]\nmessages_per_ip = \"0/min\"",
            "rate_limits.messages_per_ip",
        ),
        (
            "[rate_limits]\nrecipients_per_ip = \"10/day\"",
            "rate_limits.recipients_per_ip",
        ),
        (
            "[relay]\naccepted_domains = [\"ok.example\", \"-bad.example\"]",
            "relay.accepted_domains[1]",
        ),
        (
            "[relay]\nrelay_networks = [\"10.0.0.0/33\"]",
            "relay.relay_networks[0]",
        ),
        ("[queue]\nretry = [\"1m\", \"0s\"]", "queue.retry[1]"),
        ("[queue]\nmax_age = \"5\"", "queue.max_age"),
        ("[queue]\ndelivery_grace = \"soon\"", "queue.delivery_grace"),
        ("[queue]\nquarantine_keep = \"0s\"", "queue.quarantine_keep"),
        (
            "[queue]\nquarantine_keep = \"a week\"",
            "queue.quarantine_keep",
        ),
        (
            "[headers]\nstrip_untrusted = [\"X-Bad: *\"]",
            "headers.strip_untrusted[0]",
        ),
        ("[tls]\nmin_version = \"1.1\"", "tls.min_version"),
        ("[tls]\ncert = \"c.pem\"", "tls.key"),
        ("[tls]\nkey = \"k.pem\"", "tls.cert"),
        ("[auth]\nmax_failures = 0", "auth.max_failures"),
        ("[auth]\nlockout = \"15 minutes\"", "auth.lockout"),
        (
            "[auth]\nusers_file = \"/nonexistent/users.toml\"",
            "auth.users_file",
        ),
        (
            "[relay]\nrecipients_file = \"/nonexistent/rcpts\"",
            "relay.recipients_file",
        ),
        ("[relay]\npostmaster = \"no at sign\"", "relay.postmaster"),
        (
            "[[listeners]]\nbind = \"127.0.0.1:2526\"\ntls = \"none\"\nbare_lf = \"allow\"",
            "listeners[1].bare_lf",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:2525\"\ntls = \"none\"",
            "listeners[1].bind",
        ),
        (
            "[[listeners]]\nname = \"listener0\"\nbind = \"127.0.0.1:1\"\ntls = \"none\"",
            "listeners[1].name",
        ),
        (
            "[[listeners]]\nbind = \"localhost:25\"\ntls = \"none\"",
            "listeners[1].bind",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:1\"\ntls = \"tls\"",
            "listeners[1].tls",
        ),
        ("[[listeners]]\nbind = \"127.0.0.1:1\"", "listeners[1].tls"),
        (
            "[[listeners]]\nbind = \"127.0.0.1:1\"\ntls = \"none\"\nauth = \"required\"",
            "listeners[1].auth",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:1\"\ntls = \"none\"\nauth = \"yes\"",
            "listeners[1].auth",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:1\"\ntls = \"none\"\nallow = []",
            "listeners[1].allow",
        ),
        (
            "[[listeners]]\nbind = \"127.0.0.1:1\"\ntls = \"none\"\ndeny = [\"nope\"]",
            "listeners[1].deny[0]",
        ),
        (
            "[[upstreams]]\nname = \"upstream0\"\naddress = \"a.example:25\"",
            "upstreams[1].name",
        ),
        (
            "[[upstreams]]\naddress = \"a.example:0\"",
            "upstreams[1].address",
        ),
        (
            "[[upstreams]]\naddress = \"::1:25\"",
            "upstreams[1].address",
        ),
        (
            "[[upstreams]]\naddress = \"a.example:25\"\ntls = \"maybe\"",
            "upstreams[1].tls",
        ),
        (
            "[[upstreams]]\naddress = \"a.example:25\"\nauth_user = \"u\"",
            "upstreams[1].auth_password_file",
        ),
        (
            "[[upstreams]]\naddress = \"a.example:25\"\nauth_password_file = \"p\"",
            "upstreams[1].auth_user",
        ),
        (
            "[[upstreams]]\naddress = \"a.example:25\"\nmax_connections = 0",
            "upstreams[1].max_connections",
        ),
        (
            "[[upstreams]]\naddress = \"a.example:25\"\nca = \"/nonexistent/ca.pem\"",
            "upstreams[1].ca",
        ),
        (
            "[[upstreams]]\naddress = \"a.example:25\"\ndomains = [\"A.Example.\", \"x y\"]",
            "upstreams[1].domains[1]",
        ),
        (
            "[[upstreams]]\naddress = \"10.0.0.5:25\"\ntls_name = \"10.0.0.5\"",
            "upstreams[1].tls_name",
        ),
        (
            "[[upstreams]]\naddress = \"10.0.0.5:25\"\ntls = \"none\"\ntls_name = \"ex01.example\"",
            "upstreams[1].tls_name",
        ),
    ];
    for (snippet, key) in cases {
        let text = format!("{MINIMAL}\n{snippet}\n");
        assert_eq!(keys(&text), [*key], "for snippet:\n{snippet}");
    }
}

#[test]
fn accepted_values_table() {
    let c = ok(&format!(
        "{MINIMAL}\n[relay]\naccepted_domains = [\"Example.COM.\"]\nrelay_networks = [\"192.0.2.7\", \"10.1.2.3/8\"]\n\
         [[upstreams]]\naddress = \"[2001:db8::5]:25\"\ndomains = [\"B.Example\"]\n\
         [[upstreams]]\naddress = \"mx.example.org:2525\"\n\
         [[upstreams]]\naddress = \"10.0.0.5:25\"\ntls_name = \"EX01.Corp.Example.\"\n\
         [[listeners]]\nbind = \"[::1]:2465\"\ntls = \"implicit\"\n[tls]\nmin_version = \"1.3\"\n\
         [rate_limits]\nconnections_per_ip = \"60/min\"\n"
    ));
    assert_eq!(c.relay.accepted_domains, ["example.com"]);
    let nets: Vec<String> = c
        .relay
        .relay_networks
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["192.0.2.7/32", "10.0.0.0/8"]);
    assert_eq!(c.upstreams[1].domains, ["b.example"]);
    assert_eq!(c.upstreams[2].name, "upstream2");
    assert_eq!(c.upstreams[2].tls_name, None);
    assert_eq!(
        c.upstreams[3].tls_name.as_deref(),
        Some("ex01.corp.example")
    );
    let implicit = &c.listeners[1];
    assert_eq!(
        (implicit.name.as_str(), implicit.tls),
        ("listener1", ListenerTls::Implicit)
    );
    assert!(implicit.require_tls, "implicit TLS implies require_tls");
    assert_eq!(
        c.tls.as_ref().map(|t| t.min_version),
        Some(TlsVersion::Tls13)
    );
    assert_eq!(
        c.rate_limits.connections_per_ip,
        Some(Rate {
            count: 60,
            per: Duration::from_secs(60)
        })
    );
}

#[test]
fn portcullis_toml_documents_only_known_keys_and_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let users = format!(
        "[[users]]\nname = \"alice\"\npassword_hash = \"{}\"\nsenders = [\"alice@example.com\", \"@Example.ORG\"]\n",
        argon2id_hash("secret")
    );
    // Each file the example names, replaced by a fixture with the same role.
    let fixtures = [
        ("certs/relay.crt", write(dir.path(), "relay.crt", pem)),
        (
            "certs/relay.key",
            write(dir.path(), "relay.key", "-----BEGIN PRIVATE KEY-----\n"),
        ),
        (
            "config/recipients.txt",
            write(
                dir.path(),
                "rcpts",
                "# staff\nBob@Example.com\n\n@example.org\n",
            ),
        ),
        ("config/users.toml", write(dir.path(), "users.toml", &users)),
        ("certs/exchange-ca.pem", write(dir.path(), "ca.pem", pem)),
        (
            "/etc/portcullis/upstream.pass",
            write(dir.path(), "pass", "hunter2\n"),
        ),
        (
            "/etc/portcullis/dkim/s2026.pem",
            dkim_key(dir.path(), "s2026.pem", "ed25519"),
        ),
        (
            "/etc/portcullis/admin.token",
            write(dir.path(), "admin.token", "s3cret-token\n"),
        ),
    ];
    let mut text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/portcullis.toml"
    ))
    .expect("read config/portcullis.toml");
    for (documented, fixture) in &fixtures {
        let quoted = format!("\"{documented}\"");
        assert!(
            text.contains(&quoted),
            "portcullis.toml no longer names {documented}"
        );
        text = text.replace(&quoted, &format!("{fixture:?}"));
    }
    let c = ok(&text);
    assert_eq!(c.listeners.len(), 3);
    assert_eq!(
        c.relay.recipients.as_deref(),
        // Canonical form: the domain lower case, the local part as written (matching ignores
        // its ASCII case, see Address::matches).
        Some(&["Bob@example.com".to_owned(), "@example.org".to_owned()][..])
    );
    let auth = c.auth.as_ref().expect("auth");
    assert_eq!(auth.users.len(), 1);
    assert_eq!(auth.users[0].senders, ["alice@example.com", "@example.org"]);
    assert_eq!(c.upstreams[0].auth_password.as_deref(), Some("hunter2"));
    // Nothing that prints the configuration shows the password.
    assert!(!format!("{:?}", c.upstreams[0]).contains("hunter2"));
    assert_eq!(c.limits.min_free_space, 40 << 20);
    assert!(c.rate_limits.messages_per_user.is_some());
    // The documented mail-authentication policy: recorded SPF and DKIM, enforced DMARC, one
    // DNSBL, one signing key, signed towards the smarthost only.
    assert_eq!(
        (c.spf.verify, c.dkim.verify, c.dmarc.verify),
        (Verify::Record, true, Verify::Enforce)
    );
    assert_eq!(c.dkim.sign.len(), 1);
    assert_eq!(c.dkim.sign[0].headers, DEFAULT_DKIM_HEADERS);
    assert_eq!(c.dnsbl.zones.len(), 1);
    let signing: Vec<(&str, bool)> = c
        .upstreams
        .iter()
        .map(|u| (u.name.as_str(), u.sign))
        .collect();
    assert_eq!(signing, [("exchange", false), ("smarthost", true)]);
    assert!(
        c.headers
            .strip_untrusted
            .contains(&"X-Portcullis-Quarantine".to_owned())
    );
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    let summary = c.summary();
    for needle in [
        "relay.example.com",
        "partners on 0.0.0.0:2525",
        "exchange at exchange.example.internal:25",
        "1 users",
    ] {
        assert!(
            summary.contains(needle),
            "summary lacks {needle:?}:\n{summary}"
        );
    }
}

#[test]
fn users_file_errors_are_keyed_inside_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = argon2id_hash("pw");
    let argon2i = good.replacen("$argon2id$", "$argon2i$", 1);
    let users = format!(
        r#"
[[users]]
name = "alice"
password_hash = "{good}"
senders = ["alice@example.com"]

[[users]]
name = "alice"
password_hash = "{good}"

[[users]]
name = "bob"
password_hash = "plaintext"
senders = ["bob", "@-bad.example"]
pasword = "x"

[[users]]
name = "carol"
password_hash = "{argon2i}"

[[users]]
name = "dave"

[other]
"#
    );
    let path = write(dir.path(), "users.toml", &users);
    let text = format!("{MINIMAL}\n[auth]\nusers_file = {path:?}\n");
    let errs = errors(&text);
    assert!(errs.iter().all(|(k, _)| k == "auth.users_file"), "{errs:?}");
    let mut places: Vec<&str> = errs
        .iter()
        .map(|(_, m)| m.split(": ").next().unwrap_or(""))
        .collect();
    places.sort();
    assert_eq!(
        places,
        [
            "other",
            "users[1].name",
            "users[2].password_hash",
            "users[2].pasword",
            "users[2].senders[0]",
            "users[2].senders[1]",
            "users[3].password_hash",
            "users[4].password_hash",
        ]
    );
    let display = ConfigErrors(vec![ConfigError::new(
        "auth.users_file",
        "users[3].password_hash: uses argon2i",
    )]);
    assert_eq!(
        display.to_string(),
        "auth.users_file: users[3].password_hash: uses argon2i"
    );
}

#[test]
fn users_file_syntax_error_is_reported_under_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "users.toml", "[[users]\n");
    let errs = errors(&format!("{MINIMAL}\n[auth]\nusers_file = {path:?}\n"));
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].0, "auth.users_file");
    assert!(errs[0].1.starts_with("(syntax): line 1"), "{}", errs[0].1);
}

#[test]
fn an_empty_recipients_file_is_an_error_and_a_byte_order_mark_is_not_an_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = write(dir.path(), "empty", "# exported 2026-12-01\n\n");
    let errs = errors(&format!(
        "{MINIMAL}\n[relay]\nrecipients_file = {empty:?}\n"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, "relay.recipients_file");
    assert!(errs[0].1.contains("holds no address"), "{}", errs[0].1);

    let bom = write(
        dir.path(),
        "bom",
        "\u{feff}alice@example.com\r\nbob@example.com\r\n",
    );
    let c = ok(&format!("{MINIMAL}\n[relay]\nrecipients_file = {bom:?}\n"));
    assert_eq!(
        c.relay
            .recipients
            .as_deref()
            .map(|r| r.iter().map(String::as_str).collect::<Vec<_>>()),
        Some(vec!["alice@example.com", "bob@example.com"])
    );
}

#[test]
fn a_byte_order_mark_never_becomes_part_of_a_password_and_tls_name_unverified_is_warned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pass = write(dir.path(), "smarthost.pass", "\u{feff}s3cret\r\n");
    let c = ok(&format!(
        "{MINIMAL}\n[[upstreams]]\naddress = \"10.0.0.5:25\"\ntls = \"opportunistic\"\n\
         tls_name = \"ex01.example\"\nauth_user = \"u\"\nauth_password_file = {pass:?}\n"
    ));
    assert_eq!(c.upstreams[1].auth_password.as_deref(), Some("s3cret"));
    assert!(
        c.warnings()
            .iter()
            .any(|w| w.contains("sets tls_name but has tls = \"opportunistic\"")),
        "{:?}",
        c.warnings()
    );
}

#[test]
fn recipients_and_password_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rcpts = write(dir.path(), "rcpts", "ok@example.com\nnot an address\n");
    let empty = write(dir.path(), "empty.pass", "\n");
    let crlf = write(dir.path(), "crlf.pass", "s3cret\r\n");
    let notpem = write(dir.path(), "cert.txt", "hello");
    let errs = errors(&format!(
        "{MINIMAL}\n[relay]\nrecipients_file = {rcpts:?}\n\
         [[upstreams]]\naddress = \"a.example:25\"\nauth_user = \"u\"\nauth_password_file = {empty:?}\n\
         [tls]\ncert = {notpem:?}\nkey = {notpem:?}\n"
    ));
    let mut keys: Vec<&str> = errs.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "relay.recipients_file",
            "tls.cert",
            "tls.key",
            "upstreams[1].auth_password_file"
        ]
    );
    assert!(errs.iter().any(|(_, m)| m.contains("line 2")), "{errs:?}");

    let c = ok(&format!(
        "{MINIMAL}\n[[upstreams]]\naddress = \"a.example:25\"\nauth_user = \"u\"\nauth_password_file = {crlf:?}\n"
    ));
    assert_eq!(c.upstreams[1].auth_password.as_deref(), Some("s3cret"));
}

#[test]
fn load_reports_unreadable_file_and_records_source() {
    let err = Config::load(Path::new("/nonexistent/portcullis.toml")).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].key, "(file)");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "p.toml", MINIMAL);
    let c = Config::load(Path::new(&path)).expect("valid");
    assert_eq!(c.source.as_deref(), Some(Path::new(&path)));
}

#[test]
fn errors_display_one_per_line() {
    let e = ConfigErrors(vec![
        ConfigError::new("a.b", "is wrong"),
        ConfigError::new("(syntax)", "line 1, column 2: bad"),
    ]);
    assert_eq!(
        e.to_string(),
        "a.b: is wrong\n(syntax): line 1, column 2: bad"
    );
}

#[test]
fn warnings_for_dangerous_combinations() {
    // (snippet appended to MINIMAL, words the single warning must contain)
    let cases: &[(&str, &str)] = &[
        ("[relay]\nrelay_networks = [\"0.0.0.0/0\"]", "open relay"),
        ("[relay]\nrelay_networks = [\"::/0\"]", "open relay"),
        ("[relay]\nrelay_networks = [\"64.0.0.0/2\"]", "open relay"),
        (
            "[auth]\nusers_file = USERS\n[[listeners]]\nbind = \"127.0.0.1:1\"\ntls = \"none\"\nauth = \"optional\"",
            "unencrypted",
        ),
        (
            "[tls]\ncert = PEM\nkey = PEM\n[[listeners]]\nbind = \"0.0.0.0:25\"\nrequire_tls = true",
            "RFC 3207",
        ),
        (
            "[tls]\ncert = PEM\nkey = PEM\n[[listeners]]\nbind = \"[::]:25\"\ntls = \"implicit\"\nallow = [\"::/0\"]",
            "RFC 3207",
        ),
        (
            "[tls]\n[[listeners]]\nbind = \"127.0.0.1:1\"",
            "self-signed",
        ),
        (
            "[auth]\n[[listeners]]\nbind = \"127.0.0.1:1\"\ntls = \"none\"\nauth = \"required\"",
            "unencrypted",
        ),
        ("[queue]\nbounces = false", "bounces"),
        (
            "[[upstreams]]\naddress = \"a.example:25\"\ntls = \"opportunistic\"\nauth_user = \"u\"\nauth_password_file = PASS",
            "collect the password",
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = write(dir.path(), "c.pem", "-----BEGIN CERTIFICATE-----\n");
    let pass = write(dir.path(), "pass", "pw\n");
    let users = write(
        dir.path(),
        "users.toml",
        &format!(
            "[[users]]\nname = \"a\"\npassword_hash = \"{}\"\nsenders = [\"a@example.com\"]\n",
            argon2id_hash("pw")
        ),
    );
    for (snippet, words) in cases {
        let snippet = snippet
            .replace("PEM", &format!("{pem:?}"))
            .replace("PASS", &format!("{pass:?}"))
            .replace("USERS", &format!("{users:?}"));
        let c = ok(&format!("{MINIMAL}\n{snippet}\n"));
        let warnings = c.warnings();
        // The empty-[auth] case also (rightly) warns that nobody can authenticate; with users,
        // an AUTH listener without rate_limits.messages_per_user warns about that.
        let expected = 1 + usize::from(snippet.contains("auth = "));
        assert_eq!(warnings.len(), expected, "{snippet}: {warnings:?}");
        assert!(warnings[0].contains(words), "{snippet}: {warnings:?}");
    }
    // Every upstream bound to domains: no default route.
    let c = ok(&format!("{MINIMAL}domains = [\"example.com\"]\n"));
    assert!(
        c.warnings().iter().any(|w| w.contains("default route")),
        "{:?}",
        c.warnings()
    );
    // Port 25 requiring TLS is fine when restricted to known peers; /8 is not an open relay.
    let c = ok(&format!(
        "{MINIMAL}\n[relay]\nrelay_networks = [\"10.0.0.0/8\"]\n[tls]\ncert = {pem:?}\nkey = {pem:?}\n\
         [[listeners]]\nbind = \"0.0.0.0:25\"\nrequire_tls = true\nallow = [\"203.0.113.0/24\"]\n"
    ));
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
}

/// The field names a derived `Deserialize` asks for, captured from its `deserialize_struct`
/// call (the derive passes them all), so tests can compare `raw.rs` with the documentation.
fn field_names<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
    use serde::de::{Error as _, Visitor, value::Error};
    struct Grab<'a>(&'a mut Vec<&'static str>);
    impl<'de> serde::Deserializer<'de> for Grab<'_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            self.0.extend_from_slice(fields);
            Err(Error::custom("fields captured"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields = Vec::new();
    let _ = T::deserialize(Grab(&mut fields));
    fields
}

#[test]
fn portcullis_toml_documents_every_key_of_raw_rs() {
    use super::raw::*;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/portcullis.toml"
    ))
    .expect("read config/portcullis.toml");
    let doc: toml::Table = text.parse().expect("portcullis.toml parses");
    let mut top: Vec<&str> = doc.keys().map(String::as_str).collect();
    top.sort_unstable();
    let mut expected = field_names::<RawConfig>();
    expected.sort_unstable();
    assert_eq!(top, expected, "top-level tables");
    let sections: [(&str, Vec<&str>); 19] = [
        ("server", field_names::<RawServer>()),
        ("tls", field_names::<RawTls>()),
        ("listeners", field_names::<RawListener>()),
        ("relay", field_names::<RawRelay>()),
        ("auth", field_names::<RawAuth>()),
        ("limits", field_names::<RawLimits>()),
        ("rate_limits", field_names::<RawRateLimits>()),
        ("upstreams", field_names::<RawUpstream>()),
        ("headers", field_names::<RawHeaders>()),
        ("queue", field_names::<RawQueue>()),
        ("dns", field_names::<RawDns>()),
        ("spf", field_names::<RawSpf>()),
        ("dkim", field_names::<RawDkim>()),
        ("dmarc", field_names::<RawDmarc>()),
        ("dnsbl", field_names::<RawDnsbl>()),
        ("doctor", field_names::<RawDoctor>()),
        ("admin", field_names::<RawAdmin>()),
        ("alerts", field_names::<RawAlerts>()),
        ("log", field_names::<RawLog>()),
    ];
    let nested: [(&str, &str, Vec<&str>); 2] = [
        ("dkim", "sign", field_names::<RawDkimSign>()),
        ("dnsbl", "zones", field_names::<RawDnsblZone>()),
    ];
    for (section, inner, fields) in nested {
        let entry = doc[section][inner][0].as_table().expect("a table");
        for field in fields {
            assert!(
                entry.contains_key(field),
                "portcullis.toml does not document {section}.{inner}.{field}"
            );
        }
    }
    for (section, fields) in sections {
        assert!(!fields.is_empty(), "{section}: no fields captured");
        // For an array of tables the first entry is the one documenting every key.
        let table = match &doc[section] {
            toml::Value::Array(entries) => entries[0].as_table(),
            other => other.as_table(),
        }
        .expect("a table");
        for field in fields {
            assert!(
                table.contains_key(field),
                "portcullis.toml does not document {section}.{field}"
            );
        }
    }
}

#[test]
fn warnings_for_containment_that_can_never_trip() {
    let nothing = ok(&format!("{MINIMAL}\n[containment]\nrate_limit_hits = 3\n"))
        .warnings()
        .join("\n");
    assert!(nothing.contains("no listener allows AUTH"), "{nothing}");
    assert!(
        nothing.contains("messages_per_user is not set: it never trips"),
        "{nothing}"
    );
    let domains = ok(&format!(
        "{MINIMAL}\n[containment]\nrecipient_domains_per_hour = 50\n"
    ))
    .warnings()
    .join("\n");
    assert!(!domains.contains("never trips"), "{domains}");
    assert!(
        ok(MINIMAL)
            .warnings()
            .iter()
            .all(|w| !w.contains("containment"))
    );
    let zero = Config::from_toml(
        &format!("{MINIMAL}\n[containment]\nclient_ips_per_hour = 0\n"),
        None,
    );
    let errors = zero.expect_err("0 is refused").to_string();
    assert!(
        errors.contains("containment.client_ips_per_hour: must be at least 1"),
        "{errors}"
    );
}

#[test]
fn warnings_for_auth_without_user_budget_and_users_who_own_no_sender() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hash = argon2id_hash("pw");
    let users = write(
        dir.path(),
        "users.toml",
        &format!(
            "[[users]]\nname = \"svc\"\npassword_hash = \"{hash}\"\n\
             [[users]]\nname = \"bob@example.com\"\npassword_hash = \"{hash}\"\n\
             [[users]]\nname = \"carol\"\npassword_hash = \"{hash}\"\nsenders = [\"@example.com\"]\n"
        ),
    );
    let auth = format!(
        "{MINIMAL}\n[tls]\n[auth]\nusers_file = {users:?}\n[[listeners]]\nbind = \"127.0.0.1:1\"\n\
         auth = \"required\"\n"
    );
    let warnings = ok(&auth).warnings().join("\n");
    assert!(
        warnings.contains("messages_per_user is not set"),
        "{warnings}"
    );
    assert!(
        warnings.contains("User \"svc\" has no senders"),
        "{warnings}"
    );
    assert!(!warnings.contains("bob@example.com"), "{warnings}");
    assert!(!warnings.contains("carol"), "{warnings}");
    let limited = ok(&format!(
        "{auth}[rate_limits]\nmessages_per_user = \"100/hour\"\n"
    ))
    .warnings()
    .join("\n");
    assert!(!limited.contains("messages_per_user"), "{limited}");
    // Without an AUTH listener, neither applies.
    let off = ok(&format!("{MINIMAL}\n[auth]\nusers_file = {users:?}\n"))
        .warnings()
        .join("\n");
    assert!(
        !off.contains("messages_per_user") && !off.contains("svc"),
        "{off}"
    );
}

#[test]
fn domains_and_addresses_are_compiled_to_their_canonical_forms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rcpts = write(
        dir.path(),
        "rcpts",
        "# staff\ninfo@Bücher.example   # shop\na#b@example.com\n\"John Doe\"@example.com\n\
         @FAß.example\n\u{212A}ate@example.com\n",
    );
    let c = ok(&format!(
        "{MINIMAL}\n[relay]\naccepted_domains = [\"Bücher.Example.\", \"xn--fa-hia.example\"]\n\
         recipients_file = {rcpts:?}\n\
         [[upstreams]]\naddress = \"a.example:25\"\ndomains = [\"BÜCHER.example\"]\n"
    ));
    assert_eq!(
        c.relay.accepted_domains,
        ["xn--bcher-kva.example", "xn--fa-hia.example"]
    );
    assert_eq!(c.upstreams[1].domains, ["xn--bcher-kva.example"]);
    assert_eq!(
        c.relay.recipients.as_deref().unwrap(),
        [
            "info@xn--bcher-kva.example",
            "a#b@example.com",
            "\"John Doe\"@example.com",
            "@xn--fa-hia.example",
            "\u{212A}ate@example.com",
        ]
    );
    for (bad, why) in [
        ("xn--a.example", "internationalised"),
        ("b\u{fffd}cher.example", "internationalised"),
        ("-x.example", "hyphen"),
    ] {
        let errs = errors(&format!(
            "{MINIMAL}\n[relay]\naccepted_domains = [\"ok.example\", {bad:?}]\n"
        ));
        assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
        assert_eq!(errs[0].0, "relay.accepted_domains[1]");
        assert!(errs[0].1.contains(why), "{bad}: {}", errs[0].1);
    }
}

/// The value checks answer with a typed [`ValueError`](super::value::ValueError) whose text
/// is, word for word, what `check-config` printed before it was typed.
#[test]
fn value_errors_keep_their_check_config_text() {
    use super::compile::{check_domain, check_header_pattern, check_host_port, check_sender};
    use super::files::check_password_hash;
    use super::value::{DomainProblem, HashProblem, ValueError};
    let labels = "labels between dots of 1 to 63 letters, digits or hyphens, not starting or \
                  ending with a hyphen; at most 253 characters in all";
    let domain = |text: &str| check_domain(text).map(|_| ()).unwrap_err().to_string();
    let sender = |text: &str| check_sender(text).map(|_| ()).unwrap_err().to_string();
    let cases: Vec<(String, String)> = vec![
        (domain(""), r#""" is not a domain name (empty)"#.into()),
        (domain("."), r#""." is not a domain name (empty)"#.into()),
        (
            domain("10.0.0.1"),
            r#""10.0.0.1" is not a domain name (it is an IP address)"#.into(),
        ),
        (
            domain("a..b"),
            format!(r#""a..b" is not a domain name ({labels})"#),
        ),
        (
            domain("xn--zz.example"),
            "\"xn--zz.example\" is not a domain name (not a valid internationalised name: UTS \
             #46 refuses it; write it in U-labels, e.g. bücher.example, or as A-labels, e.g. \
             xn--bcher-kva.example)"
                .into(),
        ),
        (
            sender("alice"),
            r#""alice" is not an address (use local@domain, or @domain for a whole domain)"#
                .into(),
        ),
        (
            sender("a@[192.0.2.1]"),
            r#""a@[192.0.2.1]" has an address literal as its domain; use a domain name"#.into(),
        ),
        (
            sender("@-bad-.example"),
            format!(r#""-bad-.example" is not a domain name ({labels})"#),
        ),
        (
            sender("a b@example.com"),
            r#""a b@example.com" is not an address: address contains a control character or space"#
                .into(),
        ),
        (
            check_host_port("exchange.example").unwrap_err().to_string(),
            r#""exchange.example" is not host:port (use e.g. exchange.example.internal:25, 10.0.0.5:25, [2001:db8::5]:25)"#
                .into(),
        ),
        (
            check_header_pattern("X-*-Spam").unwrap_err().to_string(),
            r#""X-*-Spam" is not a header name pattern (e.g. "X-Spam-*": a name, optionally ending in *)"#
                .into(),
        ),
        (
            check_password_hash("$argon2i$v=19$m=19456,t=2,p=1$c29tZXNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
                .unwrap_err()
                .to_string(),
            "uses argon2i, not argon2id; make a new one with `portcullis passwd`".into(),
        ),
        (
            check_password_hash("$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzYWx0")
                .unwrap_err()
                .to_string(),
            "has no hash value".into(),
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, want);
    }
    // The class, not only the text.
    assert_eq!(
        check_domain("10.0.0.1"),
        Err(ValueError::Domain {
            text: "10.0.0.1".into(),
            problem: DomainProblem::IpAddress
        })
    );
    assert!(matches!(
        check_password_hash("plaintext"),
        Err(ValueError::PasswordHash(HashProblem::NotPhc(_)))
    ));
    let unusable = "$argon2id$v=19$m=1,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE";
    let text = check_password_hash(unusable).unwrap_err().to_string();
    assert!(
        text.starts_with("has argon2 parameters that cannot be used (")
            && text.ends_with("); make a new one with `portcullis passwd`"),
        "{text}"
    );
}

#[test]
fn negative_size_is_refused_with_its_value() {
    let text = format!("{MINIMAL}\n[limits]\nmax_message_size = -1\n");
    assert_eq!(
        errors(&text),
        [(
            "limits.max_message_size".to_owned(),
            "-1 is negative".to_owned()
        )]
    );
}

/// Makes a DKIM key in `dir` with openssl: `kind` is `ed25519` or an RSA size in bits.
fn dkim_key(dir: &Path, name: &str, kind: &str) -> String {
    let path = dir.join(name);
    let mut args = vec!["genpkey", "-out", path.to_str().expect("utf-8 path")];
    let bits = format!("rsa_keygen_bits:{kind}");
    if kind == "ed25519" {
        args.extend(["-algorithm", "ed25519"]);
    } else {
        args.extend(["-algorithm", "RSA", "-pkeyopt", &bits]);
    }
    let status = std::process::Command::new("openssl")
        .args(&args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    path.display().to_string()
}

#[test]
fn mail_auth_sections_default_to_off() {
    let c = ok(MINIMAL);
    assert_eq!(c.dns.nameservers, []);
    assert_eq!(c.dns.timeout, Duration::from_secs(5));
    assert_eq!(c.spf.verify, Verify::Off);
    assert!(!c.dkim.verify && c.dkim.sign.is_empty());
    assert_eq!(c.dmarc.verify, Verify::Off);
    assert_eq!(
        c.dmarc.quarantine_header,
        QuarantineHeader {
            name: "X-Portcullis-Quarantine".into(),
            value: "dmarc".into()
        }
    );
    assert!(!c.dmarc.own_domains_reject);
    assert_eq!((c.dnsbl.threshold, c.dnsbl.zones.len()), (1, 0));
    assert!(c.dnsbl.exempt.is_empty() && c.doctor.egress.is_empty());
    assert!(!c.upstreams[0].sign);
    // DMARC off: the quarantine field is not added to the untrusted strip list.
    assert_eq!(c.headers.strip_untrusted.len(), 4);
    let summary = c.summary();
    for needle in ["spf: off", "dmarc: off", "dnsbl: off", "no keys"] {
        assert!(summary.contains(needle), "{needle:?}:\n{summary}");
    }
}

#[test]
fn mail_auth_sections_parse_every_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ed = dkim_key(dir.path(), "ed.pem", "ed25519");
    let c = ok(&format!(
        r#"{MINIMAL}sign = true
[dns]
nameservers = ["127.0.0.1", "127.0.0.2:5353", "::1", "[::1]:5300", "[2001:db8::53]"]
timeout = "2s"
[spf]
verify = "enforce"
[dkim]
verify = "record"
[[dkim.sign]]
domain = "Bücher.Example."
selector = "S2026"
key = {ed:?}
[[dkim.sign]]
domain = "example.com"
selector = "ed"
key = {ed:?}
headers = ["from", "Subject"]
[dmarc]
verify = "enforce"
quarantine_header = "X-Spam-Flag:  YES"
own_domains = "reject"
[dnsbl]
threshold = 2
exempt = ["192.0.2.0/24"]
[[dnsbl.zones]]
zone = "Zen.Spamhaus.ORG."
[[dnsbl.zones]]
zone = "key123.zen.dq.spamhaus.net"
name = "zen.spamhaus.org (DQS)"
weight = 3
answers = ["127.0.0.2", "127.0.0.4"]
[doctor]
egress = ["198.51.100.7", "2001:db8::7"]
"#
    ));
    let servers: Vec<String> = c.dns.nameservers.iter().map(ToString::to_string).collect();
    assert_eq!(
        servers,
        [
            "127.0.0.1:53",
            "127.0.0.2:5353",
            "[::1]:53",
            "[::1]:5300",
            "[2001:db8::53]:53"
        ]
    );
    assert_eq!(c.dns.timeout, Duration::from_secs(2));
    assert_eq!(c.spf.verify, Verify::Enforce);
    assert!(c.dkim.verify);
    let signs: Vec<(&str, &str)> = c
        .dkim
        .sign
        .iter()
        .map(|s| (s.domain.as_str(), s.selector.as_str()))
        .collect();
    assert_eq!(
        signs,
        [("xn--bcher-kva.example", "s2026"), ("example.com", "ed")]
    );
    assert_eq!(c.dkim.sign[0].headers, DEFAULT_DKIM_HEADERS);
    assert_eq!(c.dkim.sign[1].headers, ["from", "Subject"]);
    assert_eq!(
        c.dkim.sign[0].key.algorithm(),
        crate::dns::keys::KeyAlgorithm::Ed25519
    );
    assert_eq!(c.dkim.sign[0].key_path, Path::new(&ed));
    assert_eq!(c.dmarc.verify, Verify::Enforce);
    assert_eq!(
        c.dmarc.quarantine_header,
        QuarantineHeader {
            name: "X-Spam-Flag".into(),
            value: "YES".into()
        }
    );
    assert!(c.dmarc.own_domains_reject);
    // DMARC on: the quarantine field arriving from strangers is removed.
    assert_eq!(
        c.headers.strip_untrusted.last().map(String::as_str),
        Some("X-Spam-Flag")
    );
    assert_eq!(c.dnsbl.threshold, 2);
    assert_eq!(c.dnsbl.exempt, ["192.0.2.0/24".parse::<IpNet>().unwrap()]);
    assert_eq!(
        c.dnsbl.zones,
        [
            DnsblZone {
                zone: "zen.spamhaus.org".into(),
                name: "zen.spamhaus.org".into(),
                weight: 1,
                answers: None,
            },
            DnsblZone {
                zone: "key123.zen.dq.spamhaus.net".into(),
                name: "zen.spamhaus.org (DQS)".into(),
                weight: 3,
                answers: Some(vec![
                    "127.0.0.2".parse().unwrap(),
                    "127.0.0.4".parse().unwrap()
                ]),
            },
        ]
    );
    let egress: Vec<String> = c.doctor.egress.iter().map(ToString::to_string).collect();
    assert_eq!(egress, ["198.51.100.7", "2001:db8::7"]);
    assert!(c.upstreams[0].sign);
    let summary = c.summary();
    for needle in [
        "resolver: 127.0.0.1:53, 127.0.0.2:5353",
        "spf: enforce (fail: 550 5.7.23",
        "dkim verification: record",
        "adds \"X-Spam-Flag: YES\"",
        "judged as p=reject",
        "zen.spamhaus.org (weight 1, any 127.0.0.0/8 answer)",
        "\"zen.spamhaus.org (DQS)\" (zone not shown",
        "at weight 2 or more; exempt 192.0.2.0/24",
        "xn--bcher-kva.example selector s2026: ed25519-sha256",
        "signed when routed to: upstream0",
        "DKIM-signs",
        "doctor egress addresses: 198.51.100.7, 2001:db8::7",
    ] {
        assert!(summary.contains(needle), "{needle:?}:\n{summary}");
    }
    // The access key in a zone's name is never printed.
    assert!(!summary.contains("key123"), "{summary}");
}

#[test]
fn mail_auth_value_errors_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ed = dkim_key(dir.path(), "ed.pem", "ed25519");
    let rsa1024 = dkim_key(dir.path(), "rsa1024.pem", "1024");
    let notkey = write(dir.path(), "notkey.pem", "hello\n");
    // (snippet appended to MINIMAL, expected key of the single error)
    let cases: &[(&str, &str)] = &[
        (
            "[dns]\nnameservers = [\"dns.example\"]",
            "dns.nameservers[0]",
        ),
        (
            "[dns]\nnameservers = [\"1.2.3.4\", \"127.0.0.1:0\"]",
            "dns.nameservers[1]",
        ),
        (
            "[dns]\nnameservers = [\"[127.0.0.1]\"]",
            "dns.nameservers[0]",
        ),
        ("[dns]\nnameservers = [\"::1:53:x\"]", "dns.nameservers[0]"),
        ("[dns]\ntimeout = \"0s\"", "dns.timeout"),
        ("[dns]\ntimeout = \"61s\"", "dns.timeout"),
        ("[dns]\ntimeout = \"soon\"", "dns.timeout"),
        ("[dns]\nresolver = \"x\"", "dns.resolver"),
        ("[spf]\nverify = \"on\"", "spf.verify"),
        ("[dkim]\nverify = \"enforce\"", "dkim.verify"),
        ("[dkim]\nsign = 5", "dkim.sign"),
        (
            "[[dkim.sign]]\nselector = \"s\"\nkey = ED",
            "dkim.sign[0].domain",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nkey = ED",
            "dkim.sign[0].selector",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"",
            "dkim.sign[0].key",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a..example\"\nselector = \"s\"\nkey = ED",
            "dkim.sign[0].domain",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s 1\"\nkey = ED",
            "dkim.sign[0].selector",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"\nkey = RSA1024",
            "dkim.sign[0].key",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"\nkey = NOTKEY",
            "dkim.sign[0].key",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"\nkey = \"/nonexistent/k.pem\"",
            "dkim.sign[0].key",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"\nkey = ED\nheaders = [\"To\", \"Subject\"]",
            "dkim.sign[0].headers",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"\nkey = ED\nheaders = [\"From\", \"Bad Name\"]",
            "dkim.sign[0].headers[1]",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"\nkey = ED\nhedaers = []",
            "dkim.sign[0].hedaers",
        ),
        (
            "[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"\nkey = ED\n[[dkim.sign]]\ndomain = \"A.example\"\nselector = \"S\"\nkey = ED",
            "dkim.sign[1].selector",
        ),
        ("[dmarc]\nverify = \"quarantine\"", "dmarc.verify"),
        ("[dmarc]\nown_domains = \"quarantine\"", "dmarc.own_domains"),
        (
            "[dmarc]\nquarantine_header = \"X-Quarantine\"",
            "dmarc.quarantine_header",
        ),
        (
            "[dmarc]\nquarantine_header = \"X Quarantine: yes\"",
            "dmarc.quarantine_header",
        ),
        (
            "[dmarc]\nquarantine_header = \"X-Quarantine:\"",
            "dmarc.quarantine_header",
        ),
        (
            "[dmarc]\nquarantine_header = \"X-Quarantine: yes\\r\\nBcc: x@example.com\"",
            "dmarc.quarantine_header",
        ),
        (
            "[dmarc]\nquarantine_header = \"Subject: [SPAM]\"",
            "dmarc.quarantine_header",
        ),
        (
            "[dmarc]\nquarantine_header = \"X-Q*: yes\"",
            "dmarc.quarantine_header",
        ),
        ("[dnsbl]\nthreshold = 0", "dnsbl.threshold"),
        ("[dnsbl]\nexempt = [\"nope\"]", "dnsbl.exempt[0]"),
        ("[[dnsbl.zones]]\nname = \"x\"", "dnsbl.zones[0].zone"),
        (
            "[[dnsbl.zones]]\nzone = \"not a zone\"",
            "dnsbl.zones[0].zone",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"192.0.2.1\"",
            "dnsbl.zones[0].zone",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\nweight = 0",
            "dnsbl.zones[0].weight",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\nname = \"\"",
            "dnsbl.zones[0].name",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\nname = \"a\\r\\n250 ok\"",
            "dnsbl.zones[0].name",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\nanswers = []",
            "dnsbl.zones[0].answers",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\nanswers = [\"127.0.0.2\", \"10.0.0.2\"]",
            "dnsbl.zones[0].answers[1]",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\nanswers = [\"::1\"]",
            "dnsbl.zones[0].answers[0]",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\nanswers = [\"127.255.255.254\"]",
            "dnsbl.zones[0].answers[0]",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\n[[dnsbl.zones]]\nzone = \"A.example.\"",
            "dnsbl.zones[1].zone",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"a.example\"\nlist = \"x\"",
            "dnsbl.zones[0].list",
        ),
        ("[doctor]\negress = [\"mx.example\"]", "doctor.egress[0]"),
        (
            "[[upstreams]]\naddress = \"a.example:25\"\nsign = \"yes\"",
            "upstreams[1].sign",
        ),
    ];
    for (snippet, key) in cases {
        let snippet = snippet
            .replace("RSA1024", &format!("{rsa1024:?}"))
            .replace("NOTKEY", &format!("{notkey:?}"))
            .replace("ED", &format!("{ed:?}"));
        let text = format!("{MINIMAL}\n{snippet}\n");
        assert_eq!(keys(&text), [*key], "for snippet:\n{snippet}");
    }
    // The messages say what is wrong.
    let rsa = errors(&format!(
        "{MINIMAL}\n[[dkim.sign]]\ndomain = \"a.example\"\nselector = \"s\"\nkey = {rsa1024:?}\n"
    ));
    assert!(
        rsa[0].1.contains("1024 bits") && rsa[0].1.contains("2048"),
        "{rsa:?}"
    );
    let refusal = errors(&format!(
        "{MINIMAL}\n[[dnsbl.zones]]\nzone = \"a.example\"\nanswers = [\"127.255.255.254\"]\n"
    ));
    assert!(refusal[0].1.contains("refuse our queries"), "{refusal:?}");
}

#[test]
fn errors_in_several_dkim_and_dnsbl_entries_are_all_reported() {
    let text = format!(
        "{MINIMAL}\n[dkim]\nverify = \"maybe\"\n[[dkim.sign]]\ndomain = 5\n[[dkim.sign]]\n\
         domain = \"b.example\"\n[dnsbl]\nthreshold = 0\n[[dnsbl.zones]]\nzone = \"-x\"\n\
         [[dnsbl.zones]]\nzone = \"ok.example\"\nweight = -1\n"
    );
    assert_eq!(
        keys(&text),
        [
            "dkim.sign[0].domain",
            "dkim.sign[0].key",
            "dkim.sign[0].selector",
            "dkim.sign[1].key",
            "dkim.sign[1].selector",
            "dkim.verify",
            "dnsbl.threshold",
            "dnsbl.zones[0].zone",
            "dnsbl.zones[1].weight",
        ]
    );
}

#[test]
fn warnings_for_mail_auth_combinations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ed = dkim_key(dir.path(), "ed.pem", "ed25519");
    let dns = "[dns]\nnameservers = [\"127.0.0.1\"]\n";
    let sign = format!("[[dkim.sign]]\ndomain = \"example.com\"\nselector = \"s\"\nkey = {ed:?}\n");
    // (text appended to MINIMAL, words the single warning must contain)
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{dns}[spf]\nverify = \"enforce\""),
            "RFC 7489 section 10.1",
        ),
        ("sign = true".to_owned(), "no [[dkim.sign]]"),
        (sign.clone(), "no [[upstreams]] has sign = true"),
        ("[spf]\nverify = \"record\"".to_owned(), "system resolver"),
        (
            "[dmarc]\nverify = \"record\"".to_owned(),
            "SPF, DKIM, DMARC use the system resolver",
        ),
        (
            "[[dnsbl.zones]]\nzone = \"bl.example\"".to_owned(),
            "DNSBL uses the system resolver",
        ),
        (
            format!(
                "{dns}[dnsbl]\nthreshold = 3\n[[dnsbl.zones]]\nzone = \"bl.example\"\nweight = 2"
            ),
            "no client is ever refused",
        ),
        ("[dmarc]\nown_domains = \"reject\"".to_owned(), "no effect"),
    ];
    for (snippet, words) in &cases {
        let c = ok(&format!("{MINIMAL}{snippet}\n"));
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{snippet}: {warnings:?}");
        assert!(warnings[0].contains(words), "{snippet}: {warnings:?}");
    }
    // Everything on, with our own resolver and a signing upstream: no warning.
    let c = ok(&format!(
        "{MINIMAL}sign = true\n{dns}{sign}[spf]\nverify = \"record\"\n[dkim]\nverify = \"record\"\n\
         [dmarc]\nverify = \"enforce\"\nown_domains = \"reject\"\n[[dnsbl.zones]]\nzone = \"bl.example\"\n"
    ));
    assert!(c.warnings().is_empty(), "{:?}", c.warnings());
}

#[test]
fn a_dkim_key_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let ed = dkim_key(dir.path(), "ed.pem", "ed25519");
    let policy = format!(
        "{MINIMAL}sign = true\n[[dkim.sign]]\ndomain = \"example.com\"\nselector = \"s\"\nkey = {ed:?}\n"
    );
    let c = ok(&policy);
    assert_eq!(perms::secret_file_warnings(&c), Vec::<String>::new());
    std::fs::set_permissions(&ed, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let warnings = perms::secret_file_warnings(&ok(&policy));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("dkim.sign[0].key ") && warnings[0].contains("every user"),
        "{warnings:?}"
    );
}

#[test]
fn an_admin_token_file_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "admin.token", "t0ken\n");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let policy = format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:9025\"\ntoken_file = {file:?}\n");
    assert_eq!(
        perms::secret_file_warnings(&ok(&policy)),
        Vec::<String>::new()
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let warnings = perms::secret_file_warnings(&ok(&policy));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("admin.token_file ") && warnings[0].contains("every user"),
        "{warnings:?}"
    );
}

#[test]
fn the_quarantine_field_is_stripped_from_untrusted_mail_while_dmarc_runs() {
    // (snippet, whether the default quarantine field is among the untrusted strip names, count)
    let cases = [
        ("[dmarc]\nverify = \"off\"", false, 4),
        ("[dmarc]\nverify = \"record\"", true, 5),
        ("[dmarc]\nverify = \"enforce\"", true, 5),
        // Already listed (in any case): not added twice.
        (
            "[dmarc]\nverify = \"enforce\"\n[headers]\nstrip_untrusted = [\"x-portcullis-QUARANTINE\"]",
            true,
            1,
        ),
    ];
    for (snippet, stripped, count) in cases {
        let c = ok(&format!(
            "{MINIMAL}\n[dns]\nnameservers = [\"127.0.0.1\"]\n{snippet}\n"
        ));
        let names = &c.headers.strip_untrusted;
        assert_eq!(
            names
                .iter()
                .any(|n| n.eq_ignore_ascii_case("X-Portcullis-Quarantine")),
            stripped,
            "{snippet}: {names:?}"
        );
        assert_eq!(names.len(), count, "{snippet}: {names:?}");
    }
}

#[test]
fn selector_message_is_one_sentence_without_a_run_of_spaces() {
    let text = super::value::ValueError::Selector {
        text: "s 1".to_owned(),
    }
    .to_string();
    assert!(
        text.contains("hyphens or underscores separated by dots"),
        "{text}"
    );
    assert!(!text.contains("  "), "{text}");
}

#[test]
fn admin_alerts_and_log_errors_name_their_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = write(dir.path(), "empty.token", " \n\t\n");
    let missing = dir.path().join("missing.token").display().to_string();
    let cases: Vec<(String, &str, String)> = vec![
        (
            "[admin]\nbind = \"0.0.0.0:9025\"".into(),
            "admin.token_file",
            "is required when admin.bind (0.0.0.0:9025) is not a loopback address: the status \
             and the queue would be open to the network"
                .into(),
        ),
        (
            format!("[admin]\nbind = \"127.0.0.1:9025\"\ntoken_file = {empty:?}"),
            "admin.token_file",
            format!("{empty} is empty"),
        ),
        (
            "[admin]\nbind = \"localhost:9025\"".into(),
            "admin.bind",
            "\"localhost:9025\" is not an IP:PORT socket address".into(),
        ),
        (
            "[admin]\n".into(),
            "admin.bind",
            "is required in [admin] (e.g. \"127.0.0.1:9025\")".into(),
        ),
        (
            "[alerts]\nwebhook = \"ftp://hooks.example/x\"".into(),
            "alerts.webhook",
            "\"ftp://hooks.example/x\" is not an http:// or https:// URL".into(),
        ),
        (
            "[alerts]\nwebhook = \"http:///path\"".into(),
            "alerts.webhook",
            "\"http:///path\" is not an http:// or https:// URL".into(),
        ),
        (
            "[alerts]\nwebhook = \"/just/a/path\"".into(),
            "alerts.webhook",
            "\"/just/a/path\" is not an http:// or https:// URL".into(),
        ),
        (
            "[alerts]\nqueue_depth = 0".into(),
            "alerts.queue_depth",
            String::new(),
        ),
        (
            "[log]\nformat = \"xml\"".into(),
            "log.format",
            String::new(),
        ),
        (
            "[log]\njournal_max_size = 0".into(),
            "log.journal_max_size",
            "must be greater than zero".into(),
        ),
    ];
    for (snippet, key, message) in cases {
        let errors = errors(&format!("{MINIMAL}\n{snippet}\n"));
        assert_eq!(errors.len(), 1, "{snippet}: {errors:?}");
        assert_eq!(errors[0].0, key, "{snippet}: {errors:?}");
        if !message.is_empty() {
            assert_eq!(errors[0].1, message, "{snippet}");
        }
    }
    // An unreadable token file: one error on its key, naming the file.
    let errors = errors(&format!(
        "{MINIMAL}\n[admin]\nbind = \"127.0.0.1:9025\"\ntoken_file = {missing:?}\n"
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "admin.token_file");
    assert!(errors[0].1.contains(&missing), "{errors:?}");
}

#[test]
fn webhook_urls_with_a_bad_port_no_host_or_a_fragment_are_refused() {
    let refused = [
        "http://user:pw@127.0.0.1:notaport/hook",
        "http://127.0.0.1:80800/hook",
        "http://127.0.0.1:8o80/hook",
        "http://127.0.0.1:/hook",
        "http://127.0.0.1:0/hook",
        "http://127.0.0.1:+80/hook",
        "http://[::1]:x/hook",
        "http://[::1]x/hook",
        "http://[zz::1]/hook",
        "http://user:pw@/hook",
        "http://ho$t.example/hook",
        "http://ho%41st.example/hook",
        "http://-host.example/hook",
        "http://host..example/hook",
        "https://hooks.example/hook#frag",
        "https://hooks.example#",
    ];
    for url in refused {
        let errors = errors(&format!("{MINIMAL}\n[alerts]\nwebhook = {url:?}\n"));
        assert_eq!(errors.len(), 1, "{url}: {errors:?}");
        assert_eq!(errors[0].0, "alerts.webhook", "{url}");
    }
    let accepted = [
        "http://127.0.0.1:8080/hook",
        "https://user:p%40ss@hooks.example:65535/p?q=1",
        "http://[::1]:9/",
        "https://hooks.example",
    ];
    for url in accepted {
        let c = ok(&format!("{MINIMAL}\n[alerts]\nwebhook = {url:?}\n"));
        assert_eq!(c.alerts.webhook.as_deref(), Some(url));
    }
}

#[test]
fn webhook_credentials_are_masked_in_errors() {
    let cases = [
        (
            "htps://user:hunter2pw@hooks.example/x",
            "\"htps://user:***@hooks.example/x\" is not an http:// or https:// URL",
        ),
        (
            "http://user:hunter2pw@127.0.0.1:notaport/hook",
            "\"http://user:***@127.0.0.1:notaport/hook\" is not an http:// or https:// URL \
             (its port is not a number in 1..=65535)",
        ),
        (
            "https://hunter2pw@hooks.example/x#f",
            "\"https://***@hooks.example/x#f\" is not an http:// or https:// URL \
             (it has a #fragment)",
        ),
        (
            "user:hunter2pw@hooks.example/x",
            "\"user:***@hooks.example/x\" is not an http:// or https:// URL",
        ),
        (
            "http://a:b@c:hunter2pw@/x",
            "\"http://a:***@/x\" is not an http:// or https:// URL",
        ),
    ];
    for (url, message) in cases {
        let text = format!("{MINIMAL}\n[alerts]\nwebhook = {url:?}\n");
        let errors = errors(&text);
        assert_eq!(errors.len(), 1, "{url}: {errors:?}");
        assert_eq!(errors[0].1, message, "{url}");
        // The whole report, as check-config prints it and a refused reload logs it.
        let report = Config::from_toml(&text, None)
            .expect_err("refused")
            .to_string();
        assert!(!report.contains("hunter2pw"), "{report}");
    }
}

#[test]
fn admin_token_is_read_trimmed_and_never_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "admin.token", "  s3cret-token \n");
    let c = ok(&format!(
        "{MINIMAL}\n[admin]\nbind = \"192.0.2.1:9025\"\ntoken_file = {file:?}\n"
    ));
    let admin = c.admin.as_ref().expect("[admin] compiled");
    assert_eq!(admin.token.as_deref(), Some("s3cret-token"));
    assert_eq!(admin.bind, "192.0.2.1:9025".parse().unwrap());
    assert!(!format!("{admin:?}").contains("s3cret"));
    assert!(!c.summary().contains("s3cret"));
}

#[test]
fn check_config_summarises_admin_alerts_and_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "admin.token", "t\n");
    let c = ok(&format!(
        "{MINIMAL}\n[admin]\nbind = \"127.0.0.1:9025\"\ntoken_file = {file:?}\n\
         [alerts]\nno_delivery = \"5m\"\nqueue_depth = 100\n\
         webhook = \"https://user:pw@hooks.example:8443/p?q=1\"\n\
         [log]\nformat = \"json\"\njournal_keep = \"3d\"\njournal_max_size = \"2GiB\"\n"
    ));
    let summary = c.summary();
    let tail: Vec<&str> = summary.lines().rev().take(3).collect();
    assert_eq!(
        tail,
        [
            "log: format json; journal kept 3d, at most 2GiB",
            "alerts: no_delivery after 5m, queue_depth at 100; webhook to hooks.example:8443",
            &format!(
                "admin: http://127.0.0.1:9025 (/metrics /healthz /readyz / /api/status), \
                 token from {file}"
            ),
        ]
    );
    assert!(!summary.contains("pw@"), "{summary}");
    let plain = ok(MINIMAL).summary();
    let tail: Vec<&str> = plain.lines().rev().take(3).collect();
    assert_eq!(
        tail,
        [
            "log: format text; journal kept 7d, at most 1GiB",
            "alerts: none; no webhook",
            "admin: not configured",
        ]
    );
}

/// `Log::default()` (what the journal benchmark starts from) writes the defaults out a second
/// time, beside the strings the compiler applies: they must agree.
#[test]
fn log_default_is_what_an_absent_log_section_compiles_to() {
    assert_eq!(ok(MINIMAL).log, Log::default());
}

#[test]
fn trusted_proxies_compile_report_and_warn() {
    let c = ok(&MINIMAL.replace(
        "tls = \"none\"",
        "tls = \"none\"\ntrusted_proxies = [\"10.0.0.5\", \"2001:db8::7/127\"]",
    ));
    let nets: Vec<String> = (c.listeners[0].trusted_proxies.iter())
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.5/32", "2001:db8::6/127"]);
    assert!(
        c.summary().lines().any(|l| l
            == "    trusted proxies (PROXY v1/v2 header required, its client used by every rule): \
                10.0.0.5/32, 2001:db8::6/127"),
        "{}",
        c.summary()
    );
    assert!(ok(MINIMAL).listeners[0].trusted_proxies.is_empty());
    assert!(!ok(MINIMAL).summary().contains("trusted proxies"));
    let bad = MINIMAL.replace(
        "tls = \"none\"",
        "tls = \"none\"\ntrusted_proxies = [\"10.0.0.5\", \"haproxy\"]",
    );
    assert_eq!(keys(&bad), ["listeners[0].trusted_proxies[1]"]);
    let wide = MINIMAL.replace(
        "tls = \"none\"",
        "tls = \"none\"\ntrusted_proxies = [\"0.0.0.0/0\"]",
    );
    let warnings = ok(&wide).warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("can claim any client address"),
        "{warnings:?}"
    );
    // A load balancer inside relay_networks: its own sessions could relay.
    let relaying = format!(
        "{}\n[relay]\nrelay_networks = [\"10.0.0.0/24\"]\n",
        MINIMAL.replace(
            "tls = \"none\"",
            "tls = \"none\"\ntrusted_proxies = [\"10.0.0.5\"]",
        )
    );
    let warnings = ok(&relaying).warnings().join("\n");
    assert!(
        warnings.contains("keep the load balancers out of relay_networks"),
        "{warnings}"
    );
}

#[test]
fn cluster_keys_are_checked_and_the_password_never_shown() {
    let plain = ok(MINIMAL);
    assert_eq!(plain.cluster.redis, None);
    assert_eq!(plain.cluster.node, plain.server.hostname);
    assert_eq!(plain.cluster.on_error, crate::config::OnError::Local);
    assert_eq!(plain.cluster.timeout, Duration::from_millis(250));
    assert!(
        plain.summary().contains("cluster: node "),
        "{}",
        plain.summary()
    );

    let c = ok(&format!(
        "{MINIMAL}\n[cluster]\nredis = \"redis://relay:s3cret@127.0.0.1:6379/1\"\nnode = \"edge-1\"\n\
         on_error = \"tempfail\"\ntimeout = \"100ms\"\n"
    ));
    assert_eq!(c.cluster.node, "edge-1");
    assert_eq!(c.cluster.on_error, crate::config::OnError::Tempfail);
    assert_eq!(c.cluster.timeout, Duration::from_millis(100));
    let summary = c.summary();
    assert!(!summary.contains("s3cret"), "{summary}");
    assert!(
        summary.contains("shared store redis://relay:***@127.0.0.1:6379/1"),
        "{summary}"
    );
    assert!(!format!("{c:?}").contains("s3cret"));
    let warnings = c.warnings().join("\n");
    assert!(
        warnings.contains("a Redis outage stops all mail"),
        "{warnings}"
    );
    assert!(!warnings.contains("[cluster] node is"), "{warnings}");
    let unnamed = ok(&format!(
        "{MINIMAL}\n[cluster]\nredis = \"redis://127.0.0.1:6379/0\"\n"
    ));
    let warnings = unnamed.warnings().join("\n");
    assert!(
        warnings.contains("give each node its own [cluster] node"),
        "{warnings}"
    );
    assert!(!plain.warnings().join("\n").contains("[cluster]"));

    let bad = errors(&format!(
        "{MINIMAL}\n[cluster]\nredis = \"rediss://u:s3cret@127.0.0.1/0\"\nnode = \"edge 1\"\n\
         on_error = \"ignore\"\ntimeout = \"1ms\"\n"
    ));
    let keys: Vec<&str> = bad.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "cluster.redis",
            "cluster.node",
            "cluster.on_error",
            "cluster.timeout"
        ],
        "{bad:?}"
    );
    assert!(bad.iter().all(|(_, m)| !m.contains("s3cret")), "{bad:?}");
    let unknown = errors(&format!("{MINIMAL}\n[cluster]\nredis_url = \"x\"\n"));
    assert_eq!(unknown[0].0, "cluster.redis_url", "{unknown:?}");
}

#[test]
fn a_file_the_policy_names_that_never_ends_is_an_error_not_a_hang() {
    let endless = errors(&format!(
        "{MINIMAL}\n[auth]\nusers_file = \"/dev/zero\"\n\n[relay]\nrecipients_file = \"/dev/zero\"\n"
    ));
    let keys: Vec<&str> = endless.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["relay.recipients_file", "auth.users_file"],
        "{endless:?}"
    );
    assert!(
        endless
            .iter()
            .all(|(_, m)| m == "cannot read /dev/zero: larger than 64MiB"),
        "{endless:?}"
    );
    let policy = Config::load(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(policy.contains("larger than 64MiB"), "{policy}");
    let pem = errors(&format!(
        "{MINIMAL}\n[tls]\ncert = \"/dev/zero\"\nkey = \"/dev/zero\"\n"
    ));
    let keys: Vec<&str> = pem.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["tls.cert", "tls.key"], "{pem:?}");
    // A FIFO nobody writes to: an error at once, not a wait forever.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("users.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path in our own temporary directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let started = std::time::Instant::now();
    let stuck = errors(&format!("{MINIMAL}\n[auth]\nusers_file = {fifo:?}\n"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(stuck[0].0, "auth.users_file", "{stuck:?}");
    assert!(stuck[0].1.ends_with("a FIFO nobody writes to"), "{stuck:?}");
}
