//! The HTTP connection manager's path normalization, as Envoy 1.40 does it
//! before routing and before any HTTP filter sees a request: the escaped
//! slashes action (`path_with_escaped_slashes_action`), then RFC 3986
//! normalization (`normalize_path`), then `merge_slashes`. Route matching,
//! RBAC and every other filter see the result, and so does the backend.
//!
//! `normalize_path` is the path canonicalization of Chromium's URL library
//! (googleurl), which Envoy calls: `.` and `..` segments are removed (`..`
//! never climbs above the root), `%2E`/`%2e` count as dots, a backslash is a
//! slash, percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//! decoded, characters a path may not carry raw (`"`, `<`, `>`, `^`, `` ` ``,
//! `{`, `|`, `}`, controls, space, non-ASCII) are percent-encoded, other
//! escapes keep their original spelling, a `%` that starts no escape stays
//! (escaped as `%25` only where decoding would otherwise make a new escape
//! of it), and an escaped or raw NUL makes the request invalid (400). Only
//! the part before the first `?` is touched: the query string never changes.
//!
//! Every function here is pure and total: any input gives an answer, never
//! a panic; the proxy applies the [`Verdict`].

use std::borrow::Cow;

use ferry_model::listener::{EscapedSlashesAction, PathNormalization};

/// What the connection manager does with a request once its path is
/// normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Route and forward the request with this path (borrowed: unchanged).
    Forward(Cow<'a, str>),
    /// Answer 400 (Envoy's `downstream_rq_failed_path_normalization`).
    Reject(Rejected),
    /// Answer 307 with this path as `Location` (Envoy's
    /// `downstream_rq_redirected_with_normalized_path`). A gRPC client
    /// cannot follow it: the proxy answers gRPC requests 400 instead.
    Redirect(String),
}

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// `%2F` or `%5C` under `REJECT_REQUEST`.
    EscapedSlash,
    /// RFC 3986 normalization failed (a NUL, raw or escaped).
    Invalid,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rejected::EscapedSlash => "escaped slash in path",
            Rejected::Invalid => "path cannot be normalized",
        })
    }
}

/// Applies the connection manager's settings to a request's path and
/// query (`:path`), in Envoy's order: escaped slashes, then
/// `normalize_path`, then `merge_slashes`. Paths that do not start with
/// `/` (`*` of `OPTIONS *`) are left alone: they are not paths to route.
pub fn normalize<'a>(cfg: &PathNormalization, path_and_query: &'a str) -> Verdict<'a> {
    if !path_and_query.starts_with('/') {
        return Verdict::Forward(Cow::Borrowed(path_and_query));
    }
    let mut path = Cow::Borrowed(path_and_query);
    let mut redirect = false;
    if cfg.escaped_slashes != EscapedSlashesAction::KeepUnchanged
        && let Some(unescaped) = unescape_slashes(&path)
    {
        match cfg.escaped_slashes {
            EscapedSlashesAction::RejectRequest => {
                return Verdict::Reject(Rejected::EscapedSlash);
            }
            EscapedSlashesAction::UnescapeAndRedirect => redirect = true,
            EscapedSlashesAction::UnescapeAndForward | EscapedSlashesAction::KeepUnchanged => {}
        }
        path = Cow::Owned(unescaped);
    }
    if cfg.normalize_path {
        match rfc3986_normalize(&path) {
            Some(Cow::Borrowed(_)) => {}
            Some(Cow::Owned(p)) => path = Cow::Owned(p),
            None => return Verdict::Reject(Rejected::Invalid),
        }
    }
    // After normalization, as Envoy: an escape may have hidden a slash.
    if cfg.merge_slashes
        && let Some(merged) = merge_slashes(&path)
    {
        path = Cow::Owned(merged);
    }
    if redirect {
        Verdict::Redirect(path.into_owned())
    } else {
        Verdict::Forward(path)
    }
}

/// Splits `:path` at its first `?`: the path, and the query with its `?`.
fn split_query(path_and_query: &str) -> (&str, &str) {
    match path_and_query.find('?') {
        Some(i) => path_and_query.split_at(i),
        None => (path_and_query, ""),
    }
}

/// Decodes `%2F`, `%2f`, `%5C` and `%5c` in the path (not the query), one
/// spelling after the other as Envoy does; `None` when there is none.
pub fn unescape_slashes(path_and_query: &str) -> Option<String> {
    let (path, query) = split_query(path_and_query);
    if !path.contains('%') {
        return None;
    }
    let mut out = path.to_string();
    for (escaped, plain) in [("%2F", "/"), ("%2f", "/"), ("%5C", "\\"), ("%5c", "\\")] {
        if out.contains(escaped) {
            out = out.replace(escaped, plain);
        }
    }
    // Each replacement shortens the path: a length change means a slash.
    if out.len() == path.len() {
        return None;
    }
    out.push_str(query);
    Some(out)
}

/// `merge_slashes`: empty segments of the path (not the query) removed, the
/// leading and trailing slash kept; `None` when the path has no `//`.
pub fn merge_slashes(path_and_query: &str) -> Option<String> {
    let (path, query) = split_query(path_and_query);
    if !path.contains("//") {
        return None;
    }
    let mut out = String::with_capacity(path_and_query.len());
    if path.starts_with('/') {
        out.push('/');
    }
    for (i, segment) in path.split('/').filter(|s| !s.is_empty()).enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment);
    }
    if path.ends_with('/') {
        out.push('/');
    }
    out.push_str(query);
    Some(out)
}

/// `normalize_path`: the path before the first `?` canonicalized, the query
/// appended unchanged; borrowed when nothing changes, `None` when the path
/// is invalid (Envoy answers 400).
pub fn rfc3986_normalize(path_and_query: &str) -> Option<Cow<'_, str>> {
    let (path, query) = split_query(path_and_query);
    if path.starts_with('/') && path.bytes().all(|b| class(b).is_plain()) {
        return Some(Cow::Borrowed(path_and_query));
    }
    let path = strip_dot_segment_parameters(path);
    let mut out = canonicalize(path.as_bytes())?;
    out.push_str(query);
    if out == path_and_query {
        return Some(Cow::Borrowed(path_and_query));
    }
    Some(Cow::Owned(out))
}

/// A `.` or `..` segment with path parameters (`..;jsessionid=x`) loses
/// them, as Envoy 1.40 does before canonicalizing: servers that read `;`
/// as a parameter separator (Tomcat, Jetty) take `/..;/admin` for
/// `/admin`, so the proxy must too. Segments are delimited by `/` only and
/// the dots must be literal (`%2E%2E;x` is left for the canonicalizer,
/// which keeps it as a name).
fn strip_dot_segment_parameters(path: &str) -> Cow<'_, str> {
    if !path.contains(".;") {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let dots = segment.bytes().take_while(|&b| b == b'.').count();
        if (dots == 1 || dots == 2) && segment.as_bytes().get(dots) == Some(&b';') {
            out.push_str(&segment[..dots]);
        } else {
            out.push_str(segment);
        }
    }
    Cow::Owned(out)
}

/// What a byte is to the canonicalizer, raw or percent-encoded. `.`, `\`
/// and `%` are handled before the class is asked when they come raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Copied raw; an escape of it keeps its spelling (sub-delims, `:`,
    /// `@`, `/`, `[`, `]`).
    Keep,
    /// RFC 3986's unreserved characters: copied raw, decoded when escaped.
    Unreserved,
    /// Percent-encoded when raw; an escape of it keeps its spelling.
    Escape,
    /// NUL: the path is invalid, raw or escaped.
    Invalid,
}

impl Class {
    /// Copied as it is, raw, and not one of the bytes handled before the
    /// class: a path of such bytes is already canonical.
    fn is_plain(self) -> bool {
        matches!(self, Class::Keep | Class::Unreserved)
    }
}

/// The class of a byte in a path.
fn class(b: u8) -> Class {
    match b {
        0 => Class::Invalid,
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => Class::Unreserved,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'/' | b':' | b';'
        | b'=' | b'@' | b'[' | b']' => Class::Keep,
        // Controls, space, `"#%.<>?\^`{|}`, DEL and every non-ASCII byte.
        // `.`, `\` and `%` never get here raw; their escapes keep their
        // spelling (`%2E` is read as a dot before this).
        _ => Class::Escape,
    }
}

/// A slash, for dot segments: a backslash counts.
fn is_slash(b: u8) -> bool {
    b == b'/' || b == b'\\'
}

/// The value of the escape `%XX` at `at`, if it is one.
fn escape_at(s: &[u8], at: usize) -> Option<u8> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    if *s.get(at)? != b'%' {
        return None;
    }
    Some(hex(*s.get(at + 1)?)? << 4 | hex(*s.get(at + 2)?)?)
}

/// The length of the dot at `at` (`.` is 1, `%2E`/`%2e` is 3), or 0.
fn dot_at(s: &[u8], at: usize) -> usize {
    match s.get(at..) {
        Some([b'.', ..]) => 1,
        Some([b'%', b'2', b'e' | b'E', ..]) => 3,
        _ => 0,
    }
}

/// What a dot that follows a slash is, given what follows the dot.
enum Segment {
    /// Part of a name (`.hidden`, `..x`).
    Name,
    /// `.`: dropped, with the `n` bytes after the dot (its slash).
    Current(usize),
    /// `..`: climbs one segment, dropping the `n` bytes after the first dot.
    Parent(usize),
}

fn segment_after_dot(s: &[u8], after: usize) -> Segment {
    match s.get(after) {
        None => return Segment::Current(0),
        Some(&b) if is_slash(b) => return Segment::Current(1),
        Some(_) => {}
    }
    let second = dot_at(s, after);
    if second == 0 {
        return Segment::Name;
    }
    match s.get(after + second) {
        None => Segment::Parent(second),
        Some(&b) if is_slash(b) => Segment::Parent(second + 1),
        Some(_) => Segment::Name,
    }
}

/// Removes the last segment of `out`, which ends with a slash: `out` then
/// ends at the slash before it, never above the leading one.
fn climb(out: &mut Vec<u8>) {
    let Some(last) = out.len().checked_sub(1) else {
        return;
    };
    let mut i = last;
    while i > 0 {
        i -= 1;
        if out[i] == b'/' {
            break;
        }
    }
    out.truncate(i + 1);
}

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
}

/// After an escape was decoded just behind a `%` that started no escape
/// (`out[percent]`): if decoding made that `%` the start of a valid escape
/// (`%%30%30` would read `%00` on a second pass), the `%` becomes `%25`, so
/// the output means what the input meant. `next` is the input index after
/// the decoded escape.
fn guard_nested_escape(input: &[u8], next: usize, percent: usize, out: &mut Vec<u8>) {
    let len = out.len();
    let Some(&decoded) = out.last() else {
        return;
    };
    // `%c`: the escape, if any, ends with the next input byte.
    let peek = percent + 2 == len;
    if peek {
        match input.get(next) {
            Some(&b) if b < 0x80 => out.push(b),
            _ => return,
        }
    }
    if escape_at(out, percent).is_some() {
        if !peek {
            out.push(out[percent + 1]);
        }
        out[percent + 1] = b'2';
        out[percent + 2] = b'5';
        out.push(decoded);
    } else if peek {
        out.truncate(len);
    }
}

/// The canonical form of a path (no query), as Chromium's
/// `CanonicalizePath`; `None` when it holds a NUL.
fn canonicalize(path: &[u8]) -> Option<String> {
    let mut out: Vec<u8> = Vec::with_capacity(path.len() + 8);
    if path.first().is_none_or(|&b| !is_slash(b)) {
        out.push(b'/');
    }
    let mut valid = true;
    // Where in `out` the last `%` that started no escape is.
    let mut lone_percent: Option<usize> = None;
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        let dot = dot_at(path, i);
        if dot > 0 {
            if out.last() == Some(&b'/') {
                match segment_after_dot(path, i + dot) {
                    Segment::Name => {
                        out.push(b'.');
                        i += dot;
                    }
                    Segment::Current(n) => i += dot + n,
                    Segment::Parent(n) => {
                        climb(&mut out);
                        if lone_percent.is_some_and(|p| p >= out.len()) {
                            lone_percent = None;
                        }
                        i += dot + n;
                    }
                }
            } else {
                out.push(b'.');
                i += dot;
            }
            continue;
        }
        match b {
            b'\\' => out.push(b'/'),
            b'%' => match escape_at(path, i) {
                Some(v) => {
                    match class(v) {
                        Class::Unreserved => {
                            out.push(v);
                            if let Some(p) = lone_percent
                                && p + 3 >= out.len()
                            {
                                guard_nested_escape(path, i + 3, p, &mut out);
                            }
                        }
                        c => {
                            out.extend_from_slice(&path[i..i + 3]);
                            valid &= c != Class::Invalid;
                        }
                    }
                    i += 3;
                    continue;
                }
                None => {
                    lone_percent = Some(out.len());
                    out.push(b'%');
                }
            },
            _ => match class(b) {
                Class::Keep | Class::Unreserved => out.push(b),
                Class::Escape => push_escaped(&mut out, b),
                Class::Invalid => {
                    push_escaped(&mut out, b);
                    valid = false;
                }
            },
        }
        i += 1;
    }
    if !valid {
        return None;
    }
    // Every byte pushed is ASCII: non-ASCII input is always escaped.
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(
        normalize_path: bool,
        merge_slashes: bool,
        escaped: EscapedSlashesAction,
    ) -> PathNormalization {
        PathNormalization {
            normalize_path,
            merge_slashes,
            escaped_slashes: escaped,
        }
    }

    fn rfc(p: &str) -> Option<String> {
        rfc3986_normalize(p).map(Cow::into_owned)
    }

    /// What Envoy 1.40 answers with `normalize_path: true` (observed through
    /// it: the path its backend received, or `None` for its 400).
    #[test]
    fn rfc3986_as_envoy() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/", Some("/")),
            ("/admin", Some("/admin")),
            ("/./admin", Some("/admin")),
            ("/x/../admin", Some("/admin")),
            ("/%61dmin", Some("/admin")),
            ("/%2e/admin", Some("/admin")),
            ("/%2E%2E/admin", Some("/admin")),
            ("//admin", Some("//admin")),
            ("/admin%2F", Some("/admin%2F")),
            ("/a/%2f../admin", Some("/a/%2f../admin")),
            ("/admin?x=/../", Some("/admin?x=/../")),
            ("/a\\b", Some("/a/b")),
            ("/%00", None),
            ("/a/..%00", None),
            ("/../../..", Some("/")),
            ("/..", Some("/")),
            ("/%5c../admin", Some("/%5c../admin")),
            ("/a%", Some("/a%")),
            ("/a%zz", Some("/a%zz")),
            ("/%%30%30", Some("/%2500")),
            ("/a/..%2f", Some("/a/..%2f")),
            ("/%2e%2e", Some("/")),
            ("/.%2e/x", Some("/x")),
            ("/a/.", Some("/a/")),
            ("/a/..", Some("/")),
            ("/a/b/..", Some("/a/")),
            ("/a/./b/../../c", Some("/c")),
            ("/..;/x", Some("/x")),
            ("/x/..;/y", Some("/y")),
            ("/x/.;/y", Some("/x/y")),
            ("/x/..;a/y", Some("/y")),
            ("/a;b", Some("/a;b")),
            ("/x/..%3B/y", Some("/x/..%3B/y")),
            ("/x/..;", Some("/")),
            ("/x/;/y", Some("/x/;/y")),
            ("/x/..;;/y", Some("/y")),
            ("/x/a;b/../y", Some("/x/y")),
            ("/x/..a;/y", Some("/x/..a;/y")),
            ("/x/;../y", Some("/x/;../y")),
            ("/x/..;a;b/y", Some("/y")),
            ("/x/%2e%2e;a/y", Some("/x/..;a/y")),
            ("/x/.%2e;/y", Some("/x/..;/y")),
            ("/x/..;\\y", Some("/")),
            ("/x/..;a\\b/y", Some("/y")),
            ("/x/..;%2f/y", Some("/y")),
            ("/x/..;?q", Some("/?q")),
            ("/x/y;/..", Some("/x/")),
            ("/x/...;/y", Some("/x/...;/y")),
            ("/x/.;./y", Some("/x/y")),
            ("/a/b/..;x=1/c", Some("/a/c")),
            ("/x\\..;a/y", Some("/x/..;a/y")),
            ("/x/..;a%00/y", Some("/y")),
            ("/x/.;%00", Some("/x/")),
            ("/a/../b?x=../%61", Some("/b?x=../%61")),
            ("/a?", Some("/a?")),
            ("/a/%2e%2E/b", Some("/b")),
            ("/%41%2E%2E/x", Some("/A../x")),
            ("/a/.%2e%2f/x", Some("/a/..%2f/x")),
            ("/x/%2E./y", Some("/y")),
            ("/x/%2e%2", Some("/x/.%2")),
            ("/x/%2", Some("/x/%2")),
            ("/x/%%2e%2e/", Some("/x/%../")),
            ("/x/%%2e/y", Some("/x/%./y")),
            ("/%2500", Some("/%2500")),
            ("/%%%30%30", Some("/%%2500")),
            ("/%%30%300", Some("/%25000")),
            ("/a/..\\\\x", Some("//x")),
            ("/a\\\\..\\\\x", Some("/a//x")),
            ("/.\\\\x", Some("//x")),
            ("//../x", Some("/x")),
            ("///x/../..//y", Some("///y")),
            ("/a\"b", Some("/a%22b")),
            ("/a<b>", Some("/a%3Cb%3E")),
            ("/a^`{|}", Some("/a%5E%60%7B%7C%7D")),
            ("/a%7e%5Fb%2D", Some("/a~_b-")),
            ("/a%3cb%3C", Some("/a%3cb%3C")),
            ("/a%40%3A%2B", Some("/a%40%3A%2B")),
            ("/caf\u{e9}", Some("/caf%C3%A9")),
            ("/a\u{7f}", Some("/a%7F")),
        ];
        for (input, want) in cases {
            assert_eq!(rfc(input).as_deref(), *want, "normalizing {input:?}");
        }
    }

    #[test]
    fn unchanged_paths_are_borrowed() {
        for p in ["/", "/a/b.c/d?x=/../", "/api/v1/items;x=1", "/~user/a-b_c"] {
            assert!(
                matches!(rfc3986_normalize(p), Some(Cow::Borrowed(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn merge_slashes_as_envoy() {
        assert_eq!(merge_slashes("/a/b"), None);
        assert_eq!(merge_slashes("//").as_deref(), Some("//"));
        assert_eq!(merge_slashes("///").as_deref(), Some("//"));
        assert_eq!(merge_slashes("/a//").as_deref(), Some("/a/"));
        assert_eq!(merge_slashes("/a//b/").as_deref(), Some("/a/b/"));
        assert_eq!(merge_slashes("//a?x=//y").as_deref(), Some("/a?x=//y"));
        assert_eq!(merge_slashes("/a?x=//y"), None);
    }

    #[test]
    fn unescape_slashes_as_envoy() {
        assert_eq!(unescape_slashes("/a/b"), None);
        assert_eq!(unescape_slashes("/a%25b"), None);
        assert_eq!(unescape_slashes("/a?x=%2F"), None);
        assert_eq!(
            unescape_slashes("/a%2Fb%5Cc%2f/d%5c?q=%2F").as_deref(),
            Some("/a/b\\c//d\\?q=%2F")
        );
        // One spelling after the other: what one replacement leaves is not
        // read again.
        assert_eq!(unescape_slashes("/%2%2F").as_deref(), Some("/%2/"));
        assert_eq!(unescape_slashes("/%%2F2F").as_deref(), Some("/%/2F"));
    }

    /// The HCM settings combinations Istio emits, and the other actions, on
    /// paths Envoy 1.40 was seen to answer so.
    #[test]
    fn pipeline_as_envoy() {
        use EscapedSlashesAction as A;
        let fwd = |s: &str| Verdict::Forward(Cow::Owned(s.to_string()));
        let base = cfg(true, false, A::KeepUnchanged);
        let merge = cfg(true, true, A::KeepUnchanged);
        let decode = cfg(true, true, A::UnescapeAndForward);
        let reject = cfg(true, true, A::RejectRequest);
        let redirect = cfg(true, true, A::UnescapeAndRedirect);
        let off = cfg(false, false, A::KeepUnchanged);
        assert_eq!(normalize(&base, "/x/../admin"), fwd("/admin"));
        assert_eq!(normalize(&base, "//admin"), fwd("//admin"));
        assert_eq!(normalize(&merge, "//admin"), fwd("/admin"));
        assert_eq!(normalize(&merge, "/a/%2F/../b"), fwd("/a/b"));
        assert_eq!(normalize(&merge, "/a/%2f../admin"), fwd("/a/%2f../admin"));
        assert_eq!(normalize(&decode, "/a/%2f../admin"), fwd("/a/admin"));
        assert_eq!(normalize(&decode, "/a%2Fb%5Cc%2f/d%5c"), fwd("/a/b/c/d/"));
        assert_eq!(normalize(&decode, "/%2F%2F/x"), fwd("/x"));
        assert_eq!(normalize(&decode, "/a%2f%2e%2e/admin"), fwd("/admin"));
        assert_eq!(normalize(&decode, "/%252F"), fwd("/%252F"));
        assert_eq!(normalize(&decode, "/a?x=%2F"), fwd("/a?x=%2F"));
        assert_eq!(
            normalize(&reject, "/admin%2F"),
            Verdict::Reject(Rejected::EscapedSlash)
        );
        assert_eq!(normalize(&reject, "//a?x=//y"), fwd("/a?x=//y"));
        assert_eq!(
            normalize(&redirect, "/a/%2f../admin?q=1"),
            Verdict::Redirect("/a/admin?q=1".into())
        );
        assert_eq!(
            normalize(&redirect, "/%2%2F"),
            Verdict::Redirect("/%2/".into())
        );
        assert_eq!(normalize(&redirect, "/a//b/"), fwd("/a/b/"));
        assert_eq!(normalize(&base, "/%00"), Verdict::Reject(Rejected::Invalid));
        // Normalization off: nothing changes, even an invalid path.
        for p in ["/./admin", "/%00", "//a", "/a%2Fb"] {
            assert_eq!(normalize(&off, p), Verdict::Forward(Cow::Borrowed(p)));
        }
        // `OPTIONS *` is no path.
        assert_eq!(
            normalize(&decode, "*"),
            Verdict::Forward(Cow::Borrowed("*"))
        );
    }
}
