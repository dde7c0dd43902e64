//! Builds the kernel programs (`mesh-ebpf`) for the BPF target with the nightly toolchain and
//! bpf-linker, through aya-build; the object lands in OUT_DIR and is embedded in the agent.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // aya-build watches mesh-ebpf; the ABI crate it depends on must trigger a rebuild too.
    println!("cargo:rerun-if-changed=../mesh-common/src");
    let package = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: "../mesh-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the eBPF programs (needs the nightly toolchain with rust-src and bpf-linker: \
         run `cargo xtask prereqs`)",
    )
}
