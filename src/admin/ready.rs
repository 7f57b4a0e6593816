//! Readiness (`/readyz`, the status's `ready`): can this node take mail now? Listeners
//! bound, not paused, the spool writable and its free space at or above
//! `limits.min_free_space`. Upstream state is not readiness: a relay whose upstream is down
//! still queues mail, which is what it is for.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use crate::config::units::format_size;
use crate::observe::Telemetry;
use crate::queue::Spool;

/// What readiness is judged from.
#[derive(Debug)]
pub struct Facts {
    /// Every listener is bound.
    pub bound: bool,
    /// `portcullis listeners pause` is in effect.
    pub paused: bool,
    /// Whether the spool's `tmp/` can be written by the effective user (`faccessat(2)` with
    /// `W_OK`, which also fails on a read-only file system).
    pub writable: io::Result<()>,
    /// Free space of the spool's file system for unprivileged writers, in octets.
    pub free: io::Result<u64>,
    /// `limits.min_free_space` in octets; 0 disables the free-space check.
    pub min_free: u64,
}

/// The verdict: `None` when ready, else one line saying why not (the first reason found, in
/// the order bound, paused, writable, free space).
pub fn verdict(facts: &Facts) -> Option<String> {
    if !facts.bound {
        return Some("listeners not bound".to_owned());
    }
    if facts.paused {
        return Some("listeners paused (portcullis listeners resume)".to_owned());
    }
    if let Err(e) = &facts.writable {
        return Some(format!("spool not writable: {e}"));
    }
    if facts.min_free > 0 {
        match &facts.free {
            Err(e) => return Some(format!("spool free space unknown: {e}")),
            Ok(free) if *free < facts.min_free => {
                return Some(format!(
                    "spool free space {} below limits.min_free_space {}",
                    format_size(*free),
                    format_size(facts.min_free)
                ));
            }
            Ok(_) => {}
        }
    }
    None
}

/// Gather the facts for `spool` now and judge them. Blocking (`faccessat`, `statvfs`): run it
/// off the reactor.
pub fn check(telemetry: &Telemetry, spool: &Spool, min_free: u64) -> Option<String> {
    let facts = Facts {
        bound: telemetry.gate.bound(),
        paused: telemetry.gate.paused(),
        writable: writable(&spool.root().join("tmp")),
        free: if min_free > 0 {
            spool.free_space()
        } else {
            Ok(0)
        },
        min_free,
    };
    verdict(&facts)
}

/// Whether the effective user may write into `dir` (`faccessat(2)`, `AT_EACCESS`).
fn writable(dir: &Path) -> io::Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let rc =
        unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), libc::W_OK, libc::AT_EACCESS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            bound: true,
            paused: false,
            writable: Ok(()),
            free: Ok(10 << 20),
            min_free: 1 << 20,
        }
    }

    /// One change to the facts of a ready node.
    type Change = fn(&mut Facts);

    #[test]
    fn each_reason_makes_the_node_not_ready_with_its_own_line() {
        assert_eq!(verdict(&facts()), None);
        let cases: [(Change, &str); 6] = [
            (|f| f.bound = false, "listeners not bound"),
            (
                |f| f.paused = true,
                "listeners paused (portcullis listeners resume)",
            ),
            (
                |f| f.writable = Err(io::Error::from_raw_os_error(libc::EROFS)),
                "spool not writable: Read-only file system (os error 30)",
            ),
            (
                |f| f.free = Ok(512 << 10),
                "spool free space 512KiB below limits.min_free_space 1MiB",
            ),
            (
                |f| f.free = Err(io::Error::from_raw_os_error(libc::EIO)),
                "spool free space unknown: Input/output error (os error 5)",
            ),
            // Bound comes first.
            (
                |f| {
                    f.bound = false;
                    f.paused = true;
                },
                "listeners not bound",
            ),
        ];
        for (change, reason) in cases {
            let mut f = facts();
            change(&mut f);
            assert_eq!(verdict(&f).as_deref(), Some(reason));
        }
    }

    #[test]
    fn free_space_is_not_judged_when_min_free_space_is_zero() {
        let mut f = facts();
        f.min_free = 0;
        f.free = Err(io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(verdict(&f), None);
        f.min_free = 1;
        f.free = Ok(1);
        assert_eq!(verdict(&f), None, "exactly the minimum is enough");
    }
}
