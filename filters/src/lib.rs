//! `ferry-filters`: HTTP request and response processing that Envoy does in its
//! HTTP connection manager and filters, one module per Envoy extension name.
//!
//! The functions here are pure transformations of `http` types, so each is
//! testable alone; the proxy wires them around its upstream call.

pub mod http;
