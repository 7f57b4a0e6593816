//! From TOML text to the raw mirror, collecting errors instead of stopping at the first.
//!
//! The document is parsed into a `toml::Table` first (a syntax error is the only error that
//! stops everything), then each top-level table, and each entry of an array of tables, is
//! deserialized on its own through `serde_ignored`, so that one type error hides nothing else
//! and every unknown key is reported with its dotted path (`listeners[1].requir_tls`).

use serde::de::DeserializeOwned;

use super::ConfigError;

/// Parses a TOML document. A syntax error becomes one `(syntax)` error with line and column.
pub(super) fn parse_document(text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| {
        let position = e
            .span()
            .map(|span| {
                let (line, column) = line_column(text, span.start);
                format!("line {line}, column {column}: ")
            })
            .unwrap_or_default();
        ConfigError::new("(syntax)", format!("{position}{}", e.message()))
    })
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Deserializes one table at `path` (`server`, `listeners[0]`), reporting unknown keys and a
/// type error into `errors`. `what` names the table for the "must be a table" message.
pub(super) fn table<T: DeserializeOwned>(
    value: toml::Value,
    path: &str,
    what: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    if !value.is_table() {
        errors.push(ConfigError::new(
            path,
            format!("must be a table ({what}), not a {}", value.type_str()),
        ));
        return None;
    }
    // On a type error, the offending key is reported and removed and the table is tried
    // again, so every type error in the table is found and its other keys still compile
    // (with the bad one at its default). Each round removes a key, so this ends.
    let mut value = value;
    let mut unknown: Vec<ConfigError> = Vec::new();
    loop {
        let mut round = Vec::new();
        let result = serde_ignored::deserialize(value.clone(), |ignored| {
            let mut key = path.to_owned();
            push_path(&mut key, &ignored);
            round.push(ConfigError::new(key, "unknown key"));
        });
        for e in round {
            if !unknown.contains(&e) {
                unknown.push(e);
            }
        }
        match result {
            Ok(parsed) => {
                errors.append(&mut unknown);
                return Some(parsed);
            }
            Err(e) => {
                let (inner, error) = type_error(path, &e);
                errors.push(error);
                if !inner
                    .as_deref()
                    .is_some_and(|keys| remove(&mut value, keys))
                {
                    errors.append(&mut unknown);
                    return None;
                }
            }
        }
    }
}

/// Removes the value at dotted `keys` inside `value`; false if there is none.
fn remove(value: &mut toml::Value, keys: &str) -> bool {
    let mut parts: Vec<&str> = keys.split('.').collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let mut table = value;
    for part in parts {
        match table.get_mut(part) {
            Some(next) => table = next,
            None => return false,
        }
    }
    table
        .as_table_mut()
        .is_some_and(|t| t.remove(last).is_some())
}

/// Deserializes an array of tables at `path` (`listeners`) entry by entry. An entry that
/// failed is `None`, so the caller still knows how many there were.
pub(super) fn array_of_tables<T: DeserializeOwned>(
    value: toml::Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<Option<T>>> {
    let toml::Value::Array(items) = value else {
        errors.push(ConfigError::new(
            path,
            format!(
                "must be an array of tables ([[{path}]]), not a {}",
                value.type_str()
            ),
        ));
        return None;
    };
    let what = format!("[[{path}]]");
    Some(
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| table(item, &format!("{path}[{i}]"), &what, errors))
            .collect(),
    )
}

/// Appends a `serde_ignored` path to `key` in our notation: `a.b`, `a[1].b`.
fn push_path(key: &mut String, path: &serde_ignored::Path<'_>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            push_path(key, parent);
            key.push_str(&format!("[{index}]"));
        }
        Path::Map { parent, key: name } => {
            push_path(key, parent);
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(name);
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => push_path(key, parent),
    }
}

/// Turns a deserialization error inside the table at `path` into a keyed error.
///
/// `toml::de::Error` keeps the keys leading to the error private but prints them, when it
/// has no source text to quote (our case: we deserialize from a `Value`), as a last line
/// `` in `a.b` ``; that line is the only way to recover them.
/// Also returns the keys inside the table, when the error names them.
fn type_error(path: &str, error: &toml::de::Error) -> (Option<String>, ConfigError) {
    let rendered = error.to_string();
    let inner = rendered
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("in `")?.strip_suffix('`'))
        .filter(|keys| !keys.is_empty());
    let key = match inner {
        Some(keys) => format!("{path}.{keys}"),
        None => path.to_owned(),
    };
    (
        inner.map(str::to_owned),
        ConfigError::new(key, readable(error.message())),
    )
}

/// Replaces Rust type names in serde messages with words an administrator knows.
fn readable(message: &str) -> String {
    message
        .replace("expected i64", "expected an integer")
        .replace("expected a string", "expected a string (in quotes)")
        .replace("expected a sequence", "expected an array")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("a\nbc", 3), (2, 2));
        assert_eq!(line_column("a\n", 99), (2, 1));
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse_document("[server]\nhostname = \n").unwrap_err();
        assert_eq!(err.key, "(syntax)");
        assert!(err.message.starts_with("line 2, column"), "{}", err.message);
    }
}
