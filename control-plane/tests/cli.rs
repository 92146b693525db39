//! The `ferry-pilot analyze` command: findings on stdout with their codes,
//! exit status 1 on errors and 0 on a clean configuration.

use std::path::Path;
use std::process::Command;

fn analyze(dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-pilot"))
        .arg("analyze")
        .arg(dir)
        .output()
        .expect("run ferry-pilot");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn analyze_reports_errors_with_codes_and_exit_status() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (ok, text) = analyze(&fixtures.join("invalid"));
    assert!(!ok, "{text}");
    assert!(
        text.contains("Error [IST0101]") || text.contains("Error [IST0106]"),
        "{text}"
    );
    assert!(text.contains("configuration has errors"), "{text}");

    let (ok, text) = analyze(&fixtures.join("mesh"));
    assert!(ok, "{text}");
}

#[test]
fn analyze_with_a_mesh_config_checks_custom_providers() {
    let dir = std::env::temp_dir().join(format!("ferry-cli-mesh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("config")).expect("dir");
    std::fs::write(
        dir.join("config/custom.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: ext, namespace: default}\n\
         spec: {action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {paths: [/x]}}]}]}\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("mesh.yaml"),
        "trustDomain: example.org\nextensionProviders:\n- name: other\n  \
         envoyExtAuthzHttp: {service: authz/x.authz.svc.cluster.local, port: 80}\n",
    )
    .expect("write");
    // Without the mesh configuration there is nothing to check against.
    let (ok, text) = analyze(&dir.join("config"));
    assert!(ok, "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-pilot"))
        .arg("analyze")
        .arg(dir.join("config"))
        .arg("--mesh-config")
        .arg(dir.join("mesh.yaml"))
        .output()
        .expect("run ferry-pilot");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("Error [IST0101]") && text.contains("\"opa\""),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
