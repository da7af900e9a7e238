//! How values that are not plain columns are kept, the same in every store: lists and
//! policies as JSON text, ids and states in their text form.

use shardgate_common::Outcome;

use super::{StoreError, StoreResult};

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data always serializes")
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(table: &'static str, s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        table,
        reason: format!("bad JSON {s:?}: {e}"),
    })
}

/// A stored id or state in its text form.
pub(crate) fn parse<T: std::str::FromStr>(table: &'static str, s: &str) -> StoreResult<T> {
    s.parse().map_err(|_| StoreError::Corrupt {
        table,
        reason: format!("bad value '{s}'"),
    })
}

/// A test's stored outcome: none while it is open.
pub(crate) fn parse_outcome(o: Option<String>) -> StoreResult<Option<Outcome>> {
    o.map(|o| parse::<Outcome>("tests", &o)).transpose()
}
