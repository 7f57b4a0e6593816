//! The bounded caches of parsed records handed to mail-auth (its `ResolverCache`): an entry
//! lives no longer than its TTL (mail-auth gives each one the answer's `valid_until`), and each
//! cache holds at most its capacity ([`CACHE_ENTRIES`] in the relay); when full, expired
//! entries go first, then the oldest.
//!
//! Tests and the fuzz targets pre-fill them ([`Caches::add_txt`] and the like), so that a check
//! runs without a single query leaving the process.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::{DnssecStatus, MX, Parameters, RecordSet, ResolverCache, Txt};

/// Entries per cache (TXT, MX, A, AAAA, PTR) in the relay.
pub const CACHE_ENTRIES: usize = 4096;

/// One bounded cache: a map plus the order keys went in (for eviction).
pub struct Cache<K, V> {
    capacity: usize,
    inner: Mutex<Entries<K, V>>,
}

struct Entries<K, V> {
    map: HashMap<K, (V, Instant)>,
    /// Keys in the order they were first inserted; may hold keys already removed (skipped
    /// when evicting), never more than twice the capacity.
    order: VecDeque<K>,
}

impl<K, V> std::fmt::Debug for Cache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Cache<K, V> {
    /// An empty cache of at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Cache<K, V> {
        Cache {
            capacity: capacity.max(1),
            inner: Mutex::new(Entries {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// Entries held now, expired ones included until they are evicted or read.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries<K, V>> {
        // A panic while holding the lock cannot leave the map inconsistent (every change is
        // one HashMap or VecDeque call), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K, V> Entries<K, V>
where
    K: Hash + Eq + Clone,
{
    /// Make room for one more entry under `capacity`.
    fn make_room(&mut self, capacity: usize, now: Instant) {
        if self.map.len() < capacity {
            return;
        }
        self.map.retain(|_, (_, until)| *until > now);
        self.order.retain(|k| self.map.contains_key(k));
        while self.map.len() >= capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&oldest);
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> ResolverCache<K, V> for Cache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut entries = self.lock();
        match entries.map.get(name) {
            Some((value, until)) if *until > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.map.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().map.remove(name).map(|(value, _)| value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let now = Instant::now();
        if valid_until <= now {
            return;
        }
        let mut entries = self.lock();
        if !entries.map.contains_key(&key) {
            entries.make_room(self.capacity, now);
            entries.order.push_back(key.clone());
        }
        entries.map.insert(key, (value, valid_until));
        if entries.order.len() > 2 * self.capacity {
            let Entries { map, order } = &mut *entries;
            order.retain(|k| map.contains_key(k));
        }
    }
}

/// mail-auth's parameters with the relay's caches attached.
pub type Cached<'x, P> = Parameters<
    'x,
    P,
    Cache<Box<str>, Txt>,
    Cache<Box<str>, RecordSet<MX>>,
    Cache<Box<str>, RecordSet<Ipv4Addr>>,
    Cache<Box<str>, RecordSet<Ipv6Addr>>,
    Cache<IpAddr, RecordSet<Box<str>>>,
>;

/// The five caches mail-auth's lookups use.
#[derive(Debug)]
pub struct Caches {
    pub txt: Cache<Box<str>, Txt>,
    pub mx: Cache<Box<str>, RecordSet<MX>>,
    pub ipv4: Cache<Box<str>, RecordSet<Ipv4Addr>>,
    pub ipv6: Cache<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: Cache<IpAddr, RecordSet<Box<str>>>,
}

impl Default for Caches {
    fn default() -> Caches {
        Caches::new()
    }
}

impl Caches {
    /// Empty caches of [`CACHE_ENTRIES`] each.
    pub fn new() -> Caches {
        Caches::with_capacity(CACHE_ENTRIES)
    }

    /// Empty caches of `capacity` entries each.
    pub fn with_capacity(capacity: usize) -> Caches {
        Caches {
            txt: Cache::new(capacity),
            mx: Cache::new(capacity),
            ipv4: Cache::new(capacity),
            ipv6: Cache::new(capacity),
            ptr: Cache::new(capacity),
        }
    }

    /// `params` with these caches attached, for a mail-auth call.
    pub fn parameters<P>(&self, params: P) -> Cached<'_, P> {
        Parameters::new(params)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.ipv4)
            .with_ipv6_cache(&self.ipv6)
            .with_ptr_cache(&self.ptr)
    }

    /// Pre-fill: the TXT record `record` at `name`, parsed as `T` (e.g.
    /// `mail_auth::spf::Spf`, `mail_auth::dkim::DomainKey`, `mail_auth::dmarc::Dmarc`); a
    /// record that does not parse is cached as the parse error, as a real lookup would be.
    pub fn add_txt<T>(&self, name: &str, record: &[u8], valid_until: Instant)
    where
        T: TxtRecordParser + Into<Txt>,
    {
        let value = match T::parse(record) {
            Ok(parsed) => parsed.into(),
            Err(error) => Txt::Error(error),
        };
        self.txt.insert(fqdn(name), value, valid_until);
    }

    /// Pre-fill: `name` has no TXT record (NXDOMAIN), as a real lookup would cache it.
    pub fn add_no_txt(&self, name: &str, valid_until: Instant) {
        let missing = mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(
            mail_auth::hickory_resolver::proto::op::ResponseCode::NXDomain,
        ));
        self.txt
            .insert(fqdn(name), Txt::Error(missing), valid_until);
    }

    /// Pre-fill: the A records of `name`.
    pub fn add_ipv4(&self, name: &str, addresses: Vec<Ipv4Addr>, valid_until: Instant) {
        self.ipv4
            .insert(fqdn(name), record_set(addresses), valid_until);
    }

    /// Pre-fill: the AAAA records of `name`.
    pub fn add_ipv6(&self, name: &str, addresses: Vec<Ipv6Addr>, valid_until: Instant) {
        self.ipv6
            .insert(fqdn(name), record_set(addresses), valid_until);
    }

    /// Pre-fill: the PTR names of `ip` (each a fully qualified name with its trailing dot).
    pub fn add_ptr(&self, ip: IpAddr, names: Vec<&str>, valid_until: Instant) {
        let names = names.into_iter().map(Box::from).collect();
        self.ptr.insert(ip, record_set(names), valid_until);
    }

    /// Pre-fill: the MX records of `name`.
    pub fn add_mx(&self, name: &str, mx: Vec<MX>, valid_until: Instant) {
        self.mx.insert(fqdn(name), record_set(mx), valid_until);
    }
}

/// The key mail-auth uses: the name with its trailing dot.
fn fqdn(name: &str) -> Box<str> {
    name.to_fqdn().into_owned().into_boxed_str()
}

fn record_set<T>(records: Vec<T>) -> RecordSet<T> {
    RecordSet {
        rrset: Arc::from(records),
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(300)
    }

    #[test]
    fn an_entry_is_served_until_its_ttl_and_not_after() {
        let cache: Cache<Box<str>, u32> = Cache::new(4);
        cache.insert("fresh.".into(), 1, later());
        cache.insert("stale.".into(), 2, Instant::now() - Duration::from_secs(1));
        assert_eq!(cache.get("fresh."), Some(1));
        assert_eq!(
            cache.get("stale."),
            None,
            "an expired answer is never inserted"
        );
    }

    #[test]
    fn a_full_cache_evicts_the_oldest_entry_and_never_grows_past_its_capacity() {
        let cache: Cache<Box<str>, u32> = Cache::new(3);
        for i in 0..10u32 {
            cache.insert(format!("n{i}.").into(), i, later());
            assert!(cache.len() <= 3);
        }
        assert_eq!(cache.get("n9."), Some(9));
        assert_eq!(cache.get("n6."), None);
        // Re-inserting one name many times keeps the order queue bounded too.
        for _ in 0..100 {
            cache.insert("n9.".into(), 9, later());
        }
        assert!(cache.lock().order.len() <= 3);
    }

    #[test]
    fn a_prefilled_txt_record_is_found_under_its_fully_qualified_name() {
        let caches = Caches::with_capacity(8);
        caches.add_txt::<mail_auth::spf::Spf>("example.test", b"v=spf1 -all", later());
        assert!(matches!(caches.txt.get("example.test."), Some(Txt::Spf(_))));
        caches.add_txt::<mail_auth::spf::Spf>("broken.test", b"not an SPF record", later());
        assert!(matches!(
            caches.txt.get("broken.test."),
            Some(Txt::Error(_))
        ));
    }
}
