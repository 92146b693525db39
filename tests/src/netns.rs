//! The netns bed of the integration tests: [`ferry_netns`]'s pods and meshes, plus the tests'
//! policy on privileges (a missing root fails under `CI=true`) and where the workspace's
//! binaries are found.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

pub use ferry_netns::{
    Dialer, Logs, Mesh, MeshOptions, Pod, PodCommand, Proc, http, is_root, namespaces_of,
    sweep_stale,
};

/// Returns whether this process may build namespaces. Without root: under `CI=true` it panics
/// (CI must run these tests, not skip them), otherwise it prints a notice and returns `false`
/// so the test can return early.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci {
        panic!(
            "\n\n*** netns tests need root (network namespaces, veth, iptables) and CI=true is set: \
             run the test suite as root. ***\n"
        );
    }
    eprintln!(
        "note: skipping a netns test: it needs root (run as root, or set CI=true to fail instead)"
    );
    false
}

/// Path of the `ferry` binary of this workspace (`target/<profile>/ferry`), or `$FERRY_BIN`.
/// Panics with a hint when it has not been built.
pub fn ferry_bin() -> PathBuf {
    workspace_bin("ferry", "ferry-proxy")
}

/// Path of binary `name` of package `package` in this workspace's target directory, found from
/// the running test executable (integration tests live in `target/<profile>/deps/`).
/// `$<NAME>_BIN` (upper case, `-` as `_`) overrides it.
pub fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return PathBuf::from(path);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => panic!("cannot locate the test executable to find {name}: {e}"),
    };
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "{} not found: run `cargo build -p {package}` first (or set {var})",
            path.display()
        );
    }
    path
}
