//! Support code for Ferry's integration tests: [`netns`] builds pods as network namespaces.

pub mod envoy;
pub mod netns;
pub mod proxy;
