//! The integration tests' harness lives in the `shardgate-testkit` crate (the chaos benchmark
//! shares it). It finds the binaries next to the test executable, where cargo builds them.

#![allow(unused_imports)]

pub use shardgate_testkit::*;
