//! The rate-limit store: Redis, holding one bucket per key of every Shared limit.
//!
//! Every agent draws from the same bucket with one atomic Lua script (GCRA on Redis's
//! own clock, so agents' clocks need not agree). To spare most requests the round trip,
//! an agent takes a small *lease* of tokens at a time and spends it locally
//! (`shared.rs`); the script grants what the bucket holds up to the lease asked for.
//! Each bucket key expires when its bucket would be full again, so idle keys cost
//! Redis nothing.
//!
//! One multiplexed connection (redis's `ConnectionManager`, which reconnects by itself)
//! carries every agent request; a health task pings it. The store is *unavailable* from
//! the first failed or late answer until a ping succeeds again; meanwhile each Shared
//! limit applies its `onStoreUnavailable` mode, without a round trip.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

/// How long one store request may take before the store counts as unavailable: requests
/// wait at most this for a limit's answer.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(250);

/// How often the health task checks the store (a ping, or a connection attempt).
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// The GCRA script. KEYS[1]: the bucket. ARGV: microseconds per token, burst, tokens
/// needed now, tokens wanted (the need plus a lease). Grants the want, or what the bucket
/// holds if that covers the need, or nothing; returns {granted, microseconds until the
/// need would fit, tokens left}.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local need = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local tolerance = math.max(burst, need) * interval
local free = math.floor((tolerance - (tat - now)) / interval)
if free < need then
  return {0, tat + need * interval - tolerance - now, math.max(free, 0)}
end
local granted = math.min(want, free)
tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {granted, 0, free - granted}
";

/// Where the store is and how to reach it.
#[derive(Clone, Serialize)]
pub struct StoreSettings {
    /// `redis://host:port/db` or `rediss://` for TLS; credentials in the URL are
    /// accepted but better given apart.
    #[serde(serialize_with = "redacted")]
    pub url: String,
    /// The ACL user, if any.
    pub username: Option<String>,
    /// The password (from a Secret); never logged or dumped.
    #[serde(skip)]
    pub password: Option<String>,
    /// Trust anchors (PEM) for `rediss://`; none: the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// The prefix of every key the agents write.
    pub key_prefix: String,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &redact(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl StoreSettings {
    /// Settings for the store at `url`, with the default key prefix.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
        }
    }
}

/// The default prefix of the store's keys.
pub const DEFAULT_KEY_PREFIX: &str = "bulwark:rl:";

fn redacted<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact(url))
}

/// `url` with any password in it replaced: what logs and `/config` may show.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:<redacted>@{host}")
        }
        None => url.to_owned(),
    }
}

/// The store cannot be set up, or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is not a Redis URL.
    #[error(
        "rate-limit store URL {url}: {source}; expected redis://HOST:PORT[/DB] or rediss:// for TLS"
    )]
    Url {
        /// The URL, redacted.
        url: String,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
    /// The CA file cannot be read.
    #[error("rate-limit store CA file {path}: {source}")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No connection (yet, or any more).
    #[error("rate-limit store is unavailable")]
    Unavailable,
    /// No answer within [`STORE_TIMEOUT`].
    #[error("rate-limit store did not answer within {STORE_TIMEOUT:?}")]
    Timeout,
    /// Redis answered with an error, or the connection broke.
    #[error("rate-limit store: {0}")]
    Redis(#[source] redis::RedisError),
}

/// What the script granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Tokens granted: the want, what the bucket held, or 0 when the need did not fit.
    pub granted: u32,
    /// With nothing granted: how long until the need fits.
    pub wait: Duration,
    /// Tokens left in the bucket.
    pub remaining: u32,
}

/// Counters of the store, for metrics.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Script calls (round trips on the request path).
    pub round_trips: AtomicU64,
    /// Calls and pings that failed or timed out.
    pub errors: AtomicU64,
}

/// A connection to the store, shared by every Shared limit of the agent.
pub struct Store {
    address: String,
    prefix: String,
    script: redis::Script,
    connection: watch::Sender<Option<ConnectionManager>>,
    available: AtomicBool,
    /// The last reason it became unavailable (for readiness detail).
    reason: ArcSwapOption<String>,
    counters: StoreCounters,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("address", &self.address)
            .field("available", &self.available())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store for `settings`, connecting in the background: it is unavailable until the
    /// first connection succeeds. The health task ends when `shutdown` is set.
    pub fn spawn(
        settings: &StoreSettings,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Store>, StoreError> {
        let address = redact(&settings.url);
        let client = client(settings, &address)?;
        let store = Arc::new(Store {
            address,
            prefix: settings.key_prefix.clone(),
            script: redis::Script::new(SCRIPT),
            connection: watch::Sender::new(None),
            available: AtomicBool::new(false),
            reason: ArcSwapOption::from_pointee("not connected yet".to_owned()),
            counters: StoreCounters::default(),
        });
        tokio::spawn(health(Arc::downgrade(&store), client, shutdown));
        Ok(store)
    }

    /// Whether requests may use the store now.
    pub fn available(&self) -> bool {
        self.available.load(Ordering::Acquire)
    }

    /// The store's address, without credentials.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Why the store is unavailable (`None` while it is available).
    pub fn unavailable_reason(&self) -> Option<String> {
        if self.available() {
            return None;
        }
        Some(
            self.reason
                .load_full()
                .map_or_else(|| "unknown".to_owned(), |r| r.to_string()),
        )
    }

    /// The store's counters.
    pub fn counters(&self) -> &StoreCounters {
        &self.counters
    }

    /// Draws from bucket `bucket`/`key`: `need` tokens now and up to `want` in all, for a
    /// bucket of one token per `interval` up to `burst`. A failure marks the store
    /// unavailable (logged once) before it is returned.
    pub async fn take(
        &self,
        bucket: &str,
        key: &[u8],
        interval: Duration,
        burst: u32,
        need: u32,
        want: u32,
    ) -> Result<Grant, StoreError> {
        let Some(mut connection) = self.connection.borrow().clone() else {
            return Err(StoreError::Unavailable);
        };
        let mut store_key = Vec::with_capacity(self.prefix.len() + bucket.len() + 1 + key.len());
        store_key.extend_from_slice(self.prefix.as_bytes());
        store_key.extend_from_slice(bucket.as_bytes());
        store_key.push(b':');
        store_key.extend_from_slice(key);
        let interval_us = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.counters.round_trips.fetch_add(1, Ordering::Relaxed);
        let call = async {
            self.script
                .key(store_key)
                .arg(interval_us)
                .arg(burst)
                .arg(need)
                .arg(want.max(need))
                .invoke_async::<(i64, i64, i64)>(&mut connection)
                .await
        };
        let result = match tokio::time::timeout(STORE_TIMEOUT, call).await {
            Ok(Ok((granted, wait_us, remaining))) => Ok(Grant {
                granted: u32::try_from(granted.max(0)).unwrap_or(u32::MAX),
                wait: Duration::from_micros(u64::try_from(wait_us.max(0)).unwrap_or(0)),
                remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
            }),
            Ok(Err(error)) => Err(StoreError::Redis(error)),
            Err(_) => Err(StoreError::Timeout),
        };
        if let Err(error) = &result {
            self.unavailable(error);
        }
        result
    }

    /// Marks the store unavailable because of `error`; logs the change once.
    fn unavailable(&self, error: &StoreError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        self.reason.store(Some(Arc::new(describe(error))));
        if self.available.swap(false, Ordering::AcqRel) {
            warn!(
                store = %self.address,
                error = %describe(error),
                "rate-limit store unavailable: Shared limits apply their onStoreUnavailable mode until it answers again"
            );
        }
    }

    /// Marks the store available; logs the change once.
    fn back(&self) {
        if !self.available.swap(true, Ordering::AcqRel) {
            self.reason.store(None);
            info!(store = %self.address, "rate-limit store available: Shared limits draw from it again");
        }
    }
}

/// An error as an operator reads it, with what to check.
fn describe(error: &StoreError) -> String {
    match error {
        StoreError::Redis(e) if is_auth(e) => format!(
            "{e}: the store refused the credentials; check the username and password in the rate-limit store Secret"
        ),
        StoreError::Redis(e) if e.is_connection_refusal() => {
            format!("{e}: nothing listens there; is Redis running and the address right?")
        }
        other => other.to_string(),
    }
}

fn is_auth(error: &redis::RedisError) -> bool {
    let text = error.to_string();
    text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("NOPERM")
        || error.kind() == redis::ErrorKind::AuthenticationFailed
}

fn client(settings: &StoreSettings, address: &str) -> Result<redis::Client, StoreError> {
    use redis::IntoConnectionInfo;
    let url_error = |source| StoreError::Url {
        url: address.to_owned(),
        source,
    };
    let mut info = settings
        .url
        .as_str()
        .into_connection_info()
        .map_err(url_error)?;
    let mut redis_settings = info.redis_settings().clone();
    if let Some(user) = &settings.username {
        redis_settings = redis_settings.set_username(user);
    }
    if let Some(password) = &settings.password {
        redis_settings = redis_settings.set_password(password);
    }
    info = info.set_redis_settings(redis_settings);
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    if !tls {
        return redis::Client::open(info).map_err(url_error);
    }
    // redis builds its rustls config from the process's default provider.
    let _ = bulwark_proto::tls::provider().install_default();
    let root_cert = match &settings.ca_file {
        None => None,
        Some(path) => Some(std::fs::read(path).map_err(|source| StoreError::CaFile {
            path: path.clone(),
            source,
        })?),
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: None,
            root_cert,
        },
    )
    .map_err(url_error)
}

/// Connects, then pings every [`HEALTH_INTERVAL`]: the store is available while pings
/// answer within [`STORE_TIMEOUT`].
async fn health(
    store: std::sync::Weak<Store>,
    client: redis::Client,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(STORE_TIMEOUT * 2))
        .set_response_timeout(Some(STORE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(HEALTH_INTERVAL);
    let mut connection: Option<ConnectionManager> = None;
    loop {
        let Some(store) = store.upgrade() else {
            return;
        };
        match &mut connection {
            None => {
                let connect = ConnectionManager::new_with_config(client.clone(), config.clone());
                match tokio::time::timeout(STORE_TIMEOUT * 4, connect).await {
                    Ok(Ok(manager)) => {
                        store.connection.send_replace(Some(manager.clone()));
                        connection = Some(manager);
                        store.back();
                    }
                    Ok(Err(error)) => store.unavailable(&StoreError::Redis(error)),
                    Err(_) => store.unavailable(&StoreError::Timeout),
                }
            }
            Some(manager) => {
                let command = redis::cmd("PING");
                let ping = command.query_async::<String>(manager);
                match tokio::time::timeout(STORE_TIMEOUT, ping).await {
                    Ok(Ok(_)) => store.back(),
                    Ok(Err(error)) => store.unavailable(&StoreError::Redis(error)),
                    Err(_) => store.unavailable(&StoreError::Timeout),
                }
            }
        }
        drop(store);
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("redis://:s3cret@redis:6379/0"),
            "redis://:<redacted>@redis:6379/0"
        );
        assert_eq!(
            redact("rediss://bulwark:s3cret@redis:6380"),
            "rediss://bulwark:<redacted>@redis:6380"
        );
        assert_eq!(redact("redis://redis:6379"), "redis://redis:6379");
        let mut settings = StoreSettings::new("redis://:s3cret@redis:6379");
        settings.password = Some("hunter2".into());
        let shown = format!("{settings:?} {}", serde_json::to_string(&settings).unwrap());
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn a_bad_url_is_a_clear_error() {
        let (_tx, rx) = watch::channel(false);
        let error = Store::spawn(&StoreSettings::new("http://redis:6379"), rx).unwrap_err();
        assert!(
            error.to_string().contains("expected redis://HOST:PORT"),
            "{error}"
        );
    }
}
