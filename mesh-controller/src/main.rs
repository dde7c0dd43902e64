//! `mesh-controller`: the cluster controller. See the library's modules for the parts.
fn main() -> std::process::ExitCode {
    mesh_controller::cli::main()
}
