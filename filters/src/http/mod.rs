//! HTTP filters (`envoy.filters.http.*`) and the connection manager's own
//! header handling.

pub mod fault;
pub mod headers;
pub mod retry;
pub mod router;
