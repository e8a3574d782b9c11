//! Logs and traces: `tracing` to stderr, and spans over OTLP with W3C
//! `traceparent` propagation when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    Init(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the OTLP pipeline alive; flushes spans when dropped.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

impl Telemetry {
    /// Whether spans are exported (and so `traceparent` is rewritten).
    pub fn propagation(&self) -> Propagation {
        Propagation {
            enabled: self.provider.is_some(),
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filter (default `info`), and an
/// OTLP exporter to `otlp_endpoint` when given (the binary passes
/// `OTEL_EXPORTER_OTLP_ENDPOINT`).
pub fn init(
    service: &'static str,
    format: LogFormat,
    otlp_endpoint: Option<String>,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal; a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (otel, provider) = match otlp_endpoint.filter(|e| !e.is_empty()) {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|source| TelemetryError::Exporter { endpoint, source })?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service)
                        .build(),
                )
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()?;
    Ok(Telemetry { provider })
}

/// W3C trace-context propagation for proxied requests.
#[derive(Clone, Copy, Debug, Default)]
pub struct Propagation {
    enabled: bool,
}

impl Propagation {
    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Continues the caller's trace in `span` and rewrites `traceparent` so the
    /// upstream's spans hang under the agent's. A no-op when spans are not exported
    /// (the caller's headers then pass through untouched).
    pub fn propagate(&self, span: &tracing::Span, headers: &mut http::HeaderMap) {
        if !self.enabled {
            return;
        }
        let propagator = TraceContextPropagator::new();
        let parent = propagator.extract(&HeaderExtractor(headers));
        // Fails only if the span is already started with another parent.
        let _ = span.set_parent(parent);
        propagator.inject_context(&span.context(), &mut HeaderInjector(headers));
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
