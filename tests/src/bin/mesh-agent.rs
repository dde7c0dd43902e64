//! The agent under test: the real `mesh-agent` entry point, built inside this package so the
//! tests can find it with `CARGO_BIN_EXE_mesh-agent`.
fn main() -> std::process::ExitCode {
    mesh_agent::cli::main()
}
