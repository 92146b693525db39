//! Envoy's `config.core.v3` building blocks that every converter shares:
//! socket addresses and CIDR ranges, data sources, transport sockets,
//! metadata values, and the `type.v3` fractional percentages.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use ferry_model as m;

use super::{ConvertError, Ctx, Typed};

pub(super) fn socket_address(
    ctx: &Ctx<'_>,
    field: &str,
    a: &Option<core_pb::Address>,
) -> Result<(String, u16), ConvertError> {
    use core_pb::address::Address as A;
    use core_pb::socket_address::PortSpecifier;
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(A::SocketAddress(sa)) => {
            if sa.protocol != core_pb::socket_address::Protocol::Tcp as i32 {
                return Err(ctx.err(
                    format!("{field}.socket_address.protocol"),
                    "only TCP is supported",
                ));
            }
            let port = match &sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => u16::try_from(*p).map_err(|_| {
                    ctx.err(
                        format!("{field}.socket_address.port_value"),
                        format!("{p} is not a port"),
                    )
                })?,
                Some(PortSpecifier::NamedPort(_)) => {
                    return Err(ctx.err(
                        format!("{field}.socket_address.named_port"),
                        "named ports are not supported",
                    ));
                }
                None => 0,
            };
            Ok((sa.address.clone(), port))
        }
        Some(_) => Err(ctx.err(field, "only socket_address is supported")),
        None => Err(ctx.err(field, "address is required")),
    }
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
    let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
        ctx.err(
            format!("{field}.address_prefix"),
            format!("{:?} is not an IP address", r.address_prefix),
        )
    })?;
    let len = r
        .prefix_len
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
    let typed = match &ts.config_type {
        Some(core_pb::transport_socket::ConfigType::TypedConfig(any)) => {
            Typed::from_any(any).map_err(|e| ctx.err(format!("{field}.typed_config"), e))?
        }
        None if ts.name == "envoy.transport_sockets.raw_buffer" || ts.name == "raw_buffer" => {
            return Ok(None);
        }
        None => {
            return Err(ctx.err(
                field,
                format!("transport socket {:?} has no typed_config", ts.name),
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
    match d.and_then(|d| d.specifier.as_ref()) {
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
    let Some(f) = f else {
        return m::Fraction {
            numerator: 0,
            denominator: 100,
        };
    };
    let denominator = match f.denominator {
        1 => 10_000,
        2 => 1_000_000,
        _ => 100,
    };
    m::Fraction {
        // Envoy clamps a numerator above the denominator to 100 %.
        numerator: f.numerator.min(denominator),
        denominator,
    }
}

pub(super) fn runtime_fraction(
    f: &Option<core_pb::RuntimeFractionalPercent>,
) -> Option<m::Fraction> {
    f.as_ref().map(|f| fraction(&f.default_value))
}

pub(super) const NEVER: m::Fraction = m::Fraction {
    numerator: 0,
    denominator: 100,
};
