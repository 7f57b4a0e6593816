//! The manual pages of the `portcullis` command, part of the binary (not of the library):
//! portcullis(8) and one page per subcommand at every level (portcullis-queue(8),
//! portcullis-queue-purge(8), …), generated from the clap definitions by clap_mangen, with the
//! sections clap does not describe (exit status, signals, files, environment, see also).
//! `portcullis man-pages --out DIR` writes them; the Debian package ships them gzipped in
//! /usr/share/man/man8.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

/// Section 8: system administration commands and daemons.
const SECTION: &str = "8";
const MANUAL: &str = "System Manager's Manual";

/// What portcullis(8) says beyond its options and subcommands: each entry is a section title
/// and its paragraphs.
const MAIN_SECTIONS: &[(&str, &[&str])] = &[
    (
        "EXIT STATUS",
        &[
            "0 on success; 2 for bad input or an invalid policy file (every error is printed with \
             its key); 1 for any other failure.",
            "queue retry, delete, hold, release and restore check every id first (one malformed \
             id: 2, nothing done); an id that is well formed but not there is reported and the \
             others are still acted on, then the status is 1. queue purge, hold and release that match \
             nothing exit 0.",
            "trace exits 1 when no event matches. doctor and policy explain exit 0 whenever they ran, whatever they found. \
             audit exits 0 with an empty log (said on standard error). listeners pause and resume \
             exit 0 whether or not the marker changed; user suspend and resume whether or not \
             the login's state changed, and 2 for a login neither in the users file nor \
             suspended.",
            "A command that changed something but could not record it in the audit log \
             (SPOOL/audit.jsonl) says so and exits 1; the change stays made.",
        ],
    ),
    (
        "SIGNALS",
        &[
            "SIGHUP reloads the policy file (systemctl reload portcullis): a valid one takes effect \
             for new sessions, an invalid one is logged and the running policy is kept. Listener \
             addresses and spool_dir need a restart.",
            "SIGTERM and SIGINT stop accepting, give sessions in progress shutdown_grace and \
             deliveries in flight delivery_grace to finish, then exit. Nothing acknowledged is \
             lost: a message is acknowledged with 250 only once it is on disk.",
        ],
    ),
    (
        "FILES",
        &[
            "/etc/portcullis/portcullis.toml: the policy file installed by the package (a \
             conffile). Every key, with its default: \
             /usr/share/doc/portcullis/portcullis.toml.reference.",
            "/etc/portcullis/users.toml: the accounts allowed to authenticate.",
            "/var/spool/portcullis: the durable queue and the message journal; owned by the user \
             portcullis, mode 0700.",
            "/usr/share/doc/portcullis/deploy.md: from a fresh host to a working edge in front of \
             Exchange.",
        ],
    ),
    (
        "ENVIRONMENT",
        &[
            "RUST_LOG sets the log level (default info); logs go to standard error, one line per \
             event, as text or JSON ([log] format).",
            "NOTIFY_SOCKET, set by systemd for Type=notify: READY=1 is sent once every listener \
             accepts, STOPPING=1 at shutdown.",
        ],
    ),
];

/// Writes every page into `out` (which must exist) and returns their paths, the main page
/// first. Hidden subcommands and clap's `help` get no page.
///
/// # Errors
/// The first file that cannot be written.
pub fn write_all(cmd: clap::Command, out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let version = env!("CARGO_PKG_VERSION");
    let mut pages = Vec::new();
    let mut names = Vec::new();
    collect(&cmd, &mut names);
    write_page(&cmd, version, out, &mut pages, &main_extra(&names))?;
    for sub in visible(&cmd) {
        write_tree(sub, version, out, &mut pages)?;
    }
    Ok(pages)
}

fn write_tree(
    cmd: &clap::Command,
    version: &str,
    out: &Path,
    pages: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let mut extra = Roff::new();
    see_also(&mut extra, &["portcullis".to_owned()]);
    write_page(cmd, version, out, pages, &extra)?;
    for sub in visible(cmd) {
        write_tree(sub, version, out, pages)?;
    }
    Ok(())
}

fn write_page(
    cmd: &clap::Command,
    version: &str,
    out: &Path,
    pages: &mut Vec<PathBuf>,
    extra: &Roff,
) -> io::Result<()> {
    let man = Man::new(cmd.clone())
        .section(SECTION)
        .manual(MANUAL)
        .source(format!("portcullis {version}"))
        .date(env!("PORTCULLIS_COMMIT_DATE"));
    let path = out.join(man.get_filename());
    let mut file = io::BufWriter::new(std::fs::File::create(&path)?);
    man.render_title(&mut file)?;
    man.render_name_section(&mut file)?;
    man.render_synopsis_section(&mut file)?;
    man.render_description_section(&mut file)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut file)?;
    }
    if visible(cmd).next().is_some() {
        man.render_subcommands_section(&mut file)?;
    }
    extra.to_writer(&mut file)?;
    file.flush()?;
    pages.push(path);
    Ok(())
}

fn visible(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// Every page's name below `cmd` (portcullis-queue, portcullis-queue-list, …), depth first.
fn collect(cmd: &clap::Command, names: &mut Vec<String>) {
    for sub in visible(cmd) {
        names.push(page_name(sub));
        collect(sub, names);
    }
}

fn page_name(cmd: &clap::Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned()
}

fn main_extra(names: &[String]) -> Roff {
    let mut roff = Roff::new();
    for (title, paragraphs) in MAIN_SECTIONS {
        roff.control("SH", [*title]);
        for (i, text) in paragraphs.iter().enumerate() {
            if i > 0 {
                roff.control("PP", []);
            }
            roff.text([roman(*text)]);
        }
    }
    let mut all = names.to_vec();
    all.extend(["systemctl".to_owned(), "journalctl".to_owned()]);
    see_also(&mut roff, &all);
    roff
}

/// A SEE ALSO section naming `pages` (ours in section 8, systemctl and journalctl in 1).
fn see_also(roff: &mut Roff, pages: &[String]) {
    roff.control("SH", ["SEE ALSO"]);
    let mut line = Vec::new();
    for (i, name) in pages.iter().enumerate() {
        let section = if name.starts_with("portcullis") {
            SECTION
        } else {
            "1"
        };
        line.push(bold(name.clone()));
        let sep = if i + 1 == pages.len() { "" } else { ", " };
        line.push(roman(format!("({section}){sep}")));
    }
    roff.text(line);
}
