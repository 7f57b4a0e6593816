//! Connection accounting: total and per-IP counts, shared by every listener, and stress mode.
//!
//! Clients are counted as the rate limits and AUTH lockouts count them ([`ClientKey`]): an IPv4
//! address as it is, an IPv6 address by its /64, since one IPv6 host usually holds a whole /64
//! and could otherwise open `max_connections_per_ip` connections from each of its addresses.
//!
//! # Stress mode
//!
//! Idle connections are cheap to hold and each one takes a slot of `max_connections` for up to
//! `command_timeout`: 1,000 of them from 50 addresses (20 each, within the per-IP cap) lock
//! everyone else out with `421 4.3.2` for minutes. As in Postfix (`smtpd_timeout =
//! ${stress?10}{300}s`), the relay enters stress mode under connection pressure: when open
//! connections reach `limits.stress_threshold` percent of `max_connections`, or a client is
//! refused for `max_connections`. In stress mode sessions get `limits.stress_timeout` per
//! command, for the TLS handshake and before the greeting, and a session in DATA that sends
//! nothing for that long is closed: idle slots free up within seconds and a waiting client
//! gets in. Sessions already open when stress starts have their current deadline cut too.
//! Stress mode ends when open connections fall below half of the threshold (hysteresis, so it
//! does not flap); its start and end are logged once each (`rule="stress"`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::policy::limits::ClientKey;

/// Counts open connections; a [`Slot`] holds one and gives it back when dropped.
#[derive(Debug, Clone)]
pub struct ConnectionCounter {
    inner: Arc<Mutex<Counts>>,
    /// True while in stress mode; sessions watch it (see the module docs).
    stress: Arc<watch::Sender<bool>>,
}

impl Default for ConnectionCounter {
    fn default() -> Self {
        ConnectionCounter {
            inner: Arc::default(),
            stress: Arc::new(watch::Sender::new(false)),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<ClientKey, usize>,
    /// The stress threshold last given to [`ConnectionCounter::admit`] (0: none yet).
    stress_at: usize,
}

impl Counts {
    /// The cap a new connection from `ip` would exceed, total first.
    fn full(&self, ip: &ClientKey, max_total: usize, max_per_ip: usize) -> Option<Full> {
        if self.total >= max_total {
            return Some(Full::Total);
        }
        (self.per_ip.get(ip).copied().unwrap_or(0) >= max_per_ip).then_some(Full::PerIp)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    PerIp,
}

impl ConnectionCounter {
    /// Take a slot for `ip` (counted by [`ClientKey`]) if both caps allow it. `stress_at` is the number of open
    /// connections at which stress mode starts (`Limits::stress_connections`); a refusal for
    /// `max_total` starts it too.
    pub fn admit(
        &self,
        ip: IpAddr,
        max_total: usize,
        max_per_ip: usize,
        stress_at: usize,
    ) -> Result<Slot, Full> {
        self.take(Some(ClientKey::new(ip)), max_total, max_per_ip, stress_at)
    }

    /// Take a slot counted only towards `max_total`: a connection from a trusted proxy
    /// before its PROXY header names the client ([`Slot::claim`] then counts the client).
    ///
    /// # Errors
    /// [`Full::Total`] when `max_total` connections are open (stress mode starts).
    pub fn admit_proxied(&self, max_total: usize, stress_at: usize) -> Result<Slot, Full> {
        self.take(None, max_total, usize::MAX, stress_at)
    }

    fn take(
        &self,
        ip: Option<ClientKey>,
        max_total: usize,
        max_per_ip: usize,
        stress_at: usize,
    ) -> Result<Slot, Full> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.stress_at = stress_at;
        let full = match &ip {
            Some(ip) => c.full(ip, max_total, max_per_ip),
            None => (c.total >= max_total).then_some(Full::Total),
        };
        match full {
            Some(Full::Total) => {
                self.enter_stress(c.total, "max_connections reached");
                return Err(Full::Total);
            }
            Some(full) => return Err(full),
            None => {}
        }
        if let Some(ip) = ip {
            *c.per_ip.entry(ip).or_insert(0) += 1;
        }
        c.total += 1;
        if c.total >= stress_at {
            self.enter_stress(c.total, "stress_threshold reached");
        }
        Ok(Slot {
            counter: self.clone(),
            ip,
        })
    }

    /// Whether a connection from `ip` would be admitted now under these caps, taking no
    /// slot and starting nothing (`portcullis policy explain`).
    ///
    /// # Errors
    /// The cap that would refuse it, as [`ConnectionCounter::admit`] decides.
    pub fn admission(&self, ip: IpAddr, max_total: usize, max_per_ip: usize) -> Result<(), Full> {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.full(&ClientKey::new(ip), max_total, max_per_ip)
            .map_or(Ok(()), Err)
    }

    /// Start stress mode unless already in it (called with the counts locked, so start and
    /// end are logged in order).
    fn enter_stress(&self, connections: usize, why: &'static str) {
        if self
            .stress
            .send_if_modified(|s| !std::mem::replace(s, true))
        {
            warn!(
                connections,
                why,
                rule = "stress",
                "stress mode on: shorter timeouts while connections are scarce"
            );
        }
    }

    /// A receiver of the stress flag (true in stress mode).
    pub fn stress(&self) -> watch::Receiver<bool> {
        self.stress.subscribe()
    }

    /// True in stress mode.
    #[cfg(test)]
    pub fn in_stress(&self) -> bool {
        *self.stress.borrow()
    }

    /// Open connections now.
    pub fn total(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// One admitted connection.
#[derive(Debug)]
pub struct Slot {
    counter: ConnectionCounter,
    /// Whom it counts towards `max_connections_per_ip`; `None`: only towards the total (a
    /// trusted proxy's connection, before or without a client in its header).
    ip: Option<ClientKey>,
}

impl Slot {
    /// Count this slot (taken by [`ConnectionCounter::admit_proxied`]) towards `ip`'s
    /// connections too, the client a PROXY header names, if that stays within
    /// `max_per_ip`.
    ///
    /// # Errors
    /// [`Full::PerIp`] when `ip` has `max_per_ip` connections open already; the slot then
    /// still counts towards the total only.
    pub fn claim(&mut self, ip: IpAddr, max_per_ip: usize) -> Result<(), Full> {
        let key = ClientKey::new(ip);
        let mut c = self.counter.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = self.ip.take() {
            release(&mut c, &old);
        }
        let n = c.per_ip.entry(key).or_insert(0);
        if *n >= max_per_ip {
            if *n == 0 {
                c.per_ip.remove(&key);
            }
            return Err(Full::PerIp);
        }
        *n += 1;
        self.ip = Some(key);
        Ok(())
    }
}

/// Give back one connection of `ip` (the counts locked).
fn release(c: &mut Counts, ip: &ClientKey) {
    if let Some(n) = c.per_ip.get_mut(ip) {
        *n -= 1;
        if *n == 0 {
            c.per_ip.remove(ip);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counter.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = &self.ip {
            release(&mut c, ip);
        }
        if c.total < c.stress_at.div_ceil(2)
            && self
                .counter
                .stress
                .send_if_modified(|s| std::mem::replace(s, false))
        {
            info!(
                connections = c.total,
                rule = "stress",
                "stress mode off: normal timeouts again"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_cannot_multiply_the_per_ip_cap_across_its_64() {
        let counter = ConnectionCounter::default();
        let ip = |n: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, n]);
        let held: Vec<Slot> = (1..=3)
            .map(|n| counter.admit(ip(n), 100, 3, 100).unwrap())
            .collect();
        assert_eq!(counter.admit(ip(4), 100, 3, 100).unwrap_err(), Full::PerIp);
        // Another /64 has its own count.
        let other = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert!(counter.admit(other, 100, 3, 100).is_ok());
        drop(held);
        assert!(counter.admit(ip(9), 100, 3, 100).is_ok());
    }

    #[test]
    fn a_proxied_slot_counts_its_client_only_once_claimed() {
        let c = ConnectionCounter::default();
        let client: IpAddr = "203.0.113.9".parse().unwrap();
        // The proxy's own connections count towards the total only, however many.
        let mut a = c.admit_proxied(3, 100).unwrap();
        let mut b = c.admit_proxied(3, 100).unwrap();
        assert_eq!(c.admission(client, 3, 1), Ok(()));
        a.claim(client, 1).unwrap();
        assert_eq!(c.admission(client, 3, 1), Err(Full::PerIp));
        assert_eq!(b.claim(client, 1), Err(Full::PerIp));
        let _direct = c.admit("192.0.2.7".parse().unwrap(), 3, 1, 100).unwrap();
        assert_eq!(c.admit_proxied(3, 100).unwrap_err(), Full::Total);
        assert_eq!(c.total(), 3);
        drop(a);
        assert_eq!(c.admission(client, 3, 1), Ok(()));
        b.claim(client, 1).unwrap();
        drop(b);
        assert_eq!(c.total(), 1);
        assert!(c.inner.lock().unwrap().per_ip.len() == 1);
    }

    #[test]
    fn caps_and_release() {
        let c = ConnectionCounter::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = c.admit(a, 3, 2, 3).unwrap();
        let _s2 = c.admit(a, 3, 2, 3).unwrap();
        assert_eq!(c.admit(a, 3, 2, 3).unwrap_err(), Full::PerIp);
        let _s3 = c.admit(b, 3, 2, 3).unwrap();
        assert_eq!(c.admit(b, 3, 2, 3).unwrap_err(), Full::Total);
        drop(s1);
        assert!(c.admit(a, 3, 2, 3).is_ok());
        assert_eq!(c.total(), 2);
    }

    #[test]
    fn stress_starts_at_the_threshold_and_ends_below_half_of_it() {
        let c = ConnectionCounter::default();
        let rx = c.stress();
        let ip = |n: u8| IpAddr::from([192, 0, 2, n]);
        // Threshold 4 of 10: three connections are not stress.
        let mut slots: Vec<Slot> = (1..=3).map(|n| c.admit(ip(n), 10, 5, 4).unwrap()).collect();
        assert!(!*rx.borrow());
        slots.push(c.admit(ip(4), 10, 5, 4).unwrap());
        assert!(*rx.borrow(), "4 of threshold 4");
        // Down to 2 (not below half of 4): still stress; to 1: over.
        slots.truncate(2);
        assert!(c.in_stress());
        slots.truncate(1);
        assert!(!c.in_stress());
    }

    #[test]
    fn refusing_for_max_connections_starts_stress_below_the_threshold() {
        let c = ConnectionCounter::default();
        let ip = IpAddr::from([192, 0, 2, 1]);
        let _slot = c.admit(ip, 1, 5, 100).unwrap();
        assert!(!c.in_stress());
        assert_eq!(c.admit(ip, 1, 5, 100).unwrap_err(), Full::Total);
        assert!(c.in_stress());
    }
}
