//! The SPF and DKIM/DMARC input path with our glue (`dns::Resolver::spf` and
//! `authenticate`) on records and messages from strangers, every record from pre-filled
//! caches and no name server at all (a name not in the caches fails at once, as a DNS error).
//!
//! Input: four parts separated by `0xFF`: the SPF record of `example.org`, the DKIM key
//! record at `s._domainkey.example.org`, the DMARC record at `_dmarc.example.org`, and the
//! message. Checked: nothing panics, and no DKIM signature passes with a key record the
//! input wrote unless it names `example.org` (the only domain with a key).

#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mail_auth::MessageAuthenticator;
use mail_auth::common::verify::DomainKey;
use mail_auth::dmarc::Dmarc;
use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
use mail_auth::spf::Spf;
use portcullis::dns::Resolver;
use portcullis::dns::cache::Caches;
use portcullis::dns::verify::{DkimResult, MessageFacts};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |&b| b == 0xFF);
    let spf = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or_default();
    let dmarc = parts.next().unwrap_or_default();
    let message = parts.next().unwrap_or_default();

    RUNTIME.with(|runtime| runtime.block_on(check(spf, key, dmarc, message)));
});

thread_local! {
    /// One runtime and resolver for every input (building them is most of an execution);
    /// the caches, where the input goes, are new each time.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    static AUTHENTICATOR: MessageAuthenticator = MessageAuthenticator::new(
        ResolverConfig::from_name_servers(vec![]),
        ResolverOpts::default(),
    )
    .expect("resolver");
}

async fn check(spf: &[u8], key: &[u8], dmarc: &[u8], message: &[u8]) {
    {
        let authenticator = AUTHENTICATOR.with(Clone::clone);
        let caches = Caches::with_capacity(64);
        let until = Instant::now() + Duration::from_secs(600);
        caches.add_txt::<Spf>("example.org", spf, until);
        caches.add_txt::<DomainKey>("s._domainkey.example.org", key, until);
        caches.add_txt::<Dmarc>("_dmarc.example.org", dmarc, until);
        let resolver = Resolver::from_parts(authenticator, Duration::from_millis(50), caches);
        let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

        let spf = resolver
            .spf(client, "mx.example.org", Some("user@example.org"))
            .await;
        let own = ["example.org".to_string()];
        let facts = MessageFacts {
            client_ip: client,
            helo: "mx.example.org",
            mail_from_domain: "example.org",
            spf: Some(&spf),
            dkim: true,
            dmarc: true,
            own_domains: &own,
        };
        let checks = resolver.authenticate(message, facts).await;
        for check in &checks.dkim {
            if check.result == DkimResult::Pass {
                assert_eq!(check.domain, "example.org", "{check:?}");
            }
        }
        let _ =
            portcullis::dns::results::authentication_results(&portcullis::dns::results::Recorded {
                authserv_id: "mx.example.com",
                client_ip: client,
                spf: Some(&spf),
                iprev: None,
                message: Some(&checks),
            });
    }
}
