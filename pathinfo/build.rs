//! Compiles `proto/pathinfo.proto` with protox (no system protoc); castore's
//! messages are the ones generated in `lazystore-castore`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    println!("cargo:rerun-if-changed={proto_dir}/pathinfo.proto");
    println!("cargo:rerun-if-changed={proto_dir}/castore.proto");
    let fds = protox::compile(["pathinfo.proto"], [proto_dir])?;
    tonic_prost_build::configure()
        .bytes(".")
        .extern_path(".lazystore.castore.v1", "::lazystore_castore::proto")
        .compile_fds(fds)?;
    Ok(())
}
