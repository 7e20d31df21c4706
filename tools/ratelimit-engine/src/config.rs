//! envoyproxy/ratelimit's YAML configuration, as far as this engine needs it: the `domain`.
//!
//! A file there is one YAML mapping with the top-level keys `domain` and `descriptors`. The
//! engine counts only descriptors that carry a limit override, which envoyproxy/ratelimit counts
//! whatever the file's `descriptors` say, so the descriptors are not read; a file that has them
//! gets a warning at start. Reading the one top-level `domain:` line by hand keeps a YAML crate
//! out; it accepts a plain, single-quoted or double-quoted scalar with an optional comment.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub domain: String,
    /// The file has a top-level `descriptors:` key (ignored by this engine).
    pub has_descriptors: bool,
}

pub fn load(path: &Path) -> Result<ConfigFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse(text: &str) -> Result<ConfigFile, String> {
    let mut domain: Option<String> = None;
    let mut has_descriptors = false;
    for (n, line) in text.lines().enumerate() {
        // Top-level keys only: an indented `domain:` belongs to something else.
        if let Some(rest) = line.strip_prefix("domain:") {
            if domain.is_some() {
                return Err(format!("line {}: a second top-level `domain:` key", n + 1));
            }
            domain = Some(scalar(rest).map_err(|e| format!("line {}: {e}", n + 1))?);
        } else if line.starts_with("descriptors:") {
            has_descriptors = true;
        }
    }
    match domain {
        None => {
            Err("no top-level `domain:` key (every ratelimit config file names its domain)".into())
        }
        Some(d) if d.is_empty() => Err("config file cannot have empty domain".into()),
        Some(domain) => Ok(ConfigFile {
            domain,
            has_descriptors,
        }),
    }
}

/// The value after `key:` on one line: `x`, `'x'` or `"x"`, then optionally ` # comment`.
fn scalar(rest: &str) -> Result<String, String> {
    let rest = rest.trim();
    for quote in ['"', '\''] {
        if let Some(inner) = rest.strip_prefix(quote) {
            let end = inner
                .find(quote)
                .ok_or_else(|| format!("unterminated {quote}-quoted domain"))?;
            let after = inner[end + 1..].trim();
            if !(after.is_empty() || after.starts_with('#')) {
                return Err(format!(
                    "unexpected text after the quoted domain: {after:?}"
                ));
            }
            let value = &inner[..end];
            if quote == '"' && value.contains('\\') {
                return Err("escape sequences in the domain are not supported".into());
            }
            return Ok(value.to_string());
        }
    }
    let value = match rest.find(" #") {
        Some(i) => &rest[..i],
        None if rest.starts_with('#') => "",
        None => rest,
    };
    let value = value.trim();
    if value.starts_with(['[', '{', '&', '*', '!', '|', '>']) {
        return Err(format!(
            "domain {value:?}: only a plain string is supported"
        ));
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_quoted_and_commented() {
        for text in [
            "domain: rocketchat\n",
            "domain: rocketchat   # the filter's default\n",
            "domain: \"rocketchat\"\n",
            "domain: 'rocketchat' # quoted\n",
            "---\n# a comment\ndomain:   rocketchat\r\n",
        ] {
            assert_eq!(parse(text).unwrap().domain, "rocketchat", "{text:?}");
        }
    }

    #[test]
    fn descriptors_are_noticed_not_read() {
        let c = parse(
            "domain: rc\ndescriptors:\n  - key: client\n    domain: not-this-one\n    rate_limit:\n      unit: minute\n      requests_per_unit: 5\n",
        )
        .unwrap();
        assert_eq!(
            c,
            ConfigFile {
                domain: "rc".into(),
                has_descriptors: true
            }
        );
        assert!(!parse("domain: rc\n").unwrap().has_descriptors);
    }

    #[test]
    fn missing_empty_or_odd_domains_are_errors() {
        assert!(parse("").unwrap_err().contains("no top-level `domain:`"));
        assert!(parse("descriptors: []\n  domain: indented\n").is_err());
        assert!(parse("domain:\n").unwrap_err().contains("empty domain"));
        assert!(parse("domain: ''\n").unwrap_err().contains("empty domain"));
        assert!(parse("domain: # nothing\n")
            .unwrap_err()
            .contains("empty domain"));
        assert!(parse("domain: a\ndomain: b\n")
            .unwrap_err()
            .contains("second"));
        assert!(parse("domain: \"a\n").is_err());
        assert!(parse("domain: [a]\n").is_err());
    }
}
