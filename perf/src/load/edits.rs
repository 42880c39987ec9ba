//! `load edits`: the update (edit) path of two writer binaries, alternately
//! (A, B, A, B, … for `--rounds` rounds, so slow drifts of a shared machine
//! hit both alike).
//!
//! One round per binary, in a fresh sandbox whose schema that binary
//! migrates itself (`writer migrate`), indexing off (`ELASTICSEARCH_URL=`:
//! only the MySQL path is measured):
//!
//! 1. seeds 5 applications × 10 chats and numbers N/2 messages in Redis
//!    as the API does; inserts those N/2 rows directly into MySQL
//!    (multi-row `INSERT`s of 1,000), so only the edits go through the
//!    writer;
//! 2. pre-publishes N `update_messages` (persistent, confirmed, no AMQP
//!    timestamp): one edit per message with the body `first …`, then a
//!    second one per message, in the same order, with the body `final …`;
//! 3. starts the writer and polls every 100 ms until every row holds a
//!    `final …` body (`COUNT(*)`), the queue has nothing ready and
//!    `rabbitmqctl list_queues` shows nothing unacknowledged;
//! 4. checks that every row holds exactly its final body, stops the writer
//!    with SIGTERM (exit 0 expected) and removes the sandbox.
//!
//! Time to done is taken when the poll saw the last final body (the same
//! poll then confirmed the queue empty; the `rabbitmqctl` call, ~0.4 s, is
//! not counted). It runs from the writer's spawn, so it includes its
//! start-up. Edits/s = N / time to done. CPU is read from `/proc` at spawn
//! and at done (`writer::cpu_use`).

use crate::backlog;
use crate::common::*;
use crate::writer::{cpu_between, cpu_use, log_tail, Writer};
use mysql_async::prelude::Queryable;
use mysql_async::{Params, Value as Sql};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Opts {
    pub a: String,
    pub b: String,
    pub rounds: usize,
    /// Edits per round (even): two per message, N/2 messages.
    pub n: usize,
}

const QUEUE: &str = "update_messages";

/// `created_at` and `updated_at` of the inserted rows (UTC).
const CREATED_AT: &str = "2025-01-01 12:00:00.123456";

/// Rows per multi-row `INSERT`.
const INSERT_CHUNK: usize = 1000;

/// (key, label, unit, lower is better), in table order.
const FIGURES: &[(&str, &str, &str, bool)] = &[
    ("edits_rate", "edits applied", "edits/s", false),
    ("done_s", "time to done (from spawn)", "s", true),
    ("consuming_s", "start to consuming", "s", true),
    ("first_final_s", "first final body seen", "s", true),
    (
        "edits_rate_consuming",
        "edits applied, from consuming",
        "edits/s",
        false,
    ),
    ("cpu_s_per_10k", "writer CPU per 10,000 edits", "s", true),
    (
        "mariadb_cpu_s_per_10k",
        "MariaDB CPU per 10,000 edits (whole server)",
        "s",
        true,
    ),
    ("peak_rss_mib", "writer peak RSS (VmHWM)", "MiB", true),
    (
        "publish_rate",
        "pre-publish rate (confirmed)",
        "msgs/s",
        false,
    ),
];

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One round: `n` edits against `bin` in a sandbox of its own.
pub async fn once(s: &Settings, bin: &str, n: usize, tag: &str) -> Res<Value> {
    // Indexing off: the sandbox's writer environment (and so `migrate`,
    // `Sandbox::indexing` and the writer) sees `ELASTICSEARCH_URL=`.
    let mut s = s.clone();
    s.writer_env
        .push(("ELASTICSEARCH_URL".to_string(), String::new()));
    let sb = Sandbox::create(&s, tag, Some(bin)).await?;
    let r = once_in(&s, &sb, bin, n).await;
    sb.destroy().await;
    r
}

/// Inserts `msgs` as rows of `messages`, `INSERT_CHUNK` per statement.
async fn insert_rows(sb: &Sandbox, msgs: &[Msg]) -> Res<()> {
    let mut db = sb.pool.get_conn().await.ctx("MySQL")?;
    for chunk in msgs.chunks(INSERT_CHUNK) {
        let row = format!("(?, ?, ?, ?, ?, ?, '{CREATED_AT}', '{CREATED_AT}')");
        let q = format!(
            "INSERT INTO messages (chat_id, token, chat_number, number, body, creator_id, \
             created_at, updated_at) VALUES {}",
            vec![row.as_str(); chunk.len()].join(", ")
        );
        let mut params: Vec<Sql> = Vec::with_capacity(chunk.len() * 6);
        for m in chunk {
            params.push(m.chat_id.into());
            params.push(m.token.as_str().into());
            params.push(m.chat_number.into());
            params.push(m.number.into());
            params.push(m.body.as_str().into());
            params.push(m.creator_id.into());
        }
        db.exec_drop(q, Params::Positional(params))
            .await
            .ctx("inserting messages")?;
    }
    let _ = db.disconnect().await;
    Ok(())
}

fn edit_payload(m: &Msg, body: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "chat_id": m.chat_id,
        "token": m.token,
        "chat_number": m.chat_number,
        "number": m.number,
        "body": body,
    }))
    .unwrap_or_default()
}

/// (ready, unacknowledged) of `queue` in `vhost`, from `rabbitmqctl`
/// (a passive declare only tells the ready count).
fn ctl_queue_counts(vhost: &str, queue: &str) -> Res<(u64, u64)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "-p",
            vhost,
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--no-table-headers",
        ])
        .stdin(Stdio::null())
        .output()
        .ctx("running rabbitmqctl")?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl list_queues: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 3 && f[0] == queue {
            let num = |x: &str| {
                x.parse::<u64>()
                    .map_err(|_| format!("rabbitmqctl list_queues: bad line {line:?}"))
            };
            return Ok((num(f[1])?, num(f[2])?));
        }
    }
    Err(format!(
        "rabbitmqctl list_queues: no queue {queue} in {vhost}"
    ))
}

async fn count_final(sb: &Sandbox) -> Res<u64> {
    let mut db = sb.pool.get_conn().await.ctx("MySQL")?;
    let n: Option<u64> = db
        .query_first("SELECT COUNT(*) FROM messages WHERE body LIKE 'final %'")
        .await
        .ctx("COUNT final bodies")?;
    Ok(n.unwrap_or(0))
}

/// Rows whose body is not their final edit, and rows in all.
async fn check_final(sb: &Sandbox, want: &HashMap<(u64, i64), String>) -> Res<(usize, usize)> {
    let mut db = sb.pool.get_conn().await.ctx("MySQL")?;
    let rows: Vec<(u64, i64, String)> = db
        .query("SELECT chat_id, number, body FROM messages")
        .await
        .ctx("reading messages back")?;
    let wrong = rows
        .iter()
        .filter(|(c, n, body)| want.get(&(*c, *n)) != Some(body))
        .count();
    Ok((wrong + want.len().saturating_sub(rows.len()), rows.len()))
}

/// Whether the sandbox's `messages` (as the binary migrated it) has the
/// column `edit_version`.
async fn has_edit_version(sb: &Sandbox) -> Res<bool> {
    let mut db = sb.pool.get_conn().await.ctx("MySQL")?;
    let n: Option<u64> = db
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = ? \
             AND table_name = 'messages' AND column_name = 'edit_version'",
            (sb.name.as_str(),),
        )
        .await
        .ctx("reading information_schema")?;
    Ok(n.unwrap_or(0) > 0)
}

async fn once_in(s: &Settings, sb: &Sandbox, bin: &str, n: usize) -> Res<Value> {
    let half = n / 2;
    let mut rng = Rng::seeded(n as u64 ^ 0xED17);
    let chats = sb.seed_chats(&mut rng).await?;
    let mut redis = sb.redis().await?;
    let msgs = make_messages(&mut redis, &chats, half, &mut rng).await?;
    let t = Instant::now();
    insert_rows(sb, &msgs).await?;
    let insert_s = t.elapsed().as_secs_f64();
    let rows = sb.count_messages().await?;
    if rows != half as u64 {
        return Err(format!("inserted {rows} rows, expected {half}"));
    }

    // The edits: first one per message, then the final one, same order.
    let conn = sb.amqp().await?;
    ensure_queue(&conn, QUEUE).await?;
    let mut p = Publisher::open(&conn, 2000).await?;
    let mut finals: HashMap<(u64, i64), String> = HashMap::with_capacity(half);
    let t = Instant::now();
    for m in &msgs {
        let body = format!("first {}", make_body(&mut rng));
        p.publish_untimed(QUEUE, &edit_payload(m, &body)).await?;
    }
    for m in &msgs {
        let body = format!("final {}", make_body(&mut rng));
        p.publish_untimed(QUEUE, &edit_payload(m, &body)).await?;
        finals.insert((m.chat_id, m.number), body);
    }
    p.flush().await?;
    let publish_rate = n as f64 / t.elapsed().as_secs_f64().max(1e-9);
    let _ = p.channel.close(200, "OK".into()).await;
    drop(msgs);
    if finals.len() != half {
        return Err(format!(
            "{} distinct messages for {half} edited twice",
            finals.len()
        ));
    }
    eprintln!(
        "load: {half} rows inserted ({insert_s:.1} s), {n} edits published ({publish_rate:.0}/s); \
         starting the writer"
    );

    std::fs::create_dir_all(&s.out).ctx("creating the output folder")?;
    let log = s.out.join(format!("writer-{}.log", sb.name));
    // No search server takes part: a port no process names.
    let no_search = "none";
    let mut w = Writer::start(bin, sb, &log)?;
    let t0 = w.started;
    let cpu0 = cpu_use(w.pid, no_search);
    let deadline = Instant::now() + s.timeout;
    let mut last_print = Instant::now();
    let (mut first_final, mut consuming) = (None, None);
    let (done, acked, cpu1) = loop {
        w.check_alive()?;
        if consuming.is_none() {
            if let Some((_, c)) = queue_state(&conn, QUEUE).await? {
                if c >= 1 {
                    consuming = Some(t0.elapsed());
                }
            }
        }
        let done_final = count_final(sb).await?;
        let seen = t0.elapsed();
        if done_final > 0 && first_final.is_none() {
            first_final = Some(seen);
        }
        if done_final == half as u64 {
            let cpu1 = cpu_use(w.pid, no_search);
            let ready = queue_state(&conn, QUEUE).await?.map(|(m, _)| m);
            if ready == Some(0) {
                let vhost = sb.name.clone();
                let (r, unacked) = smol::unblock(move || ctl_queue_counts(&vhost, QUEUE)).await?;
                if r == 0 && unacked == 0 {
                    break (seen, t0.elapsed(), cpu1);
                }
            }
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "load:   {:.0}s: {done_final} of {half} rows hold their final body",
                t0.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        if Instant::now() > deadline {
            return Err(format!(
                "edits not applied within {:?}: {done_final} of {half} final bodies; log tail:\n{}",
                s.timeout,
                log_tail(&log)
            ));
        }
        smol::Timer::after(Duration::from_millis(100)).await;
    };
    let _ = conn.close(200, "OK".into()).await;
    let after = w.snap().ok_or("the writer vanished")?;
    let peaks = w.peaks();
    let exit = w.stop();
    let (wrong, rows) = check_final(sb, &finals).await?;
    if wrong > 0 || rows != half {
        return Err(format!(
            "{wrong} of {half} rows do not hold their final body ({rows} rows); writer log {}",
            log.display()
        ));
    }
    if exit != Some(0) {
        return Err(format!(
            "the writer exited with {exit:?} after SIGTERM (0 expected); log tail:\n{}",
            log_tail(&log)
        ));
    }
    let schema_has_edit_version = has_edit_version(sb).await?;
    let cpu = cpu_between(&cpu0, &cpu1);
    let per_10k = |k: &str| {
        let used = cpu1.by.get(k)? - cpu0.by.get(k).copied().unwrap_or(0.0);
        Some(used / n as f64 * 10_000.0)
    };
    let done_s = done.as_secs_f64();
    let consuming_s = consuming.unwrap_or(done).as_secs_f64();
    Ok(json!({
        "n": n,
        "messages": half,
        "insert_s": insert_s,
        "publish_rate": publish_rate,
        "first_final_s": first_final.unwrap_or_default().as_secs_f64(),
        "done_s": done_s,
        "acked_confirmed_s": acked.as_secs_f64(),
        "edits_rate": n as f64 / done_s,
        // Start-up excluded (the consumer seen within the 100 ms poll).
        "consuming_s": consuming_s,
        "edits_rate_consuming": n as f64 / (done_s - consuming_s).max(1e-3),
        "schema_has_edit_version": schema_has_edit_version,
        // CPU seconds by process from the writer's spawn to done.
        "cpu": cpu,
        "cpu_s_per_10k": per_10k("writer"),
        "mariadb_cpu_s_per_10k": per_10k("mariadb"),
        "peak_rss_mib": mib(peaks.hwm_kib.max(after.hwm_kib)),
        "rows_checked": rows,
        "exit_code": exit,
        "writer_log": log.display().to_string(),
    }))
}

pub async fn run(s: &Settings, o: &Opts) -> Res<(Value, String)> {
    if o.n < 2 || !o.n.is_multiple_of(2) {
        return Err(format!(
            "-n {}: the number of edits must be even and at least 2 (two per message)",
            o.n
        ));
    }
    let mut results: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for round in 0..o.rounds {
        for (i, bin) in [&o.a, &o.b].into_iter().enumerate() {
            let label = ["A", "B"][i];
            eprintln!(
                "load: edits round {}/{}: {label} = {bin}",
                round + 1,
                o.rounds
            );
            let r = once(s, bin, o.n, &format!("edits{label}")).await?;
            eprintln!(
                "load:   {:.0} edits/s, done in {:.1} s, writer CPU {:.2} s per 10k, peak RSS {:.1} MiB",
                r["edits_rate"].as_f64().unwrap_or(f64::NAN),
                r["done_s"].as_f64().unwrap_or(f64::NAN),
                r["cpu_s_per_10k"].as_f64().unwrap_or(f64::NAN),
                r["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
            );
            results[i].push(r);
        }
    }
    let mut md = format!(
        "### Edits A/B: {} rounds, alternating\n\nA = `{}`\nB = `{}`\n\n\
         Each round per binary: {} rows inserted directly into MySQL, then {} `update_messages` \
         pre-published (a `first …` edit of every message, then a `final …` edit of every message, \
         no AMQP timestamp); the writer started with indexing off and timed from spawn until every \
         row held its final body and the queue was empty with nothing unacknowledged. \
         Medians over rounds; B/A > 1 means B is higher.\n\n\
         | figure | A | B | B/A | better |\n|---|---:|---:|---:|---|\n",
        o.rounds,
        o.a,
        o.b,
        fmt_num((o.n / 2) as f64),
        fmt_num(o.n as f64),
    );
    let mut fig = serde_json::Map::new();
    for (k, label, unit, lower_better) in FIGURES {
        let a = backlog::median_of(&results[0], k);
        let b = backlog::median_of(&results[1], k);
        let ratio = b / a;
        let better = if !ratio.is_finite() || (ratio - 1.0).abs() < 0.03 {
            "≈"
        } else if (ratio < 1.0) == *lower_better {
            "B"
        } else {
            "A"
        };
        md.push_str(&format!(
            "| {label} ({unit}) | {} | {} | {:.2} | {better} |\n",
            fmt_num(a),
            fmt_num(b),
            ratio
        ));
        fig.insert(k.to_string(), json!({"a": a, "b": b, "b_over_a": ratio}));
    }
    let per_round = |rs: &[Value]| {
        rs.iter()
            .map(|r| fmt_num(r["edits_rate"].as_f64().unwrap_or(f64::NAN)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let column = |rs: &[Value]| {
        let with = rs
            .iter()
            .filter(|r| r["schema_has_edit_version"].as_bool() == Some(true))
            .count();
        match with {
            0 => "without".to_string(),
            w if w == rs.len() => "with".to_string(),
            w => format!("{w} of {} rounds with", rs.len()),
        }
    };
    md.push_str(&format!(
        "\nEdits/s per round: A {}; B {}. Every row held its final body after every round; \
         the writers exited 0 after SIGTERM. Schema as each binary migrated it: A {} \
         `messages.edit_version`, B {} it. Time to done includes the writer's start-up; \
         \"from consuming\" divides by the time after a consumer was seen on `{QUEUE}` \
         (100 ms poll).\n",
        per_round(&results[0]),
        per_round(&results[1]),
        column(&results[0]),
        column(&results[1]),
    ));
    Ok((
        json!({
            "a": o.a, "b": o.b, "rounds": o.rounds, "n": o.n,
            "writer_env": s.writer_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "figures": fig,
            "runs_a": results[0], "runs_b": results[1],
            "context": run_context(),
        }),
        md,
    ))
}
