//! `load ab`: the same workload against two writer binaries, alternately
//! (A, B, A, B, … for `--rounds` rounds, so slow drifts of a shared machine
//! hit both alike). Each round runs one backlog drain (`-n`) and one steady
//! run (`--rate`, `--secs`) per binary, each in a fresh sandbox. Reported:
//! every figure's median per binary and the ratio B/A, plus the MySQL-path
//! ratio to the roofline of the same run.

use crate::common::*;
use crate::{backlog, steady};
use serde_json::{json, Value};

pub struct Opts {
    pub a: String,
    pub b: String,
    pub rounds: usize,
    pub n: usize,
    pub rate: usize,
    pub secs: usize,
}

/// (key in the flattened result, label, unit, lower is better).
const FIGURES: &[(&str, &str, &str, bool)] = &[
    ("mysql_rate", "backlog: rows to MySQL", "msgs/s", false),
    (
        "es_rate",
        "backlog: documents to the index",
        "docs/s",
        false,
    ),
    ("peak_rss_mib", "backlog: peak RSS (VmHWM)", "MiB", true),
    ("idle_rss_mib", "idle RSS after start", "MiB", true),
    ("after_drain_rss_mib", "RSS after the drain", "MiB", true),
    (
        "cpu_s_per_10k",
        "backlog: CPU per 10,000 messages",
        "s",
        true,
    ),
    ("max_threads", "threads (max)", "threads", true),
    ("max_sockets", "open sockets (max)", "sockets", true),
    ("row_p50_ms", "steady: publish→row p50", "ms", true),
    ("row_p99_ms", "steady: publish→row p99", "ms", true),
    ("row_max_ms", "steady: publish→row max", "ms", true),
    ("doc_p50_ms", "steady: publish→document p50", "ms", true),
    ("doc_p99_ms", "steady: publish→document p99", "ms", true),
    (
        "steady_cpu_s_per_10k",
        "steady: CPU per 10,000 messages",
        "s",
        true,
    ),
    ("steady_peak_rss_mib", "steady: peak RSS", "MiB", true),
];

fn flatten(bl: &Value, st: &Value) -> Value {
    let mut m = serde_json::Map::new();
    for k in [
        "mysql_rate",
        "es_rate",
        "peak_rss_mib",
        "idle_rss_mib",
        "after_drain_rss_mib",
        "cpu_s_per_10k",
        "max_threads",
        "max_sockets",
    ] {
        m.insert(k.into(), bl[k].clone());
    }
    for p in ["row", "doc"] {
        for q in ["p50_ms", "p99_ms", "max_ms"] {
            m.insert(format!("{p}_{q}"), st[p][q].clone());
        }
    }
    m.insert("steady_cpu_s_per_10k".into(), st["cpu_s_per_10k"].clone());
    m.insert("steady_peak_rss_mib".into(), st["peak_rss_mib"].clone());
    Value::Object(m)
}

pub async fn run(s: &Settings, o: &Opts, roofline: &Value) -> Res<(Value, String)> {
    let mut results: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    for round in 0..o.rounds {
        for (i, bin) in [&o.a, &o.b].into_iter().enumerate() {
            let label = ["A", "B"][i];
            eprintln!(
                "load: A/B round {}/{}: {label} = {bin}",
                round + 1,
                o.rounds
            );
            let bl = backlog::once(s, bin, o.n, &format!("ab{label}")).await?;
            let so = steady::Opts {
                writer: bin.clone(),
                rate: o.rate,
                secs: o.secs,
            };
            let st = steady::once(s, &so, &format!("ab{label}")).await?;
            results[i].push(flatten(&bl, &st));
        }
    }
    let mysql_path = roofline["mysql_path"].as_f64().unwrap_or(f64::NAN);
    let mut md = format!(
        "### A/B: {} rounds, alternating\n\nA = `{}`\nB = `{}`\n\nEach round: backlog drain of {} and steady {} msgs/s for {} s per binary. \
         Medians over rounds; B/A > 1 means B is higher.\n\n| figure | A | B | B/A | better |\n|---|---:|---:|---:|---|\n",
        o.rounds,
        o.a,
        o.b,
        fmt_num(o.n as f64),
        o.rate,
        o.secs
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
    let ra = backlog::median_of(&results[0], "mysql_rate") / mysql_path;
    let rb = backlog::median_of(&results[1], "mysql_rate") / mysql_path;
    md.push_str(&format!(
        "\nMySQL path vs roofline ({} msgs/s): A {:.0}%, B {:.0}%.\n",
        fmt_num(mysql_path),
        ra * 100.0,
        rb * 100.0
    ));
    Ok((
        json!({
            "a": o.a, "b": o.b, "rounds": o.rounds, "n": o.n, "rate": o.rate, "secs": o.secs,
            "figures": fig,
            "runs_a": results[0], "runs_b": results[1],
            "roofline_mysql_path": mysql_path,
            "mysql_ratio_a": ra, "mysql_ratio_b": rb,
            "context": run_context(),
        }),
        md,
    ))
}
