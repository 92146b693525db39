//! Marks the tests that need Istio's material from `../shared` (see `scripts/istio_material.rs`).

include!("../scripts/istio_material.rs");

fn main() {
    istio_material();
}
