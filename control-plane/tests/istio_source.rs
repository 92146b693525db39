//! Loading real Istio material: every YAML file of the shared Istio samples
//! must load without a single error for the Istio kinds, and the project's
//! own fixtures must load completely.

use std::path::{Path, PathBuf};

use ferry_pilot::istio::source::{DirectorySource, Source, Spec, load_dir};

fn samples() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-samples");
    dir.is_dir().then_some(dir)
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn every_istio_sample_loads_without_errors() -> anyhow::Result<()> {
    let dir = samples().ok_or_else(|| {
        anyhow::anyhow!(
            "../shared/istio-samples is missing (Istio's material, ../shared beside the repository)"
        )
    })?;
    let snap = load_dir(&dir)?;
    let errors: Vec<String> = snap.errors.iter().map(ToString::to_string).collect();
    assert!(
        errors.is_empty(),
        "{} errors:\n{}",
        errors.len(),
        errors.join("\n")
    );
    let count = |f: fn(&Spec) -> bool| snap.resources.iter().filter(|r| f(&r.spec)).count();
    assert!(count(|s| matches!(s, Spec::VirtualService(_))) >= 50);
    assert!(count(|s| matches!(s, Spec::DestinationRule(_))) >= 25);
    assert!(count(|s| matches!(s, Spec::ServiceEntry(_))) >= 40);
    assert!(count(|s| matches!(s, Spec::AuthorizationPolicy(_))) >= 15);
    assert!(count(|s| matches!(s, Spec::Deployment(_))) >= 50);
    Ok(())
}

#[test]
fn fixtures_load_through_the_directory_source() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let source = DirectorySource::new(&dir);
    let snap = source.list()?;
    assert!(
        snap.errors
            .iter()
            .all(|e| e.origin.file.ends_with("invalid.yaml")),
        "{:?}",
        snap.errors
    );
    assert!(!snap.resources.is_empty());
    Ok(())
}
