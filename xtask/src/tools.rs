//! The chart's tools, where `cargo xtask prereqs` puts them and the chart tests find them.
use std::path::Path;

/// Helm, from PATH (`cargo xtask prereqs` installs it as /usr/local/bin/helm).
pub const HELM: &str = "helm";

/// The Helm release `cargo xtask prereqs` installs.
pub const HELM_VERSION: &str = "v4.1.4";

/// The virtual environment that holds the chart tests' Python tools, apart from Debian's
/// externally managed Python.
pub const VENV: &str = "/opt/mesh-tools";

/// kubernetes-validate (Kubernetes' OpenAPI schemas per release, offline), in [`VENV`].
pub const KUBERNETES_VALIDATE: &str = "/opt/mesh-tools/bin/kubernetes-validate";

/// The kubernetes-validate release `cargo xtask prereqs` installs (schemas up to 1.37).
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Whether kubernetes-validate is installed where the tests look.
pub fn kubernetes_validate_present() -> bool {
    Path::new(KUBERNETES_VALIDATE).is_file()
}
