//! `envoy.filters.http.compressor`: which responses are compressed, with
//! which library and settings, as the converter read them.

use crate::route::StringMatcher;

/// One compressor filter of a connection manager (response direction).
#[derive(Debug, Clone)]
pub struct Compressor {
    /// `compressor_library.name`: a step of the statistics' names.
    pub library_name: String,
    pub library: Library,
    /// Whether response compression is on (`enabled`/`runtime_enabled`
    /// default value).
    pub enabled: bool,
    /// Responses with a smaller `content-length` are sent as they are.
    pub min_content_length: u64,
    pub content_types: ContentTypes,
    pub disable_on_etag_header: bool,
    /// Keep a strong ETag as a weak one when compressing (else it is
    /// removed).
    pub weaken_etag_on_compress: bool,
    pub remove_accept_encoding_header: bool,
    /// Statuses never compressed (`uncompressible_response_codes`).
    pub uncompressible_response_codes: Vec<u16>,
    /// Statistics under `.response.` (when `response_direction_config` is
    /// set, as Envoy roots them).
    pub response_stats: bool,
}

/// Which `content-type`s may be compressed.
#[derive(Debug, Clone)]
pub enum ContentTypes {
    /// Media types compared without case (Envoy's default list when the
    /// configuration names none).
    List(Vec<String>),
    /// `content_type_matcher`: matchers with their `ignore_case`.
    Matchers(Vec<(StringMatcher, bool)>),
}

impl ContentTypes {
    /// Whether a response's media type (parameters cut) may be compressed.
    pub fn allows(&self, media_type: &str) -> bool {
        match self {
            ContentTypes::List(l) => l.iter().any(|t| t.eq_ignore_ascii_case(media_type)),
            ContentTypes::Matchers(m) => m.iter().any(|(m, ic)| m.matches(media_type, *ic)),
        }
    }
}

/// Envoy's default content types (and their synonyms), used when neither
/// `content_type` nor `content_type_matcher` names any.
pub const DEFAULT_CONTENT_TYPES: &[&str] = &[
    "application/javascript",
    "application/json",
    "application/xhtml+xml",
    "image/svg+xml",
    "text/css",
    "text/html",
    "text/plain",
    "text/xml",
    "application/x-javascript",
    "text/javascript",
    "text/x-javascript",
    "text/ecmascript",
    "text/js",
    "text/jscript",
    "text/x-js",
    "application/ecmascript",
    "application/x-json",
    "application/xml",
];

/// Envoy's default `min_content_length`.
pub const DEFAULT_MIN_CONTENT_LENGTH: u64 = 30;

/// A compression library and the settings Ferry applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// `envoy.compression.gzip.compressor`: zlib level 1 to 9.
    Gzip { level: u32 },
    /// `envoy.compression.brotli.compressor`.
    Brotli {
        quality: u32,
        window_bits: u32,
        input_block_bits: u32,
        /// 0 generic, 1 text, 2 font (brotli's modes).
        mode: u32,
        disable_literal_context_modeling: bool,
    },
    /// `envoy.compression.zstd.compressor`.
    Zstd { level: i32, checksum: bool },
}

impl Library {
    /// The `content-encoding` it produces.
    pub fn encoding(&self) -> &'static str {
        match self {
            Library::Gzip { .. } => "gzip",
            Library::Brotli { .. } => "br",
            Library::Zstd { .. } => "zstd",
        }
    }

    /// The library's own step in the statistics' names.
    pub fn stats_prefix(&self) -> &'static str {
        match self {
            Library::Gzip { .. } => "gzip",
            Library::Brotli { .. } => "brotli",
            Library::Zstd { .. } => "zstd",
        }
    }
}
