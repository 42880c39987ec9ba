//! `load`: the measuring instruments for `chat-writer`.
//!
//! Subcommands (each prints a markdown table on stdout and writes
//! `<out>/<name>.json` and `<out>/<name>.md`; `steady` also a PNG):
//!
//! - `roofline`: each stage of the writer's path alone on this machine
//!   (broker drain, MySQL multi-row and single-row insert, `_bulk`, Redis
//!   pipeline), see `roofline.rs`;
//! - `backlog`: pre-publish N `create_messages`, start the writer, time
//!   until every row and document landed; resources from `/proc`; rates as a
//!   ratio to the roofline of the same run (`backlog.rs`);
//! - `steady`: R msgs/s for T s, publish→row and publish→document latency
//!   (`steady.rs`), with a PNG plot (`plot.rs`);
//! - `ab`: backlog + steady against two binaries alternately (`ab.rs`);
//! - `edits`: the update path of two binaries alternately: N/2 rows
//!   inserted directly, N `update_messages` pre-published (a first and a
//!   final edit of every message), the writer started with indexing off
//!   and timed until every row holds its final body (`edits.rs`);
//! - `memory`: one backlog drain per size (10,000 vs 1,000,000) to show
//!   peak RSS does not grow with the backlog;
//! - `endpoint`: idle RSS with the HTTP endpoint on (and scraped) vs off
//!   (`endpoint.rs`);
//! - `tls`: idle RSS and drains with all four connections plain vs over TLS,
//!   alternately, against the same servers (`tls_footprint.rs`, with the TLS
//!   test rig: `../rig.rs` and `tests/common/tls.rs`).
//!
//! Every run works in resources of its own, named `perf_<pid>_<seq>_<tag>`:
//! a MySQL database, a RabbitMQ vhost (`rabbitmqctl add_vhost`), an index;
//! Redis DB 11 (flushed). All are removed at the end (`--keep` keeps them).
//! Only 127.0.0.1 is contacted by default.

mod ab;
mod backlog;
mod common;
mod edits;
mod endpoint;
mod plot;
mod roofline;
mod steady;
mod tls_footprint;
mod writer;

// The TLS test rig of the tests and the four services built from it.
#[path = "../rig.rs"]
mod rig;
#[path = "../../../tests/common/tls.rs"]
mod tls;

use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
usage: load <roofline|backlog|steady|ab|edits|memory|endpoint|tls> [flags]   (flags before or after)

common flags:
  --es URL            Elasticsearch/OpenSearch (default $ELASTICSEARCH_URL or http://127.0.0.1:9200)
  --db HOST:PORT      MySQL (default 127.0.0.1:3306), --db-user root, --db-pass ''
  --amqp URL          RabbitMQ without vhost (default amqp://guest:guest@127.0.0.1:5672)
  --redis URL         Redis with its own DB, flushed (default redis://127.0.0.1:6379/11)
  --out DIR           output folder (default target/perf)
  --writer-log LEVEL  RUST_LOG of the writer (default warn; debug adds batch statistics)
  --timeout SECS      give up a drain after SECS (default 900)
  --reps K            repetitions, medians reported (roofline 3, backlog 3)
  --keep              keep databases, vhosts and indices for inspection
  --writer-env K=V    extra environment for the writer (repeatable), e.g.
                      RABBITMQ_PREFETCH_COUNT=512

roofline:  -n N (50000)  --bulk-docs LIST (256,4096)
backlog:   --writer PATH  -n N (100000)  --roofline FILE (reuse; else measured first)
steady:    --writer PATH  --rate R (2000)  --secs T (20)  --font TTF
ab:        --a PATH --b PATH  --rounds K (3)  -n N (20000)  --rate R (2000)  --secs T (10)
           --roofline FILE
edits:     --a PATH --b PATH  --rounds K (3)  -n N (20000)
memory:    --writer PATH  --sizes LIST (10000,1000000)
endpoint:  --writer PATH  --reps K (5)
tls:       --writer PATH (built with TLS)  --rounds K (3)  -n N (20000)  --idle-secs S (10)
           --indexing on|off (off)  --plain-writer PATH (built without TLS: idle, plain)
           --plain-relay (plain RabbitMQ through a plain relay: the proxy's hop on both sides)";

struct Args {
    cmd: String,
    s: Settings,
    n: Option<usize>,
    reps: Option<usize>,
    bulk_docs: Vec<usize>,
    writer: Option<String>,
    roofline: Option<PathBuf>,
    rate: usize,
    secs: Option<usize>,
    font: PathBuf,
    a: Option<String>,
    b: Option<String>,
    rounds: usize,
    sizes: Vec<usize>,
    idle_secs: u64,
    indexing: Option<bool>,
    plain_writer: Option<String>,
    plain_relay: bool,
}

fn num(flag: &str, v: Option<String>) -> Res<usize> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.replace('_', "")
        .parse()
        .map_err(|_| format!("{flag}: expected a number, got {v:?}"))
}

fn list(flag: &str, v: Option<String>) -> Res<Vec<usize>> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.split(',')
        .map(|x| num(flag, Some(x.to_string())))
        .collect()
}

fn parse() -> Res<Option<Args>> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        cmd: String::new(),
        s: Settings {
            db_host: "127.0.0.1".into(),
            db_port: 3306,
            db_user: "root".into(),
            db_pass: String::new(),
            amqp_base: "amqp://guest:guest@127.0.0.1:5672".into(),
            redis_url: "redis://127.0.0.1:6379/11".into(),
            es_url: std::env::var("ELASTICSEARCH_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:9200".into()),
            out: PathBuf::from("target/perf"),
            writer_log: "warn".into(),
            timeout: Duration::from_secs(900),
            keep: false,
            writer_env: Vec::new(),
        },
        n: None,
        reps: None,
        bulk_docs: vec![256, 4096],
        writer: None,
        roofline: None,
        rate: 2000,
        secs: None,
        font: PathBuf::from(plot::DEFAULT_FONT),
        a: None,
        b: None,
        rounds: 3,
        sizes: vec![10_000, 1_000_000],
        idle_secs: 10,
        indexing: None,
        plain_writer: None,
        plain_relay: false,
    };
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut val = || inline.clone().or_else(|| it.next());
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--es" => a.s.es_url = val().ok_or("--es needs a value")?,
            "--db" => {
                let v = val().ok_or("--db needs HOST:PORT")?;
                let (h, p) = v.rsplit_once(':').ok_or("--db needs HOST:PORT")?;
                a.s.db_host = h.into();
                a.s.db_port = p.parse().map_err(|_| format!("--db: bad port in {v:?}"))?;
            }
            "--db-user" => a.s.db_user = val().ok_or("--db-user needs a value")?,
            "--db-pass" => a.s.db_pass = val().unwrap_or_default(),
            "--amqp" => a.s.amqp_base = val().ok_or("--amqp needs a value")?,
            "--redis" => a.s.redis_url = val().ok_or("--redis needs a value")?,
            "--out" => a.s.out = val().ok_or("--out needs a value")?.into(),
            "--writer-log" => a.s.writer_log = val().ok_or("--writer-log needs a value")?,
            "--timeout" => a.s.timeout = Duration::from_secs(num(&flag, val())? as u64),
            "--keep" => a.s.keep = true,
            "--writer-env" => {
                let v = val().ok_or("--writer-env needs KEY=VALUE")?;
                let (k, x) = v.split_once('=').ok_or("--writer-env needs KEY=VALUE")?;
                a.s.writer_env.push((k.to_string(), x.to_string()));
            }
            "-n" | "--messages" => a.n = Some(num(&flag, val())?),
            "--reps" => a.reps = Some(num(&flag, val())?.max(1)),
            "--bulk-docs" => a.bulk_docs = list(&flag, val())?,
            "--writer" => a.writer = Some(val().ok_or("--writer needs a path")?),
            "--roofline" => a.roofline = Some(val().ok_or("--roofline needs a file")?.into()),
            "--rate" => a.rate = num(&flag, val())?.max(1),
            "--secs" => a.secs = Some(num(&flag, val())?.max(1)),
            "--font" => a.font = val().ok_or("--font needs a file")?.into(),
            "--a" => a.a = Some(val().ok_or("--a needs a path")?),
            "--b" => a.b = Some(val().ok_or("--b needs a path")?),
            "--rounds" => a.rounds = num(&flag, val())?.max(1),
            "--sizes" => a.sizes = list(&flag, val())?,
            "--idle-secs" => a.idle_secs = num(&flag, val())?.max(1) as u64,
            "--indexing" => {
                a.indexing = Some(match val().as_deref() {
                    Some("on") => true,
                    Some("off") => false,
                    v => return Err(format!("--indexing: expected on or off, got {v:?}")),
                })
            }
            "--plain-relay" => a.plain_relay = true,
            "--plain-writer" => a.plain_writer = Some(val().ok_or("--plain-writer needs a path")?),
            c if a.cmd.is_empty() && !c.starts_with('-') => a.cmd = c.to_string(),
            _ => return Err(format!("unknown argument {arg:?} (see --help)")),
        }
    }
    if a.cmd.is_empty() {
        return Ok(None);
    }
    a.s.es_url = a.s.es_url.trim_end_matches('/').to_string();
    Ok(Some(a))
}

fn need_writer(a: &Args) -> Res<String> {
    let w = a.writer.clone().ok_or("--writer PATH is required")?;
    let p = std::fs::canonicalize(&w).ctx(&format!("--writer {w}"))?;
    Ok(p.display().to_string())
}

fn abs(p: &str) -> Res<String> {
    Ok(std::fs::canonicalize(p)
        .ctx(&format!("binary {p}"))?
        .display()
        .to_string())
}

/// The roofline from `--roofline FILE`, or measured now (and written).
async fn roofline_for(a: &Args, default_n: usize) -> Res<Value> {
    if let Some(p) = &a.roofline {
        let text = std::fs::read_to_string(p).ctx(&format!("reading {}", p.display()))?;
        return serde_json::from_str(&text).ctx(&format!("parsing {}", p.display()));
    }
    let o = roofline::Opts {
        n: default_n,
        reps: 3,
        bulk_docs: a.bulk_docs.clone(),
    };
    let v = roofline::run(&a.s, &o).await?;
    let md = roofline::markdown(&v);
    println!("{md}");
    write_outputs(&a.s, "roofline", &v, &md)?;
    Ok(v)
}

async fn run(a: Args) -> Res<()> {
    match a.cmd.as_str() {
        "roofline" => {
            let o = roofline::Opts {
                n: a.n.unwrap_or(50_000),
                reps: a.reps.unwrap_or(3),
                bulk_docs: a.bulk_docs.clone(),
            };
            let v = roofline::run(&a.s, &o).await?;
            let md = roofline::markdown(&v);
            println!("{md}");
            write_outputs(&a.s, "roofline", &v, &md)
        }
        "backlog" => {
            let writer = need_writer(&a)?;
            let n = a.n.unwrap_or(100_000);
            let roof = roofline_for(&a, n.min(50_000)).await?;
            let o = backlog::Opts {
                writer,
                n,
                reps: a.reps.unwrap_or(3),
            };
            let v = backlog::run(&a.s, &o, &roof).await?;
            let md = backlog::markdown(&v);
            println!("{md}");
            write_outputs(&a.s, "backlog", &v, &md)
        }
        "steady" => {
            let o = steady::Opts {
                writer: need_writer(&a)?,
                rate: a.rate,
                secs: a.secs.unwrap_or(20),
            };
            let v = steady::once(&a.s, &o, "steady").await?;
            std::fs::create_dir_all(&a.s.out).ctx("creating the output folder")?;
            let png = a.s.out.join("steady.png");
            let png_note = match plot::draw(&v, &png, &a.font) {
                Ok(()) => Some(png.display().to_string()),
                Err(e) => {
                    eprintln!("load: no plot: {e}");
                    None
                }
            };
            let md = steady::markdown(&v, png_note.as_deref());
            println!("{md}");
            write_outputs(&a.s, "steady", &v, &md)
        }
        "ab" => {
            let o = ab::Opts {
                a: abs(a.a.as_deref().ok_or("--a PATH is required")?)?,
                b: abs(a.b.as_deref().ok_or("--b PATH is required")?)?,
                rounds: a.rounds,
                n: a.n.unwrap_or(20_000),
                rate: a.rate,
                secs: a.secs.unwrap_or(10),
            };
            let roof = roofline_for(&a, o.n.min(50_000)).await?;
            let (v, md) = ab::run(&a.s, &o, &roof).await?;
            println!("{md}");
            write_outputs(&a.s, "ab", &v, &md)
        }
        "edits" => {
            let o = edits::Opts {
                a: abs(a.a.as_deref().ok_or("--a PATH is required")?)?,
                b: abs(a.b.as_deref().ok_or("--b PATH is required")?)?,
                rounds: a.rounds,
                n: a.n.unwrap_or(20_000),
            };
            let (v, md) = edits::run(&a.s, &o).await?;
            println!("{md}");
            write_outputs(&a.s, "edits", &v, &md)
        }
        "memory" => {
            let writer = need_writer(&a)?;
            let (v, md) = backlog::memory(&a.s, &writer, &a.sizes).await?;
            println!("{md}");
            write_outputs(&a.s, "memory", &v, &md)
        }
        "endpoint" => {
            let writer = need_writer(&a)?;
            let (v, md) = endpoint::run(&a.s, &writer, a.reps.unwrap_or(5)).await?;
            println!("{md}");
            write_outputs(&a.s, "endpoint", &v, &md)
        }
        "tls" => {
            let o = tls_footprint::Opts {
                writer: need_writer(&a)?,
                plain_writer: a.plain_writer.as_deref().map(abs).transpose()?,
                rounds: a.rounds,
                n: a.n.unwrap_or(20_000),
                idle_secs: a.idle_secs,
                indexing: a.indexing.unwrap_or(false),
                plain_relay: a.plain_relay,
            };
            let (v, md) = tls_footprint::run(&a.s, &o).await?;
            println!("{md}");
            write_outputs(&a.s, "tls", &v, &md)
        }
        other => Err(format!("unknown subcommand {other:?} (see --help)")),
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    match block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: error: {e}");
            ExitCode::FAILURE
        }
    }
}
