//! Error lines on stderr, at most one a second: a Redis outage under load must not flood the
//! test logs. The next line that gets out says how many were held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Throttled {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttled {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `message` to stderr unless a line was written less than a second ago.
    pub fn error(&self, message: &str) {
        if let Some(line) = self.line(message, Instant::now()) {
            eprintln!("{line}");
        }
    }

    /// The line to write at `now`, if any (separate for the tests).
    fn line(&self, message: &str, now: Instant) -> Option<String> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.last
            .is_some_and(|last| now.duration_since(last) < INTERVAL)
        {
            s.held_back += 1;
            return None;
        }
        s.last = Some(now);
        let held_back = std::mem::take(&mut s.held_back);
        Some(if held_back == 0 {
            format!("ratelimit-engine: error: {message}")
        } else {
            format!("ratelimit-engine: error: {message} ({held_back} more errors in the last second not shown)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second() {
        let t = Throttled::new();
        let t0 = Instant::now();
        assert!(t.line("a", t0).unwrap().ends_with("error: a"));
        assert!(t.line("b", t0 + Duration::from_millis(10)).is_none());
        assert!(t.line("c", t0 + Duration::from_millis(999)).is_none());
        let l = t.line("d", t0 + Duration::from_millis(1000)).unwrap();
        assert!(l.contains("error: d (2 more errors"), "{l}");
        assert!(t.line("e", t0 + Duration::from_millis(1500)).is_none());
    }
}
