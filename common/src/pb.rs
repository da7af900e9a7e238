//! Generated protobuf and gRPC code for `proto/shardgate/v1`, plus the encoded descriptor set
//! that the coordinator registers with gRPC server reflection.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("shardgate.v1");

/// The encoded `FileDescriptorSet` of `proto/shardgate/v1/shardgate.proto`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/shardgate_descriptor.bin"));
