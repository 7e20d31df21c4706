//! Plugin configuration (SPEC §2), parsed in two steps:
//! 1. the *shape* (JSON syntax, types, unknown or repeated fields), read with `json` in
//!    document order so the first mistake is reported with its exact field path;
//! 2. `compile` checks the *meaning* (positive numbers, paths, duplicates) and builds the
//!    immutable tables the request path uses.
//!
//! Every error is one line: `<field path>: <reason>`. The configuration text itself is never
//! part of an error, because it may hold `bypass.service_auth_token`.

use std::fmt;

use crate::json::{self, Value};
use std::num::NonZeroU32;

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

// ---------------------------------------------------------------------------------------------
// Step 1: shape.

/// A number as written in the configuration (its JSON text); step 2 judges its value.
type Number<'a> = &'a str;

#[derive(Debug, Default)]
struct RawConfig<'a> {
    enabled: Option<bool>,
    development: Option<bool>,
    enabled_in_development: Option<bool>,
    api_prefix: Option<String>,
    default: Option<RawLimit<'a>>,
    preset: Option<String>,
    routes: Option<Vec<RawRoute<'a>>>,
    dry_run: Option<bool>,
    retry_after: Option<bool>,
    max_tracked_clients: Option<Number<'a>>,
    bypass: Option<RawBypass<'a>>,
}

#[derive(Debug, Clone, Default)]
struct RawLimit<'a> {
    num_requests_allowed: Option<Number<'a>>,
    interval_time_in_ms: Option<Number<'a>>,
}

#[derive(Debug, Default)]
struct RawRoute<'a> {
    path: Option<String>,
    method: Option<String>,
    rate_limiter_options: Option<RawRouteOptions<'a>>,
}

/// `rateLimiterOptions`: an object, or `false` for "never limited" (as in Rocket.Chat).
#[derive(Debug)]
enum RawRouteOptions<'a> {
    Limit(RawLimit<'a>),
    Disabled,
}

#[derive(Debug, Default)]
struct RawBypass<'a> {
    cluster: Option<String>,
    authority: Option<String>,
    permission: Option<String>,
    roles: Option<Vec<String>>,
    me_path: Option<String>,
    permissions_path: Option<String>,
    service_user_id: Option<String>,
    service_auth_token: Option<String>,
    timeout_ms: Option<Number<'a>>,
    cache_ttl_ms: Option<Number<'a>>,
    refresh_interval_ms: Option<Number<'a>>,
}

const CONFIG_FIELDS: &[&str] = &[
    "enabled",
    "development",
    "enabled_in_development",
    "api_prefix",
    "default",
    "preset",
    "routes",
    "dry_run",
    "retry_after",
    "max_tracked_clients",
    "bypass",
];
const LIMIT_FIELDS: &[&str] = &["numRequestsAllowed", "intervalTimeInMS"];
const ROUTE_FIELDS: &[&str] = &["path", "method", "rateLimiterOptions"];
const BYPASS_FIELDS: &[&str] = &[
    "cluster",
    "authority",
    "permission",
    "roles",
    "me_path",
    "permissions_path",
    "service_user_id",
    "service_auth_token",
    "timeout_ms",
    "cache_ttl_ms",
    "refresh_interval_ms",
];

/// `parent.name`, or `name` at the top.
fn member_path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

fn invalid_type(path: &str, found: &Value, expected: &str) -> ConfigError {
    ConfigError::new(
        path,
        format!("invalid type: {}, expected {expected}", found.describe()),
    )
}

/// Visits the members of the object at `path` in document order, as serde with
/// `deny_unknown_fields` would: the first unknown or repeated member is the error.
fn read_object<'v, 'a>(
    path: &str,
    value: &'v Value<'a>,
    fields: &[&str],
    mut member: impl FnMut(&str, &'v Value<'a>, String) -> Result<(), ConfigError>,
) -> Result<(), ConfigError> {
    let Value::Object(members) = value else {
        return Err(invalid_type(path, value, "an object"));
    };
    let mut seen: Vec<&str> = Vec::with_capacity(members.len());
    for (name, item) in members {
        let field = member_path(path, name);
        if !fields.contains(&name.as_str()) {
            let expected: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
            return Err(ConfigError::new(
                field,
                format!(
                    "unknown field `{name}`, expected one of {}",
                    expected.join(", ")
                ),
            ));
        }
        if seen.contains(&name.as_str()) {
            let parent = if path.is_empty() {
                "configuration"
            } else {
                path
            };
            return Err(ConfigError::new(
                parent,
                format!("duplicate field `{name}`"),
            ));
        }
        seen.push(name);
        member(name, item, field)?;
    }
    Ok(())
}

// `null` reads as absent, as it did for serde's `Option` fields.

fn read_bool(path: &str, value: &Value) -> Result<Option<bool>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        other => Err(invalid_type(path, other, "a boolean")),
    }
}

fn read_string(path: &str, value: &Value) -> Result<Option<String>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        other => Err(invalid_type(path, other, "a string")),
    }
}

fn read_number<'a>(path: &str, value: &Value<'a>) -> Result<Option<Number<'a>>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::Number(text) => Ok(Some(text)),
        other => Err(invalid_type(path, other, "a JSON number")),
    }
}

fn read_array<'v, 'a>(
    path: &str,
    value: &'v Value<'a>,
) -> Result<Option<&'v [Value<'a>]>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::Array(items) => Ok(Some(items)),
        other => Err(invalid_type(path, other, "a sequence")),
    }
}

fn read_limit<'a>(path: &str, value: &Value<'a>) -> Result<RawLimit<'a>, ConfigError> {
    let mut limit = RawLimit::default();
    read_object(path, value, LIMIT_FIELDS, |name, item, field| {
        let number = read_number(&field, item)?;
        if name == "numRequestsAllowed" {
            limit.num_requests_allowed = number;
        } else {
            limit.interval_time_in_ms = number;
        }
        Ok(())
    })?;
    Ok(limit)
}

fn read_route<'a>(path: &str, value: &Value<'a>) -> Result<RawRoute<'a>, ConfigError> {
    let mut route = RawRoute::default();
    read_object(path, value, ROUTE_FIELDS, |name, item, field| {
        match name {
            "path" => route.path = read_string(&field, item)?,
            "method" => route.method = read_string(&field, item)?,
            _ => {
                route.rate_limiter_options = match item {
                    Value::Null => None,
                    Value::Bool(false) => Some(RawRouteOptions::Disabled),
                    Value::Bool(true) => {
                        return Err(ConfigError::new(
                            field,
                            "invalid value: boolean `true`, expected an object or false",
                        ))
                    }
                    Value::Object(_) => Some(RawRouteOptions::Limit(read_limit(&field, item)?)),
                    other => return Err(invalid_type(&field, other, "an object or false")),
                }
            }
        }
        Ok(())
    })?;
    Ok(route)
}

fn read_bypass<'a>(path: &str, value: &Value<'a>) -> Result<RawBypass<'a>, ConfigError> {
    let mut bypass = RawBypass::default();
    read_object(path, value, BYPASS_FIELDS, |name, item, field| {
        match name {
            "cluster" => bypass.cluster = read_string(&field, item)?,
            "authority" => bypass.authority = read_string(&field, item)?,
            "permission" => bypass.permission = read_string(&field, item)?,
            "roles" => {
                bypass.roles = match read_array(&field, item)? {
                    None => None,
                    Some(items) => Some(
                        items
                            .iter()
                            .enumerate()
                            .map(|(i, role)| match role {
                                Value::String(s) => Ok(s.clone()),
                                other => {
                                    Err(invalid_type(&format!("{field}[{i}]"), other, "a string"))
                                }
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                }
            }
            "me_path" => bypass.me_path = read_string(&field, item)?,
            "permissions_path" => bypass.permissions_path = read_string(&field, item)?,
            "service_user_id" => bypass.service_user_id = read_string(&field, item)?,
            "service_auth_token" => bypass.service_auth_token = read_string(&field, item)?,
            "timeout_ms" => bypass.timeout_ms = read_number(&field, item)?,
            "cache_ttl_ms" => bypass.cache_ttl_ms = read_number(&field, item)?,
            _ => bypass.refresh_interval_ms = read_number(&field, item)?,
        }
        Ok(())
    })?;
    Ok(bypass)
}

fn read_config<'a>(value: &Value<'a>) -> Result<RawConfig<'a>, ConfigError> {
    let mut raw = RawConfig::default();
    read_object("", value, CONFIG_FIELDS, |name, item, field| {
        match name {
            "enabled" => raw.enabled = read_bool(&field, item)?,
            "development" => raw.development = read_bool(&field, item)?,
            "enabled_in_development" => raw.enabled_in_development = read_bool(&field, item)?,
            "api_prefix" => raw.api_prefix = read_string(&field, item)?,
            "default" => {
                raw.default = match item {
                    Value::Null => None,
                    _ => Some(read_limit(&field, item)?),
                }
            }
            "preset" => raw.preset = read_string(&field, item)?,
            "routes" => {
                raw.routes = match read_array(&field, item)? {
                    None => None,
                    Some(items) => Some(
                        items
                            .iter()
                            .enumerate()
                            .map(|(i, route)| read_route(&format!("{field}[{i}]"), route))
                            .collect::<Result<_, _>>()?,
                    ),
                }
            }
            "dry_run" => raw.dry_run = read_bool(&field, item)?,
            "retry_after" => raw.retry_after = read_bool(&field, item)?,
            "max_tracked_clients" => raw.max_tracked_clients = read_number(&field, item)?,
            _ => {
                raw.bypass = match item {
                    Value::Null => None,
                    _ => Some(read_bypass(&field, item)?),
                }
            }
        }
        Ok(())
    })?;
    Ok(raw)
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
    let document = json::parse(bytes)
        .map_err(|e| ConfigError::new("configuration", format!("not valid JSON ({e})")))?;
    if !matches!(document, Value::Object(_)) {
        return Err(ConfigError::new("configuration", "must be a JSON object"));
    }
    compile(read_config(&document)?)
}

fn positive(field: &str, value: Number, max: u64, max_text: &str) -> Result<u64, ConfigError> {
    let not_positive = || ConfigError::new(field, "must be a positive integer");
    let too_big = || ConfigError::new(field, format!("must be at most {max_text}"));
    match Value::Number(value).as_u64() {
        Some(0) => Err(not_positive()),
        Some(n) if n <= max => Ok(n),
        Some(_) => Err(too_big()),
        // Digits that overflow u64 are still a (huge) positive integer; a sign, a fraction or
        // an exponent is not one.
        None if value.bytes().all(|b| b.is_ascii_digit()) => Err(too_big()),
        None => Err(not_positive()),
    }
}

fn compile_limit(field: &str, raw: &RawLimit<'_>, fallback: Limit) -> Result<Limit, ConfigError> {
    let requests = match &raw.num_requests_allowed {
        Some(n) => positive(
            &format!("{field}.numRequestsAllowed"),
            n,
            MAX_REQUESTS,
            "2147483647",
        )? as u32,
        None => fallback.requests.get(),
    };
    let interval_ms = match &raw.interval_time_in_ms {
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
    let enabled = raw.enabled.unwrap_or(true);
    let development = raw.development.unwrap_or(false);
    let enabled_in_development = raw.enabled_in_development.unwrap_or(true);

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
        Some(d) => compile_limit("default", d, Limit::ROCKETCHAT_DEFAULT)?,
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
    for (index, route) in raw.routes.unwrap_or_default().into_iter().enumerate() {
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

    let max_tracked_clients = match &raw.max_tracked_clients {
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
        Some(b) => Some(compile_bypass(b)?),
        None => None,
    };

    Ok(Config {
        limiting: enabled && (!development || enabled_in_development),
        dry_run: raw.dry_run.unwrap_or(false),
        retry_after: raw.retry_after.unwrap_or(true),
        // Rounded down to whole sets so the bound is never exceeded.
        max_tracked_clients: max_tracked_clients / WAYS_PER_SET * WAYS_PER_SET,
        routes: table.build(),
        bypass,
    })
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
        }
    }

    /// Every rejected configuration names its field; the texts are part of the contract
    /// (operators grep for them), so they are pinned here.
    #[test]
    fn mistakes_are_named_exactly() {
        let cases: &[(&str, &str)] = &[
            (r#"{"enabeld":true}"#, "enabeld: unknown field `enabeld`, expected one of `enabled`, `development`, `enabled_in_development`, `api_prefix`, `default`, `preset`, `routes`, `dry_run`, `retry_after`, `max_tracked_clients`, `bypass`"),
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
            (r#"{"dry_run":1}"#, "dry_run: invalid type: integer `1`, expected a boolean"),
        ];
        for (json, want) in cases {
            assert_eq!(&err(json), want, "for {json}");
        }
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

    /// The first mistake in document order is the one reported, as serde reported it.
    #[test]
    fn nested_shape_errors_name_their_place() {
        let cases: &[(&str, &str)] = &[
            (r#"{"default":{"numRequestsAllowed":1,"numRequestsAllowed":2}}"#, "default: duplicate field `numRequestsAllowed`"),
            (r#"{"bypass":{"roles":["admin",7]}}"#, "bypass.roles[1]: invalid type: integer `7`, expected a string"),
            (r#"{"bypass":{"cluster":1.5e3}}"#, "bypass.cluster: invalid type: floating point `1.5e3`, expected a string"),
            (r#"{"routes":[7]}"#, "routes[0]: invalid type: integer `7`, expected an object"),
            (r#"{"routes":[{"rateLimiterOptions":"x"}]}"#, "routes[0].rateLimiterOptions: invalid type: string, expected an object or false"),
            (r#"{"default":[]}"#, "default: invalid type: sequence, expected an object"),
            (r#"{"zzz":1,"enabled":"x"}"#, "zzz: unknown field `zzz`, expected one of `enabled`, `development`, `enabled_in_development`, `api_prefix`, `default`, `preset`, `routes`, `dry_run`, `retry_after`, `max_tracked_clients`, `bypass`"),
            (r#"{"enabled":"x","zzz":1}"#, "enabled: invalid type: string, expected a boolean"),
            (r#"{"default":{"numRequestsAllowed":99999999999999999999999}}"#, "default.numRequestsAllowed: must be at most 2147483647"),
            (r#"{"default":{"numRequestsAllowed":1e3}}"#, "default.numRequestsAllowed: must be a positive integer"),
            ("{\n\"enabled\": tru }", "configuration: not valid JSON (expected ident at line 2 column 15)"),
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
