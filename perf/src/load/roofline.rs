//! `load roofline`: each stage of the writer's path measured alone, on this
//! machine, with the workload's message shapes (`create_messages` JSON with
//! 100..200-byte bodies), as rows (or messages, documents) per second, the
//! median of `--reps` repetitions:
//!
//! - **broker drain**: N persistent messages pre-published to a fresh
//!   durable queue, then consumed with prefetch 256 and acked with one
//!   `multiple` ack per batch (a batch = every delivery already received,
//!   up to the prefetch, as the writer takes them). Timed from
//!   `basic.consume` to the last ack.
//! - **broker publish-confirm, serial** (reference): one persistent message
//!   at a time, each waiting for its confirm, on N/10 messages: 1 / the
//!   confirm round trip a batch pays when it republishes and waits.
//! - **MySQL multi-row insert**: the writer's schema, batches of 256 rows as
//!   one `INSERT … ON DUPLICATE KEY UPDATE id = id` of literal rows inside
//!   `START TRANSACTION … COMMIT` (statements built before the clock starts).
//! - **MySQL one INSERT per message** (reference: a per-message design),
//!   autocommit, on N/10 rows.
//! - **Elasticsearch `_bulk`**: documents of the contract's shape
//!   (`version_type=external_gte`, version = µs), one request at a time, for
//!   each size in `--bulk-docs` (256 = one writer batch; 4096 = what the
//!   indexer sends from a backlog, 16 index messages of 256). The index path's
//!   ceiling is the best of those sizes. Each measurement starts from an
//!   empty index (deleted and recreated), as each backlog run does.
//! - **Redis pipeline**: `INCR message_counter:<token>:<chat>` + `SADD
//!   message_changes` pairs, 256 pairs per pipeline.
//!
//! The MySQL path's ceiling is min(broker drain, multi-row insert).

use crate::common::*;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use mysql_async::prelude::Queryable;
use serde_json::{json, Value};
use smol::stream::StreamExt;
use std::time::Instant;

pub struct Opts {
    pub n: usize,
    pub reps: usize,
    pub bulk_docs: Vec<usize>,
}

const BATCH: usize = 256;
const CREATED: &str = "2026-11-29 12:00:00.123456";

/// Appends a MySQL string literal (the writer's escaping).
fn push_str_lit(out: &mut String, s: &str) {
    out.push('\'');
    for ch in s.chars() {
        match ch {
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '"' => out.push_str("\\\""),
            '\x1a' => out.push_str("\\Z"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

fn push_row(out: &mut String, m: &Msg) {
    out.push('(');
    out.push_str(&format!("{},", m.chat_id));
    push_str_lit(out, &m.token);
    out.push_str(&format!(",{},{},", m.chat_number, m.number));
    push_str_lit(out, &m.body);
    match m.creator_id {
        Some(c) => out.push_str(&format!(",{c},")),
        None => out.push_str(",NULL,"),
    }
    out.push_str(&format!("'{CREATED}','{CREATED}')"));
}

const INSERT_HEAD: &str = "INSERT INTO messages \
    (chat_id, token, chat_number, number, body, creator_id, created_at, updated_at) VALUES ";
const INSERT_TAIL: &str = " ON DUPLICATE KEY UPDATE id = id";

/// Synthetic messages for the stages that need no Redis numbering: chat
/// round robin, numbers from `first`.
fn synthetic(chats: &[ChatRef], n: usize, first: i64, rng: &mut Rng) -> Vec<Msg> {
    (0..n)
        .map(|i| {
            let c = &chats[i % chats.len()];
            Msg {
                chat_id: c.id,
                token: c.token.clone(),
                chat_number: c.number,
                number: first + (i / chats.len()) as i64,
                body: make_body(rng),
                creator_id: Some(1 + rng.below(1000) as u64),
            }
        })
        .collect()
}

/// One persistent message at a time, each publish waiting for its confirm:
/// the round trip a writer pays when it must see a republished message
/// confirmed before it acks (msgs/s = 1 / confirm latency).
async fn broker_confirm_serial(sb: &Sandbox, msgs: &[Msg], rep: usize) -> Res<f64> {
    let conn = sb.amqp().await?;
    let queue = format!("roofline_confirm_{rep}");
    ensure_queue(&conn, &queue).await?;
    let mut p = Publisher::open(&conn, 1).await?;
    let t = Instant::now();
    for m in msgs {
        p.publish(&queue, &m.payload(), None).await?;
        p.flush().await?;
    }
    let rate = msgs.len() as f64 / t.elapsed().as_secs_f64();
    let _ = p.channel.close(200, "OK".into()).await;
    delete_queue(&conn, &queue).await;
    let _ = conn.close(200, "OK".into()).await;
    Ok(rate)
}

async fn broker_drain(sb: &Sandbox, msgs: &[Msg], rep: usize) -> Res<f64> {
    let conn = sb.amqp().await?;
    let queue = format!("roofline_drain_{rep}");
    ensure_queue(&conn, &queue).await?;
    prepublish(&conn, &queue, msgs).await?;
    let ch = conn.create_channel().await.ctx("channel")?;
    ch.basic_qos(BATCH as u16, BasicQosOptions::default())
        .await
        .ctx("basic_qos")?;
    let t = Instant::now();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "roofline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .ctx("basic_consume")?;
    let mut got = 0usize;
    while got < msgs.len() {
        let first = consumer
            .next()
            .await
            .ok_or("consumer closed")?
            .ctx("delivery")?;
        let mut last = first;
        let mut n = 1;
        while n < BATCH {
            match smol::future::poll_once(consumer.next()).await {
                Some(Some(Ok(d))) => {
                    last = d;
                    n += 1;
                }
                Some(Some(Err(e))) => return Err(format!("delivery: {e}")),
                Some(None) => return Err("consumer closed".into()),
                None => break,
            }
        }
        last.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .ctx("ack")?;
        got += n;
    }
    let rate = got as f64 / t.elapsed().as_secs_f64();
    let _ = ch.close(200, "OK".into()).await;
    delete_queue(&conn, &queue).await;
    let _ = conn.close(200, "OK".into()).await;
    Ok(rate)
}

async fn mysql_multirow(sb: &Sandbox, msgs: &[Msg]) -> Res<f64> {
    let stmts: Vec<String> = msgs
        .chunks(BATCH)
        .map(|chunk| {
            let mut s = String::with_capacity(INSERT_HEAD.len() + chunk.len() * 260);
            s.push_str(INSERT_HEAD);
            for (i, m) in chunk.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                push_row(&mut s, m);
            }
            s.push_str(INSERT_TAIL);
            s
        })
        .collect();
    let mut db = sb.pool.get_conn().await.ctx("MySQL")?;
    let t = Instant::now();
    for s in stmts {
        db.query_drop("START TRANSACTION").await.ctx("BEGIN")?;
        db.query_drop(s).await.ctx("multi-row INSERT")?;
        db.query_drop("COMMIT").await.ctx("COMMIT")?;
    }
    Ok(msgs.len() as f64 / t.elapsed().as_secs_f64())
}

async fn mysql_single(sb: &Sandbox, msgs: &[Msg]) -> Res<f64> {
    let stmts: Vec<String> = msgs
        .iter()
        .map(|m| {
            let mut s = String::from(INSERT_HEAD);
            push_row(&mut s, m);
            s.push_str(INSERT_TAIL);
            s
        })
        .collect();
    let mut db = sb.pool.get_conn().await.ctx("MySQL")?;
    let t = Instant::now();
    for s in stmts {
        db.query_drop(s).await.ctx("INSERT")?;
    }
    Ok(msgs.len() as f64 / t.elapsed().as_secs_f64())
}

/// The two NDJSON lines of one document, as the writer encodes them.
fn bulk_doc(out: &mut Vec<u8>, m: &Msg, version: u64) {
    let action =
        json!({"index": {"_id": m.doc_id(), "version": version, "version_type": "external_gte"}});
    let source = json!({
        "token": m.token, "chat_number": m.chat_number, "number": m.number,
        "body": m.body, "created_at": "2026-11-29T12:00:00.123456Z",
    });
    let _ = serde_json::to_writer(&mut *out, &action);
    out.push(b'\n');
    let _ = serde_json::to_writer(&mut *out, &source);
    out.push(b'\n');
}

async fn es_bulk(sb: &Sandbox, msgs: &[Msg], per_bulk: usize) -> Res<f64> {
    let agent = http_agent();
    let version = now_us();
    let bodies: Vec<Vec<u8>> = msgs
        .chunks(per_bulk)
        .map(|c| {
            let mut b = Vec::with_capacity(c.len() * 400);
            for m in c {
                bulk_doc(&mut b, m, version);
            }
            b
        })
        .collect();
    let url = format!("{}/_bulk", sb.index_url());
    let t = Instant::now();
    for b in bodies {
        let (status, text) = http_request(&agent, "POST", &url, Some(b)).await?;
        if status != 200 {
            return Err(format!("_bulk: HTTP {status}: {}", truncate(&text)));
        }
        let head = &text[..text.len().min(200)];
        if !head.contains("\"errors\":false") && !head.contains("\"errors\": false") {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if v["errors"].as_bool() != Some(false) {
                return Err(format!("_bulk reported item errors: {}", truncate(&text)));
            }
        }
    }
    Ok(msgs.len() as f64 / t.elapsed().as_secs_f64())
}

/// Deletes and recreates the index with the mapping: every `_bulk`
/// measurement starts from an empty index, as the writer's backlog does.
async fn fresh_index(sb: &Sandbox) -> Res<()> {
    let agent = http_agent();
    let _ = http_request(&agent, "DELETE", &sb.index_url(), None).await?;
    let (status, text) = http_request(
        &agent,
        "PUT",
        &sb.index_url(),
        Some(index_body().into_bytes()),
    )
    .await?;
    if status != 200 {
        return Err(format!(
            "creating index: HTTP {status}: {}",
            truncate(&text)
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

async fn redis_pipeline(sb: &Sandbox, msgs: &[Msg]) -> Res<f64> {
    let mut redis = sb.redis().await?;
    let keys: Vec<String> = msgs
        .iter()
        .map(|m| format!("{}:{}", m.token, m.chat_number))
        .collect();
    let t = Instant::now();
    for chunk in keys.chunks(BATCH) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.incr(format!("message_counter:{k}"), 1)
                .ignore()
                .sadd("message_changes", k)
                .ignore();
        }
        pipe.query_async::<()>(&mut redis)
            .await
            .ctx("Redis pipeline")?;
    }
    Ok(msgs.len() as f64 / t.elapsed().as_secs_f64())
}

/// One stage: its repetitions and median.
fn stage(unit: &str, n: usize, reps: &[f64]) -> Value {
    json!({"unit": unit, "n": n, "reps": reps, "median": median(reps)})
}

/// Runs every stage `reps` times in a sandbox of its own.
pub async fn run(s: &Settings, o: &Opts) -> Res<Value> {
    let sb = Sandbox::create(s, "roofline", None).await?;
    let r = run_in(&sb, o).await;
    sb.destroy().await;
    r
}

async fn run_in(sb: &Sandbox, o: &Opts) -> Res<Value> {
    let mut rng = Rng::seeded(1);
    let chats = sb.seed_chats(&mut rng).await?;
    let n_single = (o.n / 10).max(500);
    let mut drain = Vec::new();
    let mut confirm = Vec::new();
    let mut multi = Vec::new();
    let mut single = Vec::new();
    let mut bulk: Vec<Vec<f64>> = vec![Vec::new(); o.bulk_docs.len()];
    let mut redis_r = Vec::new();
    let mut next_number = 1i64;
    for rep in 0..o.reps {
        eprintln!("load: roofline rep {}/{}", rep + 1, o.reps);
        let msgs = synthetic(&chats, o.n, next_number, &mut rng);
        next_number += (o.n / chats.len() + 1) as i64;
        drain.push(broker_drain(sb, &msgs, rep).await?);
        let serial = &msgs[..n_single.min(msgs.len())];
        confirm.push(broker_confirm_serial(sb, serial, rep).await?);
        multi.push(mysql_multirow(sb, &msgs).await?);
        let one = synthetic(&chats, n_single, next_number, &mut rng);
        next_number += (n_single / chats.len() + 1) as i64;
        single.push(mysql_single(sb, &one).await?);
        for (i, &b) in o.bulk_docs.iter().enumerate() {
            fresh_index(sb).await?;
            let docs = synthetic(&chats, o.n, next_number, &mut rng);
            next_number += (o.n / chats.len() + 1) as i64;
            bulk[i].push(es_bulk(sb, &docs, b).await?);
        }
        redis_r.push(redis_pipeline(sb, &msgs).await?);
        eprintln!(
            "load:   drain {:.0}/s, multi-row {:.0}/s, single {:.0}/s, bulk {:?}, redis {:.0}/s",
            drain[rep],
            multi[rep],
            single[rep],
            bulk.iter().map(|b| b[rep].round()).collect::<Vec<_>>(),
            redis_r[rep]
        );
    }
    let mut stages = serde_json::Map::new();
    stages.insert("broker_drain".into(), stage("msgs/s", o.n, &drain));
    stages.insert(
        "broker_publish_confirm_serial".into(),
        stage("msgs/s", n_single.min(o.n), &confirm),
    );
    stages.insert("mysql_multirow_256".into(), stage("rows/s", o.n, &multi));
    stages.insert(
        "mysql_single_insert".into(),
        stage("rows/s", n_single, &single),
    );
    let mut best_bulk = 0f64;
    for (i, &b) in o.bulk_docs.iter().enumerate() {
        best_bulk = best_bulk.max(median(&bulk[i]));
        stages.insert(format!("es_bulk_{b}"), stage("docs/s", o.n, &bulk[i]));
    }
    stages.insert("redis_pipeline".into(), stage("pairs/s", o.n, &redis_r));
    let mysql_path = median(&drain).min(median(&multi));
    Ok(json!({
        "reps": o.reps,
        "stages": stages,
        "mysql_path": mysql_path,
        "index_path": best_bulk,
        "context": run_context(),
    }))
}

/// The markdown table of a roofline result.
pub fn markdown(v: &Value) -> String {
    let mut md = String::from("### Roofline: each stage alone on this machine\n\n");
    md.push_str(&format!(
        "Median of {} repetitions; workload shapes (create_messages, 100–200-byte bodies).\n\n",
        v["reps"]
    ));
    md.push_str(
        "| stage | rate (median) | unit | n per rep | repetitions |\n|---|---:|---|---:|---|\n",
    );
    if let Some(stages) = v["stages"].as_object() {
        let mut names: Vec<&String> = stages.keys().collect();
        let rank = |n: &str| {
            [
                "broker_drain",
                "broker_",
                "mysql_multi",
                "mysql_single",
                "es_",
                "redis",
            ]
            .iter()
            .position(|p| n.starts_with(p))
            .unwrap_or(9)
        };
        names.sort_by_key(|n| (rank(n), n.len(), n.to_string()));
        for name in names {
            let st = &stages[name];
            let reps: Vec<String> = st["reps"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| fmt_num(x.as_f64().unwrap_or(f64::NAN)))
                        .collect()
                })
                .unwrap_or_default();
            md.push_str(&format!(
                "| {name} | {} | {} | {} | {} |\n",
                fmt_num(st["median"].as_f64().unwrap_or(f64::NAN)),
                st["unit"].as_str().unwrap_or(""),
                st["n"],
                reps.join(", ")
            ));
        }
    }
    md.push_str(&format!(
        "\nMySQL path ceiling = min(broker drain, multi-row insert) = **{} msgs/s**; index path ceiling = best `_bulk` = **{} docs/s**.\n",
        fmt_num(v["mysql_path"].as_f64().unwrap_or(f64::NAN)),
        fmt_num(v["index_path"].as_f64().unwrap_or(f64::NAN))
    ));
    md
}
