//! The shardgate coordinator: a durable store of runs and results, the scheduling core that
//! hands shards to workers, and the gRPC and HTTP services in front of it.

#![forbid(unsafe_code)]

pub mod actor;
pub mod auth;
pub mod conn;
pub mod core;
pub mod http;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod otlp;
pub mod policy;
pub mod read;
pub mod rollout;
pub mod scheduler;
pub mod server;
pub mod service;
#[cfg(test)]
mod service_fuzz;
pub mod standby;
pub mod store;
pub mod submit;
pub mod watch;
pub mod watch_grpc;
pub mod web;

pub use model::CoreConfig;
pub use server::{Config, Listeners, run, run_on};
