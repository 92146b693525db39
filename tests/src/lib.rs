//! Support code for Ferry's integration tests: [`netns`] builds pods as network namespaces,
//! [`proxy`] runs Ferry and test backends on loopback, [`pki`] makes Istio-shaped
//! certificates and speaks TLS to listeners directly.

pub mod envoy;
pub mod istio;
pub mod netns;
pub mod pki;
pub mod proxy;
