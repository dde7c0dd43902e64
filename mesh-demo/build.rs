//! Compiles proto/demo.proto into the gRPC client and server. The protobuf compiler is the one
//! bundled by protoc-bin-vendored, so nothing has to be installed on the build machine.

fn main() -> anyhow::Result<()> {
    let mut prost = tonic_prost_build::Config::new();
    prost.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(prost, &["proto/demo.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
