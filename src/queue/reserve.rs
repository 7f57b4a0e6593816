//! Free space promised to messages in flight, so `limits.min_free_space` holds under
//! concurrency.
//!
//! Checking the free space once at MAIL is not enough: eight sessions that each see room for
//! one more message all go ahead, and together fill the disk (ENOSPC mid-DATA, or worse, for
//! the queue's own state files). So each transaction reserves, at MAIL, the most it may write:
//! its declared `SIZE` (RFC 1870), or `limits.max_message_size` when it declares none (a
//! `SIZE` above the maximum is refused by the protocol engine before this). A MAIL is refused
//! (`452 4.3.1`, RFC 3463 "mail system full") when the free space minus everything reserved
//! minus its own reservation would fall below `min_free_space`. The reservation is given back
//! when the transaction ends: message committed or refused, RSET, a new MAIL, or the session
//! closing.
//!
//! A client may declare a `SIZE` smaller than what it sends (RFC 1870 calls the value an
//! estimate): once a message has written more than it reserved, the driver grows the
//! reservation ([`SpaceReserve::grow`], in steps of [`GROW_STEP`]) under the same rule, and a
//! message that cannot grow is refused at its end (`452 4.3.1`) rather than filling the disk.
//!
//! The count errs on the safe side: bytes a message in flight has already written are counted
//! twice, once as used by the file system and once as reserved, until it ends.

use std::sync::{Arc, Mutex};

/// How much a reservation grows at a time once a message outgrows it (one `statvfs` per step).
pub const GROW_STEP: u64 = 1 << 20;

/// Bytes reserved by the transactions in flight on one spool.
#[derive(Debug, Default)]
pub struct SpaceReserve {
    reserved: Mutex<u64>,
}

/// Space held for one transaction; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    reserve: Arc<SpaceReserve>,
    bytes: u64,
}

/// Why [`SpaceReserve::try_reserve`] refused: the figures, in bytes, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{bytes} more bytes would leave {free} free minus {reserved} reserved below min_free_space {min_free}"
)]
pub struct Insufficient {
    /// Free space reported by the file system.
    pub free: u64,
    /// Already reserved by other transactions.
    pub reserved: u64,
    /// What this transaction asked for.
    pub bytes: u64,
    /// `limits.min_free_space`.
    pub min_free: u64,
}

impl SpaceReserve {
    /// Reserve `bytes` when `free` (the file system's free space now, in bytes) minus what is
    /// reserved already minus `bytes` stays at or above `min_free`. `min_free == 0` disables
    /// the check (`limits.min_free_space = 0`): nothing is reserved or refused.
    pub fn try_reserve(
        self: &Arc<Self>,
        free: u64,
        min_free: u64,
        bytes: u64,
    ) -> Result<Reservation, Insufficient> {
        if min_free == 0 {
            return Ok(Reservation {
                reserve: self.clone(),
                bytes: 0,
            });
        }
        let mut reserved = self.lock();
        let left = free
            .checked_sub(*reserved)
            .and_then(|f| f.checked_sub(bytes));
        match left {
            Some(left) if left >= min_free => {
                *reserved += bytes;
                Ok(Reservation {
                    reserve: self.clone(),
                    bytes,
                })
            }
            _ => Err(Insufficient {
                free,
                reserved: *reserved,
                bytes,
                min_free,
            }),
        }
    }

    /// Grow `reservation` (taken from this reserve) to `bytes` in all, under the rule of
    /// [`SpaceReserve::try_reserve`] for the extra bytes; `free` and `min_free` as there. A
    /// reservation already that large, or `min_free == 0`, succeeds without change.
    pub fn grow(
        &self,
        reservation: &mut Reservation,
        free: u64,
        min_free: u64,
        bytes: u64,
    ) -> Result<(), Insufficient> {
        if min_free == 0 || bytes <= reservation.bytes {
            return Ok(());
        }
        let extra = bytes - reservation.bytes;
        let mut reserved = self.lock();
        let left = free
            .checked_sub(*reserved)
            .and_then(|f| f.checked_sub(extra));
        match left {
            Some(left) if left >= min_free => {
                *reserved += extra;
                reservation.bytes = bytes;
                Ok(())
            }
            _ => Err(Insufficient {
                free,
                reserved: *reserved,
                bytes: extra,
                min_free,
            }),
        }
    }

    /// Bytes reserved now.
    #[cfg(test)]
    pub fn reserved(&self) -> u64 {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut reserved = self.reserve.lock();
        *reserved = reserved.saturating_sub(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// The reproduction in figures: a 60 MiB spool, min_free_space 4 MiB, eight
    /// parallel 9 MiB messages. Without reservations all eight passed the MAIL check and filled
    /// the disk; now the sixth is refused until one ends.
    #[test]
    fn parallel_messages_cannot_take_free_space_below_the_reserve() {
        let reserve = Arc::new(SpaceReserve::default());
        let free = 60 * MIB;
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(reserve.try_reserve(free, 4 * MIB, 9 * MIB).unwrap());
        }
        assert_eq!(reserve.reserved(), 54 * MIB);
        let refused = reserve.try_reserve(free, 4 * MIB, 9 * MIB).unwrap_err();
        assert_eq!(
            refused,
            Insufficient {
                free,
                reserved: 54 * MIB,
                bytes: 9 * MIB,
                min_free: 4 * MIB
            }
        );
        // A small declared SIZE still fits; the refused one fits once a message ends.
        let small = reserve.try_reserve(free, 4 * MIB, MIB).unwrap();
        drop(small);
        drop(held.pop());
        assert_eq!(reserve.reserved(), 45 * MIB);
        assert!(reserve.try_reserve(free, 4 * MIB, 9 * MIB).is_ok());
        drop(held);
        assert_eq!(reserve.reserved(), 0);
    }

    #[test]
    fn free_space_below_what_is_reserved_refuses_without_overflow() {
        let reserve = Arc::new(SpaceReserve::default());
        let _a = reserve.try_reserve(100, 1, 90).unwrap();
        // The disk filled up meanwhile: 50 free, 90 reserved.
        assert!(reserve.try_reserve(50, 1, 0).is_err());
        assert!(reserve.try_reserve(u64::MAX, 1, u64::MAX).is_err());
    }

    /// SIZE=1 is no way around the reserve: a message that outgrows its reservation must grow
    /// it under the same rule, and cannot once the reserve would be breached.
    #[test]
    fn a_message_larger_than_its_declared_size_cannot_grow_past_the_reserve() {
        let reserve = Arc::new(SpaceReserve::default());
        let free = 60 * MIB;
        let mut liar = reserve.try_reserve(free, 4 * MIB, 1).unwrap();
        let other = reserve.try_reserve(free, 4 * MIB, 40 * MIB).unwrap();
        reserve.grow(&mut liar, free, 4 * MIB, 10 * MIB).unwrap();
        assert_eq!((liar.bytes(), reserve.reserved()), (10 * MIB, 50 * MIB));
        // Shrinking is not a thing; asking for less changes nothing.
        reserve.grow(&mut liar, free, 4 * MIB, MIB).unwrap();
        assert_eq!(liar.bytes(), 10 * MIB);
        let short = reserve
            .grow(&mut liar, free, 4 * MIB, 17 * MIB)
            .unwrap_err();
        assert_eq!((short.bytes, short.reserved), (7 * MIB, 50 * MIB));
        assert_eq!(liar.bytes(), 10 * MIB);
        drop(other);
        reserve.grow(&mut liar, free, 4 * MIB, 17 * MIB).unwrap();
        drop(liar);
        assert_eq!(reserve.reserved(), 0);
    }

    #[test]
    fn zero_min_free_space_disables_the_reserve() {
        let reserve = Arc::new(SpaceReserve::default());
        let r = reserve.try_reserve(0, 0, u64::MAX).unwrap();
        assert_eq!(r.bytes(), 0);
        assert_eq!(reserve.reserved(), 0);
    }
}
