//! The bodies of the agent's fuzz targets, one function per target, called both by the
//! libFuzzer targets in `fuzz/` (with the `fuzzing` feature) and by the unit tests below,
//! which replay each target's committed corpus (`fuzz/corpus/<target>/`) in `make test`.
//! Each function panics when the agent misbehaves on its input: a panic of the agent's
//! own, a hang, or an answer that breaks a stated property. See `docs/fuzzing.md`.
//!
//! The targets that pair a request with config (`shard_key`, `route_match`) read their
//! input as an HTTP/1 request head, then after its blank line a protobuf message, so that
//! real request heads and real encoded config seed them and the fuzzer mutates both.

use std::cell::Cell;
use std::sync::{Arc, Once};

use arc_swap::ArcSwap;
use tokio::runtime::Runtime;

use crate::config::Config;
use crate::metrics::Metrics;

mod config;
mod http1;
mod protocol;
mod route;
mod shard;

pub use config::config_snapshot;
pub use http1::http1_head;
pub use protocol::protocol_detect;
pub use route::route_match;
pub use shard::shard_key;

/// Headers read from a target's request head (more are ignored with the head).
const MAX_HEADERS: usize = 64;

/// A new single-threaded runtime: the tasks of a harness run on the thread that feeds it
/// its input, so their panics are counted by [`PanicCount`].
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start a runtime: {e}"))
}

/// The agent's metrics over an empty config in force, as a new agent has.
fn metrics() -> (Arc<ArcSwap<Config>>, Metrics) {
    let config = Arc::new(ArcSwap::from_pointee(Config::default()));
    let metrics = Metrics::new(Arc::clone(&config));
    (config, metrics)
}

/// A protobuf duration of `ms` milliseconds.
fn duration(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: i32::try_from(ms % 1000).unwrap_or(0) * 1_000_000,
    }
}

/// Splits `data` into a request head (up to and with its blank line) and the rest. The
/// head comes back as the request's parts, or `None` when it does not parse; without a
/// blank line the whole input is the rest.
fn split_request(data: &[u8]) -> (Option<http::request::Parts>, &[u8]) {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (None, data);
    };
    let (head, rest) = data.split_at(end + 4);
    (parse_head(head), rest)
}

fn parse_head(head: &[u8]) -> Option<http::request::Parts> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let mut builder = http::Request::builder()
        .method(req.method?)
        .uri(req.path?)
        .version(match req.version {
            Some(0) => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        });
    for h in req.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    builder.body(()).ok().map(|r| r.into_parts().0)
}

thread_local! {
    static PANICS: Cell<u64> = const { Cell::new(0) };
}

/// The panics seen so far on this thread. tokio keeps a spawned task's panic in its join
/// handle, which the agent may never await; counting panics on the harness's thread (where
/// its single-threaded runtime runs every task) finds them anyway.
struct PanicCount(u64);

impl PanicCount {
    fn now() -> Self {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                PANICS.with(|n| n.set(n.get() + 1));
                previous(info);
            }));
        });
        Self(PANICS.with(Cell::get))
    }

    /// Panics when `who` panicked on this thread since [`PanicCount::now`].
    fn assert_none(&self, who: &str) {
        let seen = PANICS.with(Cell::get) - self.0;
        assert!(
            seen == 0,
            "{who} panicked {seen} time(s) in a task (the message is above)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bulwark_testkit::corpus::replay;

    fn corpus(target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target)
    }

    /// One test per target, replaying its corpus.
    macro_rules! replays {
        ($($test:ident: $target:ident),* $(,)?) => {$(
            #[test]
            fn $test() {
                replay(&corpus(stringify!($target)), super::$target);
            }
        )*};
    }

    replays! {
        protocol_detect_corpus_replays: protocol_detect,
        http1_head_corpus_replays: http1_head,
        shard_key_corpus_replays: shard_key,
        route_match_corpus_replays: route_match,
        config_snapshot_corpus_replays: config_snapshot,
    }
}
