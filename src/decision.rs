//! The request-phase decision, free of proxy-wasm: from what the host tells about a request to
//! what the filter does with it. The adapter (`filter`) only fetches inputs and applies outputs.

use std::borrow::Cow;

use crate::client::{client_id, Prefixes};
use crate::config::Config;
use crate::fingerprint::{fingerprint, Seed};
use crate::limiter::{self, set_index, Limit, Set, Verdict};
use crate::metrics::Events;
use crate::route::{normalise_path, Route};
use crate::store::{self, SetKey, SharedStore, Step, Updated};

/// A request that is to be counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Countable {
    pub limit: Limit,
    pub fingerprint: u64,
    pub set: u32,
}

/// A limited request: what is counted, and what the Rate Limit Service is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified<'a> {
    pub countable: Countable,
    /// Envoy's `source.address` (see [`Classified::client`]).
    pub source_address: Vec<u8>,
    /// The configured client prefixes.
    pub prefixes: Prefixes,
    /// The route bucket: the normalised path, or the pattern of a pattern entry.
    pub bucket: &'a [u8],
}

impl Classified<'_> {
    /// The client (SPEC §4.1, §11): the client IP masked to its prefix, as the bucket's
    /// fingerprint saw it.
    pub fn client(&self) -> Cow<'_, [u8]> {
        client_id(&self.source_address, self.prefixes)
    }
}

/// What the filter has to do with a request's path (SPEC §3, §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest<'p> {
    /// The path's normal form.
    pub path: Cow<'p, [u8]>,
    /// Limiting is on and the path is under `api_prefix`: route it.
    pub limitable: bool,
    /// `https_only_login` is on and the path carries credentials: it must have come over TLS.
    pub credentials: bool,
}

/// The path's normal form and what to do with it, or `None` when there is nothing to do (the
/// bulk of a Rocket.Chat's traffic: assets, avatars, the realtime API), so that the adapter
/// reads nothing more of such a request.
pub fn interest<'p>(config: &Config, raw_path: &'p [u8]) -> Option<Interest<'p>> {
    if !config.limiting && config.https_only_login.is_none() {
        return None;
    }
    let path = normalise_path(raw_path);
    let limitable = config.limiting && path.starts_with(config.routes.prefix());
    let credentials = config
        .https_only_login
        .as_ref()
        .is_some_and(|paths| paths.matches(&path));
    (limitable || credentials).then_some(Interest {
        path,
        limitable,
        credentials,
    })
}

/// Routes a request and, when it is limited, computes its bucket's fingerprint and set.
pub fn classify(
    config: &Config,
    seed: Seed,
    method: &[u8],
    raw_path: &[u8],
    source_address: impl FnOnce() -> Option<Vec<u8>>,
) -> Option<Countable> {
    let path = limitable_path(config, raw_path)?;
    classify_limitable(config, seed, method, &path, source_address).map(|c| c.countable)
}

/// The part of routing that needs no method: the path's normal form if a request on it can be
/// limited at all (limiting on, path under `api_prefix`), else `None` (never limited). It lets
/// the adapter skip reading the method for the bulk of a Rocket.Chat's traffic (assets,
/// avatars, the realtime API), one host call less per such request.
pub fn limitable_path<'p>(config: &Config, raw_path: &'p [u8]) -> Option<Cow<'p, [u8]>> {
    if !config.limiting {
        return None;
    }
    let path = normalise_path(raw_path);
    path.starts_with(config.routes.prefix()).then_some(path)
}

/// [`classify`] for a path that [`limitable_path`] returned.
pub fn classify_limitable<'a>(
    config: &'a Config,
    seed: Seed,
    method: &[u8],
    path: &'a [u8],
    source_address: impl FnOnce() -> Option<Vec<u8>>,
) -> Option<Classified<'a>> {
    match config.routes.route(method, path) {
        Route::NotLimited => None,
        Route::Limited { limit, bucket } => {
            // Fetched only for limited requests. Absent (never seen from Envoy's HTTP
            // listeners) means every such request shares the empty client: limited, not free.
            let source = source_address().unwrap_or_default();
            let prefixes = config.client_prefixes;
            let fp = fingerprint(seed, &client_id(&source, prefixes), method, bucket);
            Some(Classified {
                countable: Countable {
                    limit,
                    fingerprint: fp,
                    set: set_index(fp, config.counter_sets()),
                },
                source_address: source,
                prefixes,
                bucket,
            })
        }
    }
}

/// Is the bucket already over its limit in this window? Its reset if so. One read, no
/// write: for requests a Rate Limit Service would otherwise be asked about (SPEC §10).
pub fn exhausted_until<S: SharedStore + ?Sized>(
    config: &Config,
    store: &S,
    key_buf: &mut SetKey,
    value_buf: &mut Vec<u8>,
    countable: &Countable,
    now_ms: u64,
) -> Option<u64> {
    let key = key_buf.of(config.counter_sets(), countable.set);
    store.get(key, value_buf).ok()??;
    let set = Set::decode(value_buf);
    match limiter::decide(&set, countable.fingerprint, countable.limit, now_ms).verdict {
        Verdict::Limited { reset_ms } => Some(reset_ms),
        Verdict::Allowed { .. } => None,
    }
}

/// Marks the bucket exhausted until its window's reset (the engine said OVER_LIMIT), so that
/// every worker of this replica answers its next requests without asking.
pub fn mark_exhausted<S: SharedStore + ?Sized>(
    config: &Config,
    store: &S,
    key_buf: &mut SetKey,
    value_buf: &mut Vec<u8>,
    countable: &Countable,
    now_ms: u64,
) -> Events {
    let key = key_buf.of(config.counter_sets(), countable.set);
    let Updated { result, retries } = store::update(store, key, value_buf, |bytes| {
        match limiter::exhaust(
            &Set::decode(bytes),
            countable.fingerprint,
            countable.limit,
            now_ms,
        ) {
            Some(next) => Step::Write(next.encode(), ()),
            None => Step::Keep(()),
        }
    });
    Events {
        cas_retries: retries,
        store_error: result.is_err(),
        ..Events::default()
    }
}

/// What the filter does with a counted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pass, and add these `x-ratelimit-*` values to the response.
    Pass { remaining: u32, reset_ms: u64 },
    /// Over the limit in dry-run mode: pass with remaining 0.
    DryRunLimited { reset_ms: u64 },
    /// Send the 429.
    Reject { reset_ms: u64 },
    /// The store failed: pass without headers (SPEC §7).
    FailOpen,
}

/// Counts the request in its counter set (one [`store::update`]) and says what to do.
pub fn count_request<S: SharedStore + ?Sized>(
    config: &Config,
    store: &S,
    key_buf: &mut SetKey,
    value_buf: &mut Vec<u8>,
    countable: &Countable,
    now_ms: u64,
) -> (Action, Events) {
    let key = key_buf.of(config.counter_sets(), countable.set);
    let Updated { result, retries } = store::update(store, key, value_buf, |bytes| {
        let decision = limiter::decide(
            &Set::decode(bytes),
            countable.fingerprint,
            countable.limit,
            now_ms,
        );
        match decision.write {
            Some(next) => Step::Write(next.encode(), decision),
            None => Step::Keep(decision),
        }
    });
    let mut events = Events {
        cas_retries: retries,
        ..Events::default()
    };
    let action = match result {
        Err(_) => {
            events.store_error = true;
            Action::FailOpen
        }
        Ok(d) => {
            events.collision = d.collision;
            events.new_slot = d.new_slot;
            match d.verdict {
                Verdict::Allowed {
                    remaining,
                    reset_ms,
                } => Action::Pass {
                    remaining,
                    reset_ms,
                },
                Verdict::Limited { reset_ms } if config.dry_run => {
                    Action::DryRunLimited { reset_ms }
                }
                Verdict::Limited { reset_ms } => Action::Reject { reset_ms },
            }
        }
    };
    (action, events)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::store::ensure_table;
    use crate::store::memory::MemoryStore;

    fn run(
        config: &Config,
        store: &MemoryStore,
        method: &str,
        path: &str,
        addr: &str,
        now: u64,
    ) -> Option<Action> {
        let c = classify(
            config,
            Seed(7, 9),
            method.as_bytes(),
            path.as_bytes(),
            || Some(addr.as_bytes().to_vec()),
        )?;
        Some(
            count_request(
                config,
                store,
                &mut SetKey::default(),
                &mut Vec::new(),
                &c,
                now,
            )
            .0,
        )
    }

    /// What the adapter decides before it reads the method: only paths under api_prefix (in
    /// their normal form) can be limited, and nothing can when limiting is off.
    #[test]
    fn limitable_paths_are_those_under_the_prefix() {
        let config = parse(b"").unwrap();
        for (raw, limitable) in [
            ("/api/v1/users.info", Some("/api/v1/users.info")),
            ("//api/v1//users.info?x=1", Some("/api/v1/users.info")),
            ("/assets/../api/v1/users.info", Some("/api/v1/users.info")),
            ("/%61pi/v1/users.info", Some("/api/v1/users.info")),
            ("/api/v1", None),
            ("/api/info", None),
            ("/sockjs/info", None),
            ("/api/v10/users.info", None),
            ("", None),
        ] {
            assert_eq!(
                limitable_path(&config, raw.as_bytes()).as_deref(),
                limitable.map(str::as_bytes),
                "{raw}"
            );
        }
        let off = parse(br#"{"enabled":false}"#).unwrap();
        assert_eq!(limitable_path(&off, b"/api/v1/users.info"), None);
        // The two steps agree with classify in one.
        let seed = Seed(7, 9);
        let address = || Some(b"10.0.0.1:5".to_vec());
        let path = limitable_path(&config, b"/api/v1//users.info").unwrap();
        assert_eq!(
            classify_limitable(&config, seed, b"GET", &path, address).map(|c| c.countable),
            classify(&config, seed, b"GET", b"/api/v1//users.info", address)
        );
    }

    #[test]
    fn defaults_ten_per_minute_per_client_route_method() {
        let config = parse(b"").unwrap();
        let store = MemoryStore::default();
        ensure_table(&store, config.counter_sets()).unwrap();
        let now = 1_700_000_000_000;
        for i in 0..10 {
            assert_eq!(
                run(
                    &config,
                    &store,
                    "GET",
                    "/api/v1/users.info",
                    "10.0.0.1:1",
                    now
                ),
                Some(Action::Pass {
                    remaining: 9 - i,
                    reset_ms: 1_700_000_040_000
                })
            );
        }
        assert_eq!(
            run(
                &config,
                &store,
                "GET",
                "/api/v1//users.info/?x",
                "10.0.0.1:2",
                now
            ),
            Some(Action::Reject {
                reset_ms: 1_700_000_040_000
            })
        );
        // Other client, other method, other route: own buckets.
        for (m, p, a) in [
            ("GET", "/api/v1/users.info", "10.0.0.2:1"),
            ("POST", "/api/v1/users.info", "10.0.0.1:1"),
            ("GET", "/api/v1/users.list", "10.0.0.1:1"),
        ] {
            assert!(matches!(
                run(&config, &store, m, p, a, now),
                Some(Action::Pass { remaining: 9, .. })
            ));
        }
        assert_eq!(
            run(&config, &store, "GET", "/api/info", "10.0.0.1:1", now),
            None
        );
        assert_eq!(
            run(
                &config,
                &store,
                "POST",
                "/api/v1/method.call/x",
                "10.0.0.1:1",
                now
            ),
            None
        );
    }

    #[test]
    fn dry_run_passes_what_would_be_rejected() {
        let config = parse(br#"{"dry_run":true,"default":{"numRequestsAllowed":1}}"#).unwrap();
        let store = MemoryStore::default();
        ensure_table(&store, config.counter_sets()).unwrap();
        run(&config, &store, "GET", "/api/v1/x", "1.1.1.1:1", 5);
        assert_eq!(
            run(&config, &store, "GET", "/api/v1/x", "1.1.1.1:1", 5),
            Some(Action::DryRunLimited { reset_ms: 60_000 })
        );
    }

    #[test]
    fn disabled_and_development_switches() {
        let store = MemoryStore::default();
        for (json, limited) in [
            (r#"{"enabled":false}"#, false),
            (r#"{"development":true}"#, true),
            (
                r#"{"development":true,"enabled_in_development":false}"#,
                false,
            ),
            (
                r#"{"development":false,"enabled_in_development":false}"#,
                true,
            ),
        ] {
            let config = parse(json.as_bytes()).unwrap();
            ensure_table(&store, config.counter_sets()).unwrap();
            assert_eq!(
                run(&config, &store, "GET", "/api/v1/x", "1.1.1.1:1", 5).is_some(),
                limited,
                "{json}"
            );
        }
    }

    #[test]
    fn pattern_values_share_one_bucket() {
        let config = parse(br#"{"routes":[{"path":"/api/v1/rooms/:id/x","rateLimiterOptions":{"numRequestsAllowed":2}}]}"#).unwrap();
        let store = MemoryStore::default();
        ensure_table(&store, config.counter_sets()).unwrap();
        run(&config, &store, "GET", "/api/v1/rooms/a/x", "1.1.1.1:1", 5);
        run(&config, &store, "GET", "/api/v1/rooms/b/x", "1.1.1.1:1", 5);
        assert!(matches!(
            run(&config, &store, "GET", "/api/v1/rooms/c/x", "1.1.1.1:1", 5),
            Some(Action::Reject { .. })
        ));
    }

    #[test]
    fn classified_requests_carry_the_client_ip_and_the_bucket() {
        let config = parse(
            br#"{"routes":[{"path":"/api/v1/rooms/:id/x","rateLimiterOptions":{"numRequestsAllowed":2}}]}"#,
        )
        .unwrap();
        let path = limitable_path(&config, b"/api/v1/rooms/a/x").unwrap();
        let c = classify_limitable(&config, Seed(1, 2), b"GET", &path, || {
            Some(b"[::ffff:10.1.2.3]:4567".to_vec())
        })
        .unwrap();
        assert_eq!(c.client().as_ref(), b"10.1.2.3");
        assert_eq!(c.bucket, b"/api/v1/rooms/:/x");
        let path = limitable_path(&config, b"/api/v1/users.info").unwrap();
        let c = classify_limitable(&config, Seed(1, 2), b"GET", &path, || {
            Some(b"10.9.9.9:1".to_vec())
        })
        .unwrap();
        assert_eq!(c.client().as_ref(), b"10.9.9.9");
        assert_eq!(c.bucket, b"/api/v1/users.info");
    }

    /// SPEC §11: every address of one IPv6 /64 is one client (one bucket, one count), and so is
    /// every address of an IPv4 prefix when one is configured; the engine hears the prefix.
    #[test]
    fn clients_are_their_prefix() {
        let store = MemoryStore::default();
        let config = parse(br#"{"default":{"numRequestsAllowed":3}}"#).unwrap();
        ensure_table(&store, config.counter_sets()).unwrap();
        let sprayer: Vec<String> = (1..=5)
            .map(|n| format!("[2001:db8:1:2:{n:x}:{n:x}::{n:x}]:0"))
            .collect();
        let got: Vec<_> = sprayer
            .iter()
            .map(|a| run(&config, &store, "GET", "/api/v1/x", a, 5).unwrap())
            .collect();
        assert!(
            matches!(got[2], Action::Pass { remaining: 0, .. }),
            "{got:?}"
        );
        assert!(matches!(got[3], Action::Reject { .. }), "{got:?}");
        // The next /64 and an IPv4 client: their own buckets.
        for other in ["[2001:db8:1:3::1]:0", "10.0.0.1:1", "10.0.0.2:1"] {
            assert!(matches!(
                run(&config, &store, "GET", "/api/v1/x", other, 5),
                Some(Action::Pass { remaining: 2, .. })
            ));
        }
        let path = limitable_path(&config, b"/api/v1/x").unwrap();
        let c = classify_limitable(&config, Seed(7, 9), b"GET", &path, || {
            Some(sprayer[0].as_bytes().to_vec())
        })
        .unwrap();
        assert_eq!(c.client().as_ref(), b"2001:db8:1:2::/64");

        let v4 = parse(br#"{"client_ipv4_prefix":24,"default":{"numRequestsAllowed":1}}"#).unwrap();
        ensure_table(&store, v4.counter_sets()).unwrap();
        assert!(matches!(
            run(&v4, &store, "GET", "/api/v1/y", "10.9.9.1:1", 5),
            Some(Action::Pass { .. })
        ));
        assert!(matches!(
            run(&v4, &store, "GET", "/api/v1/y", "10.9.9.200:1", 5),
            Some(Action::Reject { .. })
        ));
        assert!(matches!(
            run(&v4, &store, "GET", "/api/v1/y", "10.9.8.1:1", 5),
            Some(Action::Pass { .. })
        ));
    }

    #[test]
    fn interest_in_a_path() {
        let plain = parse(b"").unwrap();
        assert_eq!(interest(&plain, b"/assets/x.png"), None);
        let i = interest(&plain, b"/api/v1//login").unwrap();
        assert_eq!(
            (i.path.as_ref(), i.limitable, i.credentials),
            (&b"/api/v1/login"[..], true, false)
        );
        let https = parse(br#"{"https_only_login":true}"#).unwrap();
        let i = interest(&https, b"/api/v1/login/").unwrap();
        assert!(i.limitable && i.credentials);
        let i = interest(&https, b"/api/v1/users.info").unwrap();
        assert!(i.limitable && !i.credentials);
        let i = interest(&https, b"/api/experimental/login").unwrap();
        assert!(!i.limitable && i.credentials);
        // Limiting off: only the credential paths are looked at.
        let off = parse(br#"{"enabled":false,"https_only_login":true}"#).unwrap();
        assert_eq!(interest(&off, b"/api/v1/users.info"), None);
        let i = interest(&off, b"/api/v1/method.callAnon/login").unwrap();
        assert!(!i.limitable && i.credentials);
        assert_eq!(
            interest(&parse(br#"{"enabled":false}"#).unwrap(), b"/api/v1/login"),
            None
        );
    }

    #[test]
    fn an_exhausted_bucket_is_seen_by_the_next_reader() {
        let config = parse(br#"{"default":{"numRequestsAllowed":3}}"#).unwrap();
        let store = MemoryStore::default();
        ensure_table(&store, config.counter_sets()).unwrap();
        let c = classify(&config, Seed(7, 9), b"GET", b"/api/v1/x", || {
            Some(b"1.1.1.1:1".to_vec())
        })
        .unwrap();
        let (mut key, mut buf) = (SetKey::default(), Vec::new());
        assert_eq!(
            exhausted_until(&config, &store, &mut key, &mut buf, &c, 5),
            None
        );
        let events = mark_exhausted(&config, &store, &mut key, &mut buf, &c, 5);
        assert!(!events.store_error);
        assert_eq!(
            exhausted_until(&config, &store, &mut key, &mut buf, &c, 6),
            Some(60_000)
        );
        assert_eq!(
            count_request(&config, &store, &mut key, &mut buf, &c, 7).0,
            Action::Reject { reset_ms: 60_000 }
        );
        assert_eq!(
            exhausted_until(&config, &store, &mut key, &mut buf, &c, 60_000),
            None
        );
    }

    #[test]
    fn contention_is_retried_and_endless_contention_fails_open() {
        let config = parse(b"").unwrap();
        let store = MemoryStore::default();
        ensure_table(&store, config.counter_sets()).unwrap();
        let c = classify(&config, Seed(7, 9), b"GET", b"/api/v1/x", || {
            Some(b"1.1.1.1:1".to_vec())
        })
        .unwrap();
        let mut key = SetKey::default();
        *store.contend.borrow_mut() = 3;
        let (action, events) = count_request(&config, &store, &mut key, &mut Vec::new(), &c, 5);
        assert!(matches!(action, Action::Pass { remaining: 9, .. }));
        assert_eq!(events.cas_retries, 3);
        assert!(events.new_slot && !events.store_error);
        *store.contend.borrow_mut() = u32::MAX;
        let (action, events) = count_request(&config, &store, &mut key, &mut Vec::new(), &c, 5);
        assert_eq!(action, Action::FailOpen);
        assert!(events.store_error);
        assert_eq!(events.cas_retries, store::MAX_CAS_ATTEMPTS);
    }
}
