//! Reading the writer's HTTP endpoint: `/metrics` parsed with a Prometheus
//! text parser (prometheus-parse), `/readyz` and `/healthz` status and body.

use std::time::Duration;

use prometheus_parse::{LineInfo, Scrape, Value};

/// `GET http://<addr><path>`: (status, content type, body); `Err` when
/// nothing answers.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let url = format!("http://{addr}{path}");
    let mut resp = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("{url}: body: {e}"))?;
    Ok((status, ct, body))
}

/// One parsed scrape of `/metrics`.
pub struct Metrics {
    pub scrape: Scrape,
    pub text: String,
}

impl Metrics {
    /// The value of the counter, gauge or untyped sample `name` whose labels
    /// are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.scrape.samples.iter().find_map(|s| {
            let same = s.metric == name
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                && s.labels.len() == labels.len();
            if !same {
                return None;
            }
            match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
                _ => None,
            }
        })
    }

    /// Like [`Metrics::value`], panicking with the exposition when missing.
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }
}

/// Scrapes `/metrics` at `addr`: status 200, the OpenMetrics content type,
/// every line either a comment or a sample the Prometheus text parser
/// reads, ending with `# EOF`.
pub fn scrape(addr: &str) -> Metrics {
    let (status, ct, text) = http_get(addr, "/metrics").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        ct, "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "content type"
    );
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end:\n{text}");
    for line in text.lines() {
        let info = LineInfo::parse(line);
        assert!(
            line.starts_with('#') || matches!(info, LineInfo::Sample { .. }),
            "not a sample nor a comment: {line:?}"
        );
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("parse: {e}\n{text}"));
    Metrics { scrape, text }
}

/// The per-queue delivery counters of one writer (`queue` label), 0 for a
/// counter not exposed yet (a labelled counter appears with its first
/// increment).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueCounters {
    pub received: u64,
    pub stored: u64,
    pub duplicate: u64,
    pub superseded: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub parked: u64,
    pub abandoned: u64,
    pub write_errors: u64,
    pub requeues: u64,
}

impl QueueCounters {
    /// Reads them from a scrape.
    pub fn of(m: &Metrics, queue: &str) -> QueueCounters {
        let get = |name: &str| {
            m.value(&format!("chat_writer_{name}"), &[("queue", queue)])
                .unwrap_or(0.0) as u64
        };
        QueueCounters {
            received: get("deliveries_received_total"),
            stored: get("deliveries_stored_total"),
            duplicate: get("deliveries_duplicate_total"),
            superseded: get("deliveries_superseded_total"),
            retried: get("deliveries_retried_total"),
            dead_lettered: get("deliveries_dead_lettered_total"),
            parked: get("deliveries_parked_total"),
            abandoned: get("deliveries_abandoned_total"),
            write_errors: get("mysql_write_errors_total"),
            requeues: get("mysql_requeues_total"),
        }
    }

    /// Scrapes `/metrics` at `addr` and reads them.
    pub fn scrape(addr: &str, queue: &str) -> QueueCounters {
        QueueCounters::of(&scrape(addr), queue)
    }

    /// `received = stored + retried + dead_lettered + parked + abandoned`
    /// (superseded and duplicate deliveries are inside `stored`).
    pub fn balanced(&self) -> bool {
        self.received
            == self.stored + self.retried + self.dead_lettered + self.parked + self.abandoned
    }
}

/// Waits until the `queue` counters of the writer at `addr` satisfy `ok` (every `poll`); returns them.
pub async fn wait_queue_counters(
    addr: &str,
    queue: &str,
    what: &str,
    timeout: Duration,
    poll: Duration,
    ok: impl Fn(&QueueCounters) -> bool,
) -> QueueCounters {
    let ok = &ok;
    super::wait_for(what, timeout, poll, move || async move {
        let c = QueueCounters::scrape(addr, queue);
        if ok(&c) {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await
}
