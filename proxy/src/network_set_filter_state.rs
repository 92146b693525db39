//! `envoy.filters.network.set_filter_state`: the filter state a connection
//! gets when it is accepted, before the chain's other filters run (its
//! `on_new_connection` values, rendered from the connection's addresses and
//! from the filter state it came with). The state is then the connection's:
//! network RBAC's `filter_state` principals and `%FILTER_STATE%` read it,
//! the connection manager starts each request's from it, and the objects it
//! shares with upstream travel with the connections opened for it to
//! internal listeners (Istio's waypoint `main_internal` chains).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ferry_model::FilterChain;
use ferry_model::filter_state::{self as fs, FilterState};
use ferry_model::format::{FormatContext, ValueContext};

/// The filter state of a connection accepted on `chain` from `peer` to
/// `local`, starting from what an internal connection `inherited` (none for
/// a socket's). `None` when there is none.
pub fn on_new_connection(
    chain: &FilterChain,
    inherited: Option<Arc<FilterState>>,
    peer: SocketAddr,
    (local, local_internal): (SocketAddr, Option<&ferry_model::cluster::InternalAddr>),
) -> Option<Arc<FilterState>> {
    if chain.set_filter_state.is_empty() {
        return inherited;
    }
    let mut state = inherited.as_deref().cloned().unwrap_or_default();
    // Nothing of a request or of the TLS handshake is known yet: Envoy
    // runs `on_new_connection` before either.
    let format = FormatContext {
        downstream_remote: Some(peer),
        downstream_local: Some(local),
        downstream_local_internal: local_internal,
        upstream_remote: None,
        protocol: "",
        hostname: crate::http::hostname(),
        start_time: SystemTime::now(),
    };
    let pseudo = ferry_model::route::Pseudo {
        method: "",
        path: "",
        authority: "",
        scheme: "",
    };
    let headers = http::HeaderMap::new();
    fs::apply(&chain.set_filter_state, &mut state, |value, so_far| {
        let ctx = ValueContext {
            format: &format,
            pseudo: &pseudo,
            peer_uri_sans: &[],
            local_uri_sans: &[],
            filter_state: Some(so_far),
        };
        value.render(&ctx, &headers)
    });
    tracing::debug!(filter_chain.name = %chain.name, "connection filter state set");
    (!state.is_empty()).then(|| Arc::new(state))
}
