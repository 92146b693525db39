//! `envoy.filters.http.compressor`: the decisions (which encoding a client
//! accepts among the chain's compressors, whether a response may be
//! compressed) and the streaming encoders (gzip, brotli, zstd), each chunk
//! flushed as it passes so nothing waits for the whole body.

use std::io::Write;

use ferry_model::compressor::{Compressor, Library};
use http::{HeaderMap, HeaderValue, header};

/// How the `accept-encoding` decision came out, for Envoy's
/// `header_*` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStat {
    /// An encoding of a compressor in the chain was the client's choice.
    ValidCompressor,
    /// `identity` won.
    Identity,
    /// `*` won: the first registered compressor is used.
    Wildcard,
    /// No acceptable encoding (empty, all `q=0`, nothing in common).
    NotValid,
}

/// The encoding chosen for one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `identity` when nothing is compressed.
    pub encoding: String,
    pub stat: HeaderStat,
}

/// The media type of a `content-type` value (parameters cut, trimmed).
pub fn media_type(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or("").trim())
}

/// Chooses the response's encoding as Envoy does: every compressor of the
/// chain whose content types admit the response competes (the first of
/// each encoding), the client's q-values rank them, `q=0` excludes one,
/// `*` takes the first registered and `identity` is always possible.
pub fn choose_encoding(accept: &str, chain: &[&Compressor], headers: &HeaderMap) -> Decision {
    let media = media_type(headers).filter(|m| !m.is_empty());
    let mut allowed: Vec<&'static str> = Vec::new();
    for c in chain {
        if let Some(m) = media
            && !c.content_types.allows(m)
        {
            continue;
        }
        let enc = c.library.encoding();
        if !allowed.contains(&enc) {
            allowed.push(enc);
        }
    }
    let mut pairs: Vec<(&str, f32)> = Vec::new();
    for token in accept.split(',').filter(|t| !t.trim().is_empty()) {
        let (name, params) = match token.split_once(';') {
            Some((n, p)) => (n.trim(), Some(p)),
            None => (token.trim(), None),
        };
        let mut q = 1.0f32;
        if let Some(p) = params
            && let Some((k, v)) = p.split_once('=')
            && k.trim().eq_ignore_ascii_case("q")
        {
            match v.trim().parse::<f32>() {
                Ok(v) => q = v,
                // An unparsable q-value drops the token.
                Err(_) => continue,
            }
        }
        pairs.push((name, q));
        if q == 0.0 {
            allowed.retain(|e| !e.eq_ignore_ascii_case(name));
        }
    }
    let not_valid = || Decision {
        encoding: "identity".into(),
        stat: HeaderStat::NotValid,
    };
    if pairs.is_empty() || allowed.is_empty() {
        return not_valid();
    }
    let mut choice: (&str, f32) = ("identity", 0.0);
    for &(name, q) in &pairs {
        if q > choice.1
            && (allowed.iter().any(|e| e.eq_ignore_ascii_case(name))
                || name == "identity"
                || name == "*")
        {
            choice = (name, q);
        }
    }
    match choice {
        (_, 0.0) => not_valid(),
        ("identity", _) => Decision {
            encoding: "identity".into(),
            stat: HeaderStat::Identity,
        },
        ("*", _) => Decision {
            encoding: allowed[0].into(),
            stat: HeaderStat::Wildcard,
        },
        (name, _) => Decision {
            encoding: name.to_ascii_lowercase(),
            stat: HeaderStat::ValidCompressor,
        },
    }
}

/// Why a response is not compressed by one filter (before the client's
/// choice is consulted), for Envoy's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    Disabled,
    ContentLengthTooSmall,
    Upgrade,
    ContentType,
    NoTransform,
    Etag,
    AlreadyEncoded,
    StatusCode,
}

/// Whether a response may be compressed by `c` at all (Envoy's
/// `isCompressible`): `Err` with the first reason it may not.
pub fn compressible(c: &Compressor, status: u16, headers: &HeaderMap) -> Result<(), Skip> {
    if !c.enabled {
        return Err(Skip::Disabled);
    }
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let ok = len
            .to_str()
            .ok()
            .and_then(|l| l.trim().parse::<u64>().ok())
            .is_some_and(|l| l >= c.min_content_length);
        if !ok {
            return Err(Skip::ContentLengthTooSmall);
        }
    }
    if c.uncompressible_response_codes.contains(&status) {
        return Err(Skip::StatusCode);
    }
    if headers.contains_key(header::UPGRADE) || status == 101 {
        return Err(Skip::Upgrade);
    }
    if let Some(m) = media_type(headers)
        && headers.contains_key(header::CONTENT_TYPE)
        && !c.content_types.allows(m)
    {
        return Err(Skip::ContentType);
    }
    if has_token(headers, header::CACHE_CONTROL, "no-transform") {
        return Err(Skip::NoTransform);
    }
    if c.disable_on_etag_header && !c.weaken_etag_on_compress && headers.contains_key(header::ETAG)
    {
        return Err(Skip::Etag);
    }
    if headers.contains_key(header::CONTENT_ENCODING) {
        return Err(Skip::AlreadyEncoded);
    }
    Ok(())
}

/// Whether `transfer-encoding` already compresses (then no filter does).
pub fn transfer_encoding_allows(headers: &HeaderMap) -> bool {
    !headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| {
            ["gzip", "br", "deflate", "compress", "zstd"]
                .iter()
                .any(|e| t.eq_ignore_ascii_case(e))
        })
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `vary: accept-encoding` added, or appended to a `vary` that lacks it.
pub fn insert_vary(headers: &mut HeaderMap) {
    let current = headers
        .get(header::VARY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match current {
        None => {
            headers.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        }
        Some(v)
            if v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding")) => {}
        Some(v) => {
            if let Ok(joined) = HeaderValue::from_str(&format!("{v}, Accept-Encoding")) {
                headers.insert(header::VARY, joined);
            }
        }
    }
}

/// What compressing does to the response's headers: a strong ETag is
/// removed (weakened with `weaken_etag_on_compress`), `content-length`
/// goes, `content-encoding` names the library.
pub fn compress_headers(c: &Compressor, headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(header::ETAG).cloned() {
        let v = etag.as_bytes();
        let weak = v.len() >= 2 && (v[0] == b'W' || v[0] == b'w') && v[1] == b'/';
        if !weak {
            if c.weaken_etag_on_compress {
                let mut w = b"W/".to_vec();
                w.extend_from_slice(v);
                if let Ok(w) = HeaderValue::from_bytes(&w) {
                    headers.insert(header::ETAG, w);
                }
            } else {
                headers.remove(header::ETAG);
            }
        }
    }
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(c.library.encoding()),
    );
}

/// A streaming encoder: each chunk is compressed and flushed, so what the
/// upstream sent is on its way at once; `finish` ends the stream.
pub enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    /// Finished (or failed): no more output.
    Done,
}

impl Encoder {
    pub fn new(library: &Library) -> std::io::Result<Encoder> {
        Ok(match *library {
            Library::Gzip { level } => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level),
            )),
            Library::Brotli {
                quality,
                window_bits,
                input_block_bits,
                mode,
                disable_literal_context_modeling,
            } => {
                use brotli::enc::backward_references::BrotliEncoderMode as M;
                let params = brotli::enc::BrotliEncoderParams {
                    quality: quality as i32,
                    lgwin: window_bits as i32,
                    lgblock: input_block_bits as i32,
                    mode: match mode {
                        1 => M::BROTLI_MODE_TEXT,
                        2 => M::BROTLI_MODE_FONT,
                        _ => M::BROTLI_MODE_GENERIC,
                    },
                    disable_literal_context_modeling: i32::from(disable_literal_context_modeling),
                    ..Default::default()
                };
                Encoder::Brotli(Box::new(brotli::CompressorWriter::with_params(
                    Vec::new(),
                    4096,
                    &params,
                )))
            }
            Library::Zstd { level, checksum } => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), level)?;
                e.include_checksum(checksum)?;
                Encoder::Zstd(e)
            }
        })
    }

    /// Compresses `data` and flushes: the bytes to send now.
    pub fn chunk(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Brotli(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Zstd(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Done => Ok(Vec::new()),
        }
    }

    /// Ends the stream: its last bytes.
    pub fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match std::mem::replace(self, Encoder::Done) {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Brotli(e) => Ok(e.into_inner()),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Done => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::compressor::{ContentTypes, DEFAULT_CONTENT_TYPES};
    use std::io::Read;

    fn comp(library: Library) -> Compressor {
        Compressor {
            library_name: "t".into(),
            library,
            enabled: true,
            min_content_length: 30,
            content_types: ContentTypes::List(
                DEFAULT_CONTENT_TYPES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            disable_on_etag_header: false,
            weaken_etag_on_compress: false,
            remove_accept_encoding_header: false,
            uncompressible_response_codes: Vec::new(),
            response_stats: true,
        }
    }

    const GZ: Library = Library::Gzip { level: 6 };
    const BR: Library = Library::Brotli {
        quality: 3,
        window_bits: 18,
        input_block_bits: 24,
        mode: 0,
        disable_literal_context_modeling: false,
    };
    const ZS: Library = Library::Zstd {
        level: 3,
        checksum: false,
    };

    fn choose(accept: &str) -> (String, HeaderStat) {
        let (b, z, g) = (comp(BR), comp(ZS), comp(GZ));
        let d = choose_encoding(accept, &[&b, &z, &g], &HeaderMap::new());
        (d.encoding, d.stat)
    }

    #[test]
    fn q_values_rank_the_chains_encodings() {
        use HeaderStat::*;
        assert_eq!(choose("gzip"), ("gzip".into(), ValidCompressor));
        assert_eq!(
            choose("gzip;q=0.5, br;q=0.8"),
            ("br".into(), ValidCompressor)
        );
        assert_eq!(choose("gzip, br"), ("gzip".into(), ValidCompressor));
        assert_eq!(choose("deflate"), ("identity".into(), NotValid));
        assert_eq!(choose("identity"), ("identity".into(), Identity));
        assert_eq!(choose("*"), ("br".into(), Wildcard));
        assert_eq!(choose("br;q=0, *"), ("zstd".into(), Wildcard));
        assert_eq!(choose("gzip;q=0"), ("identity".into(), NotValid));
        assert_eq!(choose(""), ("identity".into(), NotValid));
        assert_eq!(choose("gzip;q=x, zstd"), ("zstd".into(), ValidCompressor));
    }

    #[test]
    fn streamed_chunks_decompress_to_the_input() {
        let input: Vec<u8> = (0..20_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for lib in [GZ, BR, ZS] {
            let mut e = Encoder::new(&lib).expect("encoder");
            let mut out = Vec::new();
            for part in input.chunks(7000) {
                let chunk = e.chunk(part).expect("chunk");
                // Each chunk is flushed: something comes out at once.
                assert!(!chunk.is_empty(), "{lib:?}");
                out.extend(chunk);
            }
            out.extend(e.finish().expect("finish"));
            let mut back = Vec::new();
            match lib {
                Library::Gzip { .. } => {
                    flate2::read::GzDecoder::new(&out[..])
                        .read_to_end(&mut back)
                        .expect("gunzip");
                }
                Library::Brotli { .. } => {
                    brotli::Decompressor::new(&out[..], 4096)
                        .read_to_end(&mut back)
                        .expect("unbrotli");
                }
                Library::Zstd { .. } => {
                    back = zstd::stream::decode_all(&out[..]).expect("unzstd");
                }
            }
            assert_eq!(back, input, "{lib:?}");
        }
    }

    #[test]
    fn etag_and_length_rules() {
        let c = comp(GZ);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        assert_eq!(compressible(&c, 200, &h), Err(Skip::ContentLengthTooSmall));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        assert_eq!(compressible(&c, 200, &h), Err(Skip::ContentType));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        assert_eq!(compressible(&c, 200, &h), Ok(()));
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        compress_headers(&c, &mut h);
        assert!(h.get(header::ETAG).is_none(), "a strong ETag is removed");
        assert!(h.get(header::CONTENT_LENGTH).is_none());
        assert_eq!(h[header::CONTENT_ENCODING], "gzip");
        let mut v = HeaderMap::new();
        v.insert(header::VARY, HeaderValue::from_static("Origin"));
        insert_vary(&mut v);
        insert_vary(&mut v);
        assert_eq!(v[header::VARY], "Origin, Accept-Encoding");
    }
}
