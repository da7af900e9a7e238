//! Everything that crosses the wire between shardgate processes: the generated gRPC code, typed
//! ids, the domain enums with their wire mapping, test-id validation, and the one table that maps
//! domain errors to `tonic::Status`. The coordinator and the worker never include protos
//! themselves.

#![forbid(unsafe_code)]

pub mod auth;
pub mod error;
pub mod ids;
pub mod junit;
pub mod labels;
pub mod limits;
pub mod model;
pub mod pb;
pub mod report;
pub mod tls;
pub mod validate;

pub use error::Error;
pub use ids::{AttemptId, RunId, ShardId, WorkerId};
pub use model::{Outcome, RunStatus, RunnerKind};
/// For [`text_enum!`] in crates that do not name serde themselves.
#[doc(hidden)]
pub use serde as __serde;
