//! `load backlog`: drain a pre-filled queue and time it.
//!
//! Per repetition, in a fresh sandbox (database migrated by the writer
//! itself, vhost, index, Redis DB):
//!
//! 1. seeds 5 applications × 10 chats in MySQL and the counters in Redis;
//!    numbers N messages with `INCR`/`SADD` as the API does;
//! 2. **idle start**: starts the writer on the empty queues, waits until it
//!    consumes and its index exists, waits 2 s, reads VmRSS, threads and
//!    sockets, stops it with SIGTERM;
//! 3. pre-publishes N `create_messages` (persistent, confirmed);
//! 4. starts the writer again and polls MySQL (`COUNT(*)`) and the index
//!    (`_count`) every 100 ms (less often if a poll takes over 25 ms, so the
//!    observer stays a small load) until both hold N, then waits until the index
//!    queue `chat_writer.index` is empty (no index lag left);
//! 5. 2 s later reads RSS again ("after drain"), and the CPU time; stops it.
//!
//! Rates are N / (time from spawn to the last row / document), so they
//! include the writer's start-up (reported separately). Each rate is also
//! given as a ratio to the roofline ceilings of the same run: the MySQL
//! path min(broker drain, multi-row insert), the index path best `_bulk`.
//! With `--writer-log debug` the writer's batch log lines are summarised
//! (batch sizes, share of full batches, time per batch, documents per bulk).

use crate::common::*;
use crate::writer::{cpu_between, cpu_use, parse_debug_log, Writer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One drain of `n` messages against `bin`; a flat map of figures.
pub async fn once(s: &Settings, bin: &str, n: usize, tag: &str) -> Res<Value> {
    let sb = Sandbox::create(s, tag, Some(bin)).await?;
    let r = once_in(s, &sb, bin, n).await;
    sb.destroy().await;
    r
}

async fn once_in(s: &Settings, sb: &Sandbox, bin: &str, n: usize) -> Res<Value> {
    let mut rng = Rng::seeded(n as u64);
    let chats = sb.seed_chats(&mut rng).await?;
    let mut redis = sb.redis().await?;
    let msgs = make_messages(&mut redis, &chats, n, &mut rng).await?;
    std::fs::create_dir_all(&s.out).ctx("creating the output folder")?;
    let log = s.out.join(format!("writer-{}.log", sb.name));

    // Idle: empty queues.
    let mut w = Writer::start(bin, sb, &log)?;
    let startup = w.wait_ready(sb, Duration::from_secs(30)).await?;
    let ready = w.snap().ok_or("the writer vanished while idle")?;
    smol::Timer::after(Duration::from_secs(2)).await;
    let idle = w.snap().ok_or("the writer vanished while idle")?;
    let idle_cpu_pct = (idle.cpu_s - ready.cpu_s) / 2.0 * 100.0;
    let idle_exit = w.stop();

    // Pre-publish the backlog.
    let conn = sb.amqp().await?;
    let publish_rate = prepublish(&conn, "create_messages", &msgs).await?;
    drop(msgs);
    eprintln!("load: backlog of {n} published ({publish_rate:.0}/s); starting the writer");

    let log2 = s.out.join(format!("writer-{}-drain.log", sb.name));
    let es_port = s
        .es_url
        .rsplit(':')
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .to_string();
    let mut w = Writer::start(bin, sb, &log2)?;
    let t0 = w.started;
    let cpu0 = cpu_use(w.pid, &es_port);
    let (mut cpu_rows, mut cpu_docs) = (None, None);
    let agent = http_agent();
    let deadline = Instant::now() + s.timeout;
    let (mut t_first, mut t_mysql, mut t_es) = (None, None, None);
    if !sb.indexing() {
        t_es = Some(Duration::ZERO);
    }
    let mut last_print = Instant::now();
    while t_mysql.is_none() || t_es.is_none() {
        w.check_alive()?;
        let polled = Instant::now();
        if t_mysql.is_none() {
            let rows = sb.count_messages().await?;
            if rows > 0 && t_first.is_none() {
                t_first = Some(t0.elapsed());
            }
            if rows >= n as u64 {
                t_mysql = Some(t0.elapsed());
                cpu_rows = Some(cpu_use(w.pid, &es_port));
            }
        }
        if t_es.is_none() {
            let a = agent.clone();
            let url = sb.index_url();
            let docs = smol::unblock(move || es_count(&a, &url)).await?;
            if docs >= n as u64 {
                t_es = Some(t0.elapsed());
                cpu_docs = Some(cpu_use(w.pid, &es_port));
            }
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "load:   {:.0}s: MySQL {}, index {}",
                t0.elapsed().as_secs_f64(),
                if t_mysql.is_some() { "done" } else { "…" },
                if t_es.is_some() { "done" } else { "…" }
            );
            last_print = Instant::now();
        }
        if Instant::now() > deadline {
            return Err(format!(
                "drain of {n} not finished within {:?} (MySQL done: {}, index done: {})",
                s.timeout,
                t_mysql.is_some(),
                t_es.is_some()
            ));
        }
        // Every 100 ms, less often when COUNT(*) gets slow on a big table.
        let pause = Duration::from_millis(100).max(polled.elapsed() * 4);
        smol::Timer::after(pause).await;
    }
    // The index queue must drain to zero too.
    let mut index_lag = u32::MAX;
    while Instant::now() < deadline {
        index_lag = queue_state(&conn, "chat_writer.index")
            .await?
            .map(|(m, _)| m)
            .unwrap_or(0);
        if index_lag == 0 {
            break;
        }
        smol::Timer::after(Duration::from_millis(100)).await;
    }
    let _ = conn.close(200, "OK".into()).await;
    let (t_mysql, t_es) = (t_mysql.unwrap_or_default(), t_es.unwrap_or_default());
    let busy = w.snap().ok_or("the writer vanished")?;
    smol::Timer::after(Duration::from_secs(2)).await;
    let after = w.snap().ok_or("the writer vanished")?;
    let peaks = w.peaks();
    let exit = w.stop();
    let logstats = if s.writer_log.contains("debug") {
        let st = parse_debug_log(&log2);
        let per = |a: u64, b: u64| {
            if b == 0 {
                f64::NAN
            } else {
                a as f64 / b as f64
            }
        };
        json!({
            "batches": st.batches,
            "mean_batch_rows": per(st.batch_rows, st.batches),
            "full_batch_share": per(st.full_batches, st.batches),
            "mean_batch_ms": per(st.batch_us_total, st.batches) / 1000.0,
            "mean_write_ms": per(st.write_us_total, st.batches) / 1000.0,
            "mean_publish_ms": per(st.publish_us_total, st.batches) / 1000.0,
            "mean_bulk_ms": per(st.bulk_us_total, st.bulks) / 1000.0,
            "bulks": st.bulks,
            "mean_docs_per_bulk": per(st.bulk_docs, st.bulks),
            "mean_index_messages_per_bulk": per(st.bulk_messages, st.bulks),
        })
    } else {
        Value::Null
    };
    Ok(json!({
        "n": n,
        "publish_rate": publish_rate,
        "startup_s": startup.as_secs_f64(),
        "first_row_s": t_first.unwrap_or_default().as_secs_f64(),
        "mysql_s": t_mysql.as_secs_f64(),
        "es_s": t_es.as_secs_f64(),
        "mysql_rate": n as f64 / t_mysql.as_secs_f64(),
        "es_rate": n as f64 / t_es.as_secs_f64(),
        "index_lag_end": index_lag,
        // CPU seconds by process from the writer's start to the last row
        // and to the last document (see writer::cpu_use).
        "cpu_to_last_row": cpu_rows.map(|c| cpu_between(&cpu0, &c)),
        "cpu_to_last_doc": cpu_docs.map(|c| cpu_between(&cpu0, &c)),
        "peak_rss_mib": mib(peaks.hwm_kib.max(after.hwm_kib)),
        "idle_rss_mib": mib(idle.rss_kib),
        "idle_threads": idle.threads,
        "idle_cpu_pct": idle_cpu_pct,
        "idle_sockets": idle.sockets,
        "after_drain_rss_mib": mib(after.rss_kib),
        "max_threads": peaks.threads.max(busy.threads),
        "max_sockets": peaks.sockets.max(busy.sockets),
        "cpu_s": after.cpu_s,
        "cpu_s_per_10k": after.cpu_s / n as f64 * 10_000.0,
        "exit_code_idle": idle_exit,
        "exit_code": exit,
        "writer_log": log2.display().to_string(),
        "debug_log_stats": logstats,
    }))
}

pub struct Opts {
    pub writer: String,
    pub n: usize,
    pub reps: usize,
}

/// Figures reported per binary, in table order: (key, label, unit).
pub const FIGURES: &[(&str, &str, &str)] = &[
    ("mysql_rate", "rows to MySQL", "msgs/s"),
    ("es_rate", "documents to the index", "docs/s"),
    ("mysql_s", "time to last row", "s"),
    ("es_s", "time to last document", "s"),
    ("startup_s", "start to consuming", "s"),
    ("publish_rate", "pre-publish rate (confirmed)", "msgs/s"),
    ("peak_rss_mib", "peak RSS (VmHWM)", "MiB"),
    ("idle_rss_mib", "idle RSS after start", "MiB"),
    ("after_drain_rss_mib", "RSS 2 s after the drain", "MiB"),
    ("cpu_s_per_10k", "CPU per 10,000 messages", "s"),
    (
        "idle_cpu_pct",
        "CPU while idle (2 s after start)",
        "% of a core",
    ),
    ("max_threads", "threads (max)", "threads"),
    ("idle_threads", "threads (idle)", "threads"),
    ("max_sockets", "open sockets (max)", "sockets"),
    ("idle_sockets", "open sockets (idle)", "sockets"),
    ("index_lag_end", "index queue depth at the end", "msgs"),
];

pub fn median_of(reps: &[Value], key: &str) -> f64 {
    let v: Vec<f64> = reps.iter().filter_map(|r| r[key].as_f64()).collect();
    median(&v)
}

pub async fn run(s: &Settings, o: &Opts, roofline: &Value) -> Res<Value> {
    let mut reps = Vec::new();
    for rep in 0..o.reps {
        eprintln!("load: backlog rep {}/{} (N = {})", rep + 1, o.reps, o.n);
        let r = once(s, &o.writer, o.n, "backlog").await?;
        eprintln!(
            "load:   MySQL {:.0} msgs/s, index {:.0} docs/s, peak RSS {:.1} MiB",
            r["mysql_rate"].as_f64().unwrap_or(0.0),
            r["es_rate"].as_f64().unwrap_or(0.0),
            r["peak_rss_mib"].as_f64().unwrap_or(0.0)
        );
        reps.push(r);
    }
    let mut med = serde_json::Map::new();
    for (k, _, _) in FIGURES {
        med.insert(k.to_string(), json!(median_of(&reps, k)));
    }
    let mysql_path = roofline["mysql_path"].as_f64().unwrap_or(f64::NAN);
    let index_path = roofline["index_path"].as_f64().unwrap_or(f64::NAN);
    let mysql_ratio = median_of(&reps, "mysql_rate") / mysql_path;
    let es_ratio = median_of(&reps, "es_rate") / index_path;
    Ok(json!({
        "writer": o.writer,
        "writer_env": s.writer_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "n": o.n,
        "reps": reps,
        "median": med,
        "roofline": {"mysql_path": mysql_path, "index_path": index_path,
                     "stages": roofline["stages"].clone()},
        "mysql_ratio": mysql_ratio,
        "es_ratio": es_ratio,
        "context": run_context(),
    }))
}

/// Who used the CPU during the drain (first repetition): seconds and cores
/// (seconds / phase length) per process, from the writer's start to the
/// last row and to the last document.
fn cpu_markdown(reps: &[Value]) -> String {
    let Some(r) = reps.first() else {
        return String::new();
    };
    let phases = [
        ("to the last row", "cpu_to_last_row", r["mysql_s"].as_f64()),
        (
            "to the last document",
            "cpu_to_last_doc",
            r["es_s"].as_f64(),
        ),
    ];
    let mut md =
        String::from("\nCPU by process during the drain (first repetition; this machine has ");
    md.push_str(&format!(
        "{} cores):\n\n| phase | writer | rabbitmq | mariadb | search | redis | load | anything else | machine busy |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));
    for (label, key, secs) in phases {
        let (Some(c), Some(t)) = (r[key].as_object(), secs.filter(|t| *t > 0.0)) else {
            continue;
        };
        md.push_str(&format!("| {label} ({t:.1} s) |"));
        let groups = ["writer", "rabbitmq", "mariadb", "search", "redis", "load"];
        let ours: f64 = groups
            .iter()
            .filter_map(|g| c.get(*g).and_then(Value::as_f64))
            .sum();
        let machine = c.get("machine").and_then(Value::as_f64);
        let other = machine.map(|m| (m - ours).max(0.0));
        for x in groups
            .iter()
            .map(|g| c.get(*g).and_then(Value::as_f64))
            .chain([other, machine])
        {
            match x {
                Some(x) => md.push_str(&format!(" {x:.1} s = {:.2} cores |", x / t)),
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md.push('\n');
    md
}

pub fn markdown(v: &Value) -> String {
    let n = v["n"].as_u64().unwrap_or(0);
    let reps = v["reps"].as_array().cloned().unwrap_or_default();
    let mut md = format!(
        "### Backlog drain: {} create_messages pre-published, then the writer started\n\n\
         Writer `{}`; median of {} repetitions.\n\n| figure | median | unit | repetitions |\n|---|---:|---|---|\n",
        fmt_num(n as f64),
        v["writer"].as_str().unwrap_or(""),
        reps.len()
    );
    if let Some(env) = v["writer_env"].as_array().filter(|e| !e.is_empty()) {
        let env: Vec<&str> = env.iter().filter_map(|x| x.as_str()).collect();
        md.insert_str(
            md.find("| figure").unwrap_or(0),
            &format!("Writer environment overrides: `{}`.\n\n", env.join(" ")),
        );
    }
    for (k, label, unit) in FIGURES {
        let all: Vec<String> = reps
            .iter()
            .map(|r| fmt_num(r[*k].as_f64().unwrap_or(f64::NAN)))
            .collect();
        md.push_str(&format!(
            "| {label} | {} | {unit} | {} |\n",
            fmt_num(v["median"][*k].as_f64().unwrap_or(f64::NAN)),
            all.join(", ")
        ));
    }
    let f = |x: &Value| fmt_num(x.as_f64().unwrap_or(f64::NAN));
    md.push_str(&format!(
        "\n**Writer vs roofline (same run):** MySQL {} msgs/s = **{:.0}%** of the MySQL path ceiling {} msgs/s \
         (min of broker drain, multi-row insert)",
        f(&v["median"]["mysql_rate"]),
        v["mysql_ratio"].as_f64().unwrap_or(f64::NAN) * 100.0,
        f(&v["roofline"]["mysql_path"]),
    ));
    match v["es_ratio"].as_f64().filter(|r| r.is_finite()) {
        Some(ratio) => md.push_str(&format!(
            "; index {} docs/s = **{:.0}%** of the `_bulk` ceiling {} docs/s.\n",
            f(&v["median"]["es_rate"]),
            ratio * 100.0,
            f(&v["roofline"]["index_path"]),
        )),
        None => md.push_str("; indexing off.\n"),
    }
    md.push_str(&cpu_markdown(&reps));
    let codes: Vec<String> = reps
        .iter()
        .map(|r| format!("{}/{}", r["exit_code_idle"], r["exit_code"]))
        .collect();
    md.push_str(&format!(
        "Exit codes after SIGTERM (idle start / drain): {}.\n",
        codes.join(", ")
    ));
    if let Some(st) = reps.first().map(|r| &r["debug_log_stats"]) {
        if !st.is_null() {
            md.push_str(&format!(
                "\nWriter debug log (first repetition): {} create_messages batches, mean {} rows, \
                 {:.0}% of the largest size, mean {} ms per batch from take to ack (MySQL write {} ms, \
                 publish and confirms {} ms); {} `_bulk` requests, mean {} documents from {} index \
                 messages each, {} ms each.\n",
                st["batches"],
                f(&st["mean_batch_rows"]),
                st["full_batch_share"].as_f64().unwrap_or(f64::NAN) * 100.0,
                f(&st["mean_batch_ms"]),
                f(&st["mean_write_ms"]),
                f(&st["mean_publish_ms"]),
                st["bulks"],
                f(&st["mean_docs_per_bulk"]),
                f(&st["mean_index_messages_per_bulk"]),
                f(&st["mean_bulk_ms"]),
            ));
        }
    }
    md
}

/// `load memory`: one drain per size, to show peak RSS does not grow with
/// the backlog.
pub async fn memory(s: &Settings, writer: &str, sizes: &[usize]) -> Res<(Value, String)> {
    let mut rows = Vec::new();
    let mut md = String::from(
        "### Memory vs backlog size\n\n| backlog | peak RSS (VmHWM) MiB | RSS after drain MiB | rows msgs/s | docs/s | CPU s / 10k |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for &n in sizes {
        eprintln!("load: memory check, backlog of {n}");
        // A big backlog drains for minutes (the index path is the slow
        // one): allow 2 ms per message at least.
        let mut s2 = s.clone();
        s2.timeout = s.timeout.max(Duration::from_millis(2 * n as u64));
        let r = once(&s2, writer, n, "memory").await?;
        let f = |k: &str| fmt_num(r[k].as_f64().unwrap_or(f64::NAN));
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            fmt_num(n as f64),
            f("peak_rss_mib"),
            f("after_drain_rss_mib"),
            f("mysql_rate"),
            f("es_rate"),
            f("cpu_s_per_10k")
        ));
        eprintln!("load: {}", md.lines().last().unwrap_or(""));
        rows.push(r);
    }
    Ok((
        json!({"writer": writer, "runs": rows, "context": run_context()}),
        md,
    ))
}
