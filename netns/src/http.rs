//! A minimal blocking HTTP/1.1 client for probes and demos: one `GET` per connection
//! (`Connection: close`), the answer read to its end, a chunked body decoded. It lets a program
//! ask a pod's admin port or a gateway for a page without curl, over a socket that
//! [`Pod::connect`](crate::Pod::connect) opened inside the pod.

use std::io::{Read, Write};
use std::time::Duration;

use crate::{Error, IoContext, Result};

/// An answer: status, headers (names in lower case) and body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `GET path` with `Host: host` and `headers` over `stream` and reads the answer, waiting
/// at most `timeout` for each read.
pub fn get<S: Read + Write>(
    mut stream: S,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response> {
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .io_context(|| format!("sending GET {path} to {host}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .io_context(|| format!("reading the answer to GET {path} from {host}"))?;
    parse(&raw).map_err(|e| Error::Failed(format!("GET {path} from {host}: {e}")))
}

/// The read timeout [`get`]'s callers set on their sockets.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

fn parse(raw: &[u8]) -> std::result::Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete answer ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut body: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line without its end")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or("a chunk cut short")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).ok_or("a chunk without its CRLF")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_answers() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello";
        let r = parse(plain).expect("plain");
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        assert_eq!(r.header("x-a"), Some("b"));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = parse(chunked).expect("chunked");
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }
}
