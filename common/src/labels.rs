//! Worker labels (`k=v` pairs) and the selector rule: a run may go to a worker only when the
//! worker carries every label the run asks for.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::pb;

/// A sorted set of `key=value` labels.
pub type Labels = BTreeMap<String, String>;

/// Parses `k=v,k2=v2` (empty input gives no labels).
pub fn parse(field: &'static str, s: &str) -> Result<Labels, Error> {
    let mut out = Labels::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| Error::InvalidArgument {
            field,
            reason: format!("label '{part}' is not of the form key=value"),
        })?;
        check_label(field, k, v)?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(Error::InvalidArgument {
                field,
                reason: format!("label key '{k}' is given twice"),
            });
        }
    }
    Ok(out)
}

fn check_label(field: &'static str, k: &str, v: &str) -> Result<(), Error> {
    let ok = |s: &str| {
        s.len() <= 128
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    if k.is_empty() || !ok(k) || !ok(v) {
        return Err(Error::InvalidArgument {
            field,
            reason: format!(
                "label '{}={}' must use letters, digits, '-', '_', '.', '/' (key non-empty, at most 128 each)",
                crate::validate::prefix(k),
                crate::validate::prefix(v)
            ),
        });
    }
    Ok(())
}

/// Reads labels off the wire, checking them as [`parse`] does.
pub fn from_wire(field: &'static str, labels: &[pb::Label]) -> Result<Labels, Error> {
    if labels.len() > crate::validate::MAX_LABELS {
        return Err(Error::InvalidArgument {
            field,
            reason: format!(
                "{} labels given, at most {} allowed",
                labels.len(),
                crate::validate::MAX_LABELS
            ),
        });
    }
    let mut out = Labels::new();
    for l in labels {
        check_label(field, &l.key, &l.value)?;
        if out.insert(l.key.clone(), l.value.clone()).is_some() {
            return Err(Error::InvalidArgument {
                field,
                reason: format!("label key '{}' is given twice", l.key),
            });
        }
    }
    Ok(out)
}

pub fn to_wire(labels: &Labels) -> Vec<pb::Label> {
    labels
        .iter()
        .map(|(k, v)| pb::Label {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// `k=v,k2=v2`, as [`parse`] reads it.
pub fn to_text(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// True when `worker` carries every label of `wanted`.
pub fn satisfies(worker: &Labels, wanted: &Labels) -> bool {
    wanted.iter().all(|(k, v)| worker.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let w = parse("labels", "os=linux, arch=x86_64").unwrap();
        assert!(satisfies(&w, &parse("labels", "os=linux").unwrap()));
        assert!(satisfies(&w, &Labels::new()));
        assert!(!satisfies(&w, &parse("labels", "os=mac").unwrap()));
        assert!(!satisfies(&w, &parse("labels", "gpu=1").unwrap()));
    }

    #[test]
    fn rejects_malformed_labels_by_name() {
        let e = parse("labels", "os").unwrap_err().to_string();
        assert!(e.contains("'os' is not of the form key=value"), "{e}");
        let e = parse("labels", "a=1,a=2").unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
        let e = parse("labels", "a b=1").unwrap_err().to_string();
        assert!(e.contains("must use letters"), "{e}");
    }
}
