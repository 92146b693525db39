//! The project's own bookinfo (`samples/bookinfo/` in the repository): the same services,
//! ports, subsets, gateway and routes as Istio's sample, its apps (`src/bookinfo.py`) and the
//! stand-in app for images the local platform cannot run (`samples/standin/`). Built into the
//! binary, so `ferry-pilot demo` needs nothing beside it.

/// One file of a sample: its path under `samples/bookinfo/` and its text.
pub type SampleFile = (&'static str, &'static str);

macro_rules! sample {
    ($path:literal) => {
        (
            $path,
            include_str!(concat!("../../../samples/bookinfo/", $path)),
        )
    };
}

/// What the demo starts with: the namespaces (`default` labelled for injection), the
/// services and Deployments, the ingress Gateway with its VirtualService, every
/// DestinationRule's subsets and mesh-wide STRICT mTLS.
pub const BOOKINFO: &[SampleFile] = &[
    sample!("platform/namespace.yaml"),
    sample!("platform/kube/bookinfo.yaml"),
    sample!("networking/bookinfo-gateway.yaml"),
    sample!("networking/destination-rule-all.yaml"),
    sample!("security/peer-authentication-strict.yaml"),
];

/// The traffic rules of the walk-through, applied one at a time.
pub const NETWORKING: &[SampleFile] = &[
    sample!("networking/virtual-service-all-v1.yaml"),
    sample!("networking/virtual-service-reviews-test-v2.yaml"),
    sample!("networking/virtual-service-reviews-50-v3.yaml"),
    sample!("networking/virtual-service-reviews-v3.yaml"),
    sample!("networking/virtual-service-ratings-test-abort.yaml"),
    sample!("networking/virtual-service-ratings-test-delay.yaml"),
];

/// The bookinfo apps (`bookinfo.py SERVICE VERSION`).
pub const BOOKINFO_APP: &str = include_str!("../../../samples/bookinfo/src/bookinfo.py");

/// The stand-in app (`standin.py PORT...`).
pub const STANDIN_APP: &str = include_str!("../../../samples/standin/standin.py");

/// A traffic rule of [`NETWORKING`] by file name (`virtual-service-reviews-50-v3.yaml`).
pub fn networking(name: &str) -> Option<SampleFile> {
    NETWORKING
        .iter()
        .copied()
        .find(|(path, _)| path.rsplit('/').next() == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::source::parse_documents;
    use crate::istio::validate::{Severity, validate};
    use std::path::Path;

    #[test]
    fn the_built_in_configuration_is_valid_with_each_rule() {
        let mut base = crate::istio::source::Snapshot::default();
        for (path, text) in BOOKINFO {
            let s = parse_documents(text, Path::new(path));
            assert!(s.errors.is_empty(), "{path}: {:?}", s.errors);
            base.resources.extend(s.resources);
        }
        let kinds = |kind: &str| base.resources.iter().filter(|r| r.kind == kind).count();
        assert_eq!(
            (
                kinds("Service"),
                kinds("Deployment"),
                kinds("DestinationRule")
            ),
            (4, 6, 4)
        );
        for (path, text) in std::iter::once(("(none)", "")).chain(NETWORKING.iter().copied()) {
            let mut all = base.clone();
            all.resources
                .extend(parse_documents(text, Path::new(path)).resources);
            let errors: Vec<String> = validate(&all)
                .into_iter()
                .filter(|f| f.severity == Severity::Error)
                .map(|f| f.to_string())
                .collect();
            assert!(errors.is_empty(), "with {path}: {errors:#?}");
        }
        assert!(networking("virtual-service-reviews-50-v3.yaml").is_some());
    }
}
