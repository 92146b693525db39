//! Validation of the project's invalid fixture: each planted mistake is
//! reported once, with its code, resource and field path.

use std::path::Path;

use ferry_pilot::istio::source::load_dir;
use ferry_pilot::istio::validate::{Code, Severity, has_errors, validate};

#[test]
fn planted_mistakes_are_reported_precisely() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let findings = validate(&load_dir(&dir)?);
    let has = |code: Code, name: &str, field: &str| {
        findings.iter().any(|f| {
            f.code == code
                && f.resource.as_ref().is_some_and(|r| r.name == name)
                && f.field == field
        })
    };
    let listing = findings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        has(
            Code::SchemaValidationError,
            "typo",
            "spec.http[0].route[0].destination.hots"
        ),
        "{listing}"
    );
    assert!(
        has(
            Code::ReferencedResourceNotFound,
            "broken",
            "spec.gateways[0]"
        ),
        "{listing}"
    );
    assert!(
        has(
            Code::SchemaValidationError,
            "broken",
            "spec.http[0].match[0].uri.regex"
        ),
        "{listing}"
    );
    assert!(
        has(
            Code::ReferencedResourceNotFound,
            "broken",
            "spec.http[0].route[0].destination.subset"
        ),
        "{listing}"
    );
    assert!(
        has(
            Code::ReferencedResourceNotFound,
            "broken",
            "spec.http[0].route[1].destination.host"
        ),
        "{listing}"
    );
    assert!(
        has(Code::SchemaValidationError, "broken", "spec.http[0].route"),
        "{listing}"
    );
    assert!(
        has(
            Code::VirtualServiceIneffectiveMatch,
            "broken",
            "spec.http[1].match[0]"
        ),
        "{listing}"
    );
    assert!(
        has(
            Code::VirtualServiceUnreachableRule,
            "broken",
            "spec.http[3]"
        ),
        "{listing}"
    );
    assert!(has_errors(&findings));
    // Messages name the file, the resource and the code.
    let weight = findings
        .iter()
        .find(|f| f.field == "spec.http[0].route" && f.code == Code::SchemaValidationError)
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(weight.contains("invalid.yaml:"), "{weight}");
    assert!(weight.contains("VirtualService shop/broken"), "{weight}");
    assert!(weight.contains("IST0106"), "{weight}");
    assert!(
        weight.contains("total destination weight 90 != 100"),
        "{weight}"
    );
    assert!(findings.iter().all(|f| f.severity == f.code.severity()));
    Ok(())
}

#[test]
#[cfg_attr(
    no_istio_material,
    ignore = "needs Istio's material in ../shared beside the repository"
)]
fn istio_samples_have_no_schema_errors() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-samples");
    anyhow::ensure!(
        dir.is_dir(),
        "{} is missing (Istio's material, ../shared beside the repository)",
        dir.display()
    );
    let findings = validate(&load_dir(&dir)?);
    let schema: Vec<String> = findings
        .iter()
        .filter(|f| f.code == Code::SchemaValidationError && f.severity == Severity::Error)
        .map(ToString::to_string)
        .collect();
    assert!(schema.is_empty(), "{}", schema.join("\n"));
    Ok(())
}
