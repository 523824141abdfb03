//! Compiles `proto/castore.proto` with protox, so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    println!("cargo:rerun-if-changed={proto_dir}/castore.proto");
    let fds = protox::compile(["castore.proto"], [proto_dir])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
