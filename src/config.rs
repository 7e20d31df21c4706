//! Plugin configuration (SPEC §2), parsed in two steps:
//! 1. the *shape* (JSON syntax, types, unknown or repeated fields), read with serde and
//!    serde_json; `serde_path_to_error` names the field of the first mistake in document order
//!    (`routes[2].rateLimiterOptions`);
//! 2. `compile` checks the *meaning* (positive numbers, paths, duplicates) and builds the
//!    immutable tables the request path uses.
//!
//! Every error is one line: `<field path>: <reason>`. The configuration text itself is never
//! part of an error, because it may hold `bypass.service_auth_token`: a string value is never
//! echoed (serde would write `invalid type: string "…"`; the types below say `string`).

use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroU32;

use serde::de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::client::Prefixes;
use crate::edge::CredentialPaths;
use crate::limiter::{Limit, WAYS_PER_SET};
use crate::route::{RouteTable, RouteTableBuilder};

/// Longest window the filter accepts: one day, as SPEC §2 says.
pub const MAX_INTERVAL_MS: u64 = 86_400_000;
/// Largest `numRequestsAllowed`: a slot keeps its count in 31 bits.
pub const MAX_REQUESTS: u64 = 0x7fff_ffff;
/// Upper bound of `max_tracked_clients`: every slot is created at configure time, so a huge
/// value would be a huge allocation in Envoy. Ten million slots is ~250 MB of shared data.
pub const MAX_TRACKED_CLIENTS_LIMIT: u64 = 10_000_000;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// A configuration error: the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Step 1: shape.
//
// serde's derive reads the objects (`deny_unknown_fields`, `duplicate field`); the small types
// below read every value that is not a plain string, for three reasons serde alone would miss:
// - a derived struct also accepts a JSON array (`[true]` as `{"enabled":true}`): `Object`
//   accepts only an object;
// - serde_json reports a string where another type belongs as `string "<its text>"`, which
//   could be the service token: `Flag`, `List`, `Object`, `Number` and `RawRouteOptions` say
//   `string` and nothing more;
// - a number must be judged as written (`1e3`, `1.5`, a 30-digit integer), so `Number` keeps
//   its source text (serde_json's `RawValue`) for `compile`.
// `null` is an absent field everywhere (`Option`).

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig<'a> {
    enabled: Option<Flag>,
    development: Option<Flag>,
    enabled_in_development: Option<Flag>,
    api_prefix: Option<String>,
    #[serde(borrow)]
    default: Option<Object<RawLimit<'a>>>,
    preset: Option<String>,
    #[serde(borrow)]
    routes: Option<List<Object<RawRoute<'a>>>>,
    dry_run: Option<Flag>,
    retry_after: Option<Flag>,
    #[serde(borrow)]
    max_tracked_clients: Option<Number<'a>>,
    #[serde(borrow)]
    bypass: Option<Object<RawBypass<'a>>>,
    #[serde(borrow)]
    global: Option<Object<RawGlobal<'a>>>,
    https_only_login: Option<Flag>,
    ietf_headers: Option<Flag>,
    #[serde(borrow)]
    client_ipv4_prefix: Option<Number<'a>>,
    #[serde(borrow)]
    client_ipv6_prefix: Option<Number<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal<'a> {
    cluster: Option<String>,
    domain: Option<String>,
    #[serde(borrow)]
    timeout_ms: Option<Number<'a>>,
    on_failure: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit<'a> {
    #[serde(borrow, rename = "numRequestsAllowed")]
    num_requests_allowed: Option<Number<'a>>,
    #[serde(borrow, rename = "intervalTimeInMS")]
    interval_time_in_ms: Option<Number<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute<'a> {
    path: Option<String>,
    method: Option<String>,
    #[serde(borrow, rename = "rateLimiterOptions")]
    rate_limiter_options: Option<RawRouteOptions<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBypass<'a> {
    cluster: Option<String>,
    authority: Option<String>,
    permission: Option<String>,
    roles: Option<List<String>>,
    me_path: Option<String>,
    permissions_path: Option<String>,
    service_user_id: Option<String>,
    service_auth_token: Option<String>,
    #[serde(borrow)]
    timeout_ms: Option<Number<'a>>,
    #[serde(borrow)]
    cache_ttl_ms: Option<Number<'a>>,
    #[serde(borrow)]
    refresh_interval_ms: Option<Number<'a>>,
    #[serde(borrow)]
    lookups_per_client_per_minute: Option<Number<'a>>,
}

/// The error for a string where another type belongs: `invalid type: string, expected …`,
/// without the string (serde_json would quote it).
fn string_found<E: de::Error>(expected: &dyn de::Expected) -> E {
    E::invalid_type(de::Unexpected::Other("string"), expected)
}

/// A boolean.
#[derive(Debug, Clone, Copy)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl<'de> Visitor<'de> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Flag, E> {
                Err(string_found(&self))
            }
        }
        // `deserialize_any`, not `deserialize_bool`: serde_json reports a mismatch found by
        // `deserialize_bool` itself, string text included, without asking the visitor.
        deserializer.deserialize_any(FlagVisitor)
    }
}

/// A JSON array.
#[derive(Debug)]
struct List<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(List(items))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<List<T>, E> {
                Err(string_found(&self))
            }
        }
        deserializer.deserialize_any(ListVisitor(PhantomData))
    }
}

/// A JSON object read by `T`'s derived `Deserialize` (and nothing else: not an array).
#[derive(Debug)]
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                // `map` is serde_path_to_error's tracking wrapper: the fields read through it
                // keep their path.
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Object<T>, E> {
                Err(string_found(&self))
            }
        }
        deserializer.deserialize_any(ObjectVisitor(PhantomData))
    }
}

/// A number as written in the configuration (its JSON text, checked by serde_json against the
/// grammar); step 2 judges its value.
#[derive(Debug, Clone, Copy)]
struct Number<'a>(&'a str);

impl<'de: 'a, 'a> Deserialize<'de> for Number<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <&'de RawValue>::deserialize(deserializer)?.get();
        let found = match text.as_bytes().first() {
            Some(b'-' | b'0'..=b'9') => return Ok(Number(text)),
            Some(b'"') => de::Unexpected::Other("string"),
            Some(b't') => de::Unexpected::Bool(true),
            Some(b'f') => de::Unexpected::Bool(false),
            Some(b'[') => de::Unexpected::Seq,
            Some(b'{') => de::Unexpected::Map,
            // `null` (an `Option` reads it as absent before it gets here).
            _ => de::Unexpected::Unit,
        };
        Err(de::Error::invalid_type(found, &"a JSON number"))
    }
}

/// `rateLimiterOptions`: an object, or `false` for "never limited" (as in Rocket.Chat). A
/// visitor of its own rather than an untagged enum, which would lose the field path and
/// serde's message.
#[derive(Debug)]
enum RawRouteOptions<'a> {
    Limit(RawLimit<'a>),
    Disabled,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawRouteOptions<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OptionsVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for OptionsVisitor<'a> {
            type Value = RawRouteOptions<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object or false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                if v {
                    Err(E::invalid_value(de::Unexpected::Bool(true), &self))
                } else {
                    Ok(RawRouteOptions::Disabled)
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                RawLimit::deserialize(MapAccessDeserializer::new(map)).map(RawRouteOptions::Limit)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Err(string_found(&self))
            }
        }
        deserializer.deserialize_any(OptionsVisitor(PhantomData))
    }
}

/// The field path of a shape error as the operator reads it: `routes[2].rateLimiterOptions`,
/// or `configuration` for the document itself.
fn shape_error(error: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = error.path().to_string();
    let field = if path == "." {
        "configuration".to_string()
    } else {
        path
    };
    let error = error.into_inner();
    if !error.is_data() {
        // The syntax check passed, so only what it does not look at gets here: a number out
        // of f64 range where a boolean, a string, a list or an object belongs.
        return ConfigError::new(field, format!("not valid JSON ({error})"));
    }
    // serde_json appends " at line L column C" to a data error; the path says more.
    let text = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    let reason = text.strip_suffix(position.as_str()).unwrap_or(&text);
    ConfigError::new(field, redact_strings(reason))
}

fn not_valid_json(error: &serde_json::Error) -> ConfigError {
    // A syntax error keeps serde_json's position: it is the way to find the spot.
    ConfigError::new("configuration", format!("not valid JSON ({error})"))
}

/// A second guard behind the types above: serde writes an unexpected string as
/// `string "<text>"` with the text escaped as Rust's `{:?}` does (`\"`, `\\`, `\n`, ...).
/// Every such text is cut out, whatever it holds: `string "a\"b"` → `string`.
fn redact_strings(message: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(MARK) {
        out.push_str(rest.get(..at + "string".len()).unwrap_or_default());
        let quoted = rest.get(at + MARK.len()..).unwrap_or_default();
        let mut chars = quoted.char_indices();
        let mut end = quoted.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = quoted.get(end..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Step 2: meaning.

/// The bypass block (SPEC §5), validated.
#[derive(Clone, PartialEq, Eq)]
pub struct BypassConfig {
    pub cluster: String,
    pub authority: String,
    pub permission: String,
    pub roles: Vec<String>,
    pub me_path: String,
    pub permissions_path: String,
    /// Both present or both absent: a service account needs its id and its token.
    pub service_account: Option<(String, String)>,
    pub timeout_ms: u64,
    pub cache_ttl_ms: u64,
    pub refresh_interval_ms: u64,
    /// At most this many `me` lookups (cache misses) per client per minute (SPEC §11).
    pub lookups_per_client_per_minute: u32,
}

// Debug by hand: the derived one would print the service token.
impl fmt::Debug for BypassConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BypassConfig")
            .field("cluster", &self.cluster)
            .field("authority", &self.authority)
            .field("permission", &self.permission)
            .field("roles", &self.roles)
            .field("me_path", &self.me_path)
            .field("permissions_path", &self.permissions_path)
            .field(
                "service_account",
                &self
                    .service_account
                    .as_ref()
                    .map(|(id, _)| (id, "<redacted>")),
            )
            .field("timeout_ms", &self.timeout_ms)
            .field("cache_ttl_ms", &self.cache_ttl_ms)
            .field("refresh_interval_ms", &self.refresh_interval_ms)
            .field(
                "lookups_per_client_per_minute",
                &self.lookups_per_client_per_minute,
            )
            .finish()
    }
}

/// The compiled configuration: immutable once built.
#[derive(Debug)]
pub struct Config {
    /// `enabled && (!development || enabled_in_development)`.
    pub limiting: bool,
    pub dry_run: bool,
    pub retry_after: bool,
    pub max_tracked_clients: u32,
    pub routes: RouteTable,
    pub bypass: Option<BypassConfig>,
    /// SPEC §10: counts shared by every replica through a Rate Limit Service.
    pub global: Option<GlobalConfig>,
    /// SPEC §11 `https_only_login`: the paths that carry credentials, refused unless the
    /// request reached Envoy over TLS; `None` when off.
    pub https_only_login: Option<CredentialPaths>,
    /// SPEC §11 `ietf_headers`: `RateLimit-Policy` and `RateLimit` beside `x-ratelimit-*`.
    pub ietf_headers: bool,
    /// SPEC §11 `client_ipv4_prefix` / `client_ipv6_prefix`.
    pub client_prefixes: Prefixes,
}

/// The `global` block (SPEC §10), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalConfig {
    /// The Envoy cluster (HTTP/2) of the Rate Limit Service.
    pub cluster: String,
    pub domain: String,
    pub timeout_ms: u64,
    pub on_failure: OnFailure,
}

/// What happens to a request when the engine cannot answer it (SPEC §10 `on_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Counted by this replica's own exact counter (SPEC §4): worst case N × L.
    Local,
    /// Let through, uncounted.
    Allow,
}

/// Longest `global.timeout_ms`.
pub const MAX_GLOBAL_TIMEOUT_MS: u64 = 10_000;

fn compile_global(raw: RawGlobal<'_>) -> Result<GlobalConfig, ConfigError> {
    let cluster = match raw.cluster {
        Some(c) if !c.is_empty() => c,
        Some(_) => return Err(ConfigError::new("global.cluster", "must not be empty")),
        None => return Err(ConfigError::new("global.cluster", "is required")),
    };
    let domain = non_empty("global.domain", raw.domain, "rocketchat")?;
    let timeout_ms = match raw.timeout_ms {
        Some(n) => positive("global.timeout_ms", n, MAX_GLOBAL_TIMEOUT_MS, "10000")?,
        None => 100,
    };
    let on_failure = match raw.on_failure.as_deref() {
        None | Some("local") => OnFailure::Local,
        Some("allow") => OnFailure::Allow,
        Some(_) => {
            return Err(ConfigError::new(
                "global.on_failure",
                "must be \"local\" or \"allow\"",
            ))
        }
    };
    Ok(GlobalConfig {
        cluster,
        domain,
        timeout_ms,
        on_failure,
    })
}

impl Config {
    /// Number of shared-data keys that hold client counters (SPEC §6).
    pub fn counter_sets(&self) -> NonZeroU32 {
        NonZeroU32::new(self.max_tracked_clients / WAYS_PER_SET).unwrap_or(NonZeroU32::MIN)
    }
}

/// One preset row: path relative to `api_prefix`, method, and (limit, interval ms), `None` for
/// `rateLimiterOptions: false`.
pub type PresetRow = (&'static str, &'static str, Option<(u32, u64)>);

/// Rocket.Chat's built-in per-route limits (SPEC §1).
pub const ROCKETCHAT_PRESET: &[PresetRow] = &[
    ("users.register", "POST", Some((1, 60_000))),
    ("users.updateOwnBasicInfo", "POST", Some((1, 60_000))),
    ("users.sendConfirmationEmail", "POST", Some((1, 60_000))),
    ("users.setStatus", "POST", Some((5, 60_000))),
    ("loginCode.redeem", "POST", Some((10, 60_000))),
    ("chat.sendMessage", "POST", Some((5, 1_000))),
    ("chat.readThread", "POST", Some((20, 10_000))),
    ("chat.getThreadMessages", "GET", Some((20, 10_000))),
    ("chat.getThreadsList", "GET", Some((20, 10_000))),
    ("shield.svg", "GET", Some((60, 60_000))),
    ("push.test", "POST", Some((1, 1_000))),
    ("cloud.syncWorkspace", "POST", Some((2, 60_000))),
    ("cloud.removeLicense", "POST", Some((2, 60_000))),
    ("calendar-events.list", "GET", Some((3, 1_000))),
    ("calendar-events.info", "GET", Some((3, 1_000))),
    ("video-conference.start", "POST", Some((3, 60_000))),
    ("video-conference.join", "POST", Some((2, 5_000))),
    ("video-conference.cancel", "POST", Some((3, 60_000))),
    ("video-conference.info", "GET", Some((15, 3_000))),
    ("video-conference.list", "GET", Some((3, 1_000))),
    ("video-conference.providers", "GET", Some((3, 1_000))),
    ("video-conference.capabilities", "GET", Some((3, 1_000))),
    ("livechat/room", "GET", Some((5, 60_000))),
    ("livechat/visitor", "POST", Some((5, 60_000))),
    (
        "livechat/triggers/external-service/test",
        "POST",
        Some((15, 60_000)),
    ),
    (
        "livechat/triggers/:_id/external-service/call",
        "POST",
        Some((10, 60_000)),
    ),
    ("method.call/:method", "POST", None),
    ("method.callAnon/:method", "POST", None),
];

/// Parses and compiles a plugin configuration. Empty (or all-white-space) means `{}`.
pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return compile(RawConfig::default());
    }
    // Syntax first, over the whole document, so that a syntax error is reported as one
    // wherever it is, even after a shape mistake (serde reads in one pass and would stop at
    // the shape mistake). Skipping the values only checks their syntax: it is cheap.
    serde_json::from_slice::<de::IgnoredAny>(bytes).map_err(|e| not_valid_json(&e))?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ConfigError::new("configuration", "must be a JSON object"));
    }
    let mut document = serde_json::Deserializer::from_slice(bytes);
    let raw: RawConfig = serde_path_to_error::deserialize(&mut document).map_err(shape_error)?;
    compile(raw)
}

fn positive(field: &str, value: Number, max: u64, max_text: &str) -> Result<u64, ConfigError> {
    let not_positive = || ConfigError::new(field, "must be a positive integer");
    let too_big = || ConfigError::new(field, format!("must be at most {max_text}"));
    // A sign, a fraction or an exponent is not a positive integer; digits that overflow u64
    // are still a (huge) one.
    if value.0.is_empty() || !value.0.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_positive());
    }
    match value.0.parse::<u64>() {
        Ok(0) => Err(not_positive()),
        Ok(n) if n <= max => Ok(n),
        _ => Err(too_big()),
    }
}

fn compile_limit(field: &str, raw: &RawLimit<'_>, fallback: Limit) -> Result<Limit, ConfigError> {
    let requests = match raw.num_requests_allowed {
        Some(n) => positive(
            &format!("{field}.numRequestsAllowed"),
            n,
            MAX_REQUESTS,
            "2147483647",
        )? as u32,
        None => fallback.requests.get(),
    };
    let interval_ms = match raw.interval_time_in_ms {
        Some(n) => positive(
            &format!("{field}.intervalTimeInMS"),
            n,
            MAX_INTERVAL_MS,
            "86400000 (one day)",
        )?,
        None => fallback.interval_ms.get(),
    };
    // `positive` returned non-zero numbers.
    Limit::new(requests, interval_ms)
        .ok_or_else(|| ConfigError::new(field, "must be a positive integer"))
}

fn absolute_path(field: &str, value: &str) -> Result<(), ConfigError> {
    if !value.starts_with('/') {
        return Err(ConfigError::new(field, "must start with '/'"));
    }
    if value.contains(['?', '#']) || value.chars().any(|c| c.is_control() || c == ' ') {
        return Err(ConfigError::new(
            field,
            "must be a plain path (no query, fragment, spaces or control characters)",
        ));
    }
    Ok(())
}

fn compile(raw: RawConfig<'_>) -> Result<Config, ConfigError> {
    let enabled = flag(raw.enabled, true);
    let development = flag(raw.development, false);
    let enabled_in_development = flag(raw.enabled_in_development, true);

    let mut api_prefix = raw.api_prefix.unwrap_or_else(|| "/api/v1/".to_string());
    absolute_path("api_prefix", &api_prefix)?;
    if api_prefix.contains("//") || api_prefix.split('/').any(|s| s == "." || s == "..") {
        return Err(ConfigError::new(
            "api_prefix",
            "must not contain empty, '.' or '..' segments",
        ));
    }
    // "/api/v1" and "/api/v1/" mean the same prefix; without the slash "/api/v10" would match.
    if !api_prefix.ends_with('/') {
        api_prefix.push('/');
    }

    let default = match &raw.default {
        Some(Object(d)) => compile_limit("default", d, Limit::ROCKETCHAT_DEFAULT)?,
        None => Limit::ROCKETCHAT_DEFAULT,
    };

    let use_preset = match raw.preset.as_deref() {
        None | Some("rocketchat") => true,
        Some("none") => false,
        Some(_) => {
            return Err(ConfigError::new(
                "preset",
                "must be \"rocketchat\" or \"none\"",
            ))
        }
    };

    let mut table = RouteTableBuilder::new(&api_prefix, default);
    if use_preset {
        for (relative, method, options) in ROCKETCHAT_PRESET {
            let path = format!("{api_prefix}{relative}");
            // The preset's numbers are all non-zero (a test pins it).
            let limit =
                options.and_then(|(requests, interval_ms)| Limit::new(requests, interval_ms));
            table
                .add_preset(&path, Some(method), limit)
                .map_err(|reason| ConfigError::new("preset", reason))?;
        }
    }
    for (index, Object(route)) in raw
        .routes
        .map(|List(routes)| routes)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let field = format!("routes[{index}]");
        let path = route
            .path
            .ok_or_else(|| ConfigError::new(format!("{field}.path"), "is required"))?;
        absolute_path(&format!("{field}.path"), &path)?;
        if !path.starts_with(api_prefix.as_str()) {
            return Err(ConfigError::new(
                format!("{field}.path"),
                format!(
                    "must start with api_prefix \"{api_prefix}\" (only those paths are limited)"
                ),
            ));
        }
        if let Some(method) = route.method.as_deref() {
            if !METHODS.contains(&method) {
                return Err(ConfigError::new(
                    format!("{field}.method"),
                    "must be one of GET, POST, PUT, PATCH, DELETE (or absent for all methods)",
                ));
            }
        }
        let limit = match &route.rate_limiter_options {
            None => {
                return Err(ConfigError::new(
                    format!("{field}.rateLimiterOptions"),
                    "is required (an object, or false for never limited)",
                ))
            }
            Some(RawRouteOptions::Disabled) => None,
            Some(RawRouteOptions::Limit(l)) => Some(compile_limit(
                &format!("{field}.rateLimiterOptions"),
                l,
                default,
            )?),
        };
        table
            .add_route(&path, route.method.as_deref(), limit)
            .map_err(|reason| ConfigError::new(format!("{field}.path"), reason))?;
    }

    let max_tracked_clients = match raw.max_tracked_clients {
        Some(n) => {
            let n = positive(
                "max_tracked_clients",
                n,
                MAX_TRACKED_CLIENTS_LIMIT,
                "10000000",
            )?;
            if n < u64::from(WAYS_PER_SET) {
                return Err(ConfigError::new(
                    "max_tracked_clients",
                    format!("must be at least {WAYS_PER_SET}"),
                ));
            }
            n as u32
        }
        None => 100_000,
    };

    let bypass = match raw.bypass {
        Some(Object(b)) => Some(compile_bypass(b)?),
        None => None,
    };
    let global = match raw.global {
        Some(Object(g)) => Some(compile_global(g)?),
        None => None,
    };

    let prefix_len = |field: &str, value: Option<Number>, max: u64, default: u8| match value {
        Some(n) => positive(field, n, max, &max.to_string()).map(|n| n as u8),
        None => Ok(default),
    };
    let client_prefixes = Prefixes {
        v4: prefix_len("client_ipv4_prefix", raw.client_ipv4_prefix, 32, 32)?,
        v6: prefix_len("client_ipv6_prefix", raw.client_ipv6_prefix, 128, 64)?,
    };
    let https_only_login =
        flag(raw.https_only_login, false).then(|| CredentialPaths::new(&api_prefix));

    Ok(Config {
        limiting: enabled && (!development || enabled_in_development),
        dry_run: flag(raw.dry_run, false),
        retry_after: flag(raw.retry_after, true),
        // Rounded down to whole sets so the bound is never exceeded.
        max_tracked_clients: max_tracked_clients / WAYS_PER_SET * WAYS_PER_SET,
        routes: table.build(),
        bypass,
        global,
        https_only_login,
        ietf_headers: flag(raw.ietf_headers, false),
        client_prefixes,
    })
}

fn flag(value: Option<Flag>, default: bool) -> bool {
    value.map_or(default, |Flag(b)| b)
}

fn non_empty(field: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    match value {
        Some(v) if v.is_empty() => Err(ConfigError::new(field, "must not be empty")),
        Some(v) => Ok(v),
        None => Ok(default.to_string()),
    }
}

fn compile_bypass(raw: RawBypass<'_>) -> Result<BypassConfig, ConfigError> {
    let cluster = non_empty("bypass.cluster", raw.cluster, "rocketchat")?;
    let authority = non_empty("bypass.authority", raw.authority, "rocketchat")?;
    let permission = non_empty("bypass.permission", raw.permission, "api-bypass-rate-limit")?;
    let roles = raw
        .roles
        .map(|List(roles)| roles)
        .unwrap_or_else(|| vec!["admin".into(), "bot".into(), "app".into()]);
    for (i, role) in roles.iter().enumerate() {
        if role.is_empty() {
            return Err(ConfigError::new(
                format!("bypass.roles[{i}]"),
                "must not be empty",
            ));
        }
    }
    let me_path = non_empty("bypass.me_path", raw.me_path, "/api/v1/me")?;
    absolute_path("bypass.me_path", &me_path)?;
    let permissions_path = non_empty(
        "bypass.permissions_path",
        raw.permissions_path,
        "/api/v1/permissions.listAll",
    )?;
    absolute_path("bypass.permissions_path", &permissions_path)?;
    let service_account = match (raw.service_user_id, raw.service_auth_token) {
        (None, None) => None,
        (Some(id), Some(token)) => {
            if id.is_empty() {
                return Err(ConfigError::new(
                    "bypass.service_user_id",
                    "must not be empty",
                ));
            }
            if token.is_empty() {
                return Err(ConfigError::new(
                    "bypass.service_auth_token",
                    "must not be empty",
                ));
            }
            Some((id, token))
        }
        (Some(_), None) => {
            return Err(ConfigError::new(
                "bypass.service_auth_token",
                "is required when bypass.service_user_id is set",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "bypass.service_user_id",
                "is required when bypass.service_auth_token is set",
            ))
        }
    };
    let ms = |field: &str, value: Option<Number>, default: u64| match value {
        Some(n) => positive(field, n, MAX_INTERVAL_MS, "86400000 (one day)"),
        None => Ok(default),
    };
    Ok(BypassConfig {
        cluster,
        authority,
        permission,
        roles,
        me_path,
        permissions_path,
        service_account,
        timeout_ms: ms("bypass.timeout_ms", raw.timeout_ms, 200)?,
        cache_ttl_ms: ms("bypass.cache_ttl_ms", raw.cache_ttl_ms, 60_000)?,
        refresh_interval_ms: ms(
            "bypass.refresh_interval_ms",
            raw.refresh_interval_ms,
            60_000,
        )?,
        lookups_per_client_per_minute: match raw.lookups_per_client_per_minute {
            Some(n) => positive(
                "bypass.lookups_per_client_per_minute",
                n,
                MAX_REQUESTS,
                "2147483647",
            )? as u32,
            None => 20,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        parse(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn empty_and_defaults() {
        for text in ["", "  \n", "{}"] {
            let c = parse(text.as_bytes()).unwrap();
            assert!(c.limiting);
            assert!(!c.dry_run);
            assert!(c.retry_after);
            assert_eq!(c.max_tracked_clients, 100_000);
            assert!(c.bypass.is_none());
            assert!(c.https_only_login.is_none());
            assert!(!c.ietf_headers);
            assert_eq!(c.client_prefixes, Prefixes { v4: 32, v6: 64 });
        }
    }

    /// Every rejected configuration names its field; the texts are part of the contract
    /// (operators grep for them), so they are pinned here.
    #[test]
    fn mistakes_are_named_exactly() {
        let cases: &[(&str, &str)] = &[
            (r#"{"enabeld":true}"#, "enabeld: unknown field `enabeld`, expected one of `enabled`, `development`, `enabled_in_development`, `api_prefix`, `default`, `preset`, `routes`, `dry_run`, `retry_after`, `max_tracked_clients`, `bypass`, `global`, `https_only_login`, `ietf_headers`, `client_ipv4_prefix`, `client_ipv6_prefix`"),
            (r#"{"routes":[{"path":"/api/v1/x","methd":"GET","rateLimiterOptions":false}]}"#, "routes[0].methd: unknown field `methd`, expected one of `path`, `method`, `rateLimiterOptions`"),
            (r#"{"default":{"numRequestsAllowed":0}}"#, "default.numRequestsAllowed: must be a positive integer"),
            (r#"{"default":{"numRequestsAllowed":-3}}"#, "default.numRequestsAllowed: must be a positive integer"),
            (r#"{"default":{"numRequestsAllowed":1.5}}"#, "default.numRequestsAllowed: must be a positive integer"),
            (r#"{"default":{"intervalTimeInMS":86400001}}"#, "default.intervalTimeInMS: must be at most 86400000 (one day)"),
            (r#"{"default":{"numRequestsAllowed":2147483648}}"#, "default.numRequestsAllowed: must be at most 2147483647"),
            (r#"{"routes":[{"path":"/api/v1/a","rateLimiterOptions":false},{"path":"/api/v1/b","rateLimiterOptions":{"numRequestsAllowed":0}}]}"#, "routes[1].rateLimiterOptions.numRequestsAllowed: must be a positive integer"),
            (r#"{"routes":[{"path":"api/v1/x","rateLimiterOptions":false}]}"#, "routes[0].path: must start with '/'"),
            (r#"{"routes":[{"path":"/api/v1/x","rateLimiterOptions":false},{"path":"/api/v1/x","rateLimiterOptions":{}}]}"#, "routes[1].path: duplicate route: same path and method as routes[0]"),
            (r#"{"routes":[{"path":"/api/v1/x","method":"FETCH","rateLimiterOptions":false}]}"#, "routes[0].method: must be one of GET, POST, PUT, PATCH, DELETE (or absent for all methods)"),
            (r#"{"enabled":"yes"}"#, "enabled: invalid type: string, expected a boolean"),
            (r#"{"routes":{}}"#, "routes: invalid type: map, expected a sequence"),
            ("not json", "configuration: not valid JSON (expected ident at line 1 column 2)"),
            (r#"{"default":{"numRequestsAllowed":"10"}}"#, "default.numRequestsAllowed: invalid type: string, expected a JSON number"),
            (r#"{"routes":[{"path":"/api/v1/x","rateLimiterOptions":true}]}"#, "routes[0].rateLimiterOptions: invalid value: boolean `true`, expected an object or false"),
            (r#"{"max_tracked_clients":0}"#, "max_tracked_clients: must be a positive integer"),
            (r#"{"max_tracked_clients":7}"#, "max_tracked_clients: must be at least 8"),
            (r#"{"max_tracked_clients":10000001}"#, "max_tracked_clients: must be at most 10000000"),
            (r#"{"preset":"meteor"}"#, "preset: must be \"rocketchat\" or \"none\""),
            (r#"{"bypass":{"me_path":"me"}}"#, "bypass.me_path: must start with '/'"),
            (r#"{"bypass":{"permissions_path":"x"}}"#, "bypass.permissions_path: must start with '/'"),
            (r#"{"bypass":{"service_user_id":"x"}}"#, "bypass.service_auth_token: is required when bypass.service_user_id is set"),
            (r#"{"api_prefix":"api"}"#, "api_prefix: must start with '/'"),
            ("[]", "configuration: must be a JSON object"),
            (r#"{"enabled":true}x"#, "configuration: not valid JSON (trailing characters at line 1 column 17)"),
            (r#"{"enabled":true,"enabled":false}"#, "configuration: duplicate field `enabled`"),
            (r#"{"routes":[{"path":"/other/x","rateLimiterOptions":false}]}"#, "routes[0].path: must start with api_prefix \"/api/v1/\" (only those paths are limited)"),
            (r#"{"routes":[{"method":"GET","rateLimiterOptions":false}]}"#, "routes[0].path: is required"),
            (r#"{"routes":[{"path":"/api/v1/x"}]}"#, "routes[0].rateLimiterOptions: is required (an object, or false for never limited)"),
            (r#"{"routes":[{"path":"/api/v1/x/:","rateLimiterOptions":false}]}"#, "routes[0].path: a ':' segment needs a parameter name"),
            (r#"{"bypass":{"roles":["admin",""]}}"#, "bypass.roles[1]: must not be empty"),
            (r#"{"bypass":{"timeout_ms":0}}"#, "bypass.timeout_ms: must be a positive integer"),
            (r#"{"global":{}}"#, "global.cluster: is required"),
            (r#"{"global":{"cluster":""}}"#, "global.cluster: must not be empty"),
            (r#"{"global":{"cluster":"rls","domain":""}}"#, "global.domain: must not be empty"),
            (r#"{"global":{"cluster":"rls","timeout_ms":0}}"#, "global.timeout_ms: must be a positive integer"),
            (r#"{"global":{"cluster":"rls","timeout_ms":10001}}"#, "global.timeout_ms: must be at most 10000"),
            (r#"{"global":{"cluster":"rls","on_failure":"deny"}}"#, "global.on_failure: must be \"local\" or \"allow\""),
            (r#"{"global":{"cluster":"rls","cache":true}}"#, "global.cache: unknown field `cache`, expected one of `cluster`, `domain`, `timeout_ms`, `on_failure`"),
            (r#"{"dry_run":1}"#, "dry_run: invalid type: integer `1`, expected a boolean"),
            (r#"{"default":{"numRequestsAllowed":10,"x":1}}"#, "default.x: unknown field `x`, expected `numRequestsAllowed` or `intervalTimeInMS`"),
            (r#"{"bypass":{"tiemout_ms":1}}"#, "bypass.tiemout_ms: unknown field `tiemout_ms`, expected one of `cluster`, `authority`, `permission`, `roles`, `me_path`, `permissions_path`, `service_user_id`, `service_auth_token`, `timeout_ms`, `cache_ttl_ms`, `refresh_interval_ms`, `lookups_per_client_per_minute`"),
            ("[true]", "configuration: must be a JSON object"),
            (r#""{}""#, "configuration: must be a JSON object"),
            ("null", "configuration: must be a JSON object"),
            (r#"{"max_tracked_clients":99999999999999999999}"#, "max_tracked_clients: must be at most 10000000"),
            (r#"{"bypass":{"cache_ttl_ms":-0}}"#, "bypass.cache_ttl_ms: must be a positive integer"),
            (r#"{"bypass":{"lookups_per_client_per_minute":0}}"#, "bypass.lookups_per_client_per_minute: must be a positive integer"),
            (r#"{"bypass":{"lookups_per_client_per_minute":2147483648}}"#, "bypass.lookups_per_client_per_minute: must be at most 2147483647"),
            (r#"{"bypass":{"lookups_per_client_per_minute":"20"}}"#, "bypass.lookups_per_client_per_minute: invalid type: string, expected a JSON number"),
            (r#"{"client_ipv6_prefix":0}"#, "client_ipv6_prefix: must be a positive integer"),
            (r#"{"client_ipv6_prefix":129}"#, "client_ipv6_prefix: must be at most 128"),
            (r#"{"client_ipv6_prefix":64.5}"#, "client_ipv6_prefix: must be a positive integer"),
            (r#"{"client_ipv4_prefix":33}"#, "client_ipv4_prefix: must be at most 32"),
            (r#"{"client_ipv4_prefix":-24}"#, "client_ipv4_prefix: must be a positive integer"),
            (r#"{"client_ipv4_prefix":"24"}"#, "client_ipv4_prefix: invalid type: string, expected a JSON number"),
            (r#"{"https_only_login":"yes"}"#, "https_only_login: invalid type: string, expected a boolean"),
            (r#"{"ietf_headers":1}"#, "ietf_headers: invalid type: integer `1`, expected a boolean"),
        ];
        for (json, want) in cases {
            assert_eq!(&err(json), want, "for {json}");
        }
        let error: Box<dyn std::error::Error> = Box::new(parse(b"[]").unwrap_err());
        assert_eq!(error.to_string(), "configuration: must be a JSON object");
    }

    #[test]
    fn secrets_are_never_echoed() {
        let e = err(
            r#"{"bypass":{"service_user_id":"u","service_auth_token":"s3cr3t","timeout_ms":"s3cr3t"}}"#,
        );
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = err(r#"{"bypass":{"service_auth_token":"s3cr3t-x", "cluster": 5}}"#);
        assert!(!e.contains("s3cr3t"), "{e}");
        let c =
            parse(br#"{"bypass":{"service_user_id":"u","service_auth_token":"s3cr3t"}}"#).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));

        // A secret (with escaped quotes, a backslash, a newline and a non-ASCII letter) in
        // every place that does not take a string: each error says `string`, nothing more.
        let secret = r#""s3cr3t \" \\ \n é s3cr3t""#;
        let places = [
            ("", "enabled", "a boolean"),
            ("", "development", "a boolean"),
            ("", "enabled_in_development", "a boolean"),
            ("", "dry_run", "a boolean"),
            ("", "retry_after", "a boolean"),
            ("", "default", "an object"),
            ("", "routes", "a sequence"),
            ("", "max_tracked_clients", "a JSON number"),
            ("", "bypass", "an object"),
            ("default", "numRequestsAllowed", "a JSON number"),
            ("default", "intervalTimeInMS", "a JSON number"),
            ("bypass", "roles", "a sequence"),
            ("bypass", "timeout_ms", "a JSON number"),
            ("bypass", "cache_ttl_ms", "a JSON number"),
            ("bypass", "refresh_interval_ms", "a JSON number"),
            ("bypass", "lookups_per_client_per_minute", "a JSON number"),
            ("", "https_only_login", "a boolean"),
            ("", "ietf_headers", "a boolean"),
            ("", "client_ipv4_prefix", "a JSON number"),
            ("", "client_ipv6_prefix", "a JSON number"),
        ];
        for (parent, name, expected) in places {
            let (json, field) = if parent.is_empty() {
                (format!(r#"{{"{name}":{secret}}}"#), name.to_string())
            } else {
                (
                    format!(r#"{{"{parent}":{{"{name}":{secret}}}}}"#),
                    format!("{parent}.{name}"),
                )
            };
            assert_eq!(
                err(&json),
                format!("{field}: invalid type: string, expected {expected}")
            );
        }
        let in_lists = [
            (
                format!(r#"{{"routes":[{secret}]}}"#),
                "routes[0]: invalid type: string, expected an object",
            ),
            (
                format!(r#"{{"routes":[{{"path":"/api/v1/x","rateLimiterOptions":{secret}}}]}}"#),
                "routes[0].rateLimiterOptions: invalid type: string, expected an object or false",
            ),
            (
                format!(r#"{{"routes":[{{"path":"/api/v1/x","rateLimiterOptions":{{"numRequestsAllowed":{secret}}}}}]}}"#),
                "routes[0].rateLimiterOptions.numRequestsAllowed: invalid type: string, expected a JSON number",
            ),
        ];
        for (json, want) in in_lists {
            assert_eq!(err(&json), want);
        }
    }

    /// The guard behind the types: whatever serde would quote after `string` is cut out, its
    /// escaped quotes included.
    #[test]
    fn quoted_strings_are_cut_from_messages() {
        let cases = [
            (
                r#"invalid type: string "s3cr3t", expected a boolean"#,
                "invalid type: string, expected a boolean",
            ),
            (
                r#"invalid type: string "a\"b, expected x\\\" s3cr3t", expected a boolean"#,
                "invalid type: string, expected a boolean",
            ),
            (
                r#"invalid value: string "\\", expected one of string "x""#,
                "invalid value: string, expected one of string",
            ),
            (
                r#"invalid type: string "s3cr3t \"never closed"#,
                "invalid type: string",
            ),
            (
                "invalid type: map, expected a boolean",
                "invalid type: map, expected a boolean",
            ),
        ];
        for (message, want) in cases {
            assert_eq!(redact_strings(message), want, "for {message}");
        }
    }

    #[test]
    fn the_spec_example_parses() {
        let c = parse(
            br#"{
          "enabled": true, "development": false, "enabled_in_development": true,
          "api_prefix": "/api/v1/",
          "default": { "numRequestsAllowed": 10, "intervalTimeInMS": 60000 },
          "preset": "rocketchat",
          "routes": [
            { "path": "/api/v1/users.updateOwnBasicInfo", "method": "POST",
              "rateLimiterOptions": { "numRequestsAllowed": 1, "intervalTimeInMS": 60000 } },
            { "path": "/api/v1/method.call/:method", "method": "POST", "rateLimiterOptions": false }
          ],
          "dry_run": false, "retry_after": true, "max_tracked_clients": 100000,
          "bypass": {
            "cluster": "rocketchat", "authority": "rocketchat",
            "permission": "api-bypass-rate-limit", "roles": ["admin", "bot", "app"],
            "me_path": "/api/v1/me", "permissions_path": "/api/v1/permissions.listAll",
            "service_user_id": "...", "service_auth_token": "...",
            "timeout_ms": 200, "cache_ttl_ms": 60000, "refresh_interval_ms": 60000
          }
        }"#,
        )
        .unwrap();
        let b = c.bypass.unwrap();
        assert_eq!(b.roles, ["admin", "bot", "app"]);
        assert_eq!(b.timeout_ms, 200);
        assert_eq!(b.lookups_per_client_per_minute, 20);
    }

    /// SPEC §11: the edge protections, with their defaults and their limits.
    #[test]
    fn edge_protection_fields() {
        let c = parse(
            br#"{"https_only_login":true,"ietf_headers":true,"client_ipv4_prefix":24,
                "client_ipv6_prefix":56,"bypass":{"lookups_per_client_per_minute":5}}"#,
        )
        .unwrap();
        assert!(c.https_only_login.is_some());
        assert!(c.ietf_headers);
        assert_eq!(c.client_prefixes, Prefixes { v4: 24, v6: 56 });
        assert_eq!(c.bypass.unwrap().lookups_per_client_per_minute, 5);
        for (json, prefixes) in [
            (
                r#"{"client_ipv4_prefix":1,"client_ipv6_prefix":1}"#,
                Prefixes { v4: 1, v6: 1 },
            ),
            (
                r#"{"client_ipv4_prefix":32,"client_ipv6_prefix":128}"#,
                Prefixes { v4: 32, v6: 128 },
            ),
        ] {
            assert_eq!(parse(json.as_bytes()).unwrap().client_prefixes, prefixes);
        }
        assert!(parse(br#"{"https_only_login":false}"#)
            .unwrap()
            .https_only_login
            .is_none());
    }

    #[test]
    fn global_block_defaults() {
        assert_eq!(parse(b"{}").unwrap().global, None);
        let g = parse(br#"{"global":{"cluster":"ratelimit"}}"#)
            .unwrap()
            .global
            .unwrap();
        assert_eq!(
            g,
            GlobalConfig {
                cluster: "ratelimit".into(),
                domain: "rocketchat".into(),
                timeout_ms: 100,
                on_failure: OnFailure::Local
            }
        );
        let g = parse(
            br#"{"global":{"cluster":"r","domain":"d","timeout_ms":250,"on_failure":"allow"}}"#,
        )
        .unwrap()
        .global
        .unwrap();
        assert_eq!((g.timeout_ms, g.on_failure), (250, OnFailure::Allow));
    }

    #[test]
    fn preset_rows_are_valid_limits() {
        for (path, _, options) in ROCKETCHAT_PRESET {
            if let Some((requests, interval_ms)) = options {
                assert!(Limit::new(*requests, *interval_ms).is_some(), "{path}");
            }
        }
    }

    #[test]
    fn preset_none_drops_the_table_and_prefix_rebases_it() {
        let c = parse(br#"{"preset":"none"}"#).unwrap();
        assert!(matches!(
            c.routes.route(b"POST", b"/api/v1/method.call/x"),
            crate::route::Route::Limited { .. }
        ));
        let c = parse(br#"{"api_prefix":"/chat/api/v1"}"#).unwrap();
        assert_eq!(c.routes.prefix(), b"/chat/api/v1/");
        match c.routes.route(b"POST", b"/chat/api/v1/users.register") {
            crate::route::Route::Limited { limit, .. } => assert_eq!(limit.requests.get(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn development_mode_switch() {
        assert!(
            !parse(br#"{"development":true,"enabled_in_development":false}"#)
                .unwrap()
                .limiting
        );
        assert!(parse(br#"{"development":true}"#).unwrap().limiting);
        assert!(!parse(br#"{"enabled":false}"#).unwrap().limiting);
    }

    /// `null` is an absent field (as serde's `Option` read it), anywhere in the document.
    #[test]
    fn null_means_absent() {
        let c = parse(
            br#"{"enabled":null,"default":null,"routes":[{"path":"/api/v1/x","method":null,
                "rateLimiterOptions":{"numRequestsAllowed":null,"intervalTimeInMS":1000}}],
                "bypass":{"roles":null,"timeout_ms":null}}"#,
        )
        .unwrap();
        assert!(c.limiting);
        assert_eq!(c.bypass.unwrap().timeout_ms, 200);
        match c.routes.route(b"DELETE", b"/api/v1/x") {
            crate::route::Route::Limited { limit, .. } => {
                assert_eq!(limit, Limit::of(10, 1000))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err(r#"{"routes":[{"path":"/api/v1/x","rateLimiterOptions":null}]}"#),
            "routes[0].rateLimiterOptions: is required (an object, or false for never limited)"
        );
    }

    /// The first mistake in document order is the one reported, with serde's wording.
    #[test]
    fn nested_shape_errors_name_their_place() {
        let cases: &[(&str, &str)] = &[
            (r#"{"default":{"numRequestsAllowed":1,"numRequestsAllowed":2}}"#, "default: duplicate field `numRequestsAllowed`"),
            (r#"{"bypass":{"roles":["admin",7]}}"#, "bypass.roles[1]: invalid type: integer `7`, expected a string"),
            (r#"{"bypass":{"cluster":1.5e3}}"#, "bypass.cluster: invalid type: floating point `1500.0`, expected a string"),
            (r#"{"routes":[7]}"#, "routes[0]: invalid type: integer `7`, expected an object"),
            (r#"{"routes":[{"rateLimiterOptions":"x"}]}"#, "routes[0].rateLimiterOptions: invalid type: string, expected an object or false"),
            (r#"{"default":[]}"#, "default: invalid type: sequence, expected an object"),
            (r#"{"zzz":1,"enabled":"x"}"#, "zzz: unknown field `zzz`, expected one of `enabled`, `development`, `enabled_in_development`, `api_prefix`, `default`, `preset`, `routes`, `dry_run`, `retry_after`, `max_tracked_clients`, `bypass`, `global`, `https_only_login`, `ietf_headers`, `client_ipv4_prefix`, `client_ipv6_prefix`"),
            (r#"{"enabled":"x","zzz":1}"#, "enabled: invalid type: string, expected a boolean"),
            (r#"{"default":{"numRequestsAllowed":99999999999999999999999}}"#, "default.numRequestsAllowed: must be at most 2147483647"),
            (r#"{"default":{"numRequestsAllowed":1e3}}"#, "default.numRequestsAllowed: must be a positive integer"),
            ("{\n\"enabled\": tru }", "configuration: not valid JSON (expected ident at line 2 column 15)"),
            // A derived struct would read an array as its fields in order: not here.
            (r#"{"routes":[["/api/v1/x","GET",false]]}"#, "routes[0]: invalid type: sequence, expected an object"),
            (r#"{"routes":[{"path":"/api/v1/x","rateLimiterOptions":{"y":1}}]}"#, "routes[0].rateLimiterOptions.y: unknown field `y`, expected `numRequestsAllowed` or `intervalTimeInMS`"),
            (r#"{"routes":[{"path":"/api/v1/x","rateLimiterOptions":[]}]}"#, "routes[0].rateLimiterOptions: invalid type: sequence, expected an object or false"),
            (r#"{"max_tracked_clients":[1]}"#, "max_tracked_clients: invalid type: sequence, expected a JSON number"),
            (r#"{"max_tracked_clients":true}"#, "max_tracked_clients: invalid type: boolean `true`, expected a JSON number"),
            (r#"{"bypass":{"roles":["admin",null]}}"#, "bypass.roles[1]: invalid type: null, expected a string"),
            // Syntax is checked first, over the whole document: a syntax error after a shape
            // mistake is the one reported.
            (r#"{"enabled":"x", oops}"#, "configuration: not valid JSON (key must be a string at line 1 column 17)"),
            // The one number the syntax check lets through but serde_json cannot read: out of
            // f64 range. As a number field it is judged as written, elsewhere it is named.
            (r#"{"default":{"intervalTimeInMS":1e400}}"#, "default.intervalTimeInMS: must be a positive integer"),
            (r#"{"enabled":1e400}"#, "enabled: not valid JSON (number out of range at line 1 column 16)"),
            (r#"{"enabled":true,"enabled":"s3cr3t"}"#, "configuration: duplicate field `enabled`"),
        ];
        for (json, want) in cases {
            assert_eq!(&err(json), want, "for {json}");
        }
    }

    #[test]
    fn max_tracked_clients_rounds_down_to_whole_sets() {
        let c = parse(br#"{"max_tracked_clients":10007}"#).unwrap();
        assert_eq!(c.max_tracked_clients, 10_000);
        assert_eq!(c.counter_sets().get(), 1250);
    }
}
