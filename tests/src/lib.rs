//! Support code for Ferry's integration tests: [`netns`] builds pods as network namespaces,
//! [`proxy`] runs Ferry and test backends on loopback, [`pki`] makes Istio-shaped
//! certificates and speaks TLS to listeners directly.

pub mod envoy;
pub mod hbone;
pub mod istio;
pub mod istiod_hbone;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod proxy;

/// A path in Istio's material beside the repository (`../shared/<rel>`: Istio's samples,
/// goldens and captured config dumps). The tests that use it carry
/// `#[cfg_attr(no_istio_material, ignore = …)]` (see `scripts/istio_material.rs`): when the
/// material is absent they are listed as skipped, or, under `CI=true`, they run and fail here.
pub fn istio_material(rel: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(rel);
    anyhow::ensure!(
        p.exists(),
        "{} is missing: Istio's material (../shared beside the repository) is needed",
        p.display()
    );
    Ok(p)
}
