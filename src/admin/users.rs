//! `portcullis user list|suspend|resume`, and what the admin API's `/api/users` answers.
//!
//! The logins an operator can name are those of the users file (`[auth] users_file`, read with
//! the policy) and every login suspended under the spool ([`crate::queue::suspended`]), so
//! that a login removed from the users file while suspended can still be resumed. Any other
//! login is [`UserError::Unknown`] (exit 2).
//!
//! `suspend` writes the login's record under `SPOOL/suspended/` (rule [`OPERATOR`]), `resume`
//! removes it. Nothing else is needed: the running relay follows that directory (within
//! [`crate::policy::containment::POLL_INTERVAL`]) and refuses the login's AUTH, closes its
//! sessions and holds its queued mail; a stopped relay reads it when it starts. Resuming
//! releases nothing: held mail waits for `portcullis queue release --user LOGIN`.
//!
//! With `[cluster] redis` in the policy the suspensions are shared by every node through the
//! store ([`crate::policy::containment::shared`]), which these commands reach over a link of
//! their own ([`Store`]; its password is never shown): `suspend` puts the login in the store
//! and then writes the local record (marked shared); when the store cannot be reached it
//! writes the local record alone and the relay pushes it when the store returns (said on
//! stderr). `resume` removes the login from the store first and then the local record; when
//! the store cannot be reached it refuses ([`UserError::StoreUnavailable`], exit 1), since the
//! relay's next exchange with the store would suspend the login again here. `list` shows the
//! union of the local records and the store's (the store's view when it answers).
//!
//! `list` prints one row per login. The messages each sent in the last hour are known only to
//! the running relay: they are read from `GET /api/users` ([`super::client::fetch_users`]),
//! and shown as `-` (JSON `null`) when it cannot be asked, with the reason
//! ([`messages_last_hour`]).
//!
//! Everything printed passes through [`clean`]: a login or reason may hold control characters
//! (a users file can name any string), which must neither break a row nor reach the terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cluster::{Cluster, Unavailable};
use crate::config::Config;
use crate::policy::containment::OPERATOR;
use crate::policy::containment::shared;
use crate::queue::journal::show::rfc3339_ms;
use crate::queue::report::clean;
use crate::queue::select::Selection;
use crate::queue::suspended::Suspension;
use crate::queue::{Spool, SpoolError};

/// What the running relay knows of its logins for `/api/users`: messages queued from each
/// within the last hour (a login that sent none may be left out). Called on each request; it
/// must not block for long.
pub type UsersSource = Arc<dyn Fn() -> BTreeMap<String, u64> + Send + Sync>;

/// The body of `GET /api/users`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsersActivity {
    /// Messages queued from each login within the last hour; a login not in it sent none.
    pub messages_last_hour: BTreeMap<String, u64>,
}

/// The reason of a suspension made without `--reason`.
pub const DEFAULT_REASON: &str = "suspended by an operator";

/// Longest `--reason`, in octets (it is one line for a person; the record holding it is read
/// back with a bound of 64 KiB).
pub const MAX_REASON: usize = 1024;

/// Most characters of a login shown in a message (a login can be any length; the table
/// shows it whole).
const SHOWN_LOGIN_MAX: usize = 64;

/// Why a `user` command did nothing.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The login is neither in the users file nor suspended under the spool (bad input).
    #[error(
        "unknown login \"{shown}\": not in the users file{file}, and not suspended under the spool"
    )]
    Unknown {
        /// The login, cleaned and shortened for the terminal.
        shown: String,
        /// ` (PATH)`, or ` (the policy names none)`.
        file: String,
    },
    /// `--reason` is empty, longer than [`MAX_REASON`] octets, or not one line (bad input).
    #[error("--reason: {0}")]
    BadReason(&'static str),
    /// The spool could not be read or written.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// `resume` with `[cluster] redis`, and the store cannot be reached: nothing was changed
    /// (removing only the local record would be undone by the relay's next exchange with the
    /// store).
    #[error(
        "the shared store {url} cannot be reached ({source}); nothing was changed: a login is \
         resumed in the store first, or the nodes would suspend it again. Retry when it answers"
    )]
    StoreUnavailable {
        /// The store, password hidden.
        url: String,
        /// Why.
        source: Unavailable,
    },
    /// `resume` with `[cluster] redis`: the login was removed from the store and here, but the
    /// store stopped answering before the second removal that undoes a push this node's relay
    /// may have made meanwhile. Run the command again once the store answers.
    #[error(
        "resumed here and in the shared store {url}, which then stopped answering ({source}); \
         run the command again once it answers, to make sure no node put it back"
    )]
    StoreLost {
        /// The store, password hidden.
        url: String,
        /// Why.
        source: Unavailable,
    },
    /// The async runtime for the store could not be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl UserError {
    /// True for bad input (exit 2): an unknown login or a bad `--reason`.
    pub fn is_usage(&self) -> bool {
        matches!(self, UserError::Unknown { .. } | UserError::BadReason(_))
    }
}

/// What `suspend` or `resume` did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The login is suspended by this record now.
    Suspended(Suspension),
    /// It was suspended already, by this record; nothing changed.
    AlreadySuspended(Suspension),
    /// This suspension was lifted.
    Resumed(Suspension),
    /// It was not suspended; nothing changed.
    NotSuspended,
}

impl Outcome {
    /// Whether the login's state changed (or would, in a dry run).
    pub fn changes(&self) -> bool {
        matches!(self, Outcome::Suspended(_) | Outcome::Resumed(_))
    }
}

/// Whether a suspension made here reached the shared store.
#[derive(Debug, Clone)]
pub enum Sharing {
    /// No `[cluster] redis`, or nothing was changed.
    Local,
    /// In the store: every node holds it within a poll.
    Shared,
    /// The store could not be reached: recorded here only; the relay pushes it to the store
    /// when it answers.
    Pending(Unavailable),
}

/// The shared store of `[cluster] redis` as the `user` commands reach it: a link of their own
/// on a runtime of their own.
pub struct Store {
    cluster: Arc<Cluster>,
    runtime: tokio::runtime::Runtime,
}

impl Store {
    /// The store of `config`, or `None` without `[cluster] redis`. Nothing is connected yet.
    ///
    /// # Errors
    /// [`UserError::Runtime`].
    pub fn open(config: &Config) -> Result<Option<Store>, UserError> {
        let telemetry = Arc::new(crate::observe::Telemetry::new(config.cluster.node.clone()));
        let Some(cluster) = Cluster::new(&config.cluster, telemetry) else {
            return Ok(None);
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(UserError::Runtime)?;
        Ok(Some(Store { cluster, runtime }))
    }

    /// The store's URL as it may be shown (password hidden).
    pub fn shown_url(&self) -> String {
        self.cluster.url().to_string()
    }

    fn get(&self, login: &str) -> Result<Option<Suspension>, Unavailable> {
        self.runtime.block_on(shared::get(&self.cluster, login))
    }

    /// `s` put in the store unless it holds the login already (`HSETNX`): `Err(existing)`
    /// then, the suspension it holds; else `Ok(id)`, the store's id when it has one.
    fn push(&self, s: &Suspension) -> Result<Result<Option<String>, Suspension>, Unavailable> {
        self.runtime.block_on(async {
            if !shared::push(&self.cluster, s).await? {
                let existing = shared::get(&self.cluster, &s.login).await?;
                return Ok(Err(existing.unwrap_or_else(|| s.clone())));
            }
            shared::store_id(&self.cluster).await.map(Ok)
        })
    }

    fn lift(&self, login: &str) -> Result<bool, Unavailable> {
        self.runtime.block_on(shared::lift(&self.cluster, login))
    }

    /// Every suspension of the store (at most [`shared::READ_MAX`]; `Remote::complete` says
    /// whether that was all).
    ///
    /// # Errors
    /// [`Unavailable`].
    pub fn read(&self) -> Result<shared::Remote, Unavailable> {
        self.runtime.block_on(shared::read(&self.cluster))
    }

    fn unavailable(&self, source: Unavailable) -> UserError {
        UserError::StoreUnavailable {
            url: self.shown_url(),
            source,
        }
    }
}

/// The logins of the users file, in its order (none without a policy).
fn user_names(config: Option<&Config>) -> impl Iterator<Item = &str> {
    (config.into_iter().flat_map(|c| c.auth.iter()))
        .flat_map(|auth| auth.users.iter().map(|u| u.name.as_str()))
}

/// `login`'s suspension now, after checking that the login is known (in the users file, or
/// suspended under the spool). Without a policy (`--spool` only, when the policy cannot be
/// loaded in an emergency) any login `queue hold --user` accepts is taken.
///
/// # Errors
/// [`UserError::Unknown`] for any other login; [`UserError::Spool`] when its record cannot be
/// read.
pub fn known(
    config: Option<&Config>,
    spool: &Spool,
    login: &str,
) -> Result<Option<Suspension>, UserError> {
    // The empty login names no user (the users file refuses blank names) and no record (its
    // file name would be `suspended/` itself).
    if !login.is_empty() {
        let suspension = spool.suspension(login)?;
        let unchecked = config.is_none() && Selection::parse_user(login).is_ok();
        if suspension.is_some() || unchecked || user_names(config).any(|name| name == login) {
            return Ok(suspension);
        }
    }
    let file = match config.map(|c| c.auth.as_ref().and_then(|a| a.users_file.as_ref())) {
        Some(Some(path)) => format!(" ({})", clean(&path.display().to_string())),
        Some(None) => " (the policy names none)".to_owned(),
        None => " (no --config; nor a login --user takes)".to_owned(),
    };
    Err(UserError::Unknown {
        shown: shown(login),
        file,
    })
}

/// The reason to record: `--reason` checked (one line, at most [`MAX_REASON`] octets, not
/// blank), or [`DEFAULT_REASON`].
///
/// # Errors
/// [`UserError::BadReason`] saying what is wrong.
pub fn reason(given: Option<&str>) -> Result<String, UserError> {
    let Some(text) = given else {
        return Ok(DEFAULT_REASON.to_owned());
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(UserError::BadReason("is empty"));
    }
    if text.len() > MAX_REASON {
        return Err(UserError::BadReason("longer than 1024 octets"));
    }
    if text.chars().any(char::is_control) {
        return Err(UserError::BadReason(
            "must be one line, without control characters",
        ));
    }
    Ok(text.to_owned())
}

/// `portcullis user suspend LOGIN`: record the suspension of a known `login` (rule
/// [`OPERATOR`], `reason`, since `now_ms`), unless it is suspended already; with `store`
/// (`[cluster] redis`), in the store first (see the module doc). With `dry_run`, only say what
/// would be done (the store is not asked). Blocking.
///
/// # Errors
/// See [`known`]; [`UserError::Spool`] when the record cannot be written (then nothing is
/// left under `suspended/`, though the store may hold it: every node, this one included
/// once its relay polls, holds the login then).
pub fn suspend(
    config: Option<&Config>,
    spool: &Spool,
    store: Option<&Store>,
    login: &str,
    reason: String,
    now_ms: u64,
    dry_run: bool,
) -> Result<(Outcome, Sharing), UserError> {
    if let Some(existing) = known(config, spool, login)? {
        return Ok((Outcome::AlreadySuspended(existing), Sharing::Local));
    }
    let mut record = Suspension {
        login: login.to_owned(),
        rule: OPERATOR.to_owned(),
        reason,
        since_ms: now_ms,
        node: config
            .filter(|_| store.is_some())
            .map(|c| c.cluster.node.clone()),
        shared: false,
        store: None,
    };
    if dry_run {
        return Ok((Outcome::Suspended(record), Sharing::Local));
    }
    let mut sharing = Sharing::Local;
    if let Some(store) = store {
        // The store first, so that every node holds the login within a poll.
        match store.push(&record) {
            Ok(Err(existing)) => return Ok((Outcome::AlreadySuspended(existing), Sharing::Local)),
            // Shared with the store's id: written after the store, so a relay that reads it
            // finds the login in its next read of the store unless it was resumed. A store
            // no relay has read yet has no id: the relay marks the record.
            Ok(Ok(id)) => {
                record.shared = id.is_some();
                record.store = id;
                sharing = Sharing::Shared;
            }
            Err(e) => sharing = Sharing::Pending(e),
        }
    }
    if spool.suspend_login(&record)? {
        return Ok((Outcome::Suspended(record), sharing));
    }
    // Suspended meanwhile (by the relay's containment, or another operator): that one stays.
    Ok((
        Outcome::AlreadySuspended(spool.suspension(login)?.unwrap_or(record)),
        Sharing::Local,
    ))
}

/// `portcullis user resume LOGIN`: remove a known `login`'s suspension, if it has one; with
/// `store` (`[cluster] redis`), from the store first, then here (a login suspended only in
/// the store is known too). With `dry_run`, only say what would be done. Blocking.
///
/// # Errors
/// See [`known`]; [`UserError::StoreUnavailable`] when the store cannot be reached (nothing
/// changed); [`UserError::Spool`] when the record cannot be removed (the store no longer
/// holds the login then, and this node's relay resumes it at its next poll).
pub fn resume(
    config: Option<&Config>,
    spool: &Spool,
    store: Option<&Store>,
    login: &str,
    dry_run: bool,
) -> Result<Outcome, UserError> {
    let remote = match store {
        Some(store) if !login.is_empty() => store.get(login).map_err(|e| store.unavailable(e))?,
        _ => None,
    };
    let existing = match remote {
        Some(remote) => Some(remote),
        None => known(config, spool, login)?,
    };
    let Some(existing) = existing else {
        return Ok(Outcome::NotSuspended);
    };
    if dry_run {
        return Ok(Outcome::Resumed(existing));
    }
    let mut lifted = false;
    if let Some(store) = store {
        lifted = store.lift(login).map_err(|e| store.unavailable(e))?;
    }
    lifted |= spool.resume_login(login)?;
    if let Some(store) = store {
        // This node's relay may have pushed the record (still unshared) after the first
        // HDEL and before it was removed here: removed once more.
        store.lift(login).map_err(|source| UserError::StoreLost {
            url: store.shown_url(),
            source,
        })?;
    }
    if lifted {
        Ok(Outcome::Resumed(existing))
    } else {
        // Resumed meanwhile by someone else.
        Ok(Outcome::NotSuspended)
    }
}

/// `login` for a message: [`clean`], and cut to [`SHOWN_LOGIN_MAX`] characters (saying how
/// long it was).
pub fn shown(login: &str) -> String {
    let cleaned = clean(login);
    if cleaned.chars().count() <= SHOWN_LOGIN_MAX {
        return cleaned;
    }
    let head: String = cleaned.chars().take(SHOWN_LOGIN_MAX).collect();
    format!("{head}… ({} octets)", login.len())
}

/// The command that releases `login`'s held mail, with `--config FILE` and `--spool DIR` when
/// they were given; or, for a login `queue release --user` cannot take (whitespace, control or
/// invisible characters), how to release it by id instead.
pub fn release_hint(login: &str, config_path: Option<&Path>, spool: Option<&Path>) -> String {
    let option = |name: &str, p: &Path| {
        format!(
            " --{name} {}",
            crate::queue::audit::quote(&p.display().to_string())
        )
    };
    let config = [("config", config_path), ("spool", spool)]
        .into_iter()
        .filter_map(|(name, p)| p.map(|p| option(name, p)))
        .collect::<String>();
    match Selection::parse_user(login) {
        Ok(_) => format!(
            "portcullis queue release --user {}{config}",
            crate::queue::audit::quote(login)
        ),
        Err(_) => format!(
            "portcullis queue list{config}, then portcullis queue release ID…{config} (this \
             login cannot be given to --user)"
        ),
    }
}

/// `since (rule R: reason)` of a suspension, cleaned.
fn described(s: &Suspension) -> String {
    format!(
        "since {} (rule {}: {})",
        since(s).unwrap_or_else(|| "an unknown time".to_owned()),
        clean(&s.rule),
        clean(&s.reason)
    )
}

/// When a suspension started, RFC 3339 UTC; `None` when its record did not say (a damaged
/// record, read as time 0).
fn since(s: &Suspension) -> Option<String> {
    (s.since_ms != 0).then(|| rfc3339_ms(s.since_ms))
}

/// What `user suspend|resume` prints for `outcome` of `login`, one line each, the last
/// ending in a newline. `spool_dir` is where the record is; `given` (the `--config` and
/// `--spool` the operator gave) goes into the release command shown.
pub fn outcome_text(
    login: &str,
    outcome: &Outcome,
    dry_run: bool,
    spool_dir: &Path,
    given: (Option<&Path>, Option<&Path>),
) -> String {
    let name = shown(login);
    let release = release_hint(login, given.0, given.1);
    let record = clean(
        &spool_dir
            .join(crate::queue::suspended::DIR)
            .display()
            .to_string(),
    );
    match outcome {
        Outcome::Suspended(s) if dry_run => format!(
            "would suspend {name} (rule {}: {}); nothing changed (--dry-run)\n",
            clean(&s.rule),
            clean(&s.reason)
        ),
        Outcome::Suspended(s) => format!(
            "suspended {name} (rule {}: {}), recorded in {record}/\n\
             within a second the running relay refuses its AUTH (535 5.7.8, as a wrong \
             password), closes its open sessions (421 4.7.0) and holds its queued mail; a \
             stopped relay does so when it starts\n\
             held mail stays held until released: {release}\n",
            clean(&s.rule),
            clean(&s.reason)
        ),
        Outcome::AlreadySuspended(s) => format!(
            "{name} is already suspended {}; nothing changed\n",
            described(s)
        ),
        Outcome::Resumed(s) if dry_run => format!(
            "would resume {name}, suspended {}; nothing changed (--dry-run)\n",
            described(s)
        ),
        Outcome::Resumed(s) => format!(
            "resumed {name}, suspended {}\n\
             within a second the running relay accepts its AUTH again; its held mail stays \
             held until released: {release}\n",
            described(s)
        ),
        Outcome::NotSuspended => format!("{name} is not suspended; nothing changed\n"),
    }
}

/// One login of `user list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The login, as in the users file or the record.
    pub login: String,
    /// Its suspension, if it is suspended.
    pub suspension: Option<Suspension>,
    /// Messages queued from it within the last hour; `None`: unknown (the relay could not
    /// be asked).
    pub messages_last_hour: Option<u64>,
}

/// The rows of `user list`, sorted by login: every user of the policy and every suspended
/// login (`suspensions`), with their counts from `counts` (a login missing from a known map
/// sent nothing: 0).
pub fn rows(
    config: Option<&Config>,
    suspensions: Vec<Suspension>,
    counts: Option<&BTreeMap<String, u64>>,
) -> Vec<Row> {
    let mut by_login: BTreeMap<String, Option<Suspension>> = user_names(config)
        .map(|name| (name.to_owned(), None))
        .collect();
    for s in suspensions {
        by_login.insert(s.login.clone(), Some(s));
    }
    (by_login.into_iter())
        .map(|(login, suspension)| Row {
            messages_last_hour: counts.map(|c| c.get(&login).copied().unwrap_or(0)),
            login,
            suspension,
        })
        .collect()
}

/// Column titles of [`table`].
const COLUMNS: [&str; 6] = ["LOGIN", "STATE", "SINCE", "RULE", "MSGS/HOUR", "REASON"];

/// `user list`: a header row, then one row per login, columns padded to their widest cell
/// (the reason, last, is not padded). Unknown values are `-`.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; 6]> = rows.iter().map(row_cells).collect();
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let titles = COLUMNS.map(str::to_owned);
    for row in std::iter::once(&titles).chain(&cells) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn row_cells(row: &Row) -> [String; 6] {
    let dash = || "-".to_owned();
    let s = row.suspension.as_ref();
    [
        clean(&row.login),
        if s.is_some() { "suspended" } else { "active" }.to_owned(),
        s.and_then(since).unwrap_or_else(dash),
        s.map_or_else(dash, |s| clean(&s.rule)),
        row.messages_last_hour.map_or_else(dash, |n| n.to_string()),
        s.map_or_else(dash, |s| clean(&s.reason)),
    ]
}

/// `user list --json`: one array of objects `{login, suspended, rule, reason, since,
/// messages_last_hour}`; `rule`, `reason` and `since` (RFC 3339) are `null` for an active
/// login, `messages_last_hour` when unknown. Strings are unchanged (JSON escapes them; print
/// with [`crate::queue::report::json_line`]).
pub fn json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|row| {
                let s = row.suspension.as_ref();
                json!({
                    "login": row.login,
                    "suspended": s.is_some(),
                    "rule": s.map(|s| s.rule.as_str()),
                    "reason": s.map(|s| s.reason.as_str()),
                    "since": s.and_then(since),
                    "messages_last_hour": row.messages_last_hour,
                })
            })
            .collect(),
    )
}

/// Messages queued from each login within the last hour, from the running relay's admin API;
/// `Err(why)` when it cannot be had: no `[admin]`, the relay not answering, or any other
/// failure of the request (a refused token included), said for a person.
pub async fn messages_last_hour(config: &Config) -> Result<BTreeMap<String, u64>, String> {
    let fetch = |addr, token: Option<std::sync::Arc<str>>| async move {
        super::client::fetch_users(addr, token.as_deref()).await
    };
    let (activity, _) = super::client::ask_running(config, fetch).await?;
    Ok(activity.messages_last_hour)
}

#[cfg(test)]
mod tests;
