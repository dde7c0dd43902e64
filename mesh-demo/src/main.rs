//! `mesh-demo`: demo workloads and clients for the mesh.
fn main() -> std::process::ExitCode {
    mesh_demo::cli::main()
}
