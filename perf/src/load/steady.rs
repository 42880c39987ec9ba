//! `load steady`: publish R messages/s for T seconds against a running
//! writer and measure publish→row and publish→document latency.
//!
//! Messages are numbered in Redis (`INCR`/`SADD`, as the API does) before
//! the clock starts, so the paced loop only publishes. Every ~1 ms the
//! publisher sends the messages due by then (R × elapsed), each with its
//! publish time in microseconds in the header `x-published-us` (and the
//! AMQP `timestamp` in seconds, as the API sets it); confirms are collected
//! without blocking the pace.
//!
//! Two observers run on threads of their own:
//! - **MySQL**: every 2 ms, `SELECT id, chat_id, number FROM messages WHERE
//!   id > <last> ORDER BY id` (one consumer commits batches in order, so ids
//!   grow in commit order); a row's time is the poll that first saw it.
//! - **index**: `_mget` (realtime by id in Elasticsearch) of the oldest
//!   published documents not seen yet, up to 256 per request (16 while none
//!   of them is found, to keep the observer's load on the search server
//!   small), every 10 ms or at once when the whole window was found.
//!
//! Latency = seen − published (the poll period, 2 ms / 10 ms, is the
//! resolution). Reported: p50, p99, max for both, messages never seen within
//! the drain timeout, and a per-second series (published, stored, indexed,
//! p50/p99 by publish second) that `plot` draws as a PNG.

use crate::common::*;
use crate::writer::Writer;
use mysql_async::prelude::Queryable;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Opts {
    pub writer: String,
    pub rate: usize,
    pub secs: usize,
}

struct Shared {
    pub_us: Vec<AtomicU64>,
    row_us: Vec<AtomicU64>,
    doc_us: Vec<AtomicU64>,
    published: AtomicUsize,
    stop: AtomicBool,
}

fn zeros(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// One steady run; the flat figures plus the per-second series.
pub async fn once(s: &Settings, o: &Opts, tag: &str) -> Res<Value> {
    let sb = Sandbox::create(s, tag, Some(&o.writer)).await?;
    let r = once_in(s, &sb, o).await;
    sb.destroy().await;
    r
}

fn mysql_observer(s: Settings, db: String, keys: HashMap<(u64, i64), usize>, sh: Arc<Shared>) {
    block_on(async move {
        let mut conn = match mysql_async::Conn::new(mysql_opts(&s, Some(&db))).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("load: MySQL observer: {e}");
                return;
            }
        };
        let mut last_id = 0u64;
        let mut seen = 0usize;
        while !sh.stop.load(Ordering::Relaxed) && seen < keys.len() {
            let rows: Vec<(u64, u64, i64)> = match conn
                .exec(
                    "SELECT id, chat_id, number FROM messages WHERE id > ? ORDER BY id LIMIT 20000",
                    (last_id,),
                )
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("load: MySQL observer: {e}");
                    smol::Timer::after(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let now = now_us();
            for (id, chat_id, number) in &rows {
                last_id = last_id.max(*id);
                if let Some(&i) = keys.get(&(*chat_id, *number)) {
                    if sh.row_us[i].load(Ordering::Relaxed) == 0 {
                        sh.row_us[i].store(now, Ordering::Relaxed);
                        seen += 1;
                    }
                }
            }
            if rows.len() < 20000 {
                smol::Timer::after(Duration::from_millis(2)).await;
            }
        }
        let _ = conn.disconnect().await;
    })
}

fn es_observer(index_url: String, ids: Vec<String>, sh: Arc<Shared>) {
    let agent = http_agent();
    let url = format!("{index_url}/_mget");
    let mut cursor = 0usize;
    // Documents asked for per `_mget`: 256 while they are being found, 16
    // while the oldest pending ones are not there yet, so the observer adds
    // little load to the search server it measures.
    let mut probe = 256usize;
    while !sh.stop.load(Ordering::Relaxed) && cursor < ids.len() {
        let published = sh.published.load(Ordering::Acquire);
        while cursor < published && sh.doc_us[cursor].load(Ordering::Relaxed) != 0 {
            cursor += 1;
        }
        let window: Vec<usize> = (cursor..published)
            .filter(|&i| sh.doc_us[i].load(Ordering::Relaxed) == 0)
            .take(probe)
            .collect();
        if window.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let body = json!({"ids": window.iter().map(|&i| &ids[i]).collect::<Vec<_>>()});
        let answer = http_blocking(&agent, "POST", &url, Some(body.to_string().into_bytes()));
        let now = now_us();
        let mut found = 0;
        if let Ok((200, text)) = answer {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if let Some(docs) = v["docs"].as_array() {
                for (&i, d) in window.iter().zip(docs) {
                    if d["found"].as_bool() == Some(true) {
                        sh.doc_us[i].store(now, Ordering::Relaxed);
                        found += 1;
                    }
                }
            }
        }
        probe = if found == 0 { 16 } else { 256 };
        if found < window.len() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

async fn once_in(s: &Settings, sb: &Sandbox, o: &Opts) -> Res<Value> {
    let n = o.rate * o.secs;
    let mut rng = Rng::seeded(7);
    let chats = sb.seed_chats(&mut rng).await?;
    let mut redis = sb.redis().await?;
    let msgs = make_messages(&mut redis, &chats, n, &mut rng).await?;
    let payloads: Vec<Vec<u8>> = msgs.iter().map(Msg::payload).collect();
    let keys: HashMap<(u64, i64), usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| ((m.chat_id, m.number), i))
        .collect();
    let ids: Vec<String> = msgs.iter().map(Msg::doc_id).collect();
    std::fs::create_dir_all(&s.out).ctx("creating the output folder")?;
    let log = s.out.join(format!("writer-{}.log", sb.name));
    let mut w = Writer::start(&o.writer, sb, &log)?;
    w.wait_ready(sb, Duration::from_secs(30)).await?;
    let conn = sb.amqp().await?;
    let mut p = Publisher::open(&conn, 20_000).await?;
    let sh = Arc::new(Shared {
        pub_us: zeros(n),
        row_us: zeros(n),
        doc_us: zeros(n),
        published: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
    });
    let cpu0 = w.snap().map(|x| x.cpu_s).unwrap_or(0.0);
    let t_mysql = {
        let (s2, db, sh) = (s.clone(), sb.name.clone(), sh.clone());
        std::thread::spawn(move || mysql_observer(s2, db, keys, sh))
    };
    // With indexing off (`--writer-env ELASTICSEARCH_URL=`) only rows are
    // observed: the MySQL path alone.
    let indexing = sb.indexing();
    let t_es = indexing.then(|| {
        let (url, sh) = (sb.index_url(), sh.clone());
        std::thread::spawn(move || es_observer(url, ids, sh))
    });
    smol::Timer::after(Duration::from_millis(100)).await;

    eprintln!("load: steady {} msgs/s for {} s", o.rate, o.secs);
    let start_us = now_us();
    let t0 = Instant::now();
    let mut sent = 0usize;
    let mut max_behind = 0usize;
    while sent < n {
        let due = ((t0.elapsed().as_secs_f64() * o.rate as f64) as usize + 1).min(n);
        max_behind = max_behind.max(due.saturating_sub(sent));
        while sent < due {
            let us = now_us();
            sh.pub_us[sent].store(us, Ordering::Relaxed);
            p.publish("create_messages", &payloads[sent], Some(us))
                .await?;
            sent += 1;
            sh.published.store(sent, Ordering::Release);
        }
        p.settle_ready().await?;
        smol::Timer::after(Duration::from_millis(1)).await;
    }
    let publish_s = t0.elapsed().as_secs_f64();
    p.flush().await?;
    // Wait for the stragglers.
    let deadline = Instant::now() + Duration::from_secs(30).min(s.timeout);
    let all = |v: &[AtomicU64]| v.iter().all(|x| x.load(Ordering::Relaxed) != 0);
    while Instant::now() < deadline && !(all(&sh.row_us) && (!indexing || all(&sh.doc_us))) {
        w.check_alive()?;
        smol::Timer::after(Duration::from_millis(50)).await;
    }
    sh.stop.store(true, Ordering::Relaxed);
    let _ = t_mysql.join();
    if let Some(t) = t_es {
        let _ = t.join();
    }
    let _ = p.channel.close(200, "OK".into()).await;
    let _ = conn.close(200, "OK".into()).await;
    let snap = w.snap().unwrap_or_default();
    let peaks = w.peaks();
    let exit = w.stop();

    // Latencies.
    let lat = |v: &[AtomicU64]| -> Vec<Option<f64>> {
        (0..n)
            .map(|i| {
                let seen = v[i].load(Ordering::Relaxed);
                let pubd = sh.pub_us[i].load(Ordering::Relaxed);
                (seen != 0).then(|| seen.saturating_sub(pubd) as f64 / 1000.0)
            })
            .collect()
    };
    let row_lat = lat(&sh.row_us);
    let doc_lat = lat(&sh.doc_us);
    let summary = |l: &[Option<f64>]| {
        let mut v: Vec<f64> = l.iter().flatten().copied().collect();
        v.sort_by(|a, b| a.total_cmp(b));
        json!({
            "p50_ms": percentile(&v, 50.0),
            "p99_ms": percentile(&v, 99.0),
            "max_ms": v.last().copied().unwrap_or(f64::NAN),
            "seen": v.len(),
            "missing": n - v.len(),
        })
    };
    // Per-second series.
    let secs = o.secs + 31;
    let mut published = vec![0u64; secs];
    let mut stored = vec![0u64; secs];
    let mut indexed = vec![0u64; secs];
    let mut row_by_sec: Vec<Vec<f64>> = vec![Vec::new(); secs];
    let mut doc_by_sec: Vec<Vec<f64>> = vec![Vec::new(); secs];
    let sec_of = |us: u64| (us.saturating_sub(start_us) / 1_000_000) as usize;
    for i in 0..n {
        let ps = sec_of(sh.pub_us[i].load(Ordering::Relaxed)).min(secs - 1);
        published[ps] += 1;
        let r = sh.row_us[i].load(Ordering::Relaxed);
        if r != 0 {
            stored[sec_of(r).min(secs - 1)] += 1;
        }
        let d = sh.doc_us[i].load(Ordering::Relaxed);
        if d != 0 {
            indexed[sec_of(d).min(secs - 1)] += 1;
        }
        if let Some(l) = row_lat[i] {
            row_by_sec[ps].push(l);
        }
        if let Some(l) = doc_lat[i] {
            doc_by_sec[ps].push(l);
        }
    }
    let last = (0..secs)
        .rev()
        .find(|&i| published[i] + stored[i] + indexed[i] > 0)
        .unwrap_or(0);
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(v, p)
    };
    let series: Vec<Value> = (0..=last)
        .map(|i| {
            json!({
                "second": i,
                "published": published[i],
                "stored": stored[i],
                "indexed": indexed[i],
                "row_p50_ms": pct(&mut row_by_sec[i], 50.0),
                "row_p99_ms": pct(&mut row_by_sec[i], 99.0),
                "doc_p50_ms": pct(&mut doc_by_sec[i], 50.0),
                "doc_p99_ms": pct(&mut doc_by_sec[i], 99.0),
            })
        })
        .collect();
    Ok(json!({
        "writer": o.writer,
        "rate": o.rate,
        "secs": o.secs,
        "n": n,
        "achieved_publish_rate": n as f64 / publish_s,
        "max_publish_backlog": max_behind,
        "row": summary(&row_lat),
        "indexing": indexing,
        "doc": if indexing { summary(&doc_lat) } else { Value::Null },
        "cpu_s_per_10k": (snap.cpu_s - cpu0) / n as f64 * 10_000.0,
        "peak_rss_mib": peaks.hwm_kib.max(snap.hwm_kib) as f64 / 1024.0,
        "max_threads": peaks.threads,
        "max_sockets": peaks.sockets,
        "exit_code": exit,
        "series": series,
    }))
}

pub fn markdown(v: &Value, png: Option<&str>) -> String {
    let f = |x: &Value| fmt_num(x.as_f64().unwrap_or(f64::NAN));
    let mut md = format!(
        "### Steady rate: {} msgs/s for {} s ({} messages)\n\nWriter `{}`; publish achieved {} msgs/s. \
         Latency = first poll that saw it − publish time (MySQL polled every 2 ms, index `_mget` every ≤10 ms).\n\n\
         | path | p50 ms | p99 ms | max ms | never seen |\n|---|---:|---:|---:|---:|\n",
        v["rate"], v["secs"], v["n"],
        v["writer"].as_str().unwrap_or(""),
        f(&v["achieved_publish_rate"]),
    );
    for (k, label) in [
        ("row", "publish → row in MySQL"),
        ("doc", "publish → document in the index"),
    ] {
        if v[k].is_null() {
            md.push_str(&format!("| {label} | indexing off | | | |\n"));
            continue;
        }
        md.push_str(&format!(
            "| {label} | {} | {} | {} | {} |\n",
            f(&v[k]["p50_ms"]),
            f(&v[k]["p99_ms"]),
            f(&v[k]["max_ms"]),
            v[k]["missing"]
        ));
    }
    md.push_str(&format!(
        "\nWriter during the run: CPU {} s per 10,000 messages, peak RSS {} MiB, threads {}, sockets {}, exit code {}.\n",
        f(&v["cpu_s_per_10k"]),
        f(&v["peak_rss_mib"]),
        v["max_threads"],
        v["max_sockets"],
        v["exit_code"]
    ));
    if let Some(p) = png {
        md.push_str(&format!("\nPlot: `{p}`\n"));
    }
    md
}
