//! Who the client of an HTTP request is, and whether it is trusted: the
//! connection manager's `use_remote_address`, `xff_num_trusted_hops`,
//! `skip_xff_append`, `internal_address_config` and
//! `original_ip_detection_extensions`, as Envoy reads them. The decisions
//! themselves (parsing `x-forwarded-for`, what an internal request may keep)
//! live in `ferry-filters` (`http::forwarded`).

use crate::cidr::CidrRange;

/// The connection manager's settings that decide the client's address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTrust {
    /// `xff_num_trusted_hops`: trusted proxies in front of this one, counted
    /// from the right of `x-forwarded-for`.
    pub xff_num_trusted_hops: u32,
    /// `skip_xff_append` (only with `use_remote_address`).
    pub skip_xff_append: bool,
    /// Which detected client addresses make a request internal.
    pub internal: InternalAddresses,
    /// `original_ip_detection_extensions`, tried in order when
    /// `use_remote_address` is off; empty: `x-forwarded-for` with
    /// `xff_num_trusted_hops`, as Envoy's default.
    pub detection: Vec<IpDetection>,
    /// `preserve_external_request_id`: keep an edge request's `x-request-id`.
    pub preserve_external_request_id: bool,
}

/// `internal_address_config`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum InternalAddresses {
    /// Unset: since Envoy 1.33 no address is internal.
    #[default]
    None,
    /// Set without `cidr_ranges`: the RFC 1918 and RFC 4193 ranges and the
    /// loopback addresses, as Envoy's `isInternalAddress`.
    Private,
    /// Set with `cidr_ranges`: exactly those.
    Ranges(Vec<CidrRange>),
}

/// One original-IP detection extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpDetection {
    /// `envoy.extensions.http.original_ip_detection.xff.v3.XffConfig`.
    Xff {
        num_trusted_hops: u32,
        /// `xff_trusted_cidrs`: used instead of the hop count when set.
        trusted_cidrs: Option<Vec<CidrRange>>,
        /// `skip_xff_append` (unset: true).
        skip_xff_append: bool,
    },
    /// `envoy.extensions.http.original_ip_detection.custom_header.v3.CustomHeaderConfig`.
    CustomHeader {
        /// Lower-case header name.
        header: String,
        /// `allow_extension_to_set_address_as_trusted`.
        trusted: bool,
        /// `reject_with_status`: the status to refuse a request whose address
        /// cannot be read (403 unless it is in 400..=511).
        reject_with: Option<u16>,
    },
}
