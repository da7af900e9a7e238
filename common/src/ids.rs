//! Typed ids. Each wraps a UUID so that a run id can never be passed where a worker id is
//! expected; on the wire they travel as canonical UUID strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Error;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new id, time-ordered (UUID v7) so that ids sort by creation.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// Parses the wire form, naming the field in the error.
            pub fn parse_field(field: &'static str, s: &str) -> Result<Self, Error> {
                s.parse().map_err(|_| Error::InvalidArgument {
                    field,
                    reason: format!("'{}' is not a valid {} id", crate::validate::prefix(s), $what),
                })
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

typed_id!(
    /// One submitted run.
    RunId,
    "run"
);
typed_id!(
    /// One registration of a worker process.
    WorkerId,
    "worker"
);
typed_id!(
    /// A batch of tests formed for one hand-out.
    ShardId,
    "shard"
);
typed_id!(
    /// One hand-out of a shard to a worker, with its lease.
    AttemptId,
    "attempt"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_their_wire_form() {
        let id = RunId::new();
        let parsed: RunId = id.to_string().parse().unwrap();
        assert_eq!(id, parsed);
    }

    #[test]
    fn a_bad_id_names_the_field_and_the_value() {
        let err = RunId::parse_field("run_id", "nope").unwrap_err();
        assert_eq!(err.to_string(), "invalid run_id: 'nope' is not a valid run id");
    }

    #[test]
    fn new_ids_sort_by_creation() {
        let a = AttemptId::new();
        let b = AttemptId::new();
        assert!(a < b);
    }
}
