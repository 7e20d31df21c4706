//! Which requests are limited, and in which bucket (SPEC §3).
//!
//! Paths are handled as bytes: a `:path` header need not be UTF-8, and a client must not be
//! able to make the filter fail (or escape its bucket) by sending one that is not.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::limiter::Limit;

/// What a route entry says about its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// `None`: `rateLimiterOptions: false`, never limited.
    pub limit: Option<Limit>,
    /// A pattern entry's bucket: the pattern, its parameters written `:` (so renaming a
    /// parameter keeps the count). `None` for an exact entry and `default`, whose bucket is
    /// the request's normalised path.
    pub pattern: Option<Vec<u8>>,
}

/// The routing decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    NotLimited,
    Limited {
        limit: Limit,
        /// The bucket a limited request counts in, besides its client and method (SPEC
        /// §3.4): the normalised path, or the pattern of a pattern entry. It names what is
        /// counted, not the entry that limits it, so a configuration push that gives a path
        /// an entry of its own (or takes it away) keeps the count.
        bucket: &'a [u8],
    },
}

/// Method of an entry: one method, or every method (each still counted apart).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum MethodSel {
    One(String),
    Any,
}

impl MethodSel {
    fn matches(&self, method: &[u8]) -> bool {
        match self {
            MethodSel::One(m) => m.as_bytes() == method,
            MethodSel::Any => true,
        }
    }
}

/// Where an entry came from: `routes` beats `preset` (SPEC §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Routes,
    Preset,
}

#[derive(Debug, Clone)]
struct Entry {
    method: MethodSel,
    source: Source,
    rule: RouteRule,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Vec<u8>),
    Param,
}

#[derive(Debug, Clone)]
struct Pattern {
    segments: Vec<Segment>,
    literals: usize,
    entry: Entry,
}

/// The immutable route table.
#[derive(Debug)]
pub struct RouteTable {
    prefix: Vec<u8>,
    default_rule: RouteRule,
    /// Exact paths; each path's entries sorted by precedence (routes first, then one method
    /// before any). Looked up on every limited request, by a hash of the path: a binary
    /// search compared ~5 paths byte by byte (~1.3k wasm instructions a request).
    exact: HashMap<Vec<u8>, Vec<Entry>, BuildHasherDefault<PathHasher>>,
    /// Sorted by precedence: more literal segments first, then routes before preset, then one
    /// method before any.
    patterns: Vec<Pattern>,
}

pub struct RouteTableBuilder {
    prefix: String,
    default: Limit,
    /// (normalised path, method) → (source, routes index) for duplicate and override checks.
    exact: Vec<(Vec<u8>, Vec<Entry>)>,
    patterns: Vec<Pattern>,
    /// (normalised path, method) of every `routes` entry, in configuration order.
    seen: Vec<(Vec<u8>, MethodSel)>,
}

/// Precedence of patterns: more literal segments first, then routes before preset, then one
/// method before any.
fn pattern_order(a: &Pattern, b: &Pattern) -> Ordering {
    b.literals
        .cmp(&a.literals)
        .then(a.entry.source.cmp(&b.entry.source))
        .then(a.entry.method.cmp(&b.entry.method))
}

impl RouteTableBuilder {
    pub fn new(prefix: &str, default: Limit) -> Self {
        RouteTableBuilder {
            prefix: prefix.to_string(),
            default,
            exact: Vec::new(),
            patterns: Vec::new(),
            seen: Vec::new(),
        }
    }

    pub fn add_preset(
        &mut self,
        path: &str,
        method: Option<&str>,
        limit: Option<Limit>,
    ) -> Result<(), String> {
        self.add(path, method, limit, Source::Preset)
    }

    pub fn add_route(
        &mut self,
        path: &str,
        method: Option<&str>,
        limit: Option<Limit>,
    ) -> Result<(), String> {
        let normalised = normalise_path(path.as_bytes()).into_owned();
        let method_sel = method.map_or(MethodSel::Any, |m| MethodSel::One(m.to_string()));
        let key = (normalised, method_sel);
        if let Some(previous) = self.seen.iter().position(|seen| *seen == key) {
            return Err(format!(
                "duplicate route: same path and method as routes[{previous}]"
            ));
        }
        self.seen.push(key);
        self.add(path, method, limit, Source::Routes)
    }

    fn add(
        &mut self,
        path: &str,
        method: Option<&str>,
        limit: Option<Limit>,
        source: Source,
    ) -> Result<(), String> {
        let normalised = normalise_path(path.as_bytes()).into_owned();
        let segments: Vec<Segment> = normalised
            .split(|b| *b == b'/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.first() == Some(&b':') {
                    if s.len() == 1 {
                        Err("a ':' segment needs a parameter name".to_string())
                    } else {
                        Ok(Segment::Param)
                    }
                } else {
                    Ok(Segment::Literal(s.to_vec()))
                }
            })
            .collect::<Result<_, _>>()?;
        let entry = Entry {
            method: method.map_or(MethodSel::Any, |m| MethodSel::One(m.to_string())),
            source,
            rule: RouteRule {
                limit,
                pattern: segments
                    .contains(&Segment::Param)
                    .then(|| canonical_pattern(&segments)),
            },
        };
        let literals = segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        if literals == segments.len() {
            let at = match self
                .exact
                .binary_search_by(|(path, _)| path.as_slice().cmp(&normalised))
            {
                Ok(found) => found,
                Err(at) => {
                    self.exact.insert(at, (normalised, Vec::new()));
                    at
                }
            };
            let Some((_, entries)) = self.exact.get_mut(at) else {
                return Err("internal error: exact route table".to_string());
            };
            // A routes entry replaces the preset entry with the same path and method.
            entries.retain(|e| !(e.method == entry.method && e.source != entry.source));
            // Kept in precedence order by inserting in place (after equals: configuration
            // order); a sort would add a sort routine's code to the .wasm for a handful of items.
            let at =
                entries.partition_point(|e| (e.source, &e.method) <= (entry.source, &entry.method));
            entries.insert(at, entry);
        } else {
            self.patterns
                .retain(|p| !(p.segments == segments && p.entry.method == entry.method));
            let pattern = Pattern {
                segments,
                literals,
                entry,
            };
            let at = self
                .patterns
                .partition_point(|p| pattern_order(p, &pattern) != Ordering::Greater);
            self.patterns.insert(at, pattern);
        }
        Ok(())
    }

    pub fn build(self) -> RouteTable {
        RouteTable {
            prefix: self.prefix.into_bytes(),
            default_rule: RouteRule {
                limit: Some(self.default),
                pattern: None,
            },
            exact: self.exact.into_iter().collect(),
            patterns: self.patterns,
        }
    }
}

impl RouteTable {
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Routes a request. `normalised` must come from [`normalise_path`].
    pub fn route<'a>(&'a self, method: &[u8], normalised: &'a [u8]) -> Route<'a> {
        if method == b"OPTIONS" || method == b"HEAD" {
            return Route::NotLimited;
        }
        if !normalised.starts_with(&self.prefix) {
            return Route::NotLimited;
        }
        if let Some(entries) = self.exact.get(normalised) {
            if let Some(e) = entries.iter().find(|e| e.method.matches(method)) {
                return limited(&e.rule, normalised);
            }
        }
        if !self.patterns.is_empty() {
            for p in &self.patterns {
                if p.entry.method.matches(method) && pattern_matches(&p.segments, normalised) {
                    return limited(&p.entry.rule, normalised);
                }
            }
        }
        limited(&self.default_rule, normalised)
    }
}

/// The exact-path table's hash: 64-bit multiply-rotate over 8-byte words (FxHash's), not
/// keyed. Safe without a key because the table is fixed by the configuration: a client's path
/// cannot add to it, so the longest probe a crafted path can cause is bounded by the table
/// itself (a few dozen paths), never by the traffic.
#[derive(Default)]
pub struct PathHasher(u64);

impl PathHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for PathHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.add(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            if let Some(head) = b.get_mut(..rest.len()) {
                head.copy_from_slice(rest);
            }
            self.add(u64::from_le_bytes(b));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

fn limited<'a>(rule: &'a RouteRule, normalised: &'a [u8]) -> Route<'a> {
    match rule.limit {
        Some(limit) => Route::Limited {
            limit,
            bucket: rule.pattern.as_deref().unwrap_or(normalised),
        },
        None => Route::NotLimited,
    }
}

/// `/api/v1/rooms/:id/x` → `/api/v1/rooms/:/x`.
fn canonical_pattern(segments: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for segment in segments {
        out.push(b'/');
        match segment {
            Segment::Literal(l) => out.extend_from_slice(l),
            Segment::Param => out.push(b':'),
        }
    }
    out
}

fn pattern_matches(segments: &[Segment], path: &[u8]) -> bool {
    let mut parts = path.split(|b| *b == b'/').filter(|s| !s.is_empty());
    for seg in segments {
        match (seg, parts.next()) {
            (Segment::Literal(l), Some(p)) if l.as_slice() == p => {}
            (Segment::Param, Some(_)) => {}
            _ => return false,
        }
    }
    parts.next().is_none()
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Does the path need any rewriting? Most do not, and then no allocation is made.
fn is_normal(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    if path.len() > 1 && path.last() == Some(&b'/') {
        return false;
    }
    let mut prev_slash = false;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'?' | b'#' | b'%' => return false,
            b'/' => {
                if prev_slash {
                    return false;
                }
                prev_slash = true;
            }
            b'.' if prev_slash => {
                // "/." or "/.." as a whole segment
                let rest = path.get(i..).unwrap_or(&[]);
                if rest == b"."
                    || rest == b".."
                    || rest.starts_with(b"./")
                    || rest.starts_with(b"../")
                {
                    return false;
                }
                prev_slash = false;
            }
            _ => prev_slash = false,
        }
    }
    true
}

/// The normal form used for bucket keys and route lookup (SPEC §3.2): the query string and
/// fragment cut off, percent-encoded unreserved characters decoded (other escapes kept, with
/// upper-case hex), empty and `.` segments dropped, `..` resolved (never above the root), no
/// trailing slash. Case is kept: Rocket.Chat's routes are case-sensitive.
pub fn normalise_path(raw: &[u8]) -> Cow<'_, [u8]> {
    if is_normal(raw) {
        return Cow::Borrowed(raw);
    }
    let end = raw
        .iter()
        .position(|b| *b == b'?' || *b == b'#')
        .unwrap_or(raw.len());
    let raw = raw.get(..end).unwrap_or(raw);

    // Decode the escapes of unreserved characters; keep the others, in upper-case hex.
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'%' {
            let hi = raw.get(i + 1).copied().and_then(hex_value);
            let lo = raw.get(i + 2).copied().and_then(hex_value);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                let c = hi * 16 + lo;
                if is_unreserved(c) {
                    decoded.push(c);
                } else {
                    decoded.push(b'%');
                    decoded.extend_from_slice(format!("{c:02X}").as_bytes());
                }
                i += 3;
                continue;
            }
        }
        decoded.push(b);
        i += 1;
    }

    let mut segments: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|b| *b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + 1);
    if segments.is_empty() {
        out.push(b'/');
    }
    for s in segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    Cow::Owned(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    fn norm(p: &str) -> String {
        String::from_utf8(normalise_path(p.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn spec_variants_normalise_to_one_path() {
        for v in [
            "/api/v1/users.info",
            "/api/v1//users.info",
            "/api/v1/users.info/",
            "/api/v1/users.info?x=1",
            "/api/v1/./users.info",
            "/api/v1/x/../users.info",
            "/api/v1/%75sers.info",
            "/api/v1/%75SERS.info?a=/b",
            "//api///v1/users.info//",
            "/api/v1/users.info#frag",
        ] {
            if v.contains("SERS") {
                assert_eq!(norm(v), "/api/v1/uSERS.info", "{v}");
            } else {
                assert_eq!(norm(v), "/api/v1/users.info", "{v}");
            }
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        assert!(matches!(
            normalise_path(b"/api/v1/users.info"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(normalise_path(b"/api/v1/a.b/c"), Cow::Borrowed(_)));
        assert!(matches!(normalise_path(b"/"), Cow::Borrowed(_)));
        assert!(matches!(normalise_path(b"/api/v1/."), Cow::Owned(_)));
        assert!(matches!(normalise_path(b"/api/v1/.."), Cow::Owned(_)));
    }

    #[test]
    fn dot_dot_never_climbs_above_root_and_case_is_kept() {
        assert_eq!(norm("/../../api/v1/x"), "/api/v1/x");
        assert_eq!(norm("/api/v1/.."), "/api");
        assert_eq!(norm(""), "/");
        assert_eq!(norm("?"), "/");
        assert_eq!(norm("/API/V1/Users.Info"), "/API/V1/Users.Info");
    }

    #[test]
    fn reserved_escapes_are_kept_in_upper_case() {
        assert_eq!(norm("/api/v1/a%2fb"), "/api/v1/a%2Fb");
        assert_eq!(norm("/api/v1/a%2Fb"), "/api/v1/a%2Fb");
        assert_eq!(norm("/api/v1/a%zz"), "/api/v1/a%zz");
        assert_eq!(norm("/api/v1/a%"), "/api/v1/a%");
        assert_eq!(norm("/api/v1/a%2"), "/api/v1/a%2");
    }

    #[test]
    fn binary_paths_do_not_panic() {
        let p = [b'/', 0xff, 0xfe, b'/', 0, b'%', 0xc3];
        let n = normalise_path(&p);
        assert_eq!(n.as_ref(), &[b'/', 0xff, 0xfe, b'/', 0, b'%', 0xc3][..]);
    }

    #[test]
    fn exact_paths_by_hash_many_and_near_misses() {
        let mut b = RouteTableBuilder::new("/api/v1/", Limit::ROCKETCHAT_DEFAULT);
        for i in 1..=300u32 {
            b.add_route(&format!("/api/v1/r{i}"), None, Some(Limit::of(i, 1000)))
                .unwrap();
        }
        let t = b.build();
        let limit = |p: &str| match t.route(b"GET", p.as_bytes()) {
            Route::Limited { limit, .. } => limit.requests.get(),
            Route::NotLimited => 0,
        };
        for i in 1..=300u32 {
            assert_eq!(limit(&format!("/api/v1/r{i}")), i);
        }
        // Prefixes, extensions and same-length neighbours fall to the default (10).
        for miss in [
            "/api/v1/r",
            "/api/v1/r3000",
            "/api/v1/r1x",
            "/api/v1/s1",
            "/api/v1/r0",
        ] {
            assert_eq!(limit(miss), 10, "{miss}");
        }
    }

    #[test]
    fn path_hash_sees_length_and_every_byte() {
        let h = |b: &[u8]| {
            let mut s = PathHasher::default();
            s.write_usize(b.len());
            s.write(b);
            s.finish()
        };
        assert_ne!(h(b"/a"), h(b"/a\0"));
        assert_ne!(h(b"/api/v1/users.info"), h(b"/api/v1/users.infp"));
        assert_ne!(h(b"12345678abc"), h(b"12345678abd"));
    }

    fn table() -> RouteTable {
        let mut b = RouteTableBuilder::new("/api/v1/", Limit::ROCKETCHAT_DEFAULT);
        let l = |n| Some(Limit::of(n, 1000));
        b.add_preset("/api/v1/method.call/:method", Some("POST"), None)
            .unwrap();
        b.add_preset("/api/v1/a/:x/c", Some("GET"), l(1)).unwrap();
        b.add_preset("/api/v1/chat.sendMessage", Some("POST"), l(5))
            .unwrap();
        b.add_route("/api/v1/a/:x/:y", Some("GET"), l(2)).unwrap();
        b.add_route("/api/v1/a/b/c", Some("GET"), l(3)).unwrap();
        b.add_route("/api/v1/m", None, l(4)).unwrap();
        b.add_route("/api/v1/m", Some("PUT"), l(6)).unwrap();
        b.add_route("/api/v1/p/:x", None, l(7)).unwrap();
        b.build()
    }

    fn limit_of(t: &RouteTable, m: &str, p: &str) -> Option<u32> {
        match t.route(m.as_bytes(), p.as_bytes()) {
            Route::NotLimited => None,
            Route::Limited { limit, .. } => Some(limit.requests.get()),
        }
    }

    #[test]
    fn precedence_exact_then_literals_then_routes_then_default() {
        let t = table();
        assert_eq!(limit_of(&t, "GET", "/api/v1/a/b/c"), Some(3)); // exact beats patterns
        assert_eq!(limit_of(&t, "GET", "/api/v1/a/z/c"), Some(1)); // more literals wins
        assert_eq!(limit_of(&t, "GET", "/api/v1/a/z/d"), Some(2));
        assert_eq!(limit_of(&t, "POST", "/api/v1/a/z/d"), Some(10)); // method mismatch → default
        assert_eq!(limit_of(&t, "POST", "/api/v1/chat.sendMessage"), Some(5));
        assert_eq!(limit_of(&t, "GET", "/api/v1/chat.sendMessage"), Some(10));
        assert_eq!(limit_of(&t, "GET", "/api/v1/m"), Some(4));
        assert_eq!(limit_of(&t, "PUT", "/api/v1/m"), Some(6));
        assert_eq!(limit_of(&t, "DELETE", "/api/v1/p/1"), Some(7));
        assert_eq!(limit_of(&t, "DELETE", "/api/v1/p/1/2"), Some(10));
        assert_eq!(limit_of(&t, "POST", "/api/v1/method.call/x"), None);
        assert_eq!(limit_of(&t, "GET", "/api/v1/method.call/x"), Some(10));
        assert_eq!(limit_of(&t, "GET", "/api/info"), None);
        assert_eq!(limit_of(&t, "GET", "/api/v1"), None);
        assert_eq!(limit_of(&t, "OPTIONS", "/api/v1/m"), None);
        assert_eq!(limit_of(&t, "HEAD", "/api/v1/x"), None);
    }

    #[test]
    fn buckets_pattern_shares_default_is_concrete_path() {
        let t = table();
        let b1 = t.route(b"GET", b"/api/v1/a/q/c");
        let b2 = t.route(b"GET", b"/api/v1/a/r/c");
        match (b1, b2) {
            (Route::Limited { bucket: x, .. }, Route::Limited { bucket: y, .. }) => {
                assert_eq!(x, y);
                assert_eq!(x, b"/api/v1/a/:/c");
            }
            _ => panic!("expected limited"),
        }
        match t.route(b"GET", b"/api/v1/users.info") {
            Route::Limited { bucket, .. } => {
                assert_eq!(bucket, b"/api/v1/users.info")
            }
            _ => panic!("expected limited"),
        }
    }

    /// SPEC §3.4, §11: the bucket is the path or the pattern, never the entry, so a push
    /// that gives a path an entry of its own (or renames a parameter) keeps its count.
    #[test]
    fn buckets_name_the_path_not_the_entry() {
        let mut b = RouteTableBuilder::new("/api/v1/", Limit::ROCKETCHAT_DEFAULT);
        b.add_route(
            "/api/v1/users.info",
            Some("GET"),
            Some(Limit::of(20, 60_000)),
        )
        .unwrap();
        b.add_route("/api/v1/rooms/:rid/x", None, Some(Limit::of(5, 60_000)))
            .unwrap();
        let with_entries = b.build();
        let plain = RouteTableBuilder::new("/api/v1/", Limit::ROCKETCHAT_DEFAULT).build();
        let mut renamed = RouteTableBuilder::new("/api/v1/", Limit::ROCKETCHAT_DEFAULT);
        renamed
            .add_route("/api/v1/rooms/:id/x", None, Some(Limit::of(5, 60_000)))
            .unwrap();
        let renamed = renamed.build();
        let bucket = |t: &RouteTable, path: &'static [u8]| match t.route(b"GET", path) {
            Route::Limited { bucket, .. } => bucket.to_vec(),
            Route::NotLimited => panic!("limited"),
        };
        let users = b"/api/v1/users.info";
        assert_eq!(bucket(&with_entries, users), bucket(&plain, users));
        assert_eq!(
            bucket(&with_entries, b"/api/v1/rooms/a/x"),
            bucket(&renamed, b"/api/v1/rooms/b/x")
        );
    }

    #[test]
    fn routes_override_preset_with_same_path_and_method() {
        let mut b = RouteTableBuilder::new("/api/v1/", Limit::ROCKETCHAT_DEFAULT);
        let l = |n| Some(Limit::of(n, 1000));
        b.add_preset("/api/v1/x", Some("POST"), l(1)).unwrap();
        b.add_preset("/api/v1/y/:z", Some("POST"), None).unwrap();
        b.add_route("/api/v1/x", Some("POST"), l(9)).unwrap();
        b.add_route("/api/v1/y/:q", Some("POST"), l(8)).unwrap();
        let t = b.build();
        assert_eq!(limit_of(&t, "POST", "/api/v1/x"), Some(9));
        assert_eq!(limit_of(&t, "POST", "/api/v1/y/1"), Some(8));
    }

    #[test]
    fn duplicate_routes_are_reported() {
        let mut b = RouteTableBuilder::new("/api/v1/", Limit::ROCKETCHAT_DEFAULT);
        b.add_route("/api/v1/x", Some("POST"), None).unwrap();
        b.add_route("/api/v1/x", None, None).unwrap();
        assert_eq!(
            b.add_route("/api/v1//x/", Some("POST"), None).unwrap_err(),
            "duplicate route: same path and method as routes[0]"
        );
    }
}
