//! What `queue adopt` prints: a line per message (stdout) or refused file (stderr), then the
//! summary, what is left in `DIR`, and whether `DIR` was marked.

use super::{Left, MarkerOutcome, Outcome, Report};
use crate::queue::report::clean;

/// The line of one outcome: `Ok` for stdout, `Err` for stderr (a refused file).
pub fn line(outcome: &Outcome, dir: &std::path::Path) -> Result<String, String> {
    let held = |h: bool| if h { " (held)" } else { "" };
    let as_id = |from: &crate::envelope::QueueId, id: &crate::envelope::QueueId| {
        if from == id {
            from.to_string()
        } else {
            format!("{from} as {id} (its id is taken here)")
        }
    };
    match outcome {
        Outcome::Imported {
            from,
            id,
            held: h,
            fresh,
        } => {
            let mut text = format!("imported {}{}", as_id(from, id), held(*h));
            if let Some(why) = fresh {
                text.push_str(&format!(
                    " with a fresh state: its state file is refused ({}); recipients it had \
                     reached may get it again",
                    clean(why)
                ));
            }
            Ok(text)
        }
        Outcome::WouldImport { from, id, held: h } => {
            Ok(format!("would import {}{}", as_id(from, id), held(*h)))
        }
        Outcome::AlreadyHere { from, id } if from == id => Ok(format!("already here {from}")),
        Outcome::AlreadyHere { from, id } => Ok(format!("already here {from} as {id}")),
        Outcome::Refused { name, reason } => Err(format!(
            "refused {}: {}; left in place",
            clean(&dir.join("queue").join(name).display().to_string()),
            clean(reason)
        )),
    }
}

/// The summary line: `N messages imported (H held, C under a new id), K already here, R
/// refused`, or what a dry run would do.
pub fn summary(report: &Report, dry_run: bool) -> String {
    let (mut imported, mut held, mut renamed, mut here, mut refused) = (0, 0, 0, 0, 0);
    for o in &report.outcomes {
        match o {
            Outcome::Imported {
                from, id, held: h, ..
            }
            | Outcome::WouldImport { from, id, held: h } => {
                imported += 1;
                held += usize::from(*h);
                renamed += usize::from(from != id);
            }
            Outcome::AlreadyHere { .. } => here += 1,
            Outcome::Refused { .. } => refused += 1,
        }
    }
    let verb = if dry_run {
        "would be imported"
    } else {
        "imported"
    };
    let plural = if imported == 1 { "message" } else { "messages" };
    let dry = if dry_run { " (dry run)" } else { "" };
    format!(
        "{imported} {plural} {verb} ({held} held, {renamed} under a new id), {here} already \
         here, {refused} refused{dry}"
    )
}

/// What is left in `DIR`, or `None` when nothing is.
pub fn left(left: &Left, dir: &std::path::Path) -> Option<String> {
    let parts: Vec<String> = [
        (
            left.unfinished,
            "unfinished (never acknowledged: not taken)",
        ),
        (left.quarantined, "quarantined"),
        (left.rejected, "rejected by its recovery"),
        (left.requests, "operator requests not carried over"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "left in {}: {}",
            clean(&dir.display().to_string()),
            parts.join(", ")
        )
    })
}

/// What became of the marker, or `None` for a dry run.
pub fn marker(outcome: &MarkerOutcome, dir: &std::path::Path) -> Option<String> {
    let dir = clean(&dir.display().to_string());
    match outcome {
        MarkerOutcome::Written(path) => Some(format!(
            "{dir} marked adopted ({}): its node refuses to start on it",
            clean(&path.display().to_string())
        )),
        MarkerOutcome::Already(m) => {
            Some(format!("{dir} was marked adopted already {}", m.describe()))
        }
        MarkerOutcome::NotWritten(why) => Some(format!(
            "{dir} NOT marked adopted ({}): wipe it before its node returns, or that node \
             delivers these messages again",
            clean(why)
        )),
        MarkerOutcome::DryRun => None,
        MarkerOutcome::Stopped => Some(format!(
            "{dir} not marked adopted: the run stopped before the end"
        )),
        MarkerOutcome::Refused(n) => Some(format!(
            "{dir} NOT marked adopted: {n} refused file(s) are still in its queue/; make them \
             sound (owner, mode, format) and run the same command again, which imports them and \
             marks it (the messages taken now are not taken twice)"
        )),
    }
}
