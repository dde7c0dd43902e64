//! The demo applications, built inside this package so the end-to-end tests and the
//! single-machine mesh find them next to the agent and the controller.
fn main() -> std::process::ExitCode {
    mesh_demo::cli::main()
}
