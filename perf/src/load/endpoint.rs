//! `load endpoint`: what the HTTP endpoint (`HTTP_ADDR`) costs in
//! idle memory.
//!
//! One sandbox (database, vhost, index, Redis DB) for all runs. Per
//! repetition the writer is started twice on the empty queues, once with
//! `HTTP_ADDR` empty (endpoint off) and once on a free 127.0.0.1 port
//! (endpoint on); the order alternates between repetitions so a drift of
//! the machine does not favour one side. Each start: wait until it consumes
//! and its index exists, then 5 s during which the "on" writer is scraped
//! as Prometheus and a container runtime would (`/metrics`, `/readyz`,
//! `/healthz`, every 250 ms) and the "off" writer is left alone; then
//! VmRSS, VmHWM and threads from `/proc`, and SIGTERM.
//!
//! Reported: median idle RSS on vs off and their difference (the issue's
//! budget is 1 MiB), the size of a `/metrics` answer and the median and
//! maximum scrape time.

use crate::common::*;
use crate::writer::Writer;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long each idle writer runs (and is scraped) before its reading.
const IDLE: Duration = Duration::from_secs(5);
/// Scrape period of the "on" writer.
const SCRAPE_EVERY: Duration = Duration::from_millis(250);

/// One idle start; `addr` None means `HTTP_ADDR` empty.
async fn idle(s: &Settings, sb: &Sandbox, bin: &str, addr: Option<&str>, tag: &str) -> Res<Value> {
    let log = s.out.join(format!("writer-{}-endpoint-{tag}.log", sb.name));
    let extra = [(
        "HTTP_ADDR".to_string(),
        addr.unwrap_or_default().to_string(),
    )];
    let mut w = Writer::start_with(bin, sb, &log, &extra)?;
    w.wait_ready(sb, Duration::from_secs(30)).await?;
    let agent = http_agent();
    let t0 = Instant::now();
    let (mut scrapes_ms, mut metrics_bytes) = (Vec::new(), 0usize);
    while t0.elapsed() < IDLE {
        if let Some(a) = addr {
            for path in ["/metrics", "/readyz", "/healthz"] {
                let t = Instant::now();
                let (status, body) =
                    http_request(&agent, "GET", &format!("http://{a}{path}"), None).await?;
                if status != 200 {
                    return Err(format!("GET {path}: HTTP {status}: {body}"));
                }
                if path == "/metrics" {
                    scrapes_ms.push(t.elapsed().as_secs_f64() * 1e3);
                    metrics_bytes = body.len();
                }
            }
        }
        smol::Timer::after(SCRAPE_EVERY).await;
    }
    let snap = w.snap().ok_or("the writer vanished while idle")?;
    let exit = w.stop();
    scrapes_ms.sort_by(|a, b| a.total_cmp(b));
    Ok(json!({
        "endpoint": addr.is_some(),
        "rss_kib": snap.rss_kib,
        "hwm_kib": snap.hwm_kib,
        "threads": snap.threads,
        "scrapes": scrapes_ms.len(),
        "scrape_ms_p50": median(&scrapes_ms),
        "scrape_ms_max": scrapes_ms.last().copied(),
        "metrics_bytes": metrics_bytes,
        "exit_code": exit,
    }))
}

/// A 127.0.0.1 port that was free a moment ago.
fn free_port() -> Res<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ctx("finding a free port for HTTP_ADDR")
}

/// `reps` pairs of idle starts (off/on alternating); a JSON summary and a
/// markdown table.
pub async fn run(s: &Settings, bin: &str, reps: usize) -> Res<(Value, String)> {
    std::fs::create_dir_all(&s.out).ctx("creating the output folder")?;
    let sb = Sandbox::create(s, "endpoint", Some(bin)).await?;
    let r = runs(s, &sb, bin, reps).await;
    sb.destroy().await;
    let (off, on) = r?;
    let kib = |v: &[Value], k: &str| -> Vec<f64> {
        v.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>()
    };
    let (rss_off, rss_on) = (median(&kib(&off, "rss_kib")), median(&kib(&on, "rss_kib")));
    let (hwm_off, hwm_on) = (median(&kib(&off, "hwm_kib")), median(&kib(&on, "hwm_kib")));
    let scrape_p50 = median(&kib(&on, "scrape_ms_p50"));
    let scrape_max = kib(&on, "scrape_ms_max")
        .into_iter()
        .fold(f64::NAN, f64::max);
    let metrics_bytes = median(&kib(&on, "metrics_bytes"));
    let list = |v: &[Value], k: &str| {
        v.iter()
            .map(|r| fmt_num(r[k].as_f64().unwrap_or(f64::NAN)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let md = format!(
        "### HTTP endpoint: idle memory, on vs off ({reps} pairs, alternating)\n\n\
         | | endpoint off (`HTTP_ADDR=`) | endpoint on, scraped every {} ms | on − off |\n\
         |---|---:|---:|---:|\n\
         | idle RSS KiB, median | {} | {} | {} |\n\
         | peak RSS (VmHWM) KiB, median | {} | {} | {} |\n\
         | idle RSS KiB, each run | {} | {} | |\n\n\
         `/metrics`: {} bytes; scrape time p50 {} ms, max {} ms ({} scrapes per run). \
         Budget: on − off at most 1,024 KiB.\n",
        SCRAPE_EVERY.as_millis(),
        fmt_num(rss_off),
        fmt_num(rss_on),
        fmt_num(rss_on - rss_off),
        fmt_num(hwm_off),
        fmt_num(hwm_on),
        fmt_num(hwm_on - hwm_off),
        list(&off, "rss_kib"),
        list(&on, "rss_kib"),
        fmt_num(metrics_bytes),
        fmt_num(scrape_p50),
        fmt_num(scrape_max),
        on.first().map(|r| r["scrapes"].clone()).unwrap_or_default(),
    );
    Ok((
        json!({
            "writer": bin,
            "reps": reps,
            "idle_rss_kib_off": rss_off,
            "idle_rss_kib_on": rss_on,
            "idle_rss_kib_delta": rss_on - rss_off,
            "hwm_kib_off": hwm_off,
            "hwm_kib_on": hwm_on,
            "metrics_bytes": metrics_bytes,
            "scrape_ms_p50": scrape_p50,
            "scrape_ms_max": scrape_max,
            "off": off,
            "on": on,
            "context": run_context(),
        }),
        md,
    ))
}

async fn runs(s: &Settings, sb: &Sandbox, bin: &str, reps: usize) -> Res<(Vec<Value>, Vec<Value>)> {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let order: [Option<&str>; 2] = if rep % 2 == 0 {
            [None, Some(addr.as_str())]
        } else {
            [Some(addr.as_str()), None]
        };
        for a in order {
            let tag = format!("{rep}-{}", if a.is_some() { "on" } else { "off" });
            let r = idle(s, sb, bin, a, &tag).await?;
            eprintln!(
                "load: endpoint {} rep {rep}: idle RSS {} KiB",
                if a.is_some() { "on " } else { "off" },
                r["rss_kib"]
            );
            if a.is_some() {
                on.push(r);
            } else {
                off.push(r);
            }
        }
    }
    Ok((off, on))
}
