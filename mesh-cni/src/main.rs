//! `mesh-cni`: the chained CNI plugin, and its installer (see [`mesh_cni::cli`]).
fn main() -> std::process::ExitCode {
    mesh_cni::cli::main()
}
