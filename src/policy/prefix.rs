//! Counting clients by ever coarser prefixes when a table is full: the one scheme the rate
//! limits ([`super::limits`]) and the AUTH failure tables ([`super::lockout`]) share.
//!
//! A table holds a bounded number of exact clients (an IPv4 address, an IPv6 /64). A client
//! that finds it full of entries still in use is counted under its IPv4 /24, then /16, /8,
//! then one entry for all of IPv4 (IPv6: /48, /32, /16, then all of IPv6), each level bounded
//! but the last. A client is always counted by the finest level that already holds an entry
//! for it ([`home`]), so it never moves to a fresh entry while its own is in use, and a flood
//! cannot evict anyone: a full level is only swept of entries that say nothing a fresh one
//! would not, at most once per [`SWEEP_INTERVAL`] ([`Level::make_room`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::access::normalize;

/// Prefix lengths, finest first, under which an IPv4 client is counted.
pub const PREFIXES_V4: [u8; LEVELS] = [32, 24, 16, 8, 0];

/// Prefix lengths, finest first, under which an IPv6 client is counted.
pub const PREFIXES_V6: [u8; LEVELS] = [64, 48, 32, 16, 0];

/// Levels of a client table: exact, three coarser, one per address family.
pub const LEVELS: usize = 5;

/// A full level is swept at most this often (a sweep is a scan of the level; a flood must not
/// make every check pay for one).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The prefix that counts `ip` at `level` (0: the exact client), host bits cleared.
pub fn prefix(ip: IpAddr, level: usize) -> IpNet {
    let ip = normalize(ip);
    let len = match ip {
        IpAddr::V4(_) => PREFIXES_V4[level],
        IpAddr::V6(_) => PREFIXES_V6[level],
    };
    IpNet::new(ip, len)
        .expect("prefix lengths are valid for their family")
        .trunc()
}

/// The prefixes `ip` is counted under, finest first.
pub fn prefixes(ip: IpAddr) -> [IpNet; LEVELS] {
    std::array::from_fn(|level| prefix(ip, level))
}

/// A point in time a table is told: an [`Instant`], or nanoseconds on a table's own clock.
pub trait Moment: Copy {
    /// How long after `earlier` this is (zero if it is not after).
    fn since(self, earlier: Self) -> Duration;
}

impl Moment for Instant {
    fn since(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// Nanoseconds.
impl Moment for u64 {
    fn since(self, earlier: u64) -> Duration {
        Duration::from_nanos(self.saturating_sub(earlier))
    }
}

/// One level of a table: entries by key, and when it was last swept because it was full.
#[derive(Debug)]
pub struct Level<K, V, T> {
    pub map: HashMap<K, V>,
    swept: Option<T>,
}

impl<K: Hash + Eq, V, T: Moment> Default for Level<K, V, T> {
    fn default() -> Self {
        Level {
            map: HashMap::new(),
            swept: None,
        }
    }
}

impl<K: Hash + Eq, V, T: Moment> Level<K, V, T> {
    /// True when the level has room for one more entry under `max`. A full level is first
    /// swept of the entries `keep` rejects, at most once per [`SWEEP_INTERVAL`].
    pub fn make_room(&mut self, max: usize, now: T, mut keep: impl FnMut(&V) -> bool) -> bool {
        if self.map.len() >= max && self.swept.is_none_or(|at| now.since(at) >= SWEEP_INTERVAL) {
            self.map.retain(|_, v| keep(v));
            self.swept = Some(now);
        }
        self.map.len() < max
    }
}

/// A table's levels as [`home`] sees them for one client.
pub trait Levels {
    /// The number of levels, finest first; the last has no bound.
    fn levels(&self) -> usize;
    /// The level holds an entry that counts the client.
    fn holds(&self, level: usize) -> bool;
    /// The level has room for a new entry (see [`Level::make_room`]).
    fn make_room(&mut self, level: usize) -> bool;
}

/// The level that counts a client: the finest that already holds an entry for it; else the
/// finest with room. The last level has no bound, so there is always one.
///
/// An entry is created only for a client that no entry covers yet, so a client's finest
/// entry can change only when that entry is dropped: a finer entry created later for someone
/// else would cover them both, and the coarser entry covers that someone.
pub fn home(table: &mut impl Levels) -> usize {
    if let Some(level) = held_at(table) {
        return level;
    }
    let last = table.levels() - 1;
    (0..last).find(|&l| table.make_room(l)).unwrap_or(last)
}

/// The level that already holds the key, if any, changing nothing: what a read that must not
/// make room (`policy explain`'s) sees.
pub fn held_at(table: &impl Levels) -> Option<usize> {
    (0..table.levels()).find(|&l| table.holds(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_coarsen_by_family_and_map_ipv4_in_ipv6() {
        let v4: IpAddr = "::ffff:192.0.2.77".parse().unwrap();
        let nets: Vec<String> = prefixes(v4).iter().map(ToString::to_string).collect();
        assert_eq!(
            nets,
            [
                "192.0.2.77/32",
                "192.0.2.0/24",
                "192.0.0.0/16",
                "192.0.0.0/8",
                "0.0.0.0/0"
            ]
        );
        let v6: IpAddr = "2001:db8:1:2:3::4".parse().unwrap();
        assert_eq!(prefix(v6, 0).to_string(), "2001:db8:1:2::/64");
        assert_eq!(prefix(v6, 1).to_string(), "2001:db8:1::/48");
        assert_eq!(prefix(v6, 4).to_string(), "::/0");
    }

    #[test]
    fn a_full_level_is_swept_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut level: Level<u32, bool, Instant> = Level::default();
        level.map.extend([(1, true), (2, false)]);
        // Full: the settled entry (false) goes, and there is room.
        assert!(level.make_room(2, t0, |&in_use| in_use));
        level.map.insert(3, false);
        // Full again within the interval: not swept.
        assert!(!level.make_room(2, t0 + SWEEP_INTERVAL / 2, |&in_use| in_use));
        assert!(level.make_room(2, t0 + SWEEP_INTERVAL, |&in_use| in_use));
    }
}
