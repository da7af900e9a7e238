//! Limits of the wire that every process must agree on.

/// Largest gRPC message sent or accepted, so a whole large suite fits in one `SubmitRun`.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
