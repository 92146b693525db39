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
