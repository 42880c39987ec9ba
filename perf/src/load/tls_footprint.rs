//! `load tls`: what TLS costs the writer, plain and TLS side by side against
//! the same servers.
//!
//! The rig (`perf/src/rig.rs`, from the TLS test rig) is started once: a TLS
//! proxy in front of RabbitMQ (client certificate required), an HTTP TLS
//! proxy in front of the search server (API key), a private Redis and a
//! private MariaDB. Both of those are opened to plain clients as well
//! (`require_secure_transport` off, a plain Redis port), so a plain writer
//! and a TLS writer use the very same MySQL and Redis servers; the plain
//! writer reaches RabbitMQ and the search server directly, the TLS writer
//! through the proxies (standing in for the servers' own TLS).
//!
//! - **plain**: `DATABASE_SSL_MODE=disabled`, `redis://` to the plain port,
//!   `amqp://`, `http://`;
//! - **TLS**: all four over TLS, verified against the rig's CA:
//!   `amqps://` with a client certificate, `DATABASE_SSL_MODE=verify_identity`,
//!   `rediss://` with a client certificate, `https://` with an API key.
//!
//! Per round, the two orders alternating (plain first in even rounds):
//!
//! 1. **idle**: in a fresh sandbox, the writer on empty queues with all four
//!    connections (indexing on); once it consumes and its index exists,
//!    `--idle-secs` (10) later `VmRSS` and `VmHWM` from `/proc`; SIGTERM;
//!    with `--plain-writer` also the build without TLS, plain;
//! 2. **drain**: `load backlog`'s drain of N messages (`backlog::once`), with
//!    indexing as `--indexing on|off` says (the same for both).
//!
//! The servers' own counts (TLS handshakes at the RabbitMQ and search
//! proxies, MariaDB's `Ssl_finished_accepts`, clients of Redis's TLS port)
//! are read around each run: the TLS runs must show all four, the plain runs
//! none. The load generator's own connections are plain. The proxies run
//! in this process: in the drain's CPU figures they count as `load`.
//!
//! With `--plain-relay` the plain writer reaches RabbitMQ through a plain
//! relay of the proxy's shape ([`PlainRelay`]): both sides then have the
//! same extra hop, and what is left between them is TLS.

use crate::backlog;
use crate::common::*;
use crate::rig::{PlainRelay, Rig, Status};
use crate::writer::Writer;
use serde_json::{json, Value};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

pub struct Opts {
    /// The writer built with TLS (measured plain and TLS).
    pub writer: String,
    /// The writer built without TLS (idle only, plain), if given.
    pub plain_writer: Option<String>,
    pub rounds: usize,
    pub n: usize,
    pub idle_secs: u64,
    pub indexing: bool,
    /// The plain writer reaches RabbitMQ through a plain relay of the TLS
    /// proxy's shape (the same extra hop), not directly.
    pub plain_relay: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Tls,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Tls => "tls",
        }
    }
}

fn host_port(url: &str, default_port: u16) -> Res<SocketAddr> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    let hp = rest.split('/').next().unwrap_or(rest);
    let hp = if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:{default_port}")
    };
    hp.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("no address for {url:?}"))
}

/// The settings of one mode: our own (plain) connections to the rig's
/// MariaDB and Redis, and the writer's variables.
fn settings(
    s: &Settings,
    rig: &Rig,
    relay: Option<&PlainRelay>,
    mode: Mode,
    indexing: bool,
) -> Settings {
    let mut m = s.clone();
    m.db_host = "127.0.0.1".into();
    m.db_port = rig.db.port;
    m.db_user = "root".into();
    m.db_pass = rig.db.password.clone();
    m.redis_url = format!("redis://127.0.0.1:{}/11", rig.redis_plain_port.unwrap_or(0));
    let mut env = s.writer_env.clone();
    match mode {
        Mode::Plain => {
            env.push(("DATABASE_SSL_MODE".into(), "disabled".into()));
            if let Some(r) = relay {
                env.push((
                    "RABBITMQ_URL".into(),
                    format!("amqp://guest:guest@127.0.0.1:{}/{{sandbox}}", r.port),
                ));
            }
        }
        Mode::Tls => env.extend(rig.writer_env("{sandbox}", 11, false)),
    }
    if !indexing {
        env.retain(|(k, _)| !k.starts_with("ELASTICSEARCH_"));
        env.push(("ELASTICSEARCH_URL".into(), String::new()));
    }
    m.writer_env = env;
    m
}

/// TLS seen by the servers between two readings.
fn tls_seen(before: &Status, after: &Status, during: &Status) -> Value {
    json!({
        "amqp_handshakes": after.amqp_handshakes - before.amqp_handshakes,
        "es_handshakes": after.es_handshakes - before.es_handshakes,
        "es_forwarded": after.es_forwarded - before.es_forwarded,
        "mysql_tls_accepts": after.mysql_tls_accepts.saturating_sub(before.mysql_tls_accepts),
        "redis_tls_clients": during.redis_tls_clients,
    })
}

/// One idle start in a fresh sandbox: VmRSS/VmHWM after `idle_secs`.
async fn idle(s: &Settings, rig: &Rig, bin: &str, tag: &str, secs: u64) -> Res<Value> {
    let sb = Sandbox::create(s, tag, Some(bin)).await?;
    let r = async {
        let log = s.out.join(format!("writer-{}-idle.log", sb.name));
        let before = rig.status();
        let mut w = Writer::start(bin, &sb, &log)?;
        w.wait_ready(&sb, Duration::from_secs(60)).await?;
        smol::Timer::after(Duration::from_secs(secs)).await;
        let snap = w.snap().ok_or("the writer vanished while idle")?;
        // The mappings behind the figure, for a look at where it goes.
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", w.pid)).unwrap_or_default();
        let _ = std::fs::write(s.out.join(format!("writer-{}-smaps.txt", sb.name)), smaps);
        let during = rig.status();
        let exit = w.stop();
        let after = rig.status();
        Ok(json!({
            "rss_kib": snap.rss_kib,
            "hwm_kib": snap.hwm_kib,
            "anon_kib": snap.anon_kib,
            "file_kib": snap.file_kib,
            "threads": snap.threads,
            "sockets": snap.sockets,
            "cpu_s": snap.cpu_s,
            "exit_code": exit,
            "tls_seen": tls_seen(&before, &after, &during),
        }))
    }
    .await;
    sb.destroy().await;
    r
}

/// One drain (`backlog::once`) with the servers' TLS counts around it.
async fn drain(s: &Settings, rig: &Rig, bin: &str, n: usize, tag: &str) -> Res<Value> {
    let before = rig.status();
    let mut r = backlog::once(s, bin, n, tag).await?;
    let after = rig.status();
    // Redis clients of the TLS port are gone by now: the drain's writer
    // held one if the handshakes at the other three are there.
    r["tls_seen"] = tls_seen(&before, &after, &after);
    // Rows per second once the first row landed (start-up excluded).
    let (first, last) = (
        r["first_row_s"].as_f64().unwrap_or(0.0),
        r["mysql_s"].as_f64().unwrap_or(0.0),
    );
    r["mysql_rate_after_first_row"] = json!(n as f64 / (last - first).max(1e-9));
    Ok(r)
}

fn vals(runs: &[Value], key: &str) -> Vec<f64> {
    runs.iter().filter_map(|r| r[key].as_f64()).collect()
}

fn list(runs: &[Value], key: &str) -> String {
    runs.iter()
        .map(|r| fmt_num(r[key].as_f64().unwrap_or(f64::NAN)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run(s: &Settings, o: &Opts) -> Res<(Value, String)> {
    std::fs::create_dir_all(&s.out).ctx("creating the output folder")?;
    let amqp = host_port(&s.amqp_base, 5672)?;
    let es = host_port(&s.es_url, 9200)?;
    eprintln!("load: starting the TLS rig (proxies to {amqp} and {es}, private Redis and MariaDB)");
    let mut rig = smol::unblock(move || Rig::start(amqp, es)).await;
    let redis_plain = rig.allow_plain();
    eprintln!(
        "load: rig: amqps 127.0.0.1:{}, https 127.0.0.1:{}, Redis TLS {} / plain {}, MariaDB {}",
        rig.amqp.port, rig.es.port, rig.redis.tls_port, redis_plain, rig.db.port
    );
    let relay = o.plain_relay.then(|| PlainRelay::start(amqp));
    let idle_s = |m| settings(s, &rig, relay.as_ref(), m, true);
    let drain_s = |m| settings(s, &rig, relay.as_ref(), m, o.indexing);

    let mut idle_runs: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    let mut idle_nontls = Vec::new();
    let mut drains: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    let slot = |m: Mode| if m == Mode::Plain { 0 } else { 1 };
    for round in 0..o.rounds {
        let order = if round % 2 == 0 {
            [Mode::Plain, Mode::Tls]
        } else {
            [Mode::Tls, Mode::Plain]
        };
        for m in order {
            let r = idle(
                &idle_s(m),
                &rig,
                &o.writer,
                &format!("idle_{}", m.key()),
                o.idle_secs,
            )
            .await?;
            eprintln!(
                "load: round {} idle {:5}: VmRSS {} KiB, VmHWM {} KiB; TLS seen {}",
                round + 1,
                m.key(),
                r["rss_kib"],
                r["hwm_kib"],
                r["tls_seen"]
            );
            idle_runs[slot(m)].push(r);
        }
        if let Some(nt) = &o.plain_writer {
            let r = idle(&idle_s(Mode::Plain), &rig, nt, "idle_notls", o.idle_secs).await?;
            eprintln!(
                "load: round {} idle plain, build without TLS: VmRSS {} KiB, VmHWM {} KiB",
                round + 1,
                r["rss_kib"],
                r["hwm_kib"]
            );
            idle_nontls.push(r);
        }
        for m in order {
            let r = drain(
                &drain_s(m),
                &rig,
                &o.writer,
                o.n,
                &format!("drain_{}", m.key()),
            )
            .await?;
            eprintln!(
                "load: round {} drain {:5}: {:.0} rows/s ({:.0} after the first row), start-up {:.2} s; TLS seen {}",
                round + 1,
                m.key(),
                r["mysql_rate"].as_f64().unwrap_or(0.0),
                r["mysql_rate_after_first_row"].as_f64().unwrap_or(0.0),
                r["startup_s"].as_f64().unwrap_or(0.0),
                r["tls_seen"]
            );
            drains[slot(m)].push(r);
        }
    }
    let final_status = rig.status();
    drop(relay);
    drop(rig);

    let med = |v: &[Value], k: &str| median(&vals(v, k));
    let [ip, it] = &idle_runs;
    let [dp, dt] = &drains;
    let ratio = med(dt, "mysql_rate") / med(dp, "mysql_rate");
    let ratio_after = med(dt, "mysql_rate_after_first_row") / med(dp, "mysql_rate_after_first_row");
    let mut md = format!(
        "### TLS footprint: plain vs all four connections over TLS ({} rounds, alternating)\n\n\
         Writer `{}`, the same binary both ways; the same MariaDB and Redis (private, \
         TLS and plain ports), RabbitMQ and the search server directly (plain) or through \
         the rig's TLS proxies (TLS){}. Idle: {} s after consuming, indexing on. Drain: {} \
         create_messages, indexing **{}**.\n\n\
         | figure | plain | TLS | TLS vs plain | plain, each | TLS, each |\n\
         |---|---:|---:|---:|---|---|\n",
        o.rounds,
        o.writer,
        if o.plain_relay {
            "; plain RabbitMQ through a plain relay of the proxy's shape (`--plain-relay`)"
        } else {
            ""
        },
        o.idle_secs,
        fmt_num(o.n as f64),
        if o.indexing { "on" } else { "off" },
    );
    let row = |label: &str, v: (&[Value], &[Value]), k: &str, diff: bool| {
        let (a, b) = (med(v.0, k), med(v.1, k));
        let cmp = if diff {
            format!("{:+}", (b - a).round())
        } else {
            format!("{:.3}×", b / a)
        };
        format!(
            "| {label} | {} | {} | {cmp} | {} | {} |\n",
            fmt_num(a),
            fmt_num(b),
            list(v.0, k),
            list(v.1, k)
        )
    };
    md.push_str(&row("idle VmRSS, KiB", (ip, it), "rss_kib", true));
    md.push_str(&row("idle VmHWM, KiB", (ip, it), "hwm_kib", true));
    md.push_str(&row(
        "idle RssAnon (heap, stacks), KiB",
        (ip, it),
        "anon_kib",
        true,
    ));
    md.push_str(&row(
        "idle RssFile (the binary's mapped pages), KiB",
        (ip, it),
        "file_kib",
        true,
    ));
    md.push_str(&row("idle threads", (ip, it), "threads", true));
    md.push_str(&row("idle sockets", (ip, it), "sockets", true));
    md.push_str(&row(
        "drain: rows to MySQL, msgs/s",
        (dp, dt),
        "mysql_rate",
        false,
    ));
    md.push_str(&row(
        "drain: msgs/s after the first row",
        (dp, dt),
        "mysql_rate_after_first_row",
        false,
    ));
    if o.indexing {
        md.push_str(&row("drain: documents, docs/s", (dp, dt), "es_rate", false));
    }
    md.push_str(&row(
        "drain: start to consuming, s",
        (dp, dt),
        "startup_s",
        false,
    ));
    md.push_str(&row(
        "drain: start to first row, s",
        (dp, dt),
        "first_row_s",
        false,
    ));
    md.push_str(&row(
        "drain: peak RSS (VmHWM), MiB",
        (dp, dt),
        "peak_rss_mib",
        false,
    ));
    md.push_str(&row(
        "drain: writer CPU per 10,000, s",
        (dp, dt),
        "cpu_s_per_10k",
        false,
    ));
    if !idle_nontls.is_empty() {
        md.push_str(&format!(
            "\nBuild without TLS (`{}`), plain, idle: VmRSS median {} KiB ({}), VmHWM {} KiB ({}), RssAnon {} KiB, RssFile {} KiB.\n",
            o.plain_writer.as_deref().unwrap_or(""),
            fmt_num(med(&idle_nontls, "rss_kib")),
            list(&idle_nontls, "rss_kib"),
            fmt_num(med(&idle_nontls, "hwm_kib")),
            list(&idle_nontls, "hwm_kib"),
            fmt_num(med(&idle_nontls, "anon_kib")),
            fmt_num(med(&idle_nontls, "file_kib")),
        ));
    }
    md.push_str(&format!(
        "\n**Drain, TLS / plain: {ratio:.3}** (rows/s medians; {ratio_after:.3} counting from the first row).\n"
    ));
    let seen = |runs: &[Value]| {
        runs.iter()
            .map(|r| {
                let t = &r["tls_seen"];
                format!(
                    "{}/{}/{}/{}",
                    t["amqp_handshakes"],
                    t["mysql_tls_accepts"],
                    t["redis_tls_clients"],
                    t["es_forwarded"]
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    md.push_str(&format!(
        "\nTLS as the servers saw it, per run (RabbitMQ handshakes / MariaDB TLS handshakes / \
         clients of Redis's TLS port while idle / search requests forwarded over TLS):\n\
         idle plain {}; idle TLS {}; drain plain {}; drain TLS {}.\n",
        seen(ip),
        seen(it),
        seen(dp),
        seen(dt)
    ));
    let cpu = |runs: &[Value]| -> String {
        let Some(c) = runs.first().and_then(|r| r["cpu_to_last_row"].as_object()) else {
            return "n/a".into();
        };
        c.iter()
            .map(|(k, v)| format!("{k} {}", v))
            .collect::<Vec<_>>()
            .join(", ")
    };
    md.push_str(&format!(
        "\nCPU seconds from the writer's start to the last row, first round (the TLS \
         proxies run inside `load`): plain {}; TLS {}.\n",
        cpu(dp),
        cpu(dt)
    ));
    let v = json!({
        "writer": o.writer,
        "plain_writer": o.plain_writer,
        "rounds": o.rounds,
        "n": o.n,
        "idle_secs": o.idle_secs,
        "indexing": o.indexing,
        "plain_relay": o.plain_relay,
        "idle": {"plain": ip, "tls": it, "plain_build_without_tls": idle_nontls},
        "drain": {"plain": dp, "tls": dt},
        "median": {
            "idle_rss_kib": {"plain": med(ip, "rss_kib"), "tls": med(it, "rss_kib"),
                             "without_tls_build": med(&idle_nontls, "rss_kib")},
            "idle_hwm_kib": {"plain": med(ip, "hwm_kib"), "tls": med(it, "hwm_kib"),
                             "without_tls_build": med(&idle_nontls, "hwm_kib")},
            "drain_rows_per_s": {"plain": med(dp, "mysql_rate"), "tls": med(dt, "mysql_rate")},
            "drain_ratio_tls_plain": ratio,
            "drain_ratio_after_first_row": ratio_after,
        },
        "rig_final": final_status.to_env(),
        "context": run_context(),
    });
    Ok((v, md))
}
