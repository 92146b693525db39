//! `envoy.filters.http.compressor` (`Compressor`) with its libraries
//! (`envoy.compression.{gzip,brotli,zstd}.compressor`), and the per-route
//! `CompressorPerRoute`.

use envoy_types::pb::envoy::config::core::v3 as core_pb;
use envoy_types::pb::envoy::extensions::compression::brotli::compressor::v3 as brotli_pb;
use envoy_types::pb::envoy::extensions::compression::gzip::compressor::v3 as gzip_pb;
use envoy_types::pb::envoy::extensions::compression::zstd::compressor::v3 as zstd_pb;
use envoy_types::pb::envoy::extensions::filters::http::compressor::v3 as comp_pb;
use ferry_model as m;
use ferry_model::compressor::{
    ContentTypes, DEFAULT_CONTENT_TYPES, DEFAULT_MIN_CONTENT_LENGTH, Library,
};

use super::coverage::{fields, path};
use super::matcher::string_matcher;
use super::{ConvertError, Ctx, Typed};

pub(super) const COMPRESSOR_TYPE: &str = "envoy.extensions.filters.http.compressor.v3.Compressor";
pub(super) const COMPRESSOR_PER_ROUTE_TYPE: &str =
    "envoy.extensions.filters.http.compressor.v3.CompressorPerRoute";
const GZIP_TYPE: &str = "envoy.extensions.compression.gzip.compressor.v3.Gzip";
const BROTLI_TYPE: &str = "envoy.extensions.compression.brotli.compressor.v3.Brotli";
const ZSTD_TYPE: &str = "envoy.extensions.compression.zstd.compressor.v3.Zstd";

fields!(pub(super) static COMPRESSOR = "envoy.extensions.filters.http.compressor.v3.Compressor" {
    "content_length": applied "deprecated; read only without response_direction_config, as Envoy",
    "content_type": applied "deprecated; read only without response_direction_config, as Envoy",
    "disable_on_etag_header": applied "deprecated; read only without response_direction_config, as Envoy",
    "remove_accept_encoding_header": applied "deprecated; read only without response_direction_config, as Envoy",
    "runtime_enabled": applied "its default_value (no runtime layer overrides it); read only without response_direction_config",
    "compressor_library": applied "gzip, brotli or zstd",
    "request_direction_config": refused "request compression is not supported (a request direction whose enabled default_value is false is accepted)",
    "response_direction_config": applied,
    "choose_first": refused "preferring a compressor on equal q-values is not supported",
});

fields!(pub(super) static COMMON_DIRECTION = "envoy.extensions.filters.http.compressor.v3.Compressor.CommonDirectionConfig" {
    "enabled": applied "its default_value (no runtime layer overrides it)",
    "min_content_length": applied "default 30",
    "content_type": applied "Envoy's default list when empty",
    "content_type_matcher": applied "takes precedence over content_type",
});

fields!(pub(super) static REQUEST_DIRECTION = "envoy.extensions.filters.http.compressor.v3.Compressor.RequestDirectionConfig" {
    "common_config": applied "only to find the direction disabled; an enabled request direction is refused",
});

fields!(pub(super) static RESPONSE_DIRECTION = "envoy.extensions.filters.http.compressor.v3.Compressor.ResponseDirectionConfig" {
    "common_config": applied,
    "disable_on_etag_header": applied,
    "weaken_etag_on_compress": applied "a strong ETag is kept as W/…; without it a strong ETag is removed",
    "remove_accept_encoding_header": applied,
    "uncompressible_response_codes": applied,
    "status_header_enabled": refused "the x-envoy-compression-status header is not supported",
});

fields!(pub(super) static RUNTIME_FEATURE_FLAG = "envoy.config.core.v3.RuntimeFeatureFlag" {
    "default_value": applied "required, as Envoy requires it",
    "runtime_key": inert "there is no runtime layer: the default applies, as in Envoy without runtime overrides",
});

fields!(pub(super) static COMPRESSOR_PER_ROUTE = "envoy.extensions.filters.http.compressor.v3.CompressorPerRoute" {
    "disabled": applied "the route's responses pass uncompressed",
    "overrides": refused "per-route compressor overrides are not supported",
});

fields!(pub(super) static GZIP = "envoy.extensions.compression.gzip.compressor.v3.Gzip" {
    "memory_level": warned "the deflate encoder's memory use is fixed (the output is valid gzip either way)",
    "compression_level": applied "1 to 9; DEFAULT_COMPRESSION is 6",
    "compression_strategy": warned "the default strategy is used",
    "window_bits": warned "the deflate window is always 32 KiB (the output is valid gzip either way)",
    "chunk_size": warned "output is flushed per body chunk",
});

fields!(pub(super) static BROTLI = "envoy.extensions.compression.brotli.compressor.v3.Brotli" {
    "quality": applied "default 3",
    "encoder_mode": applied,
    "window_bits": applied "default 18",
    "input_block_bits": applied "default 24",
    "chunk_size": warned "output is flushed per body chunk",
    "disable_literal_context_modeling": applied,
});

fields!(pub(super) static ZSTD = "envoy.extensions.compression.zstd.compressor.v3.Zstd" {
    "compression_level": applied "default 3",
    "enable_checksum": applied,
    "strategy": warned "the level's own strategy is used",
    "dictionary": refused "zstd dictionaries are not supported",
    "chunk_size": warned "output is flushed per body chunk",
});

fn flag(
    ctx: &Ctx<'_>,
    field: &str,
    f: &Option<core_pb::RuntimeFeatureFlag>,
) -> Result<bool, ConvertError> {
    let Some(core_pb::RuntimeFeatureFlag {
        default_value,
        runtime_key,
    }) = f
    else {
        return Ok(true);
    };
    let _ = runtime_key;
    match default_value {
        Some(v) => Ok(v.value),
        None => Err(ctx.err(path(field, "default_value"), "default_value is required")),
    }
}

/// What a direction's common configuration sets.
struct Common {
    enabled: bool,
    min_content_length: u64,
    content_types: ContentTypes,
}

fn common(
    ctx: &Ctx<'_>,
    field: &str,
    c: &Option<comp_pb::compressor::CommonDirectionConfig>,
) -> Result<Common, ConvertError> {
    #[allow(deprecated)]
    let Some(comp_pb::compressor::CommonDirectionConfig {
        enabled,
        min_content_length,
        content_type,
        content_type_matcher,
    }) = c
    else {
        return Ok(Common {
            enabled: true,
            min_content_length: DEFAULT_MIN_CONTENT_LENGTH,
            content_types: content_types(&[]),
        });
    };
    let content_types = if content_type_matcher.is_empty() {
        content_types(content_type)
    } else {
        let mut out = Vec::with_capacity(content_type_matcher.len());
        for (i, sm) in content_type_matcher.iter().enumerate() {
            let f = format!("{field}.content_type_matcher[{i}]");
            out.push((string_matcher(ctx, &f, sm)?, sm.ignore_case));
        }
        ContentTypes::Matchers(out)
    };
    Ok(Common {
        enabled: flag(ctx, &path(field, "enabled"), enabled)?,
        min_content_length: min_content_length
            .as_ref()
            .map_or(DEFAULT_MIN_CONTENT_LENGTH, |v| u64::from(v.value)),
        content_types,
    })
}

fn content_types(listed: &[String]) -> ContentTypes {
    if listed.is_empty() {
        ContentTypes::List(
            DEFAULT_CONTENT_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    } else {
        ContentTypes::List(listed.iter().map(|s| s.trim().to_string()).collect())
    }
}

/// The `Compressor` filter configuration.
pub(super) fn compressor(
    ctx: &mut Ctx<'_>,
    field: &str,
    c: &comp_pb::Compressor,
) -> Result<m::compressor::Compressor, ConvertError> {
    let cov = &COMPRESSOR;
    #[allow(deprecated)]
    let comp_pb::Compressor {
        content_length,
        content_type,
        disable_on_etag_header,
        remove_accept_encoding_header,
        runtime_enabled,
        compressor_library,
        request_direction_config,
        response_direction_config,
        choose_first,
    } = c;
    ctx.refuse(cov, field, "choose_first", *choose_first)?;
    if let Some(comp_pb::compressor::RequestDirectionConfig { common_config }) =
        request_direction_config
    {
        let rf = path(field, "request_direction_config");
        let on = match common_config {
            Some(cc) => flag(ctx, &path(&rf, "common_config.enabled"), &cc.enabled)?,
            None => true,
        };
        ctx.refuse(cov, field, "request_direction_config", on)?;
    }
    let library_name;
    let library = {
        let lf = path(field, "compressor_library");
        let Some(core_pb::TypedExtensionConfig { name, typed_config }) = compressor_library else {
            return Err(ctx.err(lf, "a compressor library is required"));
        };
        library_name = name.clone();
        let tf = path(&lf, "typed_config");
        let Some(any) = typed_config else {
            return Err(ctx.err(tf, "a compressor library needs a typed_config"));
        };
        let typed = Typed::from_any(any).map_err(|e| ctx.err(&tf, e))?;
        library(ctx, &tf, typed)?
    };
    let mut out = m::compressor::Compressor {
        library_name,
        library,
        enabled: true,
        min_content_length: DEFAULT_MIN_CONTENT_LENGTH,
        content_types: content_types(&[]),
        disable_on_etag_header: false,
        weaken_etag_on_compress: false,
        remove_accept_encoding_header: false,
        uncompressible_response_codes: Vec::new(),
        response_stats: false,
    };
    match response_direction_config {
        Some(comp_pb::compressor::ResponseDirectionConfig {
            common_config,
            disable_on_etag_header,
            weaken_etag_on_compress,
            remove_accept_encoding_header,
            uncompressible_response_codes,
            status_header_enabled,
        }) => {
            let rf = path(field, "response_direction_config");
            ctx.refuse(
                &RESPONSE_DIRECTION,
                &rf,
                "status_header_enabled",
                *status_header_enabled,
            )?;
            let c = common(ctx, &path(&rf, "common_config"), common_config)?;
            out.enabled = c.enabled;
            out.min_content_length = c.min_content_length;
            out.content_types = c.content_types;
            out.disable_on_etag_header = *disable_on_etag_header;
            out.weaken_etag_on_compress = *weaken_etag_on_compress;
            out.remove_accept_encoding_header = *remove_accept_encoding_header;
            for (i, code) in uncompressible_response_codes.iter().enumerate() {
                let code = u16::try_from(*code)
                    .ok()
                    .filter(|c| (100..600).contains(c))
                    .ok_or_else(|| {
                        ctx.err(
                            format!("{rf}.uncompressible_response_codes[{i}]"),
                            format!("{code} is not an HTTP status"),
                        )
                    })?;
                out.uncompressible_response_codes.push(code);
            }
            out.response_stats = true;
        }
        // The deprecated top-level fields, as Envoy reads them without a
        // response direction.
        None => {
            out.enabled = flag(ctx, &path(field, "runtime_enabled"), runtime_enabled)?;
            out.min_content_length = content_length
                .as_ref()
                .map_or(DEFAULT_MIN_CONTENT_LENGTH, |v| u64::from(v.value));
            out.content_types = content_types(content_type);
            out.disable_on_etag_header = *disable_on_etag_header;
            out.remove_accept_encoding_header = *remove_accept_encoding_header;
        }
    }
    Ok(out)
}

fn library(ctx: &mut Ctx<'_>, field: &str, typed: Typed) -> Result<Library, ConvertError> {
    let range = |ctx: &Ctx<'_>, name: &str, v: u32, lo: u32, hi: u32| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(ctx.err(path(field, name), format!("{v} is outside {lo}..={hi}")))
        }
    };
    match typed.type_name() {
        GZIP_TYPE => {
            let g: gzip_pb::Gzip = typed.decode().map_err(|e| ctx.err(field, e))?;
            let gzip_pb::Gzip {
                memory_level,
                compression_level,
                compression_strategy,
                window_bits,
                chunk_size,
            } = &g;
            ctx.knob(&GZIP, field, "memory_level", memory_level.is_some());
            ctx.knob(&GZIP, field, "window_bits", window_bits.is_some());
            ctx.knob(&GZIP, field, "chunk_size", chunk_size.is_some());
            ctx.knob(
                &GZIP,
                field,
                "compression_strategy",
                *compression_strategy != 0,
            );
            let level = match *compression_level {
                0 => 6,
                l => range(ctx, "compression_level", l as u32, 1, 9)?,
            };
            Ok(Library::Gzip { level })
        }
        BROTLI_TYPE => {
            let b: brotli_pb::Brotli = typed.decode().map_err(|e| ctx.err(field, e))?;
            let brotli_pb::Brotli {
                quality,
                encoder_mode,
                window_bits,
                input_block_bits,
                chunk_size,
                disable_literal_context_modeling,
            } = &b;
            ctx.knob(&BROTLI, field, "chunk_size", chunk_size.is_some());
            let quality = range(
                ctx,
                "quality",
                quality.as_ref().map_or(3, |v| v.value),
                0,
                11,
            )?;
            let window_bits = range(
                ctx,
                "window_bits",
                window_bits.as_ref().map_or(18, |v| v.value),
                10,
                24,
            )?;
            let input_block_bits = range(
                ctx,
                "input_block_bits",
                input_block_bits.as_ref().map_or(24, |v| v.value),
                16,
                24,
            )?;
            // DEFAULT and GENERIC are brotli's generic mode; TEXT, FONT.
            let mode = match *encoder_mode {
                2 => 1,
                3 => 2,
                _ => 0,
            };
            Ok(Library::Brotli {
                quality,
                window_bits,
                input_block_bits,
                mode,
                disable_literal_context_modeling: *disable_literal_context_modeling,
            })
        }
        ZSTD_TYPE => {
            let z: zstd_pb::Zstd = typed.decode().map_err(|e| ctx.err(field, e))?;
            let zstd_pb::Zstd {
                compression_level,
                enable_checksum,
                strategy,
                dictionary,
                chunk_size,
            } = &z;
            ctx.refuse(&ZSTD, field, "dictionary", dictionary.is_some())?;
            ctx.knob(&ZSTD, field, "strategy", *strategy != 0);
            ctx.knob(&ZSTD, field, "chunk_size", chunk_size.is_some());
            let level = range(
                ctx,
                "compression_level",
                compression_level.as_ref().map_or(3, |v| v.value),
                1,
                22,
            )?;
            Ok(Library::Zstd {
                level: level as i32,
                checksum: *enable_checksum,
            })
        }
        t => Err(ctx.err(
            field,
            format!("unsupported compressor library {t} (gzip, brotli and zstd are)"),
        )),
    }
}

/// `CompressorPerRoute`: whether the route turns the filter off.
pub(super) fn per_route(ctx: &Ctx<'_>, field: &str, typed: Typed) -> Result<bool, ConvertError> {
    let p: comp_pb::CompressorPerRoute = typed.decode().map_err(|e| ctx.err(field, e))?;
    let comp_pb::CompressorPerRoute { r#override } = &p;
    use comp_pb::compressor_per_route::Override;
    match r#override {
        Some(Override::Disabled(d)) => Ok(*d),
        Some(Override::Overrides(_)) => Err(ctx.refused(&COMPRESSOR_PER_ROUTE, field, "overrides")),
        None => Ok(false),
    }
}
