//! `x-request-id` as Envoy's connection manager settles it, before routing
//! and before any filter or access log reads it: an edge request's own id
//! is dropped (unless `preserve_external_request_id`), and a request
//! without one gets a new UUID v4 (`generate_request_id`, on by default).

use ferry_filters::http::forwarded::ClientAddress;
use ferry_filters::http::headers;
use ferry_model::HttpConnectionManager;
use http::Request;

pub(super) const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Applies the connection manager's request id rules to a request whose
/// client was already decided (`client::apply`).
pub(super) fn apply<B>(hcm: &HttpConnectionManager, req: &mut Request<B>) {
    let edge = req
        .extensions()
        .get::<ClientAddress>()
        .is_some_and(|c| c.edge);
    if edge && !hcm.client_trust.preserve_external_request_id {
        req.headers_mut().remove(X_REQUEST_ID);
    }
    if hcm.generate_request_id && !req.headers().contains_key(X_REQUEST_ID) {
        req.headers_mut()
            .insert(X_REQUEST_ID, headers::request_id());
    }
}
