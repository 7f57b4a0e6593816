//! The routing table ([`Routes`]: which upstreams serve a recipient domain) and what each
//! upstream last said it can carry ([`CapabilityBook`]), shared by delivery and, read-only,
//! by the inbound checks. Both sides depend on this module; neither depends on the other.
//!
//!
//! Every connection to an upstream (the probe at start, and each new delivery connection)
//! records the extensions of its last EHLO reply ([`Capabilities`]: SMTPUTF8, 8BITMIME,
//! SIZE). The inbound side asks [`RouteCapabilities::for_domain`], a read-only view, at RCPT
//! and after the final dot (see [`crate::policy::capability`]), through the same [`Routes`]
//! delivery uses, so nothing is accepted that the route can only bounce.
//!
//! The book is kept in the spool as [`FILE_NAME`], a small JSON file replaced atomically
//! (write a temporary file, fsync, rename, fsync the directory) whenever an upstream's answer
//! changes, so a restart during an upstream outage still knows what the upstream offered. An
//! entry counts only for the upstream with the same `name` and `address`. Until an upstream
//! was first seen, [`Capabilities::UNKNOWN`] applies.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Upstream;
use crate::envelope::unix_now;
use crate::policy::capability::Capabilities;

/// The routing table: which upstreams (by index in `[[upstreams]]`) serve a recipient domain.
/// One function for delivery and for the checks at RCPT ([`RouteCapabilities`]), so what is
/// checked is the route the message will take.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_domain: HashMap<String, Vec<usize>>,
    default_route: Vec<usize>,
}

impl Routes {
    /// The routing table of `upstreams`.
    pub fn new(upstreams: &[Upstream]) -> Routes {
        let mut routes = Routes::default();
        for (i, up) in upstreams.iter().enumerate() {
            if up.domains.is_empty() {
                routes.default_route.push(i);
            }
            for d in &up.domains {
                routes.by_domain.entry(d.clone()).or_default().push(i);
            }
        }
        routes
    }

    /// The upstreams for a recipient domain, in failover order. Empty when no upstream lists
    /// the domain and there is no default route. `domain` is an [`Address::domain`]: the
    /// canonical A-label form in lower case, the form `upstreams[].domains` is compiled to,
    /// so `bücher.example` and `xn--bcher-kva.example` take the same route.
    ///
    /// [`Address::domain`]: crate::envelope::Address::domain
    pub fn route(&self, domain: &str) -> &[usize] {
        self.by_domain.get(domain).unwrap_or(&self.default_route)
    }
}

/// The file in the spool directory that keeps the last capabilities of each upstream.
pub const FILE_NAME: &str = "upstream-capabilities.json";

/// Largest capability file read at start (a few hundred octets per upstream); a bigger one is
/// ignored as damaged.
const MAX_FILE: u64 = 1024 * 1024;

/// One upstream's entry in [`FILE_NAME`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Entry {
    name: String,
    address: String,
    smtputf8: bool,
    eightbitmime: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    /// When this answer was first seen (Unix seconds).
    seen: u64,
}

/// The whole file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    upstreams: Vec<Entry>,
}

/// The last capabilities of every upstream, by index in `[[upstreams]]`.
#[derive(Debug)]
pub struct CapabilityBook {
    upstreams: Vec<Upstream>,
    routes: Routes,
    /// `None`: not seen yet (neither now nor in the spool file).
    known: Mutex<Known>,
    /// The spool file; `None` keeps the book in memory only.
    path: Option<PathBuf>,
    /// Serialises file writes and holds the version last written, so a snapshot that lost
    /// the race to the disk against a newer one is not written over it.
    written: Arc<Mutex<u64>>,
}

/// The book's contents, with a version that grows with each change.
#[derive(Debug)]
struct Known {
    upstreams: Vec<Option<(Capabilities, u64)>>,
    version: u64,
}

impl CapabilityBook {
    /// A book for `upstreams`, loaded from `spool_dir/`[`FILE_NAME`] when it exists. A file
    /// that cannot be read or parsed is logged and ignored: the capabilities are then learnt
    /// again from the upstreams.
    pub fn load(upstreams: &[Upstream], spool_dir: Option<&Path>) -> CapabilityBook {
        let path = spool_dir.map(|d| d.join(FILE_NAME));
        let file = path.as_deref().and_then(read_file).unwrap_or_default();
        let known = upstreams
            .iter()
            .map(|up| {
                let e = file
                    .upstreams
                    .iter()
                    .find(|e| e.name == up.name && e.address == up.address)?;
                let caps = Capabilities {
                    smtputf8: e.smtputf8,
                    eightbitmime: e.eightbitmime,
                    size: e.size.filter(|&n| n > 0),
                };
                info!(
                    upstream = %up.name, smtputf8 = caps.smtputf8, eightbitmime = caps.eightbitmime,
                    size = caps.size.unwrap_or(0), seen = e.seen,
                    "upstream capabilities from the spool"
                );
                Some((caps, e.seen))
            })
            .collect();
        CapabilityBook {
            upstreams: upstreams.to_vec(),
            routes: Routes::new(upstreams),
            known: Mutex::new(Known {
                upstreams: known,
                version: 0,
            }),
            path,
            written: Arc::new(Mutex::new(0)),
        }
    }

    /// The routing table, the one delivery and the checks at RCPT both use.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The capabilities of upstream `index` ([`Capabilities::UNKNOWN`] until first seen).
    pub fn get(&self, index: usize) -> Capabilities {
        self.known()
            .upstreams
            .get(index)
            .copied()
            .flatten()
            .map_or(Capabilities::UNKNOWN, |(c, _)| c)
    }

    /// What the route for a recipient domain (lower case) can carry: the meet of every
    /// upstream in it. `None` when no upstream serves the domain (such mail waits in the queue
    /// for a route; that is logged at delivery).
    pub fn for_domain(&self, domain: &str) -> Option<Capabilities> {
        let route = self.routes.route(domain);
        let known = self.known();
        route
            .iter()
            .map(|&i| {
                known
                    .upstreams
                    .get(i)
                    .copied()
                    .flatten()
                    .map_or(Capabilities::UNKNOWN, |(c, _)| c)
            })
            .reduce(Capabilities::meet)
    }

    /// Record what upstream `index` announced on a new connection. A change is logged and
    /// written to the spool file (off the reactor); the same answer again costs a lock only.
    pub fn record(&self, index: usize, caps: Capabilities) {
        let (snapshot, version) = {
            let mut known = self.known();
            let Some(slot) = known.upstreams.get_mut(index) else {
                return;
            };
            if slot.is_some_and(|(c, _)| c == caps) {
                return;
            }
            *slot = Some((caps, unix_now()));
            known.version += 1;
            (self.file_of(&known.upstreams), known.version)
        };
        info!(
            upstream = %self.upstreams[index].name, smtputf8 = caps.smtputf8,
            eightbitmime = caps.eightbitmime, size = caps.size.unwrap_or(0),
            "upstream capabilities learnt"
        );
        let Some(path) = self.path.clone() else {
            return;
        };
        let written = self.written.clone();
        let write = move || {
            let mut last = written.lock().unwrap_or_else(|p| p.into_inner());
            if *last >= version {
                return;
            }
            match write_file(&path, &snapshot) {
                Ok(()) => *last = version,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot save upstream capabilities")
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    fn file_of(&self, known: &[Option<(Capabilities, u64)>]) -> File {
        File {
            upstreams: self
                .upstreams
                .iter()
                .zip(known)
                .filter_map(|(up, k)| {
                    let (c, seen) = (*k)?;
                    Some(Entry {
                        name: up.name.clone(),
                        address: up.address.clone(),
                        smtputf8: c.smtputf8,
                        eightbitmime: c.eightbitmime,
                        size: c.size,
                        seen,
                    })
                })
                .collect(),
        }
    }
}

/// The read-only view of a [`CapabilityBook`] that the inbound side gets: it can ask what a
/// route carries, not record anything. A reload of `[[upstreams]]` replaces the book behind
/// every clone at once ([`RouteCapabilities::replace`]).
#[derive(Debug, Clone)]
pub struct RouteCapabilities(Arc<arc_swap::ArcSwap<CapabilityBook>>);

impl RouteCapabilities {
    /// A view of `book`.
    pub fn new(book: Arc<CapabilityBook>) -> RouteCapabilities {
        RouteCapabilities(Arc::new(arc_swap::ArcSwap::new(book)))
    }

    /// See [`CapabilityBook::for_domain`].
    pub fn for_domain(&self, domain: &str) -> Option<Capabilities> {
        self.0.load().for_domain(domain)
    }

    /// Answer from `book` from now on (the routing table of a reloaded configuration).
    pub fn replace(&self, book: Arc<CapabilityBook>) {
        self.0.store(book);
    }
}

fn read_file(path: &Path) -> Option<File> {
    use crate::queue::{Opened, open_trusted};
    use std::io::Read;
    // The relay runs as the spool's owner (it refuses to start otherwise).
    // SAFETY: geteuid has no preconditions and cannot fail.
    let owner = unsafe { libc::geteuid() };
    // Only a file the relay wrote decides what is accepted at RCPT: one planted by another
    // user, writable by others, or a link could make it accept mail it must then bounce.
    let text = match open_trusted(path, owner, false) {
        Ok(file) => {
            let mut text = Vec::new();
            file.take(MAX_FILE + 1).read_to_end(&mut text).map(|_| text)
        }
        Err(Opened::Untrusted(reason)) => {
            warn!(file = %path.display(), reason, "upstream capability file not written by the relay; ignored");
            return None;
        }
        Err(Opened::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(Opened::Io(e)) => Err(e),
    };
    if text.as_ref().is_ok_and(|t| t.len() as u64 > MAX_FILE) {
        warn!(file = %path.display(), "upstream capability file too large; ignored");
        return None;
    }
    match text.map(|t| serde_json::from_slice::<File>(&t)) {
        Ok(Ok(file)) => Some(file),
        Ok(Err(e)) => {
            warn!(file = %path.display(), error = %e, "upstream capability file damaged; ignored");
            None
        }
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read the upstream capability file; ignored");
            None
        }
    }
}

/// Replace `path` with `file` atomically: temporary file, fsync, rename, directory fsync.
fn write_file(path: &Path, file: &File) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("json.tmp");
    let mut json = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    json.push(b'\n');
    // Only the relay's user reads it: it says which mail the relay accepts.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&json)?;
    f.sync_data()?;
    drop(f);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstreams() -> Vec<Upstream> {
        let text = "[server]\nhostname = \"relay.test\"\n[[listeners]]\nbind = \"127.0.0.1:2525\"\n\
                    tls = \"none\"\n[[upstreams]]\nname = \"a\"\naddress = \"127.0.0.1:25\"\n\
                    [[upstreams]]\nname = \"b\"\naddress = \"127.0.0.1:26\"\n\
                    [[upstreams]]\nname = \"c\"\naddress = \"127.0.0.1:27\"\ndomains = [\"c.test\"]\n";
        Config::from_toml(text, None).unwrap().upstreams
    }

    const FULL: Capabilities = Capabilities {
        smtputf8: true,
        eightbitmime: true,
        size: Some(1000),
    };

    #[test]
    fn a_route_is_unknown_until_seen_then_the_meet_of_its_upstreams() {
        let book = CapabilityBook::load(&upstreams(), None);
        assert_eq!(book.for_domain("example.com"), Some(Capabilities::UNKNOWN));
        book.record(0, FULL);
        // b, the failover of the default route, is still unknown: no SMTPUTF8.
        assert_eq!(
            book.for_domain("example.com"),
            Some(Capabilities {
                smtputf8: false,
                ..FULL
            })
        );
        book.record(1, FULL);
        assert_eq!(book.for_domain("example.com"), Some(FULL));
        assert_eq!(book.for_domain("c.test"), Some(Capabilities::UNKNOWN));
    }

    #[test]
    fn capabilities_survive_a_restart_for_the_same_name_and_address_only() {
        let dir = tempfile::tempdir().unwrap();
        let ups = upstreams();
        let book = CapabilityBook::load(&ups, Some(dir.path()));
        book.record(0, FULL);
        book.record(2, Capabilities::UNKNOWN);
        let again = CapabilityBook::load(&ups, Some(dir.path()));
        assert_eq!(again.get(0), FULL);
        assert_eq!(again.get(1), Capabilities::UNKNOWN);
        // The same name at another address is another server.
        let mut moved = ups.clone();
        moved[0].address = "127.0.0.1:2500".into();
        assert_eq!(
            CapabilityBook::load(&moved, Some(dir.path())).get(0),
            Capabilities::UNKNOWN
        );
        // A file writable by others, or planted by another user, is not believed.
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join(FILE_NAME);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(
            CapabilityBook::load(&ups, Some(dir.path())).get(0),
            Capabilities::UNKNOWN
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert_eq!(
                CapabilityBook::load(&ups, Some(dir.path())).get(0),
                Capabilities::UNKNOWN
            );
            std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        }
        assert_eq!(CapabilityBook::load(&ups, Some(dir.path())).get(0), FULL);
        // A damaged file is ignored, not fatal.
        fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        assert_eq!(
            CapabilityBook::load(&ups, Some(dir.path())).get(0),
            Capabilities::UNKNOWN
        );
    }
}
