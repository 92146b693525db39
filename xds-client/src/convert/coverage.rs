//! What Ferry does with each field of each Envoy message it converts:
//! applies it, refuses it when set, accepts it as a tuning knob with a
//! warning, or knows it to be inert (it changes nothing in Envoy either).
//!
//! Each converter destructures its message field by field (no `..`), so a
//! new field in `envoy-types` fails the build until it is handled, and keeps
//! a [`Coverage`] list of the same fields beside that code. Refusals and
//! warnings go through [`Ctx::refuse`] and [`Ctx::knob`], which take their
//! wording from the list, so the message an operator reads and the table in
//! `docs/config-coverage.md` are one text. The tests check every list
//! against Envoy's descriptors (each field of the message, no other), set
//! every refused or warned field on a working configuration and expect the
//! error or the warning naming it, and regenerate the table.

use super::{ConvertError, Ctx};

/// What happens to a field when it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    /// Read and enforced as Envoy enforces it (the note says which values,
    /// if any, are refused).
    Applied,
    /// Set to anything but its default, it is an error naming the resource
    /// and the field: exit 1 for a bootstrap, a NACK over xDS.
    Refused,
    /// A tuning knob that changes no decision: accepted with a warning
    /// saying it is not applied.
    Warned,
    /// Changes nothing in Envoy either: names, opaque metadata no filter of
    /// Ferry's reads, settings of features that are refused or absent.
    Inert,
}

#[cfg_attr(not(test), allow(dead_code))]
impl Status {
    pub(super) fn name(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::Refused => "refused",
            Status::Warned => "warned",
            Status::Inert => "inert",
        }
    }
}

/// One field of a message: its name in the proto, its status, and the
/// reason or detail (an error's or a warning's text for refused and warned
/// fields).
#[derive(Debug)]
pub(super) struct Field {
    pub(super) name: &'static str,
    pub(super) status: Status,
    pub(super) note: &'static str,
}

/// The classification of every field of one message, in one context (the
/// same message may mean different things in two places, e.g. protocol
/// options upstream and downstream).
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(super) struct Coverage {
    /// The message's full proto name.
    pub(super) message: &'static str,
    /// Where it is read, when the message is used in several places.
    pub(super) context: &'static str,
    /// The converter module (`module_path!()`).
    pub(super) module: &'static str,
    pub(super) fields: &'static [Field],
}

impl Coverage {
    pub(super) fn field(&self, name: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    fn expect(&self, name: &str, status: Status) -> &'static str {
        match self.field(name) {
            Some(f) if f.status == status => f.note,
            // A converter calling the wrong helper for its own list is a
            // bug the tests catch; the reason then falls back to a plain one.
            other => {
                debug_assert!(
                    false,
                    "{}.{name} is classified {:?}, not {status:?}",
                    self.message,
                    other.map(|f| f.status)
                );
                match status {
                    Status::Warned => "not applied",
                    _ => "not supported",
                }
            }
        }
    }
}

/// Declares a message's [`Coverage`]:
/// `fields!(pub(super) static NAME = "envoy.pkg.Message" { "field": applied "note", … });`
/// with an optional context after the message name: `"envoy.pkg.Message" ("upstream")`.
macro_rules! fields {
    ($vis:vis static $id:ident = $msg:literal $(($ctx:literal))? {
        $($field:literal : $status:ident $($note:literal)?),* $(,)?
    }) => {
        // Read by the helpers and the tests; a list no test registers in
        // `all()` is dead code there, which the lints refuse.
        #[cfg_attr(not(test), allow(dead_code))]
        $vis static $id: $crate::convert::coverage::Coverage = $crate::convert::coverage::Coverage {
            message: $msg,
            context: fields!(@ctx $($ctx)?),
            module: module_path!(),
            fields: &[$($crate::convert::coverage::Field {
                name: $field,
                status: fields!(@status $status),
                note: fields!(@note $($note)?),
            }),*],
        };
    };
    (@ctx) => { "" };
    (@ctx $c:literal) => { $c };
    (@note) => { "" };
    (@note $n:literal) => { $n };
    (@status applied) => { $crate::convert::coverage::Status::Applied };
    (@status refused) => { $crate::convert::coverage::Status::Refused };
    (@status warned) => { $crate::convert::coverage::Status::Warned };
    (@status inert) => { $crate::convert::coverage::Status::Inert };
}
pub(super) use fields;

/// `prefix.field`, or `field` at a resource's top level.
pub(super) fn path(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

impl Ctx<'_> {
    /// Refuses `field` of the message at `at` when it is set, with the
    /// reason `cov` gives for it.
    pub(super) fn refuse(
        &self,
        cov: &Coverage,
        at: &str,
        field: &str,
        set: bool,
    ) -> Result<(), ConvertError> {
        if set {
            let why = cov.expect(field, Status::Refused);
            return Err(self.err(path(at, field), why));
        }
        Ok(())
    }

    /// The refusal of `field` of the message at `at` (a oneof case that is
    /// set), with the reason `cov` gives for it.
    pub(super) fn refused(&self, cov: &Coverage, at: &str, field: &str) -> ConvertError {
        let why = cov.expect(field, Status::Refused);
        self.err(path(at, field), why)
    }

    /// Accepts `field` of the message at `at` when it is set, warning that
    /// this tuning knob is not applied (with the detail `cov` gives).
    pub(super) fn knob(&mut self, cov: &Coverage, at: &str, field: &str, set: bool) {
        if set {
            let why = cov.expect(field, Status::Warned);
            self.warn(
                &path(at, field),
                if why.is_empty() {
                    "tuning knob not applied".to_string()
                } else {
                    format!("tuning knob not applied: {why}")
                },
            );
        }
    }
}

/// Every list, in the order of the generated table.
#[cfg_attr(not(test), allow(dead_code))]
pub(super) fn all() -> Vec<&'static Coverage> {
    use super::{
        access_log, bootstrap, circuit_breakers, cluster, compressor, core_types, cors, endpoint,
        ext_authz, fault, filter_chain_matcher as fcm, header_mutation, health_check,
        http_connection_manager, http_protocol, jwt_authn, lb_config, listener, local_ratelimit,
        matcher, outlier_detection, per_filter, rbac, retry, route, set_filter_state, tcp_proxy,
        tls, trace, upstream_protocol,
    };
    vec![
        &listener::LISTENER,
        &listener::ADDITIONAL_ADDRESS,
        &listener::LISTENER_FILTER,
        &listener::LISTENER_FILTER_PREDICATE,
        &listener::FILTER_CHAIN,
        &listener::FILTER_CHAIN_MATCH,
        &listener::NETWORK_FILTER,
        &fcm::MATCHER,
        &fcm::ON_MATCH,
        &fcm::MATCHER_LIST,
        &fcm::FIELD_MATCHER,
        &fcm::PREDICATE,
        &fcm::SINGLE_PREDICATE,
        &fcm::PREDICATE_LIST,
        &fcm::MATCHER_TREE,
        &fcm::MATCH_MAP,
        &fcm::IP_MATCHER,
        &fcm::IP_RANGE_MATCHER,
        &fcm::XDS_CIDR_RANGE,
        &fcm::TYPED_EXTENSION_CONFIG,
        &fcm::XDS_STRING_MATCHER,
        &fcm::XDS_REGEX_MATCHER,
        &http_connection_manager::HCM,
        &http_connection_manager::UPGRADE_CONFIG,
        &bootstrap::BOOTSTRAP,
        &bootstrap::STATS_CONFIG,
        &bootstrap::OVERLOAD_MANAGER,
        &bootstrap::CLUSTER_MANAGER,
        &bootstrap::ADMIN,
        &compressor::COMPRESSOR,
        &compressor::COMMON_DIRECTION,
        &compressor::REQUEST_DIRECTION,
        &compressor::RESPONSE_DIRECTION,
        &compressor::RUNTIME_FEATURE_FLAG,
        &compressor::COMPRESSOR_PER_ROUTE,
        &compressor::GZIP,
        &compressor::BROTLI,
        &compressor::ZSTD,
        &http_protocol::COMMON_HTTP_PROTOCOL_OPTIONS,
        &http_protocol::HTTP1_PROTOCOL_OPTIONS,
        &http_protocol::HTTP2_PROTOCOL_OPTIONS,
        &http_protocol::KEEPALIVE_SETTINGS,
        &tcp_proxy::TCP_PROXY,
        &tcp_proxy::TUNNELING_CONFIG,
        &tls::INTERNAL_UPSTREAM,
        &tcp_proxy::TCP_HASH_POLICY,
        &access_log::HCM_ACCESS_LOG_OPTIONS,
        &access_log::TCP_ACCESS_LOG_OPTIONS,
        &trace::TRACING,
        &trace::BOOTSTRAP_TRACING,
        &trace::TRACING_HTTP,
        &trace::OPENTELEMETRY,
        &trace::ZIPKIN,
        &trace::CUSTOM_TAG,
        &trace::CUSTOM_TAG_LITERAL,
        &trace::CUSTOM_TAG_ENVIRONMENT,
        &trace::CUSTOM_TAG_HEADER,
        &trace::CUSTOM_TAG_METADATA,
        &trace::METADATA_KIND,
        &trace::METADATA_KEY,
        &trace::GRPC_SERVICE,
        &trace::ENVOY_GRPC,
        &trace::HTTP_SERVICE,
        &trace::HTTP_URI,
        &trace::REQUEST_ID_EXTENSION,
        &trace::UUID_REQUEST_ID,
        &access_log::ACCESS_LOG,
        &access_log::FILE_ACCESS_LOG,
        &access_log::STDOUT_ACCESS_LOG,
        &access_log::STDERR_ACCESS_LOG,
        &access_log::SUBSTITUTION_FORMAT_STRING,
        &access_log::JSON_FORMAT_OPTIONS,
        &access_log::ACCESS_LOG_FILTER,
        &access_log::COMPARISON_FILTER,
        &access_log::RUNTIME_UINT32,
        &access_log::STATUS_CODE_FILTER,
        &access_log::DURATION_FILTER,
        &access_log::RUNTIME_FILTER,
        &access_log::AND_FILTER,
        &access_log::OR_FILTER,
        &access_log::HEADER_FILTER,
        &access_log::RESPONSE_FLAG_FILTER,
        &access_log::GRPC_STATUS_FILTER,
        &access_log::LOG_TYPE_FILTER,
        &tls::DOWNSTREAM_TLS_CONTEXT,
        &tls::UPSTREAM_TLS_CONTEXT,
        &tls::COMMON_TLS_CONTEXT,
        &tls::TLS_PARAMETERS,
        &tls::SDS_SECRET_CONFIG,
        &tls::TLS_CERTIFICATE,
        &tls::COMBINED_VALIDATION_CONTEXT,
        &tls::VALIDATION_CONTEXT,
        &tls::SAN_MATCHER,
        &tls::SPIFFE_VALIDATOR,
        &tls::SPIFFE_TRUST_DOMAIN,
        &tls::SECRET,
        &core_types::ADDRESS,
        &core_types::SOCKET_ADDRESS,
        &core_types::PIPE,
        &core_types::CIDR_RANGE,
        &core_types::TRANSPORT_SOCKET,
        &core_types::DATA_SOURCE,
        &core_types::RUNTIME_FRACTIONAL_PERCENT,
        &core_types::FRACTIONAL_PERCENT,
        &header_mutation::HEADER_VALUE_OPTION,
        &header_mutation::HEADER_VALUE,
        &set_filter_state::SET_FILTER_STATE,
        &set_filter_state::NETWORK_SET_FILTER_STATE,
        &set_filter_state::FILTER_STATE_VALUE,
        &set_filter_state::VALUE_FORMAT,
        &route::ROUTE_CONFIGURATION,
        &route::VIRTUAL_HOST,
        &route::ROUTE,
        &route::ROUTE_MATCH,
        &matcher::HEADER_MATCHER,
        &matcher::QUERY_PARAMETER_MATCHER,
        &route::ROUTE_ACTION,
        &route::WEIGHTED_CLUSTER,
        &route::CLUSTER_WEIGHT,
        &route::UPGRADE_CONFIG,
        &route::CONNECT_CONFIG,
        &route::MAX_STREAM_DURATION,
        &route::HASH_POLICY,
        &route::MIRROR_POLICY,
        &route::HEDGE_POLICY,
        &retry::RETRY_POLICY,
        &route::REDIRECT_ACTION,
        &route::DIRECT_RESPONSE,
        &per_filter::FILTER_CONFIG,
        &matcher::STRING_MATCHER,
        &matcher::REGEX_MATCHER,
        &matcher::REGEX_MATCH_AND_SUBSTITUTE,
        &cluster::CLUSTER,
        &cluster::EDS_CLUSTER_CONFIG,
        &cluster::TRANSPORT_SOCKET_MATCH,
        &cluster::CLUSTER_FILTER,
        &cluster::UPSTREAM_CONNECTION_OPTIONS,
        &cluster::TCP_KEEPALIVE,
        &cluster::BIND_CONFIG,
        &lb_config::COMMON_LB_CONFIG,
        &lb_config::CONSISTENT_HASHING,
        &lb_config::SLOW_START,
        &lb_config::ROUND_ROBIN,
        &lb_config::LEAST_REQUEST,
        &lb_config::RING_HASH,
        &lb_config::MAGLEV,
        &lb_config::ORIGINAL_DST,
        &outlier_detection::OUTLIER_DETECTION,
        &health_check::HEALTH_CHECK,
        &health_check::HTTP_HEALTH_CHECK,
        &health_check::TCP_HEALTH_CHECK,
        &health_check::GRPC_HEALTH_CHECK,
        &health_check::PAYLOAD,
        &health_check::ENDPOINT_HEALTH_CHECK_CONFIG,
        &circuit_breakers::CIRCUIT_BREAKERS,
        &circuit_breakers::THRESHOLDS,
        &circuit_breakers::RETRY_BUDGET,
        &upstream_protocol::HTTP_PROTOCOL_OPTIONS,
        &upstream_protocol::EXPLICIT_HTTP_CONFIG,
        &upstream_protocol::USE_DOWNSTREAM_HTTP_CONFIG,
        &upstream_protocol::AUTO_HTTP_CONFIG,
        &upstream_protocol::COMMON_HTTP_PROTOCOL_OPTIONS,
        &upstream_protocol::HTTP1_PROTOCOL_OPTIONS,
        &upstream_protocol::HTTP2_PROTOCOL_OPTIONS,
        &upstream_protocol::UPSTREAM_HTTP_PROTOCOL_OPTIONS,
        &endpoint::CLUSTER_LOAD_ASSIGNMENT,
        &endpoint::POLICY,
        &endpoint::LOCALITY_LB_ENDPOINTS,
        &endpoint::LB_ENDPOINT,
        &endpoint::ENDPOINT,
        &fault::HTTP_FAULT,
        &fault::FAULT_DELAY,
        &fault::FAULT_ABORT,
        &cors::CORS_POLICY,
        &cors::ROUTE_CORS_POLICY,
        &local_ratelimit::LOCAL_RATE_LIMIT,
        &local_ratelimit::LOCAL_RATE_LIMIT_DESCRIPTOR,
        &local_ratelimit::TOKEN_BUCKET,
        &local_ratelimit::RATE_LIMIT,
        &local_ratelimit::RATE_LIMIT_ACTION,
        &local_ratelimit::GENERIC_KEY,
        &local_ratelimit::REQUEST_HEADERS,
        &local_ratelimit::HEADER_VALUE_MATCH,
        &local_ratelimit::MASKED_REMOTE_ADDRESS,
        &local_ratelimit::QUERY_PARAMETERS,
        &local_ratelimit::QUERY_PARAMETER_VALUE_MATCH,
        &rbac::HTTP_RBAC,
        &rbac::RBAC_PER_ROUTE,
        &rbac::NETWORK_RBAC,
        &rbac::RBAC,
        &rbac::POLICY,
        &rbac::PERMISSION,
        &rbac::PRINCIPAL,
        &jwt_authn::JWT_AUTHENTICATION,
        &jwt_authn::JWT_PROVIDER,
        &jwt_authn::JWT_HEADER,
        &jwt_authn::JWT_CLAIM_TO_HEADER,
        &jwt_authn::NORMALIZE_PAYLOAD,
        &jwt_authn::JWT_REQUIREMENT,
        &jwt_authn::JWT_REQUIREMENT_OR_LIST,
        &jwt_authn::JWT_REQUIREMENT_AND_LIST,
        &jwt_authn::REQUIREMENT_RULE,
        &jwt_authn::RULE_MATCH,
        &jwt_authn::PER_ROUTE_CONFIG,
        &ext_authz::EXT_AUTHZ,
        &ext_authz::NETWORK_EXT_AUTHZ,
        &ext_authz::GRPC_SERVICE,
        &ext_authz::ENVOY_GRPC,
        &ext_authz::HTTP_SERVICE,
        &ext_authz::HTTP_URI,
        &ext_authz::AUTHORIZATION_REQUEST,
        &ext_authz::AUTHORIZATION_RESPONSE,
        &ext_authz::BUFFER_SETTINGS,
        &ext_authz::EXT_AUTHZ_PER_ROUTE,
        &ext_authz::CHECK_SETTINGS,
    ]
}

#[cfg(test)]
mod dangerous;
#[cfg(test)]
mod probe;
#[cfg(test)]
mod tests;

/// A cluster from Envoy's JSON, for the converters' unit tests.
#[cfg(test)]
pub(super) fn cluster_from_json(
    json: &str,
) -> envoy_types::pb::envoy::config::cluster::v3::Cluster {
    use prost::Message;
    let desc = probe::descriptors()
        .get_message_by_name("envoy.config.cluster.v3.Cluster")
        .expect("Cluster descriptor");
    let bytes = probe::parse(&desc, json).encode_to_vec();
    envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(bytes.as_slice()).expect("Cluster")
}
