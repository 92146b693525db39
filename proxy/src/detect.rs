//! Protocol detection on the first bytes a client sends, as Envoy's
//! `tls_inspector` and `http_inspector` listener filters do: TLS ClientHello
//! (with SNI and ALPN), an HTTP/1.x request line, or the HTTP/2 preface.
//! Works on a bounded peek; never consumes bytes.

/// Longest prefix ever needed: a ClientHello record can be up to 16 KiB.
pub const MAX_PEEK: usize = 16 * 1024 + 5;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Detected {
    pub tls: bool,
    pub server_name: Option<String>,
    /// ALPN offered in the ClientHello, or the HTTP inspector's
    /// `http/1.0` / `http/1.1` / `h2c`.
    pub application_protocols: Vec<String>,
    /// The ClientHello offers TLS 1.3 (`supported_versions`).
    pub offers_tls13: bool,
}

impl Detected {
    /// What a connection to `dst` from `peer` shows the filter chain match:
    /// the detected server name and protocols, and the transport protocol
    /// when the listener's TLS inspector runs for it.
    pub fn connection_info(
        &self,
        listener: &ferry_model::Listener,
        dst: std::net::SocketAddr,
        peer: std::net::SocketAddr,
    ) -> ferry_model::ConnectionInfo {
        ferry_model::ConnectionInfo {
            destination: Some(dst),
            source: Some(peer),
            server_name: self.server_name.clone(),
            transport_protocol: listener
                .listener_filters
                .tls_inspector_for(Some(dst))
                .then_some(if self.tls { "tls" } else { "raw_buffer" }),
            application_protocols: self.application_protocols.clone(),
        }
    }

    pub fn http2(&self) -> bool {
        self.application_protocols
            .iter()
            .any(|p| p == "h2c" || p == "h2")
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// More bytes could change the answer.
    NeedMore,
    Done(Detected),
}

/// Inspects `buf` (what has arrived so far).
pub fn inspect(buf: &[u8], tls_inspector: bool, http_inspector: bool) -> Outcome {
    if buf.is_empty() {
        return Outcome::NeedMore;
    }
    if tls_inspector && buf[0] == 0x16 {
        return match client_hello(buf) {
            Hello::NeedMore => Outcome::NeedMore,
            Hello::Parsed(d) => Outcome::Done(d),
            Hello::NotTls => Outcome::Done(Detected::default()),
        };
    }
    if http_inspector {
        return http(buf);
    }
    Outcome::Done(Detected::default())
}

/// Whether `buf` starts the HTTP/2 client preface: `None` while it could
/// still go either way.
pub fn h2_preface(buf: &[u8]) -> Option<bool> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] != H2_PREFACE[..n] {
        Some(false)
    } else if n == H2_PREFACE.len() {
        Some(true)
    } else {
        None
    }
}

fn http(buf: &[u8]) -> Outcome {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Outcome::Done(Detected {
                application_protocols: vec!["h2c".into()],
                ..Default::default()
            })
        } else {
            Outcome::NeedMore
        };
    }
    // METHOD SP request-target SP HTTP/1.x CRLF
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(i) => &buf[..i],
        None if buf.len() >= 8 * 1024 => return Outcome::Done(Detected::default()),
        None => buf,
    };
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    if method.is_empty()
        || !method
            .iter()
            .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_')
    {
        return Outcome::Done(Detected::default());
    }
    if line_end.is_none() {
        return Outcome::NeedMore;
    }
    let _target = parts.next();
    let version = parts.next().unwrap_or_default();
    let version = version.strip_suffix(b"\r").unwrap_or(version);
    let proto = match version {
        b"HTTP/1.1" => "http/1.1",
        b"HTTP/1.0" => "http/1.0",
        _ => return Outcome::Done(Detected::default()),
    };
    Outcome::Done(Detected {
        application_protocols: vec![proto.into()],
        ..Default::default()
    })
}

enum Hello {
    NeedMore,
    NotTls,
    Parsed(Detected),
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let v = *self.b.get(self.pos)?;
        self.pos += 1;
        Some(v)
    }
    fn u16(&mut self) -> Option<usize> {
        Some(usize::from(self.u8()?) << 8 | usize::from(self.u8()?))
    }
    fn u24(&mut self) -> Option<usize> {
        Some(usize::from(self.u8()?) << 16 | self.u16()?)
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
}

/// The ClientHello at the start of `buf`, its message reassembled from
/// as many handshake records as it spans (within [`MAX_PEEK`]).
fn client_hello(buf: &[u8]) -> Hello {
    if buf.len() < 5 {
        return Hello::NeedMore;
    }
    if buf[1] != 3 {
        return Hello::NotTls;
    }
    let mut message: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            // The next record's header has not arrived yet.
            return if pos + 5 > MAX_PEEK {
                hello_parsed(&message)
            } else {
                Hello::NeedMore
            };
        };
        if header[0] != 0x16 {
            // Not a handshake record: the hello ends unfinished.
            return hello_parsed(&message);
        }
        let len = usize::from(header[3]) << 8 | usize::from(header[4]);
        // A record longer than the peek is parsed as far as it goes.
        let end = (pos + 5 + len).min(MAX_PEEK);
        if buf.len() < end {
            return Hello::NeedMore;
        }
        message.extend_from_slice(&buf[pos + 5..end]);
        pos = end;
        let whole = message
            .get(1..4)
            .map(|l| 4 + (usize::from(l[0]) << 16 | usize::from(l[1]) << 8 | usize::from(l[2])));
        if whole.is_some_and(|n| message.len() >= n) || end == MAX_PEEK || len == 0 {
            return hello_parsed(&message);
        }
    }
}

fn hello_parsed(message: &[u8]) -> Hello {
    match parse_hello(message) {
        Some(d) => Hello::Parsed(d),
        // A hello cut short is still TLS; SNI/ALPN unknown.
        None => Hello::Parsed(Detected {
            tls: true,
            ..Default::default()
        }),
    }
}

fn parse_hello(rec: &[u8]) -> Option<Detected> {
    let mut r = Reader { b: rec, pos: 0 };
    if r.u8()? != 1 {
        return None;
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    let mut r = Reader { b: body, pos: 0 };
    r.take(2 + 32)?; // version, random
    let sid = usize::from(r.u8()?);
    r.take(sid)?;
    let cs = r.u16()?;
    r.take(cs)?;
    let cm = usize::from(r.u8()?);
    r.take(cm)?;
    let mut d = Detected {
        tls: true,
        ..Default::default()
    };
    if r.pos == body.len() {
        return Some(d);
    }
    let ext_len = r.u16()?;
    let exts = r.take(ext_len)?;
    let mut r = Reader { b: exts, pos: 0 };
    while r.pos < exts.len() {
        let ty = r.u16()?;
        let len = r.u16()?;
        let data = r.take(len)?;
        let mut e = Reader { b: data, pos: 0 };
        match ty {
            0 => {
                let list = e.u16()?;
                let list = e.take(list)?;
                let mut l = Reader { b: list, pos: 0 };
                while l.pos < list.len() {
                    let kind = l.u8()?;
                    let n = l.u16()?;
                    let name = l.take(n)?;
                    if kind == 0 {
                        d.server_name = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let list = e.u16()?;
                let list = e.take(list)?;
                let mut l = Reader { b: list, pos: 0 };
                while l.pos < list.len() {
                    let n = usize::from(l.u8()?);
                    let p = l.take(n)?;
                    d.application_protocols
                        .push(String::from_utf8_lossy(p).into_owned());
                }
            }
            // supported_versions: whether TLS 1.3 (0x0304) is among them. Read
            // leniently: a malformed list only hides TLS 1.3 (rustls refuses
            // such a hello anyway), never the name or protocols.
            43 => {
                d.offers_tls13 = data.split_first().is_some_and(|(&n, rest)| {
                    rest.get(..usize::from(n))
                        .unwrap_or(rest)
                        .chunks_exact(2)
                        .any(|v| v == [3, 4])
                });
            }
            _ => {}
        }
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with SNI `api.example.com`, ALPN h2, http/1.1,
    /// and TLS 1.3 and 1.2 in `supported_versions`.
    fn hello() -> Vec<u8> {
        let mut exts = Vec::new();
        let name = b"api.example.com";
        let mut sni = vec![0u8];
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name);
        let mut sni_ext = (sni.len() as u16).to_be_bytes().to_vec();
        sni_ext.extend(&sni);
        exts.extend(0u16.to_be_bytes());
        exts.extend((sni_ext.len() as u16).to_be_bytes());
        exts.extend(&sni_ext);
        let mut alpn = Vec::new();
        for p in [&b"h2"[..], b"http/1.1"] {
            alpn.push(p.len() as u8);
            alpn.extend(p);
        }
        let mut alpn_ext = (alpn.len() as u16).to_be_bytes().to_vec();
        alpn_ext.extend(&alpn);
        exts.extend(16u16.to_be_bytes());
        exts.extend((alpn_ext.len() as u16).to_be_bytes());
        exts.extend(&alpn_ext);
        // supported_versions: TLS 1.3, TLS 1.2.
        exts.extend(43u16.to_be_bytes());
        exts.extend(5u16.to_be_bytes());
        exts.extend([4, 3, 4, 3, 3]);

        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend(2u16.to_be_bytes());
        body.extend([0x13, 0x01]);
        body.extend([1, 0]); // compression
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(&exts);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(&hs);
        rec
    }

    #[test]
    fn h2_preface_decides_on_the_first_differing_byte() {
        assert_eq!(h2_preface(b"G"), Some(false));
        assert_eq!(h2_preface(b"PRI * HTTP/1.1"), Some(false));
        assert_eq!(h2_preface(b"PRI * HT"), None);
        assert_eq!(h2_preface(H2_PREFACE), Some(true));
    }

    #[test]
    fn tls_client_hello() {
        let h = hello();
        let Outcome::Done(d) = inspect(&h, true, true) else {
            panic!("expected a result")
        };
        assert!(d.tls);
        assert_eq!(d.server_name.as_deref(), Some("api.example.com"));
        assert_eq!(d.application_protocols, vec!["h2", "http/1.1"]);
        assert!(d.offers_tls13);
        assert_eq!(inspect(&h[..20], true, true), Outcome::NeedMore);
        assert_eq!(inspect(&h[..3], true, true), Outcome::NeedMore);
    }

    /// A ClientHello split over several handshake records is read whole.
    #[test]
    fn a_client_hello_over_several_records() {
        let h = hello();
        let message = &h[5..];
        let mut split = Vec::new();
        for part in message.chunks(7) {
            split.extend([0x16, 3, 1]);
            split.extend((part.len() as u16).to_be_bytes());
            split.extend(part);
        }
        for cut in [3, 5, 20, split.len() - 1] {
            assert_eq!(
                inspect(&split[..cut], true, false),
                Outcome::NeedMore,
                "{cut}"
            );
        }
        let Outcome::Done(d) = inspect(&split, true, false) else {
            panic!("expected a result")
        };
        assert_eq!(d.server_name.as_deref(), Some("api.example.com"));
        assert_eq!(d.application_protocols, vec!["h2", "http/1.1"]);
        // Another record type before the end: TLS, names unknown.
        let mut cut = split[..12].to_vec();
        cut.extend([0x17, 3, 3, 0, 1, 0]);
        assert_eq!(
            inspect(&cut, true, false),
            Outcome::Done(Detected {
                tls: true,
                ..Default::default()
            })
        );
    }

    #[test]
    fn http1_and_h2c() {
        let done = |b: &[u8]| match inspect(b, true, true) {
            Outcome::Done(d) => d.application_protocols,
            Outcome::NeedMore => vec!["more".into()],
        };
        assert_eq!(done(b"GET / HTTP/1.1\r\nHost: x\r\n"), vec!["http/1.1"]);
        assert_eq!(done(b"POST /upload HTTP/1.0\r\n"), vec!["http/1.0"]);
        assert_eq!(done(b"GET /long/path"), vec!["more"]);
        assert_eq!(done(H2_PREFACE), vec!["h2c"]);
        assert_eq!(done(&H2_PREFACE[..10]), vec!["more"]);
        assert!(done(b"\x00\x01binary").is_empty());
        assert!(done(b"SSH-2.0-OpenSSH\r\n").is_empty());
        assert!(done(b"GET / FOO/1.1\r\n").is_empty());
        // Without inspectors nothing is awaited.
        assert_eq!(
            inspect(b"G", false, false),
            Outcome::Done(Detected::default())
        );
    }
}
