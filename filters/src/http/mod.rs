//! HTTP filters (`envoy.filters.http.*`) and the connection manager's own
//! header handling.

pub mod compressor;
pub mod cors;
pub mod fault;
pub mod forwarded;
pub mod headers;
pub mod jwt_authn;
pub mod local_ratelimit;
pub mod path_normalization;
pub mod rbac;
pub mod retry;
pub mod router;
