//! The CNI plugin under test: the real `mesh-cni` entry point, built inside this package so the
//! tests can find it with `CARGO_BIN_EXE_mesh-cni`.
fn main() -> std::process::ExitCode {
    mesh_cni::cli::main()
}
