//! Connection accounting: total and per-IP counts, shared by every listener.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::policy::access::normalize;

/// Counts open connections; a [`Slot`] holds one and gives it back when dropped.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCounter {
    inner: Arc<Mutex<Counts>>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    PerIp,
}

impl ConnectionCounter {
    /// Take a slot for `ip` if both caps allow it.
    pub fn admit(&self, ip: IpAddr, max_total: usize, max_per_ip: usize) -> Result<Slot, Full> {
        let ip = normalize(ip);
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= max_total {
            return Err(Full::Total);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            return Err(Full::PerIp);
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            counter: self.clone(),
            ip,
        })
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
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counter.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_release() {
        let c = ConnectionCounter::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = c.admit(a, 3, 2).unwrap();
        let _s2 = c.admit(a, 3, 2).unwrap();
        assert_eq!(c.admit(a, 3, 2).unwrap_err(), Full::PerIp);
        let _s3 = c.admit(b, 3, 2).unwrap();
        assert_eq!(c.admit(b, 3, 2).unwrap_err(), Full::Total);
        drop(s1);
        assert!(c.admit(a, 3, 2).is_ok());
        assert_eq!(c.total(), 2);
    }
}
