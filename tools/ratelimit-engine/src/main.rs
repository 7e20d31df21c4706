//! `ratelimit-engine --listen HOST:PORT --redis HOST:PORT --config FILE`: see README.md.

use std::process::ExitCode;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use ratelimit_engine::{args, config, log::Throttled, service::Engine, store::RedisStore};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", args::USAGE);
        return ExitCode::SUCCESS;
    }
    let args = match args::parse(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ratelimit-engine: {e}\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    let mut domains: Vec<String> = Vec::new();
    for path in &args.configs {
        match config::load(path) {
            Ok(c) => {
                if domains.contains(&c.domain) {
                    eprintln!(
                        "ratelimit-engine: {}: duplicate domain '{}' in config file",
                        path.display(),
                        c.domain
                    );
                    return ExitCode::from(2);
                }
                if c.has_descriptors {
                    eprintln!(
                        "ratelimit-engine: note: {}: `descriptors` are not read; only descriptors \
                         that carry a limit override in the request are counted",
                        path.display()
                    );
                }
                domains.push(c.domain);
            }
            Err(e) => {
                eprintln!("ratelimit-engine: {e}");
                return ExitCode::from(2);
            }
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ratelimit-engine: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args, domains)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ratelimit-engine: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: args::Args, domains: Vec<String>) -> Result<(), String> {
    let log = Arc::new(Throttled::new());
    let store = Arc::new(RedisStore::new(
        &args.redis,
        args.redis_timeout,
        log.clone(),
    )?);
    if let Err(e) = store.probe().await {
        // Not fatal: each call connects when there is no connection.
        log.error(&format!(
            "{e} (calls fail with UNAVAILABLE until it answers)"
        ));
    }
    let incoming = TcpIncoming::bind(args.listen)
        .map_err(|e| format!("--listen {}: {e}", args.listen))?
        .with_nodelay(Some(true));
    let bound = incoming
        .local_addr()
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    eprintln!(
        "ratelimit-engine listening on {bound} (domain {}, redis {})",
        domains.join(", "),
        args.redis
    );
    Server::builder()
        .serve_with_incoming(
            RateLimitServiceServer::new(Engine::new(domains, store)),
            incoming,
        )
        .await
        .map_err(|e| format!("gRPC server: {e}"))
}
