//! `bulwark-upstream`: the test upstream as a process, for the demo and for
//! trying the agent by hand. Change its knobs while it runs with
//! `curl -X PUT http://ADDR/_upstream/knobs -d '{"fail_ratio": 1, "fail_status": 500}'`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bulwark_testkit::{Knobs, Upstream};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A test HTTP/1.1 + HTTP/2 (prior knowledge) server whose failures are set by knobs.
#[derive(Debug, Parser)]
#[command(name = "bulwark-upstream", version)]
struct Args {
    /// Address to listen on; repeat to serve several addresses with the same knobs.
    #[arg(
        long,
        required = true,
        env = "BULWARK_UPSTREAM_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<SocketAddr>,
    /// Name sent in the `x-upstream` header and the JSON body.
    #[arg(long, env = "BULWARK_UPSTREAM_NAME")]
    name: String,
    /// Share of requests (0 to 1) answered with --fail-status.
    #[arg(long, default_value_t = 0.0)]
    fail_ratio: f64,
    /// HTTP status of failed answers.
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Never answer: hold every request until the client goes away.
    #[arg(long)]
    hang: bool,
    /// Reset every connection without answering.
    #[arg(long)]
    reset: bool,
    /// Answer every gRPC request with this grpc-status in the trailers.
    #[arg(long)]
    grpc_status: Option<u32>,
    /// Seed of the failure draws (same seed and order of requests, same failures).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let knobs = Knobs {
        fail_ratio: args.fail_ratio,
        fail_status: args.fail_status,
        latency: Duration::from_millis(args.latency_ms),
        hang: args.hang,
        reset: args.reset,
        grpc_status: args.grpc_status,
        seed: args.seed,
    };
    knobs
        .validate()
        .context("invalid knobs on the command line")?;

    let mut upstreams = Vec::with_capacity(args.listen.len());
    for &addr in &args.listen {
        let upstream = Upstream::start(addr, &args.name, knobs.clone())
            .await
            .with_context(|| format!("starting test upstream {} on {addr}", args.name))?;
        tracing::info!(name = %args.name, addr = %upstream.addr(), ?knobs, "test upstream listening");
        upstreams.push(upstream);
    }

    shutdown_signal().await?;
    tracing::info!(name = %args.name, "test upstream stopping");
    for upstream in upstreams {
        upstream.shutdown().await;
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
