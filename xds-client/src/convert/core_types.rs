//! Envoy's `config.core.v3` building blocks that every converter shares:
//! socket addresses and CIDR ranges, data sources, transport sockets,
//! metadata values, and the `type.v3` fractional percentages.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use ferry_model as m;

use super::coverage::{fields, path};
use super::{ConvertError, Ctx, Typed};

fields!(pub(super) static ADDRESS = "envoy.config.core.v3.Address" {
    "socket_address": applied,
    "pipe": applied "endpoints of STATIC and EDS clusters (Unix socket; `@name` in the abstract namespace); refused on listeners and DNS clusters",
    "envoy_internal_address": applied "as a cluster endpoint (an internal listener of this proxy) and an internal listener's own address; refused elsewhere",
});

fields!(pub(super) static SOCKET_ADDRESS = "envoy.config.core.v3.SocketAddress" {
    "protocol": applied "TCP (UDP refused)",
    "address": applied,
    "port_value": applied,
    "named_port": refused "named ports are not supported",
    "resolver_name": refused "custom resolvers are not supported",
    "ipv4_compat": applied "an IPv6 wildcard listener accepts IPv4 whether or not it is set (the system's dual-stack default; Envoy without it is IPv6-only)",
    "network_namespace_filepath": refused "addresses in other network namespaces are not supported",
});

fields!(pub(super) static DATA_SOURCE = "envoy.config.core.v3.DataSource" {
    "filename": applied "read when the configuration is loaded",
    "inline_bytes": applied,
    "inline_string": applied,
    "environment_variable": applied,
    "watched_directory": refused "reloading data sources from a watched directory is not supported",
});

fields!(pub(super) static TRANSPORT_SOCKET = "envoy.config.core.v3.TransportSocket" {
    "name": applied "raw_buffer without a typed_config",
    "typed_config": applied "raw buffer, DownstreamTlsContext or UpstreamTlsContext (others refused)",
});

fields!(pub(super) static RUNTIME_FRACTIONAL_PERCENT = "envoy.config.core.v3.RuntimeFractionalPercent" {
    "default_value": applied,
    "runtime_key": applied "the runtime's value when a static layer holds the key, else default_value",
});

fields!(pub(super) static FRACTIONAL_PERCENT = "envoy.type.v3.FractionalPercent" {
    "numerator": applied "clamped to the denominator, as Envoy does",
    "denominator": applied,
});

fields!(pub(super) static CIDR_RANGE = "envoy.config.core.v3.CidrRange" {
    "address_prefix": applied,
    "prefix_len": applied,
});

pub(super) fn socket_address(
    ctx: &Ctx<'_>,
    field: &str,
    a: &Option<core_pb::Address>,
) -> Result<(String, u16), ConvertError> {
    use core_pb::address::Address as A;
    use core_pb::socket_address::PortSpecifier;
    let Some(core_pb::Address { address }) = a else {
        return Err(ctx.err(field, "address is required"));
    };
    match address {
        Some(A::SocketAddress(sa)) => {
            let sf = path(field, "socket_address");
            let core_pb::SocketAddress {
                protocol,
                address,
                resolver_name,
                ipv4_compat,
                network_namespace_filepath,
                port_specifier,
            } = sa;
            if *protocol != core_pb::socket_address::Protocol::Tcp as i32 {
                return Err(ctx.err(path(&sf, "protocol"), "only TCP is supported"));
            }
            ctx.refuse(
                &SOCKET_ADDRESS,
                &sf,
                "resolver_name",
                !resolver_name.is_empty(),
            )?;
            ctx.refuse(
                &SOCKET_ADDRESS,
                &sf,
                "network_namespace_filepath",
                !network_namespace_filepath.is_empty(),
            )?;
            // IPv6 wildcard listeners are dual-stack (the system's default).
            let _ = ipv4_compat;
            let port = match port_specifier {
                Some(PortSpecifier::PortValue(p)) => u16::try_from(*p)
                    .map_err(|_| ctx.err(path(&sf, "port_value"), format!("{p} is not a port")))?,
                Some(PortSpecifier::NamedPort(_)) => {
                    ctx.refuse(&SOCKET_ADDRESS, &sf, "named_port", true)?;
                    0
                }
                None => 0,
            };
            Ok((address.clone(), port))
        }
        // Only cluster endpoints may be Unix sockets (`host_addr`).
        Some(A::Pipe(_)) => Err(ctx.err(
            path(field, "pipe"),
            "a Unix socket is only supported as the endpoint of a STATIC or EDS cluster",
        )),
        Some(A::EnvoyInternalAddress(_)) => Err(ctx.err(
            path(field, "envoy_internal_address"),
            "an internal address is only supported as a cluster endpoint or an internal listener's own address",
        )),
        None => Err(ctx.err(field, "address is required")),
    }
}

fields!(pub(super) static PIPE = "envoy.config.core.v3.Pipe" {
    "path": applied "a file path, or `@name` in the abstract namespace",
    "mode": applied "an upstream connection creates no socket file, so only checked as Envoy does (at most 0777, none on an abstract socket)",
});

/// An endpoint's address: an IP socket or a Unix socket (`pipe`), as Envoy
/// accepts them in STATIC and EDS clusters.
pub(super) fn host_addr(
    ctx: &Ctx<'_>,
    field: &str,
    a: &Option<core_pb::Address>,
) -> Result<m::cluster::HostAddr, ConvertError> {
    use core_pb::address::Address as A;
    if let Some(core_pb::Address {
        address: Some(A::Pipe(p)),
    }) = a
    {
        let pf = path(field, "pipe");
        let core_pb::Pipe { path: file, mode } = p;
        if file.is_empty() || file == "@" {
            return Err(ctx.err(path(&pf, "path"), "a pipe needs a path"));
        }
        if file.contains('\0') {
            return Err(ctx.err(path(&pf, "path"), "a pipe path cannot hold NUL"));
        }
        // sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
        if file.len() > 107 {
            return Err(ctx.err(
                path(&pf, "path"),
                format!("{file:?} is longer than a Unix socket path may be (107 bytes)"),
            ));
        }
        if *mode > 0o777 {
            return Err(ctx.err(path(&pf, "mode"), format!("{mode:o} is not a file mode")));
        }
        if *mode != 0 && file.starts_with('@') {
            return Err(ctx.err(
                path(&pf, "mode"),
                "an abstract Unix socket has no file mode",
            ));
        }
        return Ok(m::cluster::HostAddr::Pipe(m::cluster::PipeAddr(
            std::sync::Arc::from(file.as_str()),
        )));
    }
    if let Some(core_pb::Address {
        address: Some(A::EnvoyInternalAddress(ia)),
    }) = a
    {
        let core_pb::EnvoyInternalAddress {
            endpoint_id,
            address_name_specifier,
        } = ia;
        let listener =
            match address_name_specifier {
                Some(
                    core_pb::envoy_internal_address::AddressNameSpecifier::ServerListenerName(n),
                ) if !n.is_empty() => n,
                _ => {
                    return Err(ctx.err(
                        path(field, "envoy_internal_address.server_listener_name"),
                        "an internal address needs the internal listener's name",
                    ));
                }
            };
        return Ok(m::cluster::HostAddr::Internal(m::cluster::InternalAddr {
            listener: std::sync::Arc::from(listener.as_str()),
            endpoint_id: std::sync::Arc::from(endpoint_id.as_str()),
        }));
    }
    ip_socket(ctx, field, a).map(m::cluster::HostAddr::Ip)
}

pub(super) fn ip_socket(
    ctx: &Ctx<'_>,
    field: &str,
    a: &Option<core_pb::Address>,
) -> Result<SocketAddr, ConvertError> {
    let (host, port) = socket_address(ctx, field, a)?;
    let ip: IpAddr = host.parse().map_err(|_| {
        ctx.err(
            format!("{field}.socket_address.address"),
            format!("{host:?} is not an IP address"),
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// A metadata value as the string Envoy compares it with.
pub(super) fn value_string(v: &envoy_types::pb::google::protobuf::Value) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::NumberValue(n)) => n.to_string(),
        _ => String::new(),
    }
}

pub(super) fn cidr(
    ctx: &Ctx<'_>,
    field: &str,
    r: &core_pb::CidrRange,
) -> Result<m::CidrRange, ConvertError> {
    let core_pb::CidrRange {
        address_prefix,
        prefix_len,
    } = r;
    let ip: IpAddr = address_prefix.parse().map_err(|_| {
        ctx.err(
            format!("{field}.address_prefix"),
            format!("{address_prefix:?} is not an IP address"),
        )
    })?;
    let len = prefix_len
        .as_ref()
        .map_or(if ip.is_ipv4() { 32 } else { 128 }, |v| v.value);
    u8::try_from(len)
        .ok()
        .and_then(|len| m::CidrRange::new(ip, len))
        .ok_or_else(|| {
            ctx.err(
                format!("{field}.prefix_len"),
                format!("{len} is too long for {ip}"),
            )
        })
}

/// A transport socket: raw (plaintext) or TLS, whose settings are parsed
/// into the model. Returns the TLS context's type and bytes, if TLS.
pub(super) fn transport_socket_typed(
    ctx: &Ctx<'_>,
    field: &str,
    ts: &core_pb::TransportSocket,
) -> Result<Option<Typed>, ConvertError> {
    let core_pb::TransportSocket { name, config_type } = ts;
    let typed = match config_type {
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any)) => {
            Typed::from_any(any).map_err(|e| ctx.err(format!("{field}.typed_config"), e))?
        }
        None if name == "envoy.transport_sockets.raw_buffer" || name == "raw_buffer" => {
            return Ok(None);
        }
        None => {
            return Err(ctx.err(
                field,
                format!("transport socket {name:?} has no typed_config"),
            ));
        }
    };
    match typed.type_name() {
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => Ok(None),
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
        | "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext" => Ok(Some(typed)),
        t => Err(ctx.err(
            format!("{field}.typed_config"),
            format!("unsupported transport socket {:?} ({t})", ts.name),
        )),
    }
}

/// The bytes of a `DataSource`: inline, or read from a file (as Envoy
/// reads it when the configuration is loaded).
pub(super) fn data_source(
    ctx: &Ctx<'_>,
    field: &str,
    d: Option<&core_pb::DataSource>,
) -> Result<Vec<u8>, ConvertError> {
    use core_pb::data_source::Specifier as S;
    let Some(core_pb::DataSource {
        watched_directory,
        specifier,
    }) = d
    else {
        return Ok(Vec::new());
    };
    ctx.refuse(
        &DATA_SOURCE,
        field,
        "watched_directory",
        watched_directory.is_some(),
    )?;
    match specifier {
        None => Ok(Vec::new()),
        Some(S::InlineBytes(b)) => Ok(b.clone()),
        Some(S::InlineString(s)) => Ok(s.clone().into_bytes()),
        Some(S::Filename(f)) => std::fs::read(f).map_err(|e| {
            ctx.err(
                format!("{field}.filename"),
                format!("cannot read {f:?}: {e}"),
            )
        }),
        Some(S::EnvironmentVariable(v)) => std::env::var(v).map(String::into_bytes).map_err(|_| {
            ctx.err(
                format!("{field}.environment_variable"),
                format!("environment variable {v:?} is not set"),
            )
        }),
    }
}

pub(super) fn fraction(
    f: &Option<envoy_types::pb::envoy::r#type::v3::FractionalPercent>,
) -> m::Fraction {
    let Some(envoy_types::pb::envoy::r#type::v3::FractionalPercent {
        numerator,
        denominator,
    }) = f
    else {
        return m::Fraction {
            numerator: 0,
            denominator: 100,
        };
    };
    let denominator = match denominator {
        1 => 10_000,
        2 => 1_000_000,
        _ => 100,
    };
    m::Fraction {
        // Envoy clamps a numerator above the denominator to 100 %.
        numerator: (*numerator).min(denominator),
        denominator,
    }
}

/// A `RuntimeFractionalPercent`: the runtime's value for its `runtime_key`
/// when a layer holds one, else its `default_value`.
pub(super) fn runtime_fraction(
    f: &Option<core_pb::RuntimeFractionalPercent>,
) -> Option<m::Fraction> {
    f.as_ref().map(
        |core_pb::RuntimeFractionalPercent {
             default_value,
             runtime_key,
         }| runtime_value(runtime_key, fraction(default_value)),
    )
}

/// The runtime's value for `key` (a fraction), else `default`.
pub(super) fn runtime_value(key: &str, default: m::Fraction) -> m::Fraction {
    let (numerator, denominator) =
        crate::runtime::current().fraction(key, (default.numerator, default.denominator));
    m::Fraction {
        numerator,
        denominator,
    }
}

pub(super) const NEVER: m::Fraction = m::Fraction {
    numerator: 0,
    denominator: 100,
};
