//! Generates the API code from proto/. protoc comes from the protoc-bin-vendored crate, so a
//! fresh machine needs nothing installed beyond what cargo fetches.

fn main() -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &["proto/mesh/v1/mesh.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
