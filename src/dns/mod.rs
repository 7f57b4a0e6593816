//! DNS and mail authentication: the relay's resolver, and the glue to mail-auth for SPF
//! (RFC 7208), DKIM (RFC 6376, RFC 8301, RFC 8463), DMARC (RFC 7489), ARC (RFC 8617) and
//! iprev (RFC 8601 §3), DNSBL lookups (RFC 5782), the `Authentication-Results:` field
//! (RFC 8601), DKIM signing and the `doctor` pre-flight.
//!
//! Nothing here decides a reply: a check answers what it found (a `*Check` value), and
//! `policy::stage` decides what that means for the session. Every lookup goes through one
//! [`Resolver`], built from `[dns]`: a timeout or SERVFAIL is a temporary error for SPF, DKIM
//! and DMARC and "not listed" for a DNSBL, never a pass; answers are cached within their TTL
//! in a bounded cache.
//!
//! - [`keys`]: DKIM private keys (PEM: PKCS#8, or PKCS#1 for RSA).
//! - [`cache`]: the bounded TTL caches of parsed records.
//! - [`verify`]: SPF, iprev, and a message's DKIM signatures, ARC chain and DMARC policy.
//! - [`results`]: our `Authentication-Results:` field.
//! - [`dnsbl`]: DNSBL query names and lookups.
//! - [`sign`]: DKIM signatures for trusted outbound mail.
//! - [`doctor`]: checks of our own domain's published records.

pub mod cache;
pub mod dnsbl;
pub mod doctor;
pub mod keys;
pub mod results;
pub mod sign;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use mail_auth::MessageAuthenticator;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};

use crate::config::Dns;

/// Entries hickory keeps in its own record cache (answers within their TTL).
pub const RECORD_CACHE_ENTRIES: u64 = 4096;

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// `[dns] nameservers` is empty and the system configuration cannot be read.
    #[error("cannot read the system resolver configuration: {0}")]
    System(String),
    /// The resolver could not be built.
    #[error("cannot build the resolver: {0}")]
    Build(String),
}

/// The relay's one resolver: mail-auth's authenticator over hickory, configured from `[dns]`,
/// with the caches of parsed records. Cheap to clone (shared).
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    authenticator: MessageAuthenticator,
    timeout: Duration,
    caches: cache::Caches,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver for `[dns]`: its `nameservers` (each over UDP, then TCP for truncated
    /// answers) or, when empty, the system's; one attempt per server and query, each
    /// bounded by `timeout`.
    ///
    /// # Errors
    /// [`ResolverError`] when the system configuration cannot be read or the resolver built.
    pub fn new(config: &Dns) -> Result<Resolver, ResolverError> {
        let (resolver_config, mut options) = if config.nameservers.is_empty() {
            mail_auth::hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| ResolverError::System(e.to_string()))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            (
                ResolverConfig::from_name_servers(servers),
                ResolverOpts::default(),
            )
        };
        options.timeout = config.timeout;
        options.attempts = 1;
        options.cache_size = RECORD_CACHE_ENTRIES;
        // Every name goes to the name servers: never /etc/hosts, where a host name of this
        // machine would otherwise pass an SPF `a:` or confirm an iprev name nobody published.
        options.use_hosts_file = ResolveHosts::Never;
        // Names are always absolute here; never try them under a search domain.
        options.ndots = 0;
        let authenticator = MessageAuthenticator::new(resolver_config, options)
            .map_err(|e| ResolverError::Build(e.to_string()))?;
        Ok(Resolver::from_parts(
            authenticator,
            config.timeout,
            cache::Caches::new(),
        ))
    }

    /// A resolver over `authenticator` with `caches` (tests and fuzzing pre-fill the caches
    /// so that no query leaves the process).
    pub fn from_parts(
        authenticator: MessageAuthenticator,
        timeout: Duration,
        caches: cache::Caches,
    ) -> Resolver {
        Resolver {
            inner: Arc::new(Inner {
                authenticator,
                timeout,
                caches,
            }),
        }
    }

    /// mail-auth's authenticator (its hickory resolver is `authenticator().resolver()`).
    pub fn authenticator(&self) -> &MessageAuthenticator {
        &self.inner.authenticator
    }

    /// The caches of parsed records.
    pub fn caches(&self) -> &cache::Caches {
        &self.inner.caches
    }

    /// `[dns] timeout`: the time allowed for one query.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }
}
