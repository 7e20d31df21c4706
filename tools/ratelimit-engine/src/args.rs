//! The command line, read by hand (a handful of `--flag value` pairs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const USAGE: &str =
    "usage: ratelimit-engine --listen HOST:PORT --redis HOST:PORT --config FILE \
[--config FILE ...] [--redis-timeout-ms N]

  --listen            address of the gRPC server (port 0: any free port; the ready line names it)
  --redis             Redis server, host:port
  --config            envoyproxy/ratelimit YAML configuration; only its `domain:` is read.
                      Repeat for several domains (one file = one domain).
  --redis-timeout-ms  budget of one call's Redis work, connect included (default 50)";

/// Default budget of one call's Redis work (connect + INCRBY/EXPIRE pipeline): small enough that
/// a caller with a 100 ms deadline sees an error from the engine, not its own timeout.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub listen: SocketAddr,
    pub redis: String,
    pub configs: Vec<PathBuf>,
    pub redis_timeout: Duration,
}

/// Parses the arguments after the program name. `Err` carries a message for stderr; the caller
/// adds the usage text.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Args, String> {
    let mut listen = None;
    let mut redis = None;
    let mut configs = Vec::new();
    let mut redis_timeout = DEFAULT_REDIS_TIMEOUT;
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                let addr = v
                    .parse::<SocketAddr>()
                    .map_err(|e| format!("--listen {v}: {e} (expected IP:PORT)"))?;
                listen = Some(addr);
            }
            "--redis" => {
                let v = value("--redis")?;
                if v.is_empty() || !v.contains(':') {
                    return Err(format!("--redis {v:?}: expected HOST:PORT"));
                }
                redis = Some(v);
            }
            "--config" => configs.push(PathBuf::from(value("--config")?)),
            "--redis-timeout-ms" => {
                let v = value("--redis-timeout-ms")?;
                let ms = v.parse::<u64>().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    format!("--redis-timeout-ms {v}: expected a positive integer")
                })?;
                redis_timeout = Duration::from_millis(ms);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        redis: redis.ok_or("--redis is required")?,
        configs: if configs.is_empty() {
            return Err("--config is required".into());
        } else {
            configs
        },
        redis_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Args, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn all_flags() {
        let a = parse_str(
            "--listen 127.0.0.1:0 --redis 127.0.0.1:6379 --config a.yaml --config b.yaml --redis-timeout-ms 200",
        )
        .unwrap();
        assert_eq!(a.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(a.redis, "127.0.0.1:6379");
        assert_eq!(
            a.configs,
            vec![PathBuf::from("a.yaml"), PathBuf::from("b.yaml")]
        );
        assert_eq!(a.redis_timeout, Duration::from_millis(200));
    }

    #[test]
    fn defaults_and_errors() {
        let a = parse_str("--config c --redis localhost:1 --listen [::1]:9").unwrap();
        assert_eq!(a.redis_timeout, DEFAULT_REDIS_TIMEOUT);
        assert!(parse_str("--listen 127.0.0.1:1 --redis h:1")
            .unwrap_err()
            .contains("--config"));
        assert!(parse_str("--listen 127.0.0.1:1 --config c")
            .unwrap_err()
            .contains("--redis"));
        assert!(parse_str("--redis h:1 --config c")
            .unwrap_err()
            .contains("--listen"));
        assert!(parse_str("--listen nohost --redis h:1 --config c").is_err());
        assert!(parse_str("--listen 127.0.0.1:1 --redis 6379 --config c").is_err());
        assert!(parse_str("--listen 127.0.0.1:1 --redis h:1 --config").is_err());
        assert!(
            parse_str("--listen 127.0.0.1:1 --redis h:1 --config c --redis-timeout-ms 0").is_err()
        );
        assert!(parse_str("--listen 127.0.0.1:1 --redis h:1 --config c --verbose").is_err());
    }
}
