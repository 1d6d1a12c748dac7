//! `GET /metrics`: every export's counters in the Prometheus text exposition format (OpenMetrics
//! when the scraper asks for it), encoded by `prometheus-client` from the atomics the data path
//! records (see [`crate::activity::metrics`]). Nothing is computed per request here: a scrape
//! reads the counters as they are, on the control worker (with a series per rule, a large
//! policy makes megabytes of text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use nbdfault_policies::Op;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::{ApiError, ControlState};
use crate::activity::metrics::outcome_name;
use crate::export::Exports;
use crate::fault::log::FaultLog;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub(super) async fn metrics(State(state): State<ControlState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    // A series per rule: with a large policy, megabytes of text, rendered off the NBD threads.
    let (exports, log) = (Arc::clone(&state.exports), Arc::clone(&state.log));
    let text = state.worker.run(move |_| render(exports, log, openmetrics)).await?;
    let content_type =
        if openmetrics { OPENMETRICS } else { prometheus_client::encoding::prometheus_text::CONTENT_TYPE };
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], text).into_response())
}

/// The exposition of every export, in Prometheus text (0.0.4) or OpenMetrics.
pub fn render(exports: Arc<Exports>, log: Arc<FaultLog>, openmetrics: bool) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition { exports, log }));
    let mut text = String::new();
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut text, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
    };
    // Writing into a String cannot fail; a collector error would be a bug in this file.
    encoded.expect("the exposition encodes");
    text
}

/// Reads every export's counters when scraped.
struct Exposition {
    exports: Arc<Exports>,
    log: Arc<FaultLog>,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exposition")
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its samples, each with its labels.
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let exports: Vec<_> = self.exports.iter().collect();
        let counter = |value: u64| ConstCounter::new(value);
        let gauge = |value: u64| ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
        let per_export = |f: &dyn Fn(&crate::export::Export) -> u64| {
            exports.iter().map(move |export| (vec![("export", export.name.as_str())], f(export))).collect::<Vec<_>>()
        };

        let info =
            encoder.encode_descriptor("nbdfault_build", "The nbdfault version serving.", None, MetricType::Info)?;
        let mut info = info;
        info.encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;

        family(
            &mut encoder,
            "nbdfault_export_size_bytes",
            "Size of each export.",
            None,
            MetricType::Gauge,
            per_export(&|export| export.size()).into_iter().map(|(labels, value)| (labels, gauge(value))),
        )?;

        let snapshots: Vec<_> = exports
            .iter()
            .flat_map(|export| {
                Op::ALL.iter().map(move |&op| (export.name.as_str(), export.activity().metrics.snapshot(op)))
            })
            .collect();
        let per_op = |value: fn(&crate::activity::metrics::OpSnapshot) -> u64| {
            snapshots.iter().map(move |(export, snapshot)| {
                (vec![("export", *export), ("op", snapshot.op.name())], counter(value(snapshot)))
            })
        };
        family(
            &mut encoder,
            "nbdfault_requests",
            "Requests answered, per export and NBD command (what the client heard, injected faults included).",
            None,
            MetricType::Counter,
            per_op(|snapshot| snapshot.requests),
        )?;
        family(
            &mut encoder,
            "nbdfault_request_errors",
            "Requests answered with an error (or a dropped connection), per export and NBD command.",
            None,
            MetricType::Counter,
            per_op(|snapshot| snapshot.errors),
        )?;
        family(
            &mut encoder,
            "nbdfault_request_bytes",
            "Bytes of successful requests: read, written, trimmed or zeroed.",
            None,
            MetricType::Counter,
            per_op(|snapshot| snapshot.bytes),
        )?;
        let mut histogram = encoder.encode_descriptor(
            "nbdfault_request_duration",
            "Time from a request reaching the fault layer to its reply being ready (injected waits included).",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (export, snapshot) in &snapshots {
            histogram
                .encode_family(&vec![("export", *export), ("op", snapshot.op.name())])?
                .encode_histogram::<NoLabelSet>(
                    snapshot.latency_sum,
                    snapshot.latency_count,
                    &snapshot.buckets,
                    None,
                )?;
        }

        let in_flight: Vec<_> = exports.iter().map(|export| export.activity().metrics.in_flight()).collect();
        family(
            &mut encoder,
            "nbdfault_requests_in_flight",
            "Requests inside the device now (stalled and delayed ones included).",
            None,
            MetricType::Gauge,
            exports
                .iter()
                .zip(&in_flight)
                .map(|(export, (requests, _))| (vec![("export", export.name.as_str())], gauge(*requests))),
        )?;
        family(
            &mut encoder,
            "nbdfault_in_flight_bytes",
            "Bytes of reads and writes inside the device now.",
            None,
            MetricType::Gauge,
            exports
                .iter()
                .zip(&in_flight)
                .map(|(export, (_, bytes))| (vec![("export", export.name.as_str())], gauge(*bytes))),
        )?;
        family(
            &mut encoder,
            "nbdfault_connections_open",
            "NBD connections in transmission now.",
            None,
            MetricType::Gauge,
            per_export(&|export| export.activity().metrics.connections_open())
                .into_iter()
                .map(|(labels, value)| (labels, gauge(value))),
        )?;
        family(
            &mut encoder,
            "nbdfault_connections",
            "NBD connections that reached transmission since the start.",
            None,
            MetricType::Counter,
            per_export(&|export| export.counters.values().connections)
                .into_iter()
                .map(|(labels, value)| (labels, counter(value))),
        )?;

        let faults: Vec<_> =
            exports.iter().map(|export| (export.name.as_str(), export.activity().metrics.faults())).collect();
        family(
            &mut encoder,
            "nbdfault_faults",
            "Requests a rule (or a bad sector) touched, per export, rule and outcome: the fault log's records.",
            None,
            MetricType::Counter,
            faults.iter().flat_map(|(export, faults)| {
                faults.iter().map(move |(rule, outcome, count)| {
                    (vec![("export", *export), ("rule", &**rule), ("outcome", outcome_name(*outcome))], counter(*count))
                })
            }),
        )?;

        let rules: Vec<_> =
            exports.iter().map(|export| (export.name.as_str(), export.engine().rule_counters())).collect();
        family(
            &mut encoder,
            "nbdfault_rule_occurrences",
            "Requests that met a rule's conditions, for the installed policy (reset when it is replaced).",
            None,
            MetricType::Counter,
            rules.iter().flat_map(|(export, rules)| {
                rules
                    .iter()
                    .map(move |rule| (vec![("export", *export), ("rule", &*rule.rule)], counter(rule.occurrences)))
            }),
        )?;
        family(
            &mut encoder,
            "nbdfault_rule_fired",
            "Requests a rule decided, for the installed policy (reset when it is replaced).",
            None,
            MetricType::Counter,
            rules.iter().flat_map(|(export, rules)| {
                rules.iter().map(move |rule| (vec![("export", *export), ("rule", &*rule.rule)], counter(rule.fired)))
            }),
        )?;
        let triggers: Vec<_> =
            exports.iter().map(|export| (export.name.as_str(), export.engine().triggers())).collect();
        family(
            &mut encoder,
            "nbdfault_trigger_armed",
            "1 while a trigger is armed, 0 while it is not (every trigger a policy or the API named).",
            None,
            MetricType::Gauge,
            triggers.iter().flat_map(|(export, triggers)| {
                triggers.iter().map(move |trigger| {
                    (vec![("export", *export), ("trigger", &*trigger.name)], gauge(u64::from(trigger.armed)))
                })
            }),
        )?;
        family(
            &mut encoder,
            "nbdfault_unflushed_bytes",
            "Bytes of unflushed writes a power cut would undo now (tracked when the policy can cut power).",
            None,
            MetricType::Gauge,
            per_export(&|export| export.faults.unflushed_bytes())
                .into_iter()
                .map(|(labels, value)| (labels, gauge(value))),
        )?;
        family(
            &mut encoder,
            "nbdfault_power_cuts",
            "Power cuts of the export since the start, by a rule or through the control API (its power cycle).",
            None,
            MetricType::Counter,
            per_export(&|export| export.faults.power().cycle())
                .into_iter()
                .map(|(labels, value)| (labels, counter(value))),
        )?;
        family(
            &mut encoder,
            "nbdfault_power_off",
            "1 while the export is kept off after a power cut (clients refused at the handshake), 0 while it is on.",
            None,
            MetricType::Gauge,
            per_export(&|export| u64::from(export.faults.power().admits().is_none()))
                .into_iter()
                .map(|(labels, value)| (labels, gauge(value))),
        )?;
        family(
            &mut encoder,
            "nbdfault_event_subscribers",
            "Subscribers of the export's event stream now.",
            None,
            MetricType::Gauge,
            per_export(&|export| export.activity().events.subscribers() as u64)
                .into_iter()
                .map(|(labels, value)| (labels, gauge(value))),
        )?;
        family(
            &mut encoder,
            "nbdfault_event_subscribers_dropped",
            "Event stream subscribers dropped for reading too slowly.",
            None,
            MetricType::Counter,
            per_export(&|export| export.activity().events.dropped_total())
                .into_iter()
                .map(|(labels, value)| (labels, counter(value))),
        )?;
        let dropped = encoder.encode_descriptor(
            "nbdfault_fault_log_dropped",
            "Fault records that fell out of the server's memory (the --fault-log file keeps them).",
            None,
            MetricType::Counter,
        )?;
        counter(self.log.dropped()).encode(dropped)?;
        Ok(())
    }
}
