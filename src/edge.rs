//! HTTPS-only login (SPEC §11 `https_only_login`), free of proxy-wasm: which Rocket.Chat REST
//! paths carry a password or a login token, and whether a request reached Envoy over TLS.
//!
//! The paths come from Rocket.Chat's source (README "HTTPS-only login" lists them with the
//! field each one carries). A request on one of them that did not reach Envoy over TLS is
//! refused before it is forwarded, so the credential in it never reaches Rocket.Chat and no
//! login token is ever sent back in clear.
//!
//! "Over TLS" is Envoy's own view of the downstream connection: the `connection.tls_version`
//! property (TLS terminated by this Envoy), or `x-forwarded-proto: https` as Envoy's connection
//! manager leaves it. The connection manager overwrites a client's `x-forwarded-proto` with the
//! connection's real scheme unless the operator trusts the hops in front of Envoy
//! (`xff_num_trusted_hops` > 0, or `use_remote_address: false`), which is how a TLS-terminating
//! load balancer the operator trusts says "https". `:scheme` is never used: Envoy trusts it from
//! HTTP/2 clients, so a plain-text HTTP/2 client could claim `https`.

/// Routes under `api_prefix` whose request or answer carries a password, a password-reset
/// token or a login token (personal access tokens and 2FA secrets included).
pub const REST_ROUTES: &[&str] = &[
    "login",
    "users.register",
    "users.create",
    "users.update",
    "users.updateOwnBasicInfo",
    "users.deleteOwnAccount",
    "users.createToken",
    "users.generatePersonalAccessToken",
    "users.regeneratePersonalAccessToken",
    "loginCode.redeem",
];

/// Meteor methods with the same kind of secret in their parameters or result, reached through
/// `method.call/<name>` and `method.callAnon/<name>` (Rocket.Chat's clients name the method in
/// the path, `:` written as `%3A` by the web client).
pub const METEOR_METHODS: &[&str] = &[
    "login",
    "registerUser",
    "resetPassword",
    "setUserPassword",
    "changePassword",
    "saveUserProfile",
    "deleteUserOwnAccount",
    "insertOrUpdateUser",
    "verifyEmail",
    "getNewToken",
    "createToken",
    "personalAccessTokens:generateToken",
    "personalAccessTokens:regenerateToken",
    "2fa:enable",
    "2fa:validateTempToken",
    "2fa:regenerateCodes",
];

/// The absolute paths a configuration refuses over plain HTTP, in their normal form, compared
/// without regard to ASCII case (Rocket.Chat's Express router matched paths case-insensitively
/// before 7.x; a refused `/API/V1/LOGIN` costs nothing, a forwarded one would leak).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialPaths {
    paths: Vec<Vec<u8>>,
}

impl CredentialPaths {
    /// The paths under `api_prefix` (which ends with `/`), and the `login` of Rocket.Chat's
    /// `experimental` API beside it when the prefix is a `v1/` one.
    pub fn new(api_prefix: &str) -> CredentialPaths {
        let mut paths: Vec<Vec<u8>> = Vec::new();
        let mut add = |path: String| paths.push(path.into_bytes());
        for route in REST_ROUTES {
            add(format!("{api_prefix}{route}"));
        }
        for method in METEOR_METHODS {
            for endpoint in ["method.call", "method.callAnon"] {
                add(format!("{api_prefix}{endpoint}/{method}"));
                if method.contains(':') {
                    add(format!(
                        "{api_prefix}{endpoint}/{}",
                        method.replace(':', "%3A")
                    ));
                }
            }
        }
        if let Some(root) = api_prefix.strip_suffix("v1/") {
            add(format!("{root}experimental/login"));
        }
        // By length, so that a path is compared only with the few of its own length.
        paths.sort_by_key(Vec::len);
        CredentialPaths { paths }
    }

    /// Does a request with this method on this path (from `route::normalise_path`) carry
    /// credentials? Every method but OPTIONS: a CORS preflight carries none, and refusing it
    /// would turn the clear refusal of the real request into an opaque CORS failure.
    pub fn covers(&self, method: &[u8], normalised: &[u8]) -> bool {
        method != b"OPTIONS" && self.matches(normalised)
    }

    /// Is this path (in its normal form) one of the credential paths?
    pub fn matches(&self, normalised: &[u8]) -> bool {
        let len = normalised.len();
        let first = self.paths.partition_point(|p| p.len() < len);
        self.paths
            .get(first..)
            .unwrap_or_default()
            .iter()
            .take_while(|p| p.len() == len)
            .any(|p| p.eq_ignore_ascii_case(normalised))
    }

    pub fn paths(&self) -> impl Iterator<Item = &[u8]> {
        self.paths.iter().map(Vec::as_slice)
    }
}

/// Did the request reach Envoy over TLS? `forwarded_proto`: the `x-forwarded-proto` header as
/// Envoy's connection manager left it; `tls_version`: the `connection.tls_version` property,
/// asked only when the header does not already say `https` (absent on a plain connection).
pub fn over_tls(
    forwarded_proto: Option<&[u8]>,
    tls_version: impl FnOnce() -> Option<Vec<u8>>,
) -> bool {
    // Exactly one value; a list (`https, http`) is not something Envoy or a trusted load
    // balancer writes, so it proves nothing.
    let says_https = forwarded_proto.is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"https"));
    says_https || tls_version().is_some_and(|v| !v.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::route::normalise_path;

    fn covered(paths: &CredentialPaths, method: &str, raw: &str) -> bool {
        paths.covers(method.as_bytes(), &normalise_path(raw.as_bytes()))
    }

    #[test]
    fn login_registration_and_password_paths_are_covered_in_every_spelling() {
        let paths = CredentialPaths::new("/api/v1/");
        for (method, raw) in [
            ("POST", "/api/v1/login"),
            ("POST", "/api/v1//login/"),
            ("POST", "/api/v1/login?x=1"),
            ("POST", "/api/v1/./login"),
            ("POST", "/api/v1/x/../login"),
            ("POST", "/api/v1/%6Cogin"),
            ("POST", "/API/V1/LOGIN"),
            ("GET", "/api/v1/login"),
            ("POST", "/api/v1/users.register"),
            ("POST", "/api/v1/users.updateOwnBasicInfo"),
            ("POST", "/api/v1/users.update"),
            ("POST", "/api/v1/users.create"),
            ("POST", "/api/v1/users.deleteOwnAccount"),
            ("POST", "/api/v1/users.generatePersonalAccessToken"),
            ("POST", "/api/v1/loginCode.redeem"),
            ("POST", "/api/v1/method.call/login"),
            ("POST", "/api/v1/method.callAnon/login"),
            ("POST", "/api/v1/method.callAnon/registerUser"),
            ("POST", "/api/v1/method.callAnon/resetPassword"),
            ("POST", "/api/v1/method.call/setUserPassword"),
            (
                "POST",
                "/api/v1/method.call/personalAccessTokens:generateToken",
            ),
            (
                "POST",
                "/api/v1/method.call/personalAccessTokens%3AgenerateToken",
            ),
            (
                "POST",
                "/api/v1/method.call/personalAccessTokens%3agenerateToken",
            ),
            ("POST", "/api/v1/method.call/2fa%3Aenable"),
            ("POST", "/api/experimental/login"),
        ] {
            assert!(covered(&paths, method, raw), "{method} {raw}");
        }
        for (method, raw) in [
            ("OPTIONS", "/api/v1/login"),
            ("POST", "/api/v1/logout"),
            ("POST", "/api/v1/login/x"),
            ("POST", "/api/v1/loginx"),
            ("POST", "/api/v1/users.forgotPassword"),
            ("GET", "/api/v1/users.info"),
            ("POST", "/api/v1/method.call/sendMessage"),
            ("POST", "/api/v1/method.call/login/x"),
            ("POST", "/api/v2/login"),
            ("POST", "/login"),
            ("GET", "/api/info"),
        ] {
            assert!(!covered(&paths, method, raw), "{method} {raw}");
        }
    }

    #[test]
    fn paths_follow_the_api_prefix() {
        let paths = CredentialPaths::new("/chat/api/v1/");
        assert!(covered(&paths, "POST", "/chat/api/v1/login"));
        assert!(covered(&paths, "POST", "/chat/api/experimental/login"));
        assert!(!covered(&paths, "POST", "/api/v1/login"));
        let other = CredentialPaths::new("/rest/");
        assert!(covered(&other, "POST", "/rest/login"));
        assert!(other.paths().all(|p| p.starts_with(b"/rest/")));
    }

    #[test]
    fn tls_is_envoys_view() {
        let none = || None;
        let tls = || Some(b"TLSv1.3".to_vec());
        assert!(over_tls(Some(b"https"), none));
        assert!(over_tls(Some(b"HTTPS "), none));
        assert!(over_tls(None, tls));
        assert!(over_tls(Some(b"http"), tls));
        assert!(!over_tls(Some(b"http"), none));
        assert!(!over_tls(None, none));
        assert!(!over_tls(Some(b"https, http"), none));
        assert!(!over_tls(Some(b"http"), || Some(Vec::new())));
        // The property is asked only when the header does not settle it.
        assert!(over_tls(Some(b"https"), || panic!("asked")));
    }
}
