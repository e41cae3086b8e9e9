//! Generates the protobuf types from proto/ with prost, and their canonical JSON mapping with
//! pbjson. The .proto files are compiled by protox (pure Rust), so building needs no system
//! `protoc`.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/imgate/v1/imgate.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let bytes = descriptors.encode_to_vec();
    prost_build::Config::new().compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .build(&[".imgate.v1"])?;
    Ok(())
}
