//! Logging and tracing set-up, the same in every binary.
//!
//! - `TRAINMESH_LOG_FORMAT=json|text` (default text),
//! - `TRAINMESH_LOG_LEVEL` (an `EnvFilter` directive, default `info`),
//! - `TRAINMESH_LOG_FILE` (append to this file instead of stderr), rotated
//!   by size: `TRAINMESH_LOG_MAX_BYTES` (default 100 MiB) per file, and
//!   `TRAINMESH_LOG_KEEP` (default 5) rotated files kept ([`crate::log_file`]),
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` (export spans over OTLP/gRPC when set).
//!
//! JSON lines carry `timestamp`, `level`, `target`, `message`, the event's
//! fields and the fields of every enclosing span at the top level, so
//! `correlation_id`, `job_id`, `user` and `attempt` are on every line.

use std::sync::OnceLock;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::log_file::{RotatingFile, Rotation};

pub const LOG_FORMAT_ENV: &str = "TRAINMESH_LOG_FORMAT";
pub const LOG_LEVEL_ENV: &str = "TRAINMESH_LOG_LEVEL";
pub const LOG_FILE_ENV: &str = "TRAINMESH_LOG_FILE";
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Every variable [`init`] reads. They are not clap flags, so no binary's
/// `--help` lists them; deployment checks accept them for every binary.
pub const ENV_VARS: [&str; 6] = [
    LOG_FORMAT_ENV,
    LOG_LEVEL_ENV,
    LOG_FILE_ENV,
    crate::log_file::MAX_BYTES_ENV,
    crate::log_file::KEEP_ENV,
    OTLP_ENDPOINT_ENV,
];

static OTEL_ENABLED: OnceLock<bool> = OnceLock::new();

fn otel_enabled() -> bool {
    OTEL_ENABLED.get().copied().unwrap_or(false)
}

/// Keeps the log writer and the span exporter alive; flushes both on drop.
pub struct Telemetry {
    _writer_guard: Option<tracing_appender::non_blocking::WorkerGuard>,
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber for `service`. Safe to call more than once
/// in one process (tests): later calls leave the first subscriber in place.
pub fn init(service: &'static str) -> anyhow::Result<Telemetry> {
    let level = std::env::var(LOG_LEVEL_ENV).unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&level)
        .map_err(|e| anyhow::anyhow!("invalid {LOG_LEVEL_ENV} `{level}`: {e}"))?;
    let json = match std::env::var(LOG_FORMAT_ENV).as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => anyhow::bail!("invalid {LOG_FORMAT_ENV} `{other}`: expected json or text"),
    };

    let (writer, guard) = match std::env::var_os(LOG_FILE_ENV) {
        Some(path) => {
            let rotation = Rotation::from_env(|k| std::env::var(k).ok())?;
            let file = RotatingFile::open(&path, rotation)
                .map_err(|e| anyhow::anyhow!("cannot open {LOG_FILE_ENV} {path:?}: {e}"))?;
            tracing_appender::non_blocking(file)
        }
        None => tracing_appender::non_blocking(std::io::stderr()),
    };

    let fmt_layer = if json {
        tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine { service })
            .with_writer(writer)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(false)
            .boxed()
    };

    let mut provider = None;
    let otel_layer = match std::env::var(OTLP_ENDPOINT_ENV) {
        Ok(ep) if !ep.is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?;
            let p = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service)
                        .build(),
                )
                .build();
            let tracer = p.tracer(service);
            provider = Some(p);
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
        _ => None,
    };

    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .is_ok();
    if installed {
        let _ = OTEL_ENABLED.set(provider.is_some());
    }
    Ok(Telemetry {
        _writer_guard: Some(guard),
        provider,
    })
}

/// Makes `span` a child of the trace in `headers` (`traceparent`), when OTLP
/// export is on.
pub(crate) fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if !otel_enabled() {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtract(headers)));
    let _ = span.set_parent(parent);
}

/// Makes `span` a child of the W3C `traceparent` value, when OTLP export is on.
pub(crate) fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    if !otel_enabled() {
        return;
    }
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(parent);
}

/// The current span's `traceparent`, when OTLP export is on and a trace is
/// active.
pub(crate) fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    if !otel_enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// Writes the current span's trace context into `md`; false when there is
/// none (tracing off, or no active trace), so the caller can pass an
/// incoming `traceparent` through instead.
pub(crate) fn inject_current(md: &mut tonic::metadata::MetadataMap) -> bool {
    match current_traceparent() {
        Some(tp) => match tonic::metadata::AsciiMetadataValue::try_from(tp) {
            Ok(v) => {
                md.insert("traceparent", v);
                true
            }
            Err(_) => false,
        },
        None => false,
    }
}

struct HeaderExtract<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// One JSON object per line with span fields flattened to the top level.
struct JsonLine {
    service: &'static str,
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut map = serde_json::Map::new();
        map.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        map.insert("level".into(), meta.level().as_str().into());
        map.insert("target".into(), meta.target().into());
        map.insert("service".into(), self.service.into());
        let mut span_names = Vec::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                span_names.push(serde_json::Value::from(span.name()));
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if let Ok(serde_json::Value::Object(obj)) =
                        serde_json::from_str::<serde_json::Value>(fields.as_str())
                    {
                        map.extend(obj);
                    }
                }
            }
        }
        event.record(&mut JsonVisitor(&mut map));
        if !span_names.is_empty() {
            map.insert("spans".into(), span_names.into());
        }
        writeln!(writer, "{}", serde_json::Value::Object(map))
    }
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for JsonVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
