//! Checks plugin configurations with the filter's own parser, before they reach Envoy.
//!
//! `cargo run --example check_config -- FILE...` — each FILE holds one plugin configuration
//! (the JSON of `configuration.value` / Istio's `pluginConfig`); `-` reads standard input.
//! Prints `FILE: ok` or `FILE: <field>: <reason>` and exits 1 if any is rejected.

use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut failed = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: check_config FILE... (- for standard input)");
        return ExitCode::from(2);
    }
    for path in args {
        let bytes = if path == "-" {
            let mut buf = Vec::new();
            match std::io::stdin().read_to_end(&mut buf) {
                Ok(_) => buf,
                Err(e) => {
                    println!("{path}: cannot read: {e}");
                    failed = true;
                    continue;
                }
            }
        } else {
            match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    println!("{path}: cannot read: {e}");
                    failed = true;
                    continue;
                }
            }
        };
        match rocketchat_ratelimit_wasm::config::parse(&bytes) {
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
