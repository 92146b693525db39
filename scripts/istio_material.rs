// Included by the build scripts of the crates whose tests read Istio's material from `../shared`
// beside the repository (Istio's samples, translation goldens, captured config dumps). When any
// of it is absent and CI is not `true`, the crate is built with `cfg(no_istio_material)`, which
// marks those tests `#[ignore]` with the reason: `cargo test` and `cargo nextest` then list them
// as skipped instead of passing without running. Under `CI=true` they stay in and fail on the
// missing files. A directory that appears later is seen on the next rebuild of the crate.

fn istio_material() {
    const PARTS: [&str; 3] = ["istio-samples", "istio-goldens", "istio-config-dumps"];
    println!("cargo::rustc-check-cfg=cfg(no_istio_material)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=../scripts/istio_material.rs");
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let shared = std::path::Path::new(&manifest).join("../../shared");
    let mut absent = false;
    for part in PARTS {
        let dir = shared.join(part);
        if dir.is_dir() {
            // Watching a missing path would rebuild the crate every time; a present one is
            // watched so that its removal is noticed.
            println!("cargo::rerun-if-changed={}", dir.display());
        } else {
            absent = true;
        }
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if absent && !ci {
        println!("cargo::rustc-cfg=no_istio_material");
    }
}
