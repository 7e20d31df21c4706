//! Checks plugin configurations with the filter's own parser, before they reach Envoy.
//!
//! `cargo run --example check_config -- FILE...` — each FILE holds one plugin configuration
//! (the JSON of `configuration.value` / Istio's `pluginConfig`); `-` reads standard input.
//! Prints `FILE: ok` or `FILE: <field>: <reason>` and exits 1 if any is rejected.
//!
//! `cargo run --example check_config -- --engine-config FILE` — FILE is a plugin configuration
//! with a `global` block (SPEC §10); prints the envoyproxy/ratelimit configuration file its Rate
//! Limit Service needs (YAML: the domain, nothing else). A configuration that is rejected, or
//! that has no `global` block, gets one error line on standard error and exit status 1.

use std::io::Read;
use std::process::ExitCode;

use rocketchat_ratelimit_wasm::config;

const USAGE: &str = "usage: check_config FILE...               (- for standard input)\n       \
                     check_config --engine-config FILE";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
        Some("--engine-config") => match args.get(1..) {
            Some([path]) => engine_config(path),
            _ => {
                eprintln!("{USAGE}");
                ExitCode::from(2)
            }
        },
        Some(_) => validate(&args),
    }
}

fn read(path: &str) -> std::io::Result<Vec<u8>> {
    if path == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(path)
    }
}

/// `FILE: ok` or `FILE: <error>` for each file.
fn validate(paths: &[String]) -> ExitCode {
    let mut failed = false;
    for path in paths {
        let bytes = match read(path) {
            Ok(b) => b,
            Err(e) => {
                println!("{path}: cannot read: {e}");
                failed = true;
                continue;
            }
        };
        match config::parse(&bytes) {
            Ok(_) => println!("{path}: ok"),
            Err(e) => {
                println!("{path}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The Rate Limit Service configuration for `path`'s `global` block, on standard output.
fn engine_config(path: &str) -> ExitCode {
    let bytes = match read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{path}: cannot read: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parsed = match config::parse(&bytes) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(global) = parsed.global else {
        eprintln!(
            "{path}: no `global` block: without one the filter counts on each replica alone \
             and calls no Rate Limit Service, so there is no engine configuration to write \
             (add \"global\": {{\"cluster\": \"ratelimit\"}}, README \"Global mode\")"
        );
        return ExitCode::FAILURE;
    };
    print!("{}", ratelimit_yaml(&global.domain));
    ExitCode::SUCCESS
}

/// envoyproxy/ratelimit's configuration file for the filter's `global` mode.
///
/// Its loader (`src/config/config_impl.go`) needs a non-empty `domain`; `descriptors` may be
/// absent (a missing or empty list loads the same: no rules). `GetLimit` counts a request
/// descriptor that carries a `limit` override with that override, for any domain the
/// configuration names, before it looks at any rule; and every descriptor the filter sends
/// carries one. So the domain is the whole configuration.
fn ratelimit_yaml(domain: &str) -> String {
    format!(
        "# envoyproxy/ratelimit configuration for the rocketchat-ratelimit filter's `global` mode\n\
         # (written by `cargo run --example check_config -- --engine-config FILE`).\n\
         #\n\
         # Every descriptor the filter sends carries its own limit override (requests_per_unit and\n\
         # unit: the route's numRequestsAllowed, and the smallest unit that holds its window), and\n\
         # envoyproxy/ratelimit counts an override in any domain its configuration names, without\n\
         # looking at rules. So the engine needs only the domain: no `descriptors` (a missing or\n\
         # empty list loads the same). The descriptor entries are client, route, method and window\n\
         # (the start of the filter's window, epoch milliseconds): each window is its own key.\n\
         #\n\
         # Its place: RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/config/, e.g. /data/ratelimit/config/.\n\
         domain: {}\n",
        yaml_scalar(domain)
    )
}

/// `value` as a YAML scalar that every YAML 1.1 or 1.2 reader (envoyproxy/ratelimit uses
/// gopkg.in/yaml.v2) reads back as that exact string: plain when it cannot be taken for
/// anything else, else single-quoted, or double-quoted (JSON escapes) if it holds a control
/// character, which single quotes cannot carry.
fn yaml_scalar(value: &str) -> String {
    const WORDS: [&str; 11] = [
        "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "",
    ];
    let plain = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && !WORDS.contains(&value.to_ascii_lowercase().as_str());
    if plain {
        value.to_string()
    } else if value.chars().any(char::is_control) {
        serde_json::to_string(value).unwrap_or_default()
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_that_yaml_could_misread_are_quoted() {
        assert_eq!(yaml_scalar("rocketchat"), "rocketchat");
        assert_eq!(yaml_scalar("rocket.chat-prod_2"), "rocket.chat-prod_2");
        assert_eq!(yaml_scalar("yes"), "'yes'");
        assert_eq!(yaml_scalar("Null"), "'Null'");
        assert_eq!(yaml_scalar("1.5"), "'1.5'");
        assert_eq!(yaml_scalar("a b: c # d"), "'a b: c # d'");
        assert_eq!(yaml_scalar("it's"), "'it''s'");
        assert_eq!(yaml_scalar("a\nb"), "\"a\\nb\"");
    }
}
