//! HTTP filters (`envoy.filters.http.*`) and the connection manager's own
//! header handling.

pub mod headers;
pub mod router;
