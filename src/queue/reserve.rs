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
//! reservation ([`SpaceReserve::hold`], in steps of [`GROW_STEP`]) under the same rule, and a
//! message that cannot grow is refused at its end (`452 4.3.1`) rather than filling the disk.
//!
//! The count errs on the safe side: bytes a message in flight has already written are counted
//! twice, once as used by the file system and once as reserved, until it ends.

use std::io;
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

/// Why [`SpaceReserve::reserve`] or [`SpaceReserve::hold`] refused: the figures, in bytes, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{bytes} more bytes would leave {free} free minus {reserved} reserved below min_free_space {min_free}"
)]
pub struct Insufficient {
    /// Free space reported by the file system.
    pub free: u64,
    /// Already reserved by other transactions.
    pub reserved: u64,
    /// What this transaction asked for (in addition to what it holds already).
    pub bytes: u64,
    /// `limits.min_free_space`.
    pub min_free: u64,
}

impl SpaceReserve {
    /// Reserve `bytes` when the free space (`free()`, the file system's free space now, in
    /// bytes; asked only when needed) minus what is reserved already minus `bytes` stays at
    /// or above `min_free`. `min_free == 0` disables the check (`limits.min_free_space = 0`):
    /// nothing is reserved or refused, and `free` is not asked.
    ///
    /// # Errors
    /// The outer error is `free`'s; the inner one says the reserve would be breached.
    pub fn reserve(
        self: &Arc<Self>,
        free: impl FnOnce() -> io::Result<u64>,
        min_free: u64,
        bytes: u64,
    ) -> io::Result<Result<Reservation, Insufficient>> {
        let mut reservation = Reservation {
            reserve: self.clone(),
            bytes: 0,
        };
        Ok(self
            .take(&mut reservation, free, min_free, bytes)?
            .map(|()| reservation))
    }

    /// Keep `reservation` (taken from this reserve) ahead of a message that has written
    /// `written` bytes: once it has written more than is held, grow the reservation to
    /// `written +` [`GROW_STEP`] under the rule of [`SpaceReserve::reserve`] for the extra
    /// bytes. A reservation still ahead, or `min_free == 0`, succeeds without change and
    /// without asking `free`.
    ///
    /// # Errors
    /// As [`SpaceReserve::reserve`]; the reservation is then unchanged.
    pub fn hold(
        &self,
        reservation: &mut Reservation,
        free: impl FnOnce() -> io::Result<u64>,
        min_free: u64,
        written: u64,
    ) -> io::Result<Result<(), Insufficient>> {
        if written <= reservation.bytes {
            return Ok(Ok(()));
        }
        let extra = written.saturating_add(GROW_STEP) - reservation.bytes;
        self.take(reservation, free, min_free, extra)
    }

    /// The one rule: add `extra` bytes to `reservation` when the free space minus everything
    /// reserved minus `extra` stays at or above `min_free` (never when `min_free == 0`).
    fn take(
        &self,
        reservation: &mut Reservation,
        free: impl FnOnce() -> io::Result<u64>,
        min_free: u64,
        extra: u64,
    ) -> io::Result<Result<(), Insufficient>> {
        if min_free == 0 {
            return Ok(Ok(()));
        }
        let free = free()?;
        let mut reserved = self.lock();
        let left = free
            .checked_sub(*reserved)
            .and_then(|f| f.checked_sub(extra));
        Ok(match left {
            Some(left) if left >= min_free => {
                *reserved += extra;
                reservation.bytes += extra;
                Ok(())
            }
            _ => Err(Insufficient {
                free,
                reserved: *reserved,
                bytes: extra,
                min_free,
            }),
        })
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

    /// A file system reporting `free` bytes.
    fn at(free: u64) -> impl FnOnce() -> io::Result<u64> {
        move || Ok(free)
    }

    fn reserve(
        r: &Arc<SpaceReserve>,
        free: u64,
        min_free: u64,
        bytes: u64,
    ) -> Result<Reservation, Insufficient> {
        r.reserve(at(free), min_free, bytes).unwrap()
    }

    /// Hold for a message that has written `written` bytes.
    fn hold(
        r: &SpaceReserve,
        held: &mut Reservation,
        free: u64,
        min_free: u64,
        written: u64,
    ) -> Result<(), Insufficient> {
        r.hold(held, at(free), min_free, written).unwrap()
    }

    /// The reproduction in figures: a 60 MiB spool, min_free_space 4 MiB, eight
    /// parallel 9 MiB messages. Without reservations all eight passed the MAIL check and filled
    /// the disk; now the sixth is refused until one ends.
    #[test]
    fn parallel_messages_cannot_take_free_space_below_the_reserve() {
        let r = Arc::new(SpaceReserve::default());
        let free = 60 * MIB;
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(reserve(&r, free, 4 * MIB, 9 * MIB).unwrap());
        }
        assert_eq!(r.reserved(), 54 * MIB);
        let refused = reserve(&r, free, 4 * MIB, 9 * MIB).unwrap_err();
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
        let small = reserve(&r, free, 4 * MIB, MIB).unwrap();
        drop(small);
        drop(held.pop());
        assert_eq!(r.reserved(), 45 * MIB);
        assert!(reserve(&r, free, 4 * MIB, 9 * MIB).is_ok());
        drop(held);
        assert_eq!(r.reserved(), 0);
    }

    #[test]
    fn free_space_below_what_is_reserved_refuses_without_overflow() {
        let r = Arc::new(SpaceReserve::default());
        let _a = reserve(&r, 100, 1, 90).unwrap();
        // The disk filled up meanwhile: 50 free, 90 reserved.
        assert!(reserve(&r, 50, 1, 0).is_err());
        assert!(reserve(&r, u64::MAX, 1, u64::MAX).is_err());
    }

    /// SIZE=1 is no way around the reserve: a message that outgrows its reservation must grow
    /// it under the same rule, and cannot once the reserve would be breached.
    #[test]
    fn a_message_larger_than_its_declared_size_cannot_grow_past_the_reserve() {
        let r = Arc::new(SpaceReserve::default());
        let free = 60 * MIB;
        let mut liar = reserve(&r, free, 4 * MIB, 1).unwrap();
        let other = reserve(&r, free, 4 * MIB, 40 * MIB).unwrap();
        // 9 MiB written: held up to one step ahead.
        hold(&r, &mut liar, free, 4 * MIB, 9 * MIB).unwrap();
        assert_eq!((liar.bytes(), r.reserved()), (10 * MIB, 50 * MIB));
        // Shrinking is not a thing; what is held covers less written.
        hold(&r, &mut liar, free, 4 * MIB, MIB).unwrap();
        assert_eq!(liar.bytes(), 10 * MIB);
        let short = hold(&r, &mut liar, free, 4 * MIB, 16 * MIB).unwrap_err();
        assert_eq!((short.bytes, short.reserved), (7 * MIB, 50 * MIB));
        assert_eq!(liar.bytes(), 10 * MIB);
        drop(other);
        hold(&r, &mut liar, free, 4 * MIB, 16 * MIB).unwrap();
        assert_eq!(liar.bytes(), 17 * MIB);
        drop(liar);
        assert_eq!(r.reserved(), 0);
    }

    #[test]
    fn zero_min_free_space_disables_the_reserve_without_asking_the_file_system() {
        let r = Arc::new(SpaceReserve::default());
        let unasked = || -> io::Result<u64> { panic!("statvfs with min_free_space = 0") };
        let mut held = r.reserve(unasked, 0, u64::MAX).unwrap().unwrap();
        assert_eq!(held.bytes(), 0);
        r.hold(&mut held, unasked, 0, u64::MAX).unwrap().unwrap();
        assert_eq!((held.bytes(), r.reserved()), (0, 0));
    }

    /// A reservation still ahead of what is written asks nothing of the file system (one
    /// `statvfs` per step, not per chunk); one that must grow and cannot read the free space
    /// reports that error and holds what it held.
    #[test]
    fn the_free_space_is_read_only_when_the_reservation_must_grow() {
        let r = Arc::new(SpaceReserve::default());
        let mut held = reserve(&r, 10 * MIB, MIB, 2 * MIB).unwrap();
        let unasked = || -> io::Result<u64> { panic!("statvfs while the reservation is ahead") };
        r.hold(&mut held, unasked, MIB, 2 * MIB).unwrap().unwrap();
        let failing = || -> io::Result<u64> { Err(io::ErrorKind::PermissionDenied.into()) };
        assert!(r.hold(&mut held, failing, MIB, 3 * MIB).is_err());
        assert_eq!((held.bytes(), r.reserved()), (2 * MIB, 2 * MIB));
    }
}
