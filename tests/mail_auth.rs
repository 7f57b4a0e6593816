//! Mail authentication and reputation against the real binary on loopback: SPF, DKIM
//! (verification and signing), DMARC, ARC, iprev, DNSBL, our `Authentication-Results:`,
//! `portcullis doctor` and `check-config`.
//!
//! Every DNS answer comes from a real `nsd` on 127.0.0.1 serving the zones below (or from a
//! server that never answers), and the independent DKIM/ARC implementation is Debian's dkimpy
//! (tests/dkim_tool.py), which looks its keys up in the same `nsd`. The upstream is the test
//! sink. Each test asserts the exact reply, what reached the sink and, for refused mail, that
//! the spool stays empty; "nothing was delivered" is proved by a later honest message being the
//! only one the sink has, never by waiting.
//!
//! Client addresses (every 127/8 address works on Linux loopback):
//! - 127.0.0.2: a stranger listed nowhere (its PTR in the zone below is never asked: the
//!   resolver answers reverse lookups of 127/8 itself, as localhost);
//! - 127.0.0.3: in `relay_networks` (and listed in the DNSBL, which must not matter);
//! - 127.0.0.9: a stranger listed in the DNSBL zone `bl.test`;
//! - 127.0.0.10: answered 127.255.255.254 by `bl.test` (the list refuses our queries);
//! - 127.0.0.11: listed, but in `[dnsbl] exempt`.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::dns::*;
use common::sink::{Sink, SinkConfig};
use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// `[server] authserv_id` of every relay here.
const AUTHSERV_ID: &str = "mx.portcullis.test";

/// The keys published in the zones, made once per test process.
struct Keys {
    /// `rsa._domainkey.good.test`, PKCS#1 (as OpenDKIM makes them).
    rsa: DkimKey,
    /// `ed._domainkey.good.test`, PKCS#8.
    ed: DkimKey,
    /// `arc._domainkey.list.test`, the forwarder's; also the key `stale._domainkey.good.test`
    /// does NOT publish (a stale key for `doctor`).
    other: DkimKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa: DkimKey::rsa(2048),
        ed: DkimKey::ed25519(),
        other: DkimKey::rsa(2048),
    })
}

/// The zone `test` (every sender domain, the DNSBL `bl.test`) and the reverse zone of 127/8's
/// first /24.
fn zones() -> Vec<Zone> {
    let k = keys();
    let huge: String = (1..=60).map(|i| format!("a:h{i:02}.huge.test ")).collect();
    let many: String = (1..=11)
        .map(|i| format!("include:i{i}.many.test "))
        .collect();
    let split: String = (1..=40).map(|i| format!("ip4:192.0.2.{i} ")).collect();
    let mut test = Zone::new("test")
        // good.test: SPF passes for all of loopback, two DKIM keys, p=reject.
        .record("good IN TXT \"v=spf1 ip4:127.0.0.0/8 ip4:192.0.2.7 -all\"")
        .txt("rsa._domainkey.good", &k.rsa.record())
        .txt("ed._domainkey.good", &k.ed.record())
        .txt("stale._domainkey.good", &k.rsa.record())
        .record("_dmarc.good IN TXT \"v=DMARC1; p=reject\"")
        .record("client2.good IN A 127.0.0.2")
        .record("mx.good IN A 192.0.2.7")
        // Domains whose SPF fails for loopback, one per DMARC policy.
        .record("reject IN TXT \"v=spf1 ip4:192.0.2.1 -all\"")
        .record("_dmarc.reject IN TXT \"v=DMARC1; p=reject\"")
        .record("quarantine IN TXT \"v=spf1 ip4:192.0.2.1 -all\"")
        .record("_dmarc.quarantine IN TXT \"v=DMARC1; p=quarantine\"")
        .record("relaxed IN TXT \"v=spf1 ip4:192.0.2.1 -all\"")
        .record("_dmarc.relaxed IN TXT \"v=DMARC1; p=none\"")
        .record("testing IN TXT \"v=spf1 ip4:192.0.2.1 -all\"")
        .record("_dmarc.testing IN TXT \"v=DMARC1; p=reject; t=y\"")
        // A HELO name whose SPF fails.
        .record("badhelo IN TXT \"v=spf1 -all\"")
        // The forwarder of the ARC test.
        .record("list IN TXT \"v=spf1 ip4:127.0.0.0/8 -all\"")
        .txt("arc._domainkey.list", &k.other.record())
        // Hostile SPF: a loop, more than 10 lookups (RFC 7208 §4.6.4), a huge record (over
        // 512 octets: truncated over UDP, fetched again over TCP), one split in 10-octet
        // strings.
        .record("loop IN TXT \"v=spf1 include:loop.test -all\"")
        .txt("many", &format!("v=spf1 {many}-all"))
        .txt("huge", &format!("v=spf1 {huge}-all"))
        .record(format!(
            "split IN TXT {}",
            txt_strings(&format!("v=spf1 {split}ip4:127.0.0.0/8 -all"), 10)
        ))
        // Two SPF records (RFC 7208 §4.5: permerror), the first one authorising loopback.
        .record("twice IN TXT \"v=spf1 ip4:127.0.0.0/8 -all\"")
        .record("twice IN TXT \"v=spf1 -all\"")
        // Two DMARC records (RFC 7489 §6.6.3: no policy), the first asking for reject.
        .record("_dmarc.twodmarc IN TXT \"v=DMARC1; p=reject\"")
        .record("_dmarc.twodmarc IN TXT \"v=DMARC1; p=none\"")
        // The DNSBL.
        .record("9.0.0.127.bl IN A 127.0.0.2")
        .record("9.0.0.127.bl IN TXT \"listed for testing\"")
        .record("3.0.0.127.bl IN A 127.0.0.2")
        .record("11.0.0.127.bl IN A 127.0.0.2")
        .record("10.0.0.127.bl IN A 127.255.255.254");
    for i in 1..=11 {
        test = test.record(format!("i{i}.many IN TXT \"v=spf1 -all\""));
    }
    let reverse = Zone::new("0.0.127.in-addr.arpa").record("2 IN PTR client2.good.test.");
    // Our egress address for `doctor` (only looked up, never connected to).
    let egress = Zone::new("2.0.192.in-addr.arpa").record("7 IN PTR mx.good.test.");
    vec![test, reverse, egress]
}

/// Our accepted domain (a stranger may send to it; it publishes no DMARC record).
const OURS: &str = "ours.test";

/// A relay policy: `[server]` with our authserv-id, an MX listener open to everyone, a
/// submission listener (STARTTLS, AUTH required) for alice (password `secret`, owning
/// alice@good.test), `[relay]` accepting ours.test with 127.0.0.3 as relay_networks, `[dns]` at
/// `nameserver` (1 s per query), one upstream `up` (the default route) at `upstream_port`,
/// then `extra` (more tables; `[upstreams_up]` keys via [`UP_KEYS`]).
fn policy(
    dir: &TestDir,
    nameserver: &str,
    upstream_port: u16,
    up_keys: &str,
    extra: &str,
) -> String {
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{}\"\nsenders = [\"alice@good.test\"]\n",
            secret_hash()
        ),
    );
    format!(
        "[server]\nhostname = \"relay.test\"\nauthserv_id = \"{AUTHSERV_ID}\"\n\
         spool_dir = \"{{dir}}/spool\"\n\n\
         [tls]\ncert = \"{{dir}}/certs/cert.pem\"\nkey = \"{{dir}}/certs/key.pem\"\n\n\
         {mx}\n{sub}require_tls = true\nauth = \"required\"\n\n\
         [relay]\naccepted_domains = [\"{OURS}\"]\nrelay_networks = [\"127.0.0.3/32\"]\n\n\
         [auth]\nusers_file = \"{{dir}}/users.toml\"\n\n\
         [dns]\nnameservers = [\"{nameserver}\"]\ntimeout = \"1s\"\n\n\
         [queue]\nretry = [\"1s\"]\n\n\
         [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{upstream_port}\"\ntls = \"none\"\n{up_keys}\n\
         {extra}",
        mx = listener("mx", free_port(), "none"),
        sub = listener("submission", free_port(), "starttls"),
    )
}

/// No extra keys for the upstream `up`.
const UP_KEYS: &str = "";

/// nsd with [`zones`], a fresh sink, and the relay on [`policy`] with `extra`.
struct Setup {
    nsd: Nsd,
    sink: Sink,
    relay: Relay,
}

fn setup(up_keys: &str, extra: &str) -> Setup {
    let nsd = Nsd::start(&zones());
    let sink = Sink::start(SinkConfig::default());
    let dir = TestDir::new();
    let toml = policy(&dir, &nsd.address(), sink.port(), up_keys, extra);
    let relay = Relay::start_in(dir, &toml);
    Setup { nsd, sink, relay }
}

/// Greeted on the MX listener from `ip` with `EHLO helo`.
fn client(relay: &Relay, ip: &str, helo: &str) -> SmtpClient {
    let mut c = SmtpClient::connect_from(ip, relay.port(0));
    c.expect_reply(220);
    c.expect(&format!("EHLO {helo}"), 250);
    c
}

/// A stranger (127.0.0.2, not listed).
fn stranger(relay: &Relay) -> SmtpClient {
    client(relay, "127.0.0.2", "client2.good.test")
}

/// Authenticated as alice on the submission listener, from `ip`.
fn alice(relay: &Relay, ip: &str) -> SmtpClient {
    let mut c = SmtpClient::connect_from(ip, relay.port(1));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c.starttls(&relay.cert_path());
    c.expect("EHLO client.test", 250);
    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");
    c
}

/// A message with the given `From:` line (or none) and a unique Message-ID, CRLF.
fn message(from: Option<&str>, subject: &str, body: &str) -> String {
    let from = from.map(|f| format!("From: {f}\r\n")).unwrap_or_default();
    format!(
        "{from}To: user@{OURS}\r\nSubject: {subject}\r\nDate: Tue, 01 Dec 2026 00:00:00 +0000\r\n\
         Message-ID: <{subject}.{}@good.test>\r\n\r\n{body}\r\n",
        std::process::id()
    )
}

/// Send `msg` (raw bytes, CRLF, not yet dot-stuffed) in one transaction; the final reply.
fn send(c: &mut SmtpClient, from: &str, rcpts: &[&str], msg: &[u8]) -> (u16, String) {
    c.send_message(
        from,
        rcpts,
        std::str::from_utf8(msg).expect("ASCII message"),
    )
}

/// The header section of `msg`, unfolded: `(name, value)` per field, in order.
fn header_fields(msg: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    fields
}

/// The values of every field named `name` (case-insensitive).
fn fields_named(msg: &[u8], name: &str) -> Vec<String> {
    header_fields(msg)
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect()
}

/// The `Authentication-Results:` fields in `authserv_id`'s name.
fn results_by(msg: &[u8], authserv_id: &str) -> Vec<String> {
    fields_named(msg, "Authentication-Results")
        .into_iter()
        .filter(|v| {
            let id = v.split([';', ' ', '\t']).next().unwrap_or_default();
            id.eq_ignore_ascii_case(authserv_id)
        })
        .collect()
}

/// Our one `Authentication-Results:` field (asserting there is exactly one).
#[track_caller]
fn our_results(msg: &[u8]) -> String {
    let ours = results_by(msg, AUTHSERV_ID);
    assert_eq!(
        ours.len(),
        1,
        "expected exactly one Authentication-Results in our name:\n{}",
        String::from_utf8_lossy(msg)
    );
    ours.into_iter().next().expect("one")
}

/// The resinfos of an A-R value for `method` (`"dkim"`), lower-cased: `dkim=pass header.d=…`.
fn resinfos(ar: &str, method: &str) -> Vec<String> {
    ar.split(';')
        .skip(1)
        .map(|r| r.trim().to_ascii_lowercase())
        .filter(|r| r.starts_with(&format!("{method}=")))
        .collect()
}

/// The result of `method` in an A-R value, asserting it appears once.
#[track_caller]
fn result_of(ar: &str, method: &str) -> String {
    let infos = resinfos(ar, method);
    assert_eq!(infos.len(), 1, "one {method} result expected in {ar:?}");
    let info = &infos[0][method.len() + 1..];
    info.split([' ', '(']).next().unwrap_or_default().to_owned()
}

/// No thread of the relay panicked (hostile DNS answers and messages come from strangers).
#[track_caller]
fn assert_no_panic(relay: &Relay) {
    let log = relay.log();
    assert!(!log.contains("panicked"), "the relay panicked:\n{log}");
}

/// The one message the sink got (waiting for it).
#[track_caller]
fn delivered(sink: &Sink) -> Vec<u8> {
    assert!(sink.wait_for(1, WAIT), "nothing reached the sink");
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 1, "more than one message reached the sink");
    msgs[0].data.clone()
}

/// Prove that a refused message went nowhere: an honest message (SPF and DMARC pass for
/// good.test from loopback) on the same session is the only one the sink gets, and the spool
/// held nothing else.
#[track_caller]
fn only_honest_delivered(s: &Setup, c: &mut SmtpClient) {
    let honest = message(Some("<alice@good.test>"), "honest", "Hello.");
    let reply = send(
        c,
        "alice@good.test",
        &[&format!("user@{OURS}")],
        honest.as_bytes(),
    );
    assert_reply(&reply, 250, "2.0.0");
    let got = delivered(&s.sink);
    assert!(
        contains(&got, b"Subject: honest"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(s.relay.wait_for_queue_len(0, WAIT), "spool not emptied");
}

// ---------------------------------------------------------------------------------------
// The harness on its own: nsd, the silent server, dkimpy.

#[test]
fn harness_nsd_serves_the_zones_over_udp_and_tcp() {
    let nsd = Nsd::start(&zones());
    let port = nsd.port();
    for tcp in [false, true] {
        assert_eq!(
            dig_short(port, "good.test", "TXT", tcp).trim(),
            "\"v=spf1 ip4:127.0.0.0/8 ip4:192.0.2.7 -all\""
        );
        // The DKIM key is served as several strings that join to the record.
        let dkim = dig_short(port, "rsa._domainkey.good.test", "TXT", tcp);
        let strings: Vec<&str> = dkim.trim().split("\" \"").collect();
        assert!(strings.len() >= 2, "{dkim}");
        assert_eq!(
            dkim.trim().trim_matches('"').replace("\" \"", ""),
            keys().rsa.record()
        );
        assert_eq!(
            dig_short(port, "9.0.0.127.bl.test", "A", tcp).trim(),
            "127.0.0.2"
        );
        assert_eq!(
            dig_short(port, "2.0.0.127.in-addr.arpa", "PTR", tcp).trim(),
            "client2.good.test."
        );
        assert_eq!(
            dig_short(port, "7.2.0.192.in-addr.arpa", "PTR", tcp).trim(),
            "mx.good.test."
        );
    }
    let split = dig_short(port, "split.test", "TXT", false);
    assert!(split.matches("\" \"").count() > 30, "{split}");
    assert!(dig(port, "nothing.good.test", "A").contains("status: NXDOMAIN"));
}

#[test]
fn harness_silent_dns_never_answers() {
    let silent = SilentDns::start();
    let port: u16 = silent
        .address()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let start = Instant::now();
    let out = dig(port, "good.test", "TXT");
    assert!(!out.contains("ANSWER SECTION"), "{out}");
    assert!(
        out.contains("timed out") || out.contains("no servers"),
        "{out}"
    );
    assert!(start.elapsed() >= Duration::from_millis(900));
}

#[test]
fn harness_dkimpy_signs_and_verifies_through_nsd() {
    let nsd = Nsd::start(&zones());
    let k = keys();
    let msg = message(Some("<alice@good.test>"), "harness", "Hello.");
    let signed = dkimpy_sign(
        nsd.port(),
        &k.rsa,
        "good.test",
        "rsa",
        "rsa-sha256",
        msg.as_bytes(),
    );
    let signed = dkimpy_sign(
        nsd.port(),
        &k.ed,
        "good.test",
        "ed",
        "ed25519-sha256",
        &signed,
    );
    let results = dkimpy_verify(nsd.port(), &signed);
    let expected = |s: &str, a: &str, ok| ("good.test".to_owned(), s.to_owned(), a.to_owned(), ok);
    assert_eq!(
        results,
        [
            expected("ed", "ed25519-sha256", true),
            expected("rsa", "rsa-sha256", true)
        ]
    );
    let tampered = String::from_utf8(signed)
        .unwrap()
        .replace("Hello.", "Hellx.");
    let results = dkimpy_verify(nsd.port(), tampered.as_bytes());
    assert!(results.iter().all(|r| !r.3), "{results:?}");
    // A key published nowhere does not verify.
    let stray = dkimpy_sign(
        nsd.port(),
        &k.other,
        "good.test",
        "rsa",
        "rsa-sha256",
        msg.as_bytes(),
    );
    assert!(!dkimpy_verify(nsd.port(), &stray)[0].3);
}

// ---------------------------------------------------------------------------------------
// SPF

#[test]
fn spf_enforce_refuses_fail_at_mail_with_550_5_7_23() {
    let s = setup(UP_KEYS, "[spf]\nverify = \"enforce\"\n");
    let mut c = stranger(&s.relay);
    assert_reply(&c.cmd("MAIL FROM:<alice@reject.test>"), 550, "5.7.23");
    assert_log_fields(&s.relay, &[("rule", "spf")]);
    // The same session goes on: a sender SPF authorises is accepted.
    only_honest_delivered(&s, &mut c);
}

#[test]
fn spf_enforce_temperror_is_451_4_7_24_and_other_sessions_go_on() {
    let silent = SilentDns::start();
    let sink = Sink::start(SinkConfig::default());
    let dir = TestDir::new();
    let toml = policy(
        &dir,
        &silent.address(),
        sink.port(),
        UP_KEYS,
        "[spf]\nverify = \"enforce\"\n",
    );
    let relay = Relay::start_in(dir, &toml);
    let mut waiting = stranger(&relay);
    let start = Instant::now();
    waiting.send_raw(b"MAIL FROM:<alice@good.test>\r\n");
    // While that lookup hangs, another client is served at once.
    let mut other = client(&relay, "127.0.0.4", "other.test");
    assert_reply(&other.cmd("NOOP"), 250, "2.0.0");
    let other_done = start.elapsed();
    let reply = waiting.read_reply();
    let waited = start.elapsed();
    assert_reply(&reply, 451, "4.7.24");
    assert!(
        other_done < Duration::from_millis(900),
        "other session waited {other_done:?}"
    );
    assert!(
        other_done < waited,
        "other session served only after the lookup ended"
    );
    // Bounded by the DNS timeout (1 s per query, a few queries at most), never a hang.
    assert!(
        waited < Duration::from_secs(6),
        "temperror after {waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "no lookup was waited for ({waited:?})"
    );
    assert!(sink.messages().is_empty());
    assert_no_panic(&relay);
}

#[test]
fn spf_record_accepts_fail_and_records_it() {
    let s = setup(UP_KEYS, "[spf]\nverify = \"record\"\n");
    let msg = message(Some("<alice@reject.test>"), "recorded", "Hello.");
    let ar = send_and_read_results(&s, "alice@reject.test", msg.as_bytes());
    assert_eq!(result_of(&ar, "spf"), "fail", "{ar}");
    let spf = &resinfos(&ar, "spf")[0];
    assert!(
        spf.contains("smtp.mailfrom=") && spf.contains("reject.test"),
        "{ar}"
    );
}

#[test]
fn spf_null_reverse_path_checks_the_helo_name() {
    let s = setup(UP_KEYS, "[spf]\nverify = \"enforce\"\n");
    let mut c = client(&s.relay, "127.0.0.2", "badhelo.test");
    assert_reply(&c.cmd("MAIL FROM:<>"), 550, "5.7.23");
    assert_log_fields(&s.relay, &[("rule", "spf")]);
    // A HELO name whose SPF passes: the bounce is accepted and recorded with smtp.helo.
    let mut c = client(&s.relay, "127.0.0.2", "good.test");
    let msg = message(
        Some("<mailer-daemon@good.test>"),
        "bounce",
        "Undeliverable.",
    );
    let reply = send(&mut c, "", &[&format!("user@{OURS}")], msg.as_bytes());
    assert_reply(&reply, 250, "2.0.0");
    let ar = our_results(&delivered(&s.sink));
    assert_eq!(result_of(&ar, "spf"), "pass", "{ar}");
    assert!(
        resinfos(&ar, "spf")[0].contains("smtp.helo=good.test"),
        "{ar}"
    );
}

#[test]
fn spf_does_not_judge_authenticated_or_relay_networks_mail() {
    let s = setup(
        UP_KEYS,
        "[spf]\nverify = \"enforce\"\n[dmarc]\nverify = \"enforce\"\n",
    );
    let to = format!("user@{OURS}");
    // The check is on: a stranger with this reverse-path is refused, and a stranger's mail to
    // the same recipient carries our SPF result.
    let mut c = stranger(&s.relay);
    assert_reply(&c.cmd("MAIL FROM:<alice@reject.test>"), 550, "5.7.23");
    let msg = message(Some("<alice@good.test>"), "stranger", "Hello.");
    let reply = send(&mut c, "alice@good.test", &[&to], msg.as_bytes());
    assert_reply(&reply, 250, "2.0.0");
    assert!(s.sink.wait_for(1, WAIT));
    let got = s.sink.messages()[0].data.clone();
    assert_eq!(result_of(&our_results(&got), "spf"), "pass");
    // relay_networks: a sender whose SPF fails everywhere, to the same recipient and a
    // foreign one.
    let mut c = client(&s.relay, "127.0.0.3", "internal.test");
    assert_not_judged(&s, &mut c, "alice@reject.test", "internal", 2);
    // Authenticated on the submission listener: no A-R of ours either.
    let mut a = alice(&s.relay, "127.0.0.2");
    assert_not_judged(&s, &mut a, "alice@good.test", "submitted", 3);
}

/// Trusted mail from `from` to our recipient and a foreign one is accepted and reaches the
/// sink (its `nth` message) with no Authentication-Results of ours.
#[track_caller]
fn assert_not_judged(s: &Setup, c: &mut SmtpClient, from: &str, subject: &str, nth: usize) {
    let msg = message(Some(&format!("<{from}>")), subject, "Hello.");
    let to = format!("user@{OURS}");
    let reply = send(c, from, &[&to, "bob@elsewhere.test"], msg.as_bytes());
    assert_reply(&reply, 250, "2.0.0");
    assert!(s.sink.wait_for(nth, WAIT));
    let got = s.sink.messages()[nth - 1].data.clone();
    assert!(contains(&got, format!("Subject: {subject}").as_bytes()));
    assert!(
        results_by(&got, AUTHSERV_ID).is_empty(),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn spf_looping_and_over_limit_records_are_permerror() {
    let s = setup(UP_KEYS, "[spf]\nverify = \"enforce\"\n");
    for (n, domain) in ["loop.test", "many.test", "huge.test"].iter().enumerate() {
        let mut c = stranger(&s.relay);
        let msg = message(
            Some(&format!("<a@{domain}>")),
            &format!("hostile{n}"),
            "Hello.",
        );
        let reply = send(
            &mut c,
            &format!("a@{domain}"),
            &[&format!("user@{OURS}")],
            msg.as_bytes(),
        );
        // permerror is recorded, never refused, and the relay survives it.
        assert_reply(&reply, 250, "2.0.0");
        assert!(s.sink.wait_for(n + 1, WAIT));
        let ar = our_results(&s.sink.messages()[n].data);
        assert_eq!(result_of(&ar, "spf"), "permerror", "{domain}: {ar}");
    }
    assert_no_panic(&s.relay);
}

#[test]
fn spf_two_records_are_permerror_and_not_refused_under_enforce() {
    let s = setup(UP_KEYS, "[spf]\nverify = \"enforce\"\n");
    let msg = message(Some("<a@twice.test>"), "twice", "Hello.");
    let ar = send_and_read_results(&s, "a@twice.test", msg.as_bytes());
    assert_eq!(result_of(&ar, "spf"), "permerror", "{ar}");
}

#[test]
fn dmarc_two_records_are_permerror_and_decide_nothing() {
    let s = setup(UP_KEYS, "[dmarc]\nverify = \"enforce\"\n");
    let msg = message(Some("<a@twodmarc.test>"), "two DMARC records", "Hello.");
    let ar = send_and_read_results(&s, "a@elsewhere.test", msg.as_bytes());
    assert_eq!(result_of(&ar, "dmarc"), "permerror", "{ar}");
}

#[test]
fn spf_record_split_over_many_strings_parses() {
    let s = setup(UP_KEYS, "[spf]\nverify = \"record\"\n");
    let msg = message(Some("<a@split.test>"), "split", "Hello.");
    let ar = send_and_read_results(&s, "a@split.test", msg.as_bytes());
    assert_eq!(result_of(&ar, "spf"), "pass", "{ar}");
}

// ---------------------------------------------------------------------------------------
// DKIM verification and ARC

/// A message From: alice@good.test signed by dkimpy with `key` (selector `selector`,
/// `algorithm`).
fn dkimpy_signed(s: &Setup, subject: &str, signers: &[(&DkimKey, &str, &str)]) -> Vec<u8> {
    let mut msg = message(
        Some("Alice <alice@good.test>"),
        subject,
        "Hello from good.test.",
    )
    .into_bytes();
    for (key, selector, algorithm) in signers {
        msg = dkimpy_sign(s.nsd.port(), key, "good.test", selector, algorithm, &msg);
    }
    msg
}

/// Send `msg` from the stranger with reverse-path `from`; our A-R at the sink.
fn send_and_read_results(s: &Setup, from: &str, msg: &[u8]) -> String {
    let mut c = stranger(&s.relay);
    let reply = send(&mut c, from, &[&format!("user@{OURS}")], msg);
    assert_reply(&reply, 250, "2.0.0");
    our_results(&delivered(&s.sink))
}

#[test]
fn dkim_signatures_by_dkimpy_verify_as_pass() {
    let s = setup(
        UP_KEYS,
        "[dkim]\nverify = \"record\"\n[dmarc]\nverify = \"record\"\n",
    );
    let k = keys();
    let msg = dkimpy_signed(
        &s,
        "dkimpass",
        &[
            (&k.rsa, "rsa", "rsa-sha256"),
            (&k.ed, "ed", "ed25519-sha256"),
        ],
    );
    // A bounce's null reverse-path: DMARC passes through DKIM alone.
    let ar = send_and_read_results(&s, "", &msg);
    let dkim = resinfos(&ar, "dkim");
    assert_eq!(dkim.len(), 2, "{ar}");
    for info in &dkim {
        assert!(info.starts_with("dkim=pass"), "{ar}");
        assert!(info.contains("header.d=good.test"), "{ar}");
    }
    assert_eq!(result_of(&ar, "dmarc"), "pass", "{ar}");
    assert!(
        resinfos(&ar, "dmarc")[0].contains("header.from=good.test"),
        "{ar}"
    );
    // iprev is recorded. Its value for a loopback client is the resolver's own: reverse
    // lookups of 127/8 are answered locally as `localhost` (RFC 6761 §6.3), never by nsd, and
    // localhost is 127.0.0.1, so 127.0.0.2 does not confirm.
    let iprev = result_of(&ar, "iprev");
    assert!(
        ["pass", "fail", "temperror", "permerror", "none"].contains(&iprev.as_str()),
        "{ar}"
    );
}

#[test]
fn dkim_altered_body_is_fail() {
    let s = setup(UP_KEYS, "[dkim]\nverify = \"record\"\n");
    let k = keys();
    let msg = dkimpy_signed(&s, "altered", &[(&k.rsa, "rsa", "rsa-sha256")]);
    let altered = String::from_utf8(msg)
        .unwrap()
        .replace("Hello from", "Hullo from");
    let ar = send_and_read_results(&s, "alice@good.test", altered.as_bytes());
    assert_eq!(result_of(&ar, "dkim"), "fail", "{ar}");
}

#[test]
fn dkim_rsa_sha1_signature_is_not_pass() {
    let s = setup(UP_KEYS, "[dkim]\nverify = \"record\"\n");
    let k = keys();
    let msg = dkimpy_signed(&s, "sha1", &[(&k.rsa, "rsa", "rsa-sha1")]);
    // dkimpy itself accepts the signature: only RFC 8301 makes it not count.
    assert!(dkimpy_verify(s.nsd.port(), &msg)[0].3);
    let ar = send_and_read_results(&s, "alice@good.test", &msg);
    let result = result_of(&ar, "dkim");
    assert_ne!(result, "pass", "{ar}");
    assert!(
        ["policy", "fail", "neutral", "permerror"].contains(&result.as_str()),
        "{ar}"
    );
}

#[test]
fn dkim_malformed_signature_tags_are_recorded_and_never_pass() {
    let s = setup(UP_KEYS, "[dkim]\nverify = \"record\"\n");
    let hostile = [
        "v=1; a=rsa-sha256; d=good.test; s=rsa; h=from; bh=; b=",
        "v=1; a=rsa-sha256; d=good.test; s=rsa; h=from; bh=%%%; b=!!!; l=99999999999999999999",
        "v=1; a=rot13-sha512; d=good.test; s=rsa; h=from; bh=AAAA; b=AAAA",
        "v=1; a=rsa-sha256; d=good.test; i=@evil.test; s=rsa; h=subject; bh=AAAA; b=AAAA",
        "v=1; a=rsa-sha256; d=; s=; h=; bh=; b=",
        "v=1; a=ed25519-sha256; d=good.test; s=nothing; h=from; bh=AAAA; b=AAAA",
        "garbage without tags",
    ];
    let mut msg: String = hostile
        .iter()
        .map(|tags| format!("DKIM-Signature: {tags}\r\n"))
        .collect();
    msg.push_str(&message(Some("<alice@good.test>"), "malformed", "Hello."));
    let ar = send_and_read_results(&s, "alice@good.test", msg.as_bytes());
    let dkim = resinfos(&ar, "dkim");
    assert!(!dkim.is_empty(), "{ar}");
    assert!(dkim.iter().all(|r| !r.starts_with("dkim=pass")), "{ar}");
    assert_no_panic(&s.relay);
}

#[test]
fn arc_sealed_forward_shows_arc_pass() {
    let s = setup(UP_KEYS, "[dkim]\nverify = \"record\"\n");
    let k = keys();
    let original = dkimpy_signed(&s, "forwarded", &[(&k.rsa, "rsa", "rsa-sha256")]);
    // The forwarder list.test judged it, recorded that, and sealed the chain.
    let mut forwarded =
        b"Authentication-Results: list.test; dkim=pass header.d=good.test\r\n".to_vec();
    forwarded.extend_from_slice(&original);
    let sealed = dkimpy_arc_seal(
        s.nsd.port(),
        &k.other,
        "list.test",
        "arc",
        "list.test",
        &forwarded,
    );
    let ar = send_and_read_results(&s, "bounces@list.test", &sealed);
    assert_eq!(result_of(&ar, "arc"), "pass", "{ar}");
}

#[test]
fn forged_authentication_results_in_our_name_is_removed() {
    let s = setup(UP_KEYS, "[dkim]\nverify = \"record\"\n");
    let forged = format!(
        "Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d=bank.test\r\n\
         Authentication-Results:{}; dmarc=pass\r\n{}",
        AUTHSERV_ID.to_uppercase(),
        message(Some("<alice@good.test>"), "forged", "Hello.")
    );
    let ar = send_and_read_results(&s, "alice@good.test", forged.as_bytes());
    assert!(!ar.contains("bank.test"), "{ar}");
    assert!(resinfos(&ar, "dmarc").is_empty(), "{ar}");
    // Unsigned: DKIM found nothing to pass.
    assert!(
        resinfos(&ar, "dkim")
            .iter()
            .all(|r| !r.starts_with("dkim=pass")),
        "{ar}"
    );
}

// ---------------------------------------------------------------------------------------
// DKIM signing

/// `[[dkim.sign]]` for good.test with the RSA (PKCS#1) and the Ed25519 (PKCS#8) key, written
/// into `dir`; and a second upstream `exchange` for ours.test at `exchange_port`, without
/// signing.
fn signing_policy(dir: &TestDir, exchange_port: u16) -> String {
    let k = keys();
    let rsa = k.rsa.write(dir, "dkim/rsa.pem");
    let ed = k.ed.write(dir, "dkim/ed.pem");
    format!(
        "[[upstreams]]\nname = \"exchange\"\naddress = \"127.0.0.1:{exchange_port}\"\n\
         tls = \"none\"\ndomains = [\"{OURS}\"]\n\n\
         [[dkim.sign]]\ndomain = \"good.test\"\nselector = \"rsa\"\nkey = \"{}\"\n\n\
         [[dkim.sign]]\ndomain = \"good.test\"\nselector = \"ed\"\nkey = \"{}\"\n",
        rsa.display(),
        ed.display()
    )
}

fn signing_setup(up: SinkConfig) -> (Setup, Sink) {
    let nsd = Nsd::start(&zones());
    let sink = Sink::start(up);
    let exchange = Sink::start(SinkConfig::default());
    let dir = TestDir::new();
    let extra = signing_policy(&dir, exchange.port());
    let toml = policy(&dir, &nsd.address(), sink.port(), "sign = true\n", &extra);
    let relay = Relay::start_in(dir, &toml);
    (Setup { nsd, sink, relay }, exchange)
}

#[track_caller]
fn assert_signed_twice_and_verified(s: &Setup, msg: &[u8]) {
    let sigs = fields_named(msg, "DKIM-Signature");
    assert_eq!(sigs.len(), 2, "{}", String::from_utf8_lossy(msg));
    for sig in &sigs {
        assert!(sig.replace(' ', "").contains("c=relaxed/relaxed"), "{sig}");
    }
    let mut results = dkimpy_verify(s.nsd.port(), msg);
    results.sort();
    let expected =
        |sel: &str, a: &str| ("good.test".to_owned(), sel.to_owned(), a.to_owned(), true);
    assert_eq!(
        results,
        [
            expected("ed", "ed25519-sha256"),
            expected("rsa", "rsa-sha256")
        ]
    );
}

#[test]
fn signing_trusted_mail_to_a_sign_upstream_verifies_with_dkimpy() {
    let (s, exchange) = signing_setup(SinkConfig::default());
    // From relay_networks, to the internet (upstream up, sign = true).
    let mut c = client(&s.relay, "127.0.0.3", "internal.test");
    let msg = message(Some("Alice <alice@good.test>"), "outbound", "Signed here.");
    assert_reply(
        &send(
            &mut c,
            "alice@good.test",
            &["bob@elsewhere.test"],
            msg.as_bytes(),
        ),
        250,
        "2.0.0",
    );
    assert_signed_twice_and_verified(&s, &delivered(&s.sink));
    // Authenticated, to the internet: signed too.
    let mut a = alice(&s.relay, "127.0.0.2");
    let msg = message(Some("<alice@good.test>"), "submitted", "Signed too.");
    assert_reply(
        &send(
            &mut a,
            "alice@good.test",
            &["carol@elsewhere.test"],
            msg.as_bytes(),
        ),
        250,
        "2.0.0",
    );
    assert!(s.sink.wait_for(2, WAIT));
    assert_signed_twice_and_verified(&s, &s.sink.messages()[1].data);
    // To Exchange (no sign): unsigned.
    let msg = message(Some("<alice@good.test>"), "inside", "Not signed.");
    assert_reply(
        &send(
            &mut c,
            "alice@good.test",
            &[&format!("user@{OURS}")],
            msg.as_bytes(),
        ),
        250,
        "2.0.0",
    );
    let got = delivered(&exchange);
    assert!(
        fields_named(&got, "DKIM-Signature").is_empty(),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn signing_a_deferred_message_does_not_sign_again_on_retry() {
    let (s, _exchange) = signing_setup(SinkConfig {
        data_reply: Some("451 4.3.0 try again later".to_owned()),
        ..SinkConfig::default()
    });
    let mut c = client(&s.relay, "127.0.0.3", "internal.test");
    let msg = message(Some("<alice@good.test>"), "retried", "Signed once.");
    let reply = send(
        &mut c,
        "alice@good.test",
        &["bob@elsewhere.test"],
        msg.as_bytes(),
    );
    assert_reply(&reply, 250, "2.0.0");
    // The spool holds the signed bytes.
    let queued = s.relay.queued_messages();
    assert_eq!(queued.len(), 1);
    assert_eq!(fields_named(&queued[0].1, "DKIM-Signature").len(), 2);
    let refused = || {
        s.sink
            .commands()
            .iter()
            .filter(|c| c.starts_with("DATA"))
            .count()
            >= 1
    };
    assert!(wait_until(WAIT, refused), "no first attempt");
    assert!(wait_until(WAIT, || {
        let out = s.relay.command(&["queue", "list", "--json"]);
        String::from_utf8_lossy(&out.stdout).contains("4.3.0")
    }));
    s.sink.set_config(SinkConfig::default());
    assert_signed_twice_and_verified(&s, &delivered(&s.sink));
}

// ---------------------------------------------------------------------------------------
// DMARC

#[test]
fn dmarc_reject_refuses_spoofed_mail_after_the_dot_and_queues_nothing() {
    let s = setup(UP_KEYS, "[dmarc]\nverify = \"enforce\"\n");
    let mut c = stranger(&s.relay);
    let spoof = message(
        Some("Bank <security@reject.test>"),
        "spoofed",
        "Click here.",
    );
    // SPF is not enforced: the envelope is accepted, the verdict comes after the dot.
    let reply = send(
        &mut c,
        "security@reject.test",
        &[&format!("user@{OURS}")],
        spoof.as_bytes(),
    );
    assert_reply(&reply, 550, "5.7.1");
    assert_log_fields(
        &s.relay,
        &[("rule", "dmarc"), ("queue_id", "*"), ("reply", "*")],
    );
    assert!(s.relay.spool_files().is_empty());
    only_honest_delivered(&s, &mut c);
}

#[test]
fn dmarc_quarantine_marks_the_message_and_removes_a_forged_mark() {
    let s = setup(UP_KEYS, "[dmarc]\nverify = \"enforce\"\n");
    let forged = "X-Portcullis-Quarantine: no\r\n";
    let send_from = |domain: &str, subject: &str| {
        let mut c = stranger(&s.relay);
        let msg = format!(
            "{forged}{}",
            message(Some(&format!("<a@{domain}>")), subject, "Hello.")
        );
        let reply = send(
            &mut c,
            &format!("a@{domain}"),
            &[&format!("user@{OURS}")],
            msg.as_bytes(),
        );
        assert_reply(&reply, 250, "2.0.0");
    };
    send_from("quarantine.test", "q");
    assert!(s.sink.wait_for(1, WAIT));
    let got = s.sink.messages()[0].data.clone();
    assert_eq!(fields_named(&got, "X-Portcullis-Quarantine"), ["dmarc"]);
    assert_eq!(result_of(&our_results(&got), "dmarc"), "fail");
    // p=none: delivered unmarked, recorded; the forged mark is gone.
    send_from("relaxed.test", "n");
    assert!(s.sink.wait_for(2, WAIT));
    let got = s.sink.messages()[1].data.clone();
    assert!(fields_named(&got, "X-Portcullis-Quarantine").is_empty());
    assert_eq!(result_of(&our_results(&got), "dmarc"), "fail");
    // A pass: unmarked, the forged mark gone.
    send_from("good.test", "p");
    assert!(s.sink.wait_for(3, WAIT));
    let got = s.sink.messages()[2].data.clone();
    assert!(fields_named(&got, "X-Portcullis-Quarantine").is_empty());
    assert_eq!(result_of(&our_results(&got), "dmarc"), "pass");
}

#[test]
fn dmarc_testing_flag_lowers_reject_to_quarantine() {
    let s = setup(UP_KEYS, "[dmarc]\nverify = \"enforce\"\n");
    let mut c = stranger(&s.relay);
    let msg = message(Some("<a@testing.test>"), "t", "Hello.");
    let reply = send(
        &mut c,
        "a@testing.test",
        &[&format!("user@{OURS}")],
        msg.as_bytes(),
    );
    assert_reply(&reply, 250, "2.0.0");
    let got = delivered(&s.sink);
    assert_eq!(fields_named(&got, "X-Portcullis-Quarantine"), ["dmarc"]);
}

#[test]
fn dmarc_enforce_refuses_no_from_or_several_from_domains() {
    let s = setup(UP_KEYS, "[dmarc]\nverify = \"enforce\"\n");
    let mut c = stranger(&s.relay);
    let rcpt = format!("user@{OURS}");
    let none = message(None, "nofrom", "Hello.");
    let two_fields = format!(
        "From: <a@good.test>\r\n{}",
        message(Some("<b@reject.test>"), "twofrom", "Hello.")
    );
    let two_domains = message(
        Some("<a@good.test>, <b@reject.test>"),
        "twodomains",
        "Hello.",
    );
    for msg in [none, two_fields, two_domains] {
        let reply = send(&mut c, "alice@good.test", &[&rcpt], msg.as_bytes());
        assert_reply(&reply, 550, "5.7.1");
    }
    let refusals = count_log_fields(&s.relay.log(), &[("rule", "dmarc")]);
    assert!(refusals >= 3, "{}", s.relay.log());
    assert!(s.relay.spool_files().is_empty());
    only_honest_delivered(&s, &mut c);
}

#[test]
fn dmarc_own_domains_reject_refuses_strangers_using_our_domain() {
    let s = setup(
        UP_KEYS,
        "[dmarc]\nverify = \"enforce\"\nown_domains = \"reject\"\n",
    );
    let mut c = stranger(&s.relay);
    // SPF passes for good.test, but nothing aligns with ours.test, which publishes no record.
    let msg = message(Some(&format!("CEO <ceo@{OURS}>")), "ceo", "Wire the money.");
    let reply = send(
        &mut c,
        "alice@good.test",
        &[&format!("user@{OURS}")],
        msg.as_bytes(),
    );
    assert_reply(&reply, 550, "5.7.1");
    assert_log_fields(&s.relay, &[("rule", "dmarc")]);
    only_honest_delivered(&s, &mut c);
}

// ---------------------------------------------------------------------------------------
// DNSBL

const DNSBL: &str = "[dnsbl]\nthreshold = 1\nexempt = [\"127.0.0.11/32\"]\n\
                     [[dnsbl.zones]]\nzone = \"bl.test\"\nname = \"blocklist.example\"\nweight = 1\n";

#[test]
fn dnsbl_listed_client_is_refused_at_each_rcpt_naming_the_list() {
    let s = setup(UP_KEYS, DNSBL);
    let mut c = client(&s.relay, "127.0.0.9", "listed.test");
    assert_reply(&c.cmd("MAIL FROM:<a@good.test>"), 250, "2.1.0");
    for rcpt in ["user@ours.test", "other@ours.test"] {
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert_reply(&reply, 550, "5.7.1");
        assert!(reply.1.contains("blocklist.example"), "{reply:?}");
        assert!(!reply.1.contains("bl.test"), "zone name shown: {reply:?}");
    }
    assert_log_fields(&s.relay, &[("rule", "dnsbl")]);
    // The postmaster stays reachable (RFC 5321 §4.5.1).
    assert_reply(&c.cmd("RCPT TO:<postmaster>"), 250, "2.1.5");
    assert_reply(
        &c.cmd(&format!("RCPT TO:<postmaster@{OURS}>")),
        250,
        "2.1.5",
    );
    // A list that refuses our queries (127.255.255.254) does not list anyone.
    let mut c = client(&s.relay, "127.0.0.10", "refused.test");
    assert_reply(&c.cmd("MAIL FROM:<a@good.test>"), 250, "2.1.0");
    assert_reply(&c.cmd(&format!("RCPT TO:<user@{OURS}>")), 250, "2.1.5");
}

#[test]
fn dnsbl_spares_relay_networks_and_exempt_clients() {
    let s = setup(UP_KEYS, DNSBL);
    for ip in ["127.0.0.3", "127.0.0.11"] {
        let mut c = client(&s.relay, ip, "spared.test");
        assert_reply(&c.cmd("MAIL FROM:<a@good.test>"), 250, "2.1.0");
        assert_reply(&c.cmd(&format!("RCPT TO:<user@{OURS}>")), 250, "2.1.5");
    }
    // The same zone does list 127.0.0.9: the check is on.
    let mut c = client(&s.relay, "127.0.0.9", "listed.test");
    assert_reply(&c.cmd("MAIL FROM:<a@good.test>"), 250, "2.1.0");
    assert_reply(&c.cmd(&format!("RCPT TO:<user@{OURS}>")), 550, "5.7.1");
}

#[test]
fn dnsbl_listed_user_can_still_authenticate_and_send() {
    let s = setup(UP_KEYS, DNSBL);
    // Unauthenticated, the same address is refused.
    let mut c = client(&s.relay, "127.0.0.9", "listed.test");
    assert_reply(&c.cmd("MAIL FROM:<alice@good.test>"), 250, "2.1.0");
    assert_reply(&c.cmd(&format!("RCPT TO:<user@{OURS}>")), 550, "5.7.1");
    let mut a = alice(&s.relay, "127.0.0.9");
    let msg = message(Some("<alice@good.test>"), "fromhome", "Hello.");
    let reply = send(
        &mut a,
        "alice@good.test",
        &["bob@elsewhere.test"],
        msg.as_bytes(),
    );
    assert_reply(&reply, 250, "2.0.0");
    assert!(contains(&delivered(&s.sink), b"Subject: fromhome"));
}

/// A relay on [`DNSBL`] whose DNS answers (nsd's) arrive `delay` late, each query waited
/// for `timeout`.
struct SlowList {
    _nsd: Nsd,
    _sink: Sink,
    dns: SlowDns,
    relay: Relay,
}

fn slow_list(delay: Duration, timeout: &str) -> SlowList {
    let nsd = Nsd::start(&zones());
    let dns = SlowDns::start(nsd.port(), delay);
    let sink = Sink::start(SinkConfig::default());
    let dir = TestDir::new();
    let toml = policy(&dir, &dns.address(), sink.port(), UP_KEYS, DNSBL)
        .replace("timeout = \"1s\"", &format!("timeout = \"{timeout}\""));
    let relay = Relay::start_in(dir, &toml);
    SlowList {
        _nsd: nsd,
        _sink: sink,
        dns,
        relay,
    }
}

/// Connect from the listed 127.0.0.9 (asserting the greeting comes at once, whatever the
/// DNS) and get to RCPT: the RCPT reply and its time since connect.
fn listed_client_rcpt(relay: &Relay) -> ((u16, String), Duration) {
    let start = Instant::now();
    let mut c = SmtpClient::connect_from("127.0.0.9", relay.port(0));
    c.expect_reply(220);
    let greeting = start.elapsed();
    assert!(
        greeting < Duration::from_millis(500),
        "greeting after {greeting:?}"
    );
    c.expect("EHLO listed.test", 250);
    assert_reply(&c.cmd("MAIL FROM:<a@good.test>"), 250, "2.1.0");
    let reply = c.cmd(&format!("RCPT TO:<user@{OURS}>"));
    (reply, start.elapsed())
}

#[test]
fn dnsbl_lookup_never_delays_the_greeting() {
    // Every answer from nsd arrives 1.5 s late, within the 3 s DNS timeout.
    let s = slow_list(Duration::from_millis(1500), "3s");
    let (reply, rcpt) = listed_client_rcpt(&s.relay);
    // The lookup started at connect went on meanwhile, and its answer counts at RCPT.
    assert_reply(&reply, 550, "5.7.1");
    assert!(
        rcpt >= Duration::from_millis(1400),
        "answered before the DNS did: {rcpt:?}"
    );
    assert!(s.dns.queries() >= 1);
}

#[test]
fn dnsbl_lookup_timeout_counts_as_not_listed() {
    // The list does answer that 127.0.0.9 is listed, but 4 s late: past the 1 s DNS timeout.
    let s = slow_list(Duration::from_secs(4), "1s");
    let (reply, rcpt) = listed_client_rcpt(&s.relay);
    assert_reply(&reply, 250, "2.1.5");
    // The list was asked, and RCPT waited out the timeout rather than skipping the lookup...
    assert!(s.dns.queries() >= 1, "the list was never asked");
    assert!(
        rcpt >= Duration::from_millis(900),
        "answered before the DNS timeout: {rcpt:?}"
    );
    // ...bounded by it (1 s per query), never a wait for the late answer or a hang.
    assert!(rcpt < Duration::from_secs(6), "waited {rcpt:?}");
    assert_no_panic(&s.relay);
}

// ---------------------------------------------------------------------------------------
// portcullis doctor and check-config

/// A policy for `doctor`: egress 192.0.2.7 (authorised by good.test's SPF, with FCrDNS) and
/// 192.0.2.77 (neither); `[[dkim.sign]]` good.test `rsa` (the published key) and `stale`
/// (another key than the one published there).
fn doctor_config(nsd: &Nsd, dir: &TestDir) -> std::path::PathBuf {
    let k = keys();
    let rsa = k.rsa.write(dir, "dkim/rsa.pem");
    let stale = k.other.write(dir, "dkim/stale.pem");
    let extra = format!(
        "[doctor]\negress = [\"192.0.2.7\", \"192.0.2.77\"]\n\n\
         [[dkim.sign]]\ndomain = \"good.test\"\nselector = \"rsa\"\nkey = \"{}\"\n\n\
         [[dkim.sign]]\ndomain = \"good.test\"\nselector = \"stale\"\nkey = \"{}\"\n",
        rsa.display(),
        stale.display()
    );
    let text = policy(dir, &nsd.address(), free_port(), UP_KEYS, &extra);
    write_certs(&dir.join("certs"));
    dir.write("doctor.toml", dir.expand(&text))
}

fn doctor(config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .arg("doctor")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("spawn portcullis doctor");
    assert!(out.status.success(), "doctor {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Whether a doctor string names `needle`: a selector (the value itself, or its
/// `selector._domainkey` name) or an address (a whole token, so 192.0.2.7 is not 192.0.2.77).
fn mentions(s: &str, needle: &str) -> bool {
    s == needle
        || s.contains(&format!("{needle}._domainkey"))
        || (needle.parse::<std::net::IpAddr>().is_ok()
            && s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == ':'))
                .any(|t| t == needle))
}

/// Every JSON object in `v` (depth first) whose own string values include `needle`.
fn objects_mentioning<'a>(
    v: &'a serde_json::Value,
    needle: &str,
    out: &mut Vec<&'a serde_json::Value>,
) {
    match v {
        serde_json::Value::Object(map) => {
            if map
                .values()
                .any(|x| x.as_str().is_some_and(|s| mentions(s, needle)))
            {
                out.push(v);
            }
            map.values()
                .for_each(|x| objects_mentioning(x, needle, out));
        }
        serde_json::Value::Array(items) => items
            .iter()
            .for_each(|x| objects_mentioning(x, needle, out)),
        _ => {}
    }
}

#[test]
fn doctor_reports_keys_spf_dmarc_and_fcrdns() {
    let nsd = Nsd::start(&zones());
    let dir = TestDir::new();
    let config = doctor_config(&nsd, &dir);
    let text = doctor(&config, &["good.test"]);
    for needle in ["stale", "192.0.2.77", "192.0.2.7", "reject", "mx.good.test"] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(doctor(&config, &["good.test", "--json"]).trim())
            .expect("one JSON object");
    assert!(json.is_object(), "{json}");
    // The matching key and the stale one are reported differently (beyond their names), and
    // so are the authorised egress address and the other one.
    for (good, bad) in [("\"rsa\"", "\"stale\""), ("192.0.2.7", "192.0.2.77")] {
        let (g, b) = (good.trim_matches('"'), bad.trim_matches('"'));
        let (mut gs, mut bs) = (Vec::new(), Vec::new());
        objects_mentioning(&json, g, &mut gs);
        objects_mentioning(&json, b, &mut bs);
        let g0 = gs
            .first()
            .unwrap_or_else(|| panic!("no finding for {g}: {json}"))
            .to_string();
        let b0 = bs
            .first()
            .unwrap_or_else(|| panic!("no finding for {b}: {json}"))
            .to_string();
        assert_ne!(g0.replace(good, bad), b0, "same finding for {g} and {b}");
    }
    // The fix for the stale key is what to publish: the key it signs with.
    assert!(json.to_string().contains(&keys().other.public), "{json}");
}

#[test]
fn check_config_shows_the_mail_auth_checks() {
    let nsd = Nsd::start(&zones());
    let dir = TestDir::new();
    let exchange = free_port();
    let extra = format!(
        "{}\n[spf]\nverify = \"enforce\"\n[dkim]\nverify = \"record\"\n\
         [dmarc]\nverify = \"enforce\"\nown_domains = \"reject\"\n\
         quarantine_header = \"X-Spam-Flag: YES\"\n[doctor]\negress = [\"127.0.0.2\"]\n{DNSBL}",
        signing_policy(&dir, exchange)
    );
    let text = policy(&dir, &nsd.address(), free_port(), "sign = true\n", &extra);
    write_certs(&dir.join("certs"));
    let report = check_config(&dir, &text).to_ascii_lowercase();
    for needle in [
        "spf",
        "dkim",
        "dmarc",
        "dnsbl",
        "blocklist.example",
        "good.test",
        "x-spam-flag",
    ] {
        assert!(
            report.contains(needle),
            "{needle:?} missing from check-config:\n{report}"
        );
    }
}

#[test]
fn check_config_refuses_an_rsa_1024_signing_key() {
    let nsd = Nsd::start(&zones());
    let dir = TestDir::new();
    let weak = DkimKey::rsa(1024).write(&dir, "dkim/weak.pem");
    let extra = format!(
        "[[dkim.sign]]\ndomain = \"good.test\"\nselector = \"weak\"\nkey = \"{}\"\n",
        weak.display()
    );
    let text = policy(&dir, &nsd.address(), free_port(), "sign = true\n", &extra);
    write_certs(&dir.join("certs"));
    let path = dir.write("check.toml", dir.expand(&text));
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("spawn portcullis");
    assert!(
        !out.status.success(),
        "an RSA-1024 key passed check-config: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("weak.pem"), "key not named: {stderr}");
}
