//! Compiles `proto/` without a system `protoc`: protox parses the files into a descriptor set,
//! tonic-prost-build generates the Rust code from it, and the set itself is written to `OUT_DIR`
//! for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let file = proto_root.join("shardgate/v1/shardgate.proto");
    println!("cargo:rerun-if-changed={}", file.display());

    let fds = protox::compile([&file], [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("shardgate_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // The gate's plain records are also JSON (`--json`, the HTTP API), with the wire's names.
    tonic_prost_build::configure()
        .type_attribute("shardgate.v1.FlakyTest", "#[derive(serde::Serialize)]")
        .type_attribute("shardgate.v1.QuarantineEntry", "#[derive(serde::Serialize)]")
        .type_attribute("shardgate.v1.Deploy", "#[derive(serde::Serialize)]")
        .type_attribute("shardgate.v1.ListDeploysResponse", "#[derive(serde::Serialize)]")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
