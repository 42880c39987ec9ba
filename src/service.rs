//! The service: one smol `LocalExecutor` on the main thread running the
//! consumers, the indexer, the count sync and the marker flusher, plus the
//! supervisor that (re)connects to RabbitMQ and the shutdown sequence.
//!
//! Supervision: each connection "generation" declares the topology, opens
//! a consumer per queue and waits. When any consumer fails (connection or
//! channel closed, consumer cancelled), the rest of the generation is
//! cancelled, the connection closed (unacked deliveries return to their
//! queues) and a new one opened with backoff.
//!
//! Shutdown (README, "Failure semantics"): the first SIGTERM/SIGINT stops the
//! consumers taking deliveries; the batches in hand finish and are acked;
//! then the markers are flushed, a final count sync runs, connections
//! close and the process exits 0. SHUTDOWN_TIMEOUT is a hard deadline
//! (exit 1 past it); a second signal exits at once.

use crate::amqp::consumer::BatchConsumer;
use crate::amqp::republish::Republisher;
use crate::amqp::{self, INDEX_QUEUE, WORK_QUEUES};
use crate::backoff::Backoff;
use crate::config::{redact_url as redact, Config};
use crate::count_sync::{self, CountSync};
use crate::elasticsearch::backfill::{self, BACKFILL_QUEUE};
use crate::elasticsearch::{indexer, Client};
use crate::metrics::Dependency;
use crate::mysql::Store;
use crate::pipeline::{self, Context};
use crate::redis_store::{run_marker_flusher, MarkerSender, Redis};
use crate::shutdown::Shutdown;
use async_executor::LocalExecutor;
use async_signal::{Signal, Signals};
use smol::stream::StreamExt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Runs the writer until shutdown. Returns the process exit code: 0 after
/// a clean shutdown, 2 for configuration found bad at start-up, 1 otherwise.
pub fn run(cfg: Config) -> i32 {
    let signals = match Signals::new([Signal::Term, Signal::Int]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return 1;
        }
    };
    let ex = LocalExecutor::new();
    smol::block_on(ex.run(serve(&ex, cfg, signals)))
}

async fn serve(ex: &LocalExecutor<'_>, cfg: Config, signals: Signals) -> i32 {
    let shutdown = Shutdown::new();
    ex.spawn(watch_signals(
        signals,
        shutdown.clone(),
        cfg.shutdown_timeout,
    ))
    .detach();
    let redis = match Redis::new(&cfg.redis_url, &cfg.tls.redis) {
        Ok(r) => Rc::new(r),
        Err(e) => {
            log::error!("invalid configuration: REDIS_URL: {e}");
            return 2;
        }
    };
    log::info!(
        "chat-writer {} starting: mysql={}:{}/{} redis={} rabbitmq={} elasticsearch={} index={} prefetch={}",
        env!("CARGO_PKG_VERSION"),
        cfg.database_host,
        cfg.database_port,
        cfg.database_name,
        redact(&cfg.redis_url),
        redact(&cfg.rabbitmq_url),
        cfg.elasticsearch_url.as_deref().map(redact).unwrap_or_else(|| "disabled".into()),
        cfg.elasticsearch_index,
        cfg.prefetch
    );
    for warning in cfg.tls_warnings(&crate::tls::Service::ALL) {
        log::warn!("{warning}");
    }
    let _http = match cfg.http_addr {
        None => None,
        Some(addr) => match crate::http::bind(addr) {
            Ok(listener) => {
                log::info!("http: serving /healthz, /readyz, /metrics on {addr}");
                Some(ex.spawn(crate::http::serve(listener)))
            }
            Err(e) => {
                log::error!("HTTP_ADDR={addr}: cannot listen: {e}");
                return 1;
            }
        },
    };
    let store = Store::new(&cfg);
    let (marker_tx, marker_rx) = smol::channel::unbounded();
    let flusher = ex.spawn(run_marker_flusher(
        redis.clone(),
        marker_rx,
        shutdown.clone(),
    ));
    let sync = Rc::new(CountSync::new(store.clone(), redis.clone()));
    let sync_task = {
        let (sync, shutdown) = (sync.clone(), shutdown.clone());
        let (every, reconcile) = (cfg.count_sync_interval, cfg.count_reconcile_interval);
        ex.spawn(async move { count_sync::run(&sync, every, reconcile, &shutdown).await })
    };

    let monitor = {
        let (cfg, redis, shutdown) = (cfg.clone(), redis.clone(), shutdown.clone());
        ex.spawn(async move { crate::monitor::run(&cfg, redis, shutdown).await })
    };

    supervise(ex, &cfg, &store, &marker_tx, &shutdown).await;
    drop(monitor);

    // The consumers are done; what they took is acked or back in the queue.
    drop(marker_tx);
    let deadline =
        shutdown.triggered_at().unwrap_or_else(Instant::now) + cfg.shutdown_timeout.mul_f64(0.9);
    if within(deadline, flusher).await.is_none() {
        log::warn!("shutdown: change markers not all flushed before the deadline");
    }
    let _ = within(deadline, sync_task).await;
    let t = Instant::now();
    match within(deadline, sync.sync_changes()).await {
        Some(Ok(s)) => log::info!(
            "final count sync: counters={} rows_changed={} duration_ms={}",
            s.counters,
            s.rows_changed,
            t.elapsed().as_millis()
        ),
        Some(Err(e)) => log::error!("final count sync failed: {e}"),
        None => log::error!("final count sync did not finish before the deadline"),
    }
    drop(sync);
    let _ = within(deadline, store.close()).await;
    log::info!("chat-writer stopped");
    0
}

/// Resolves to `Some(output)` or `None` at `deadline`.
async fn within<T>(deadline: Instant, f: impl Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(f.await) }, async {
        async_io::Timer::at(deadline).await;
        None
    })
    .await
}

async fn watch_signals(mut signals: Signals, shutdown: Shutdown, timeout: Duration) {
    let Some(Ok(sig)) = signals.next().await else {
        return;
    };
    log::info!(
        "received {sig:?}: stopping consumers, finishing batches in flight (deadline {}s)",
        timeout.as_secs_f64()
    );
    shutdown.trigger();
    crate::metrics::get().set_shutting_down();
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        log::error!("shutdown did not finish within SHUTDOWN_TIMEOUT; exiting");
        std::process::exit(1);
    });
    if let Some(Ok(sig)) = signals.next().await {
        log::warn!("received a second {sig:?}: exiting now");
        std::process::exit(1);
    }
}

/// Connects, consumes, and reconnects with backoff until shutdown.
async fn supervise(
    ex: &LocalExecutor<'_>,
    cfg: &Config,
    store: &Store,
    markers: &MarkerSender,
    shutdown: &Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    while !shutdown.is_triggered() {
        let started = Instant::now();
        let result = generation(ex, cfg, store, markers, shutdown).await;
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        match result {
            Ok(()) => break,
            Err(e) => {
                let e = crate::tls::explain(&e);
                log::error!(
                    "rabbitmq: {e}; reconnecting, retry={}",
                    backoff.attempts() + 1
                );
                crate::metrics::get().set_failure(Dependency::rabbitmq, Some((e, false)));
                if !backoff.wait(shutdown).await {
                    break;
                }
            }
        }
    }
}

/// One connection's life. `Ok` on shutdown, `Err` on a broker failure.
async fn generation(
    ex: &LocalExecutor<'_>,
    cfg: &Config,
    store: &Store,
    markers: &MarkerSender,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let connected = smol::future::or(
        async { Some(amqp::connect(&cfg.rabbitmq_url, &cfg.tls.rabbitmq).await) },
        async {
            shutdown.wait().await;
            None
        },
    )
    .await;
    let conn = match connected {
        None => return Ok(()),
        Some(c) => c.map_err(|e| format!("connect to {}: {e}", redact(&cfg.rabbitmq_url)))?,
    };
    let m = crate::metrics::get();
    m.set_up(Dependency::rabbitmq, true);
    m.set_failure(Dependency::rabbitmq, None);
    let es = Client::from_config(cfg);
    let result = async {
        amqp::topology::declare_all(&conn, &cfg.retry_delays, es.is_some())
            .await
            .map_err(|e| format!("declare queues: {e}"))?;
        let republisher = Republisher::open(&conn)
            .await
            .map_err(|e| format!("open publish channel: {e}"))?;
        let ctx = Rc::new(Context {
            store: store.clone(),
            republisher: republisher.clone(),
            markers: markers.clone(),
            indexing: es.is_some(),
            retry_delays: cfg.retry_delays.clone(),
            mysql_requeue_after: cfg.mysql_requeue_after,
            shutdown: shutdown.clone(),
        });
        let (tx, rx) = smol::channel::unbounded::<Result<(), String>>();
        let mut tasks = Vec::new();
        let mut spawn = |task: Pin<Box<dyn Future<Output = Result<(), String>>>>| {
            let tx = tx.clone();
            tasks.push(ex.spawn(async move {
                let _ = tx.send(task.await).await;
            }));
        };
        for queue in WORK_QUEUES {
            let consumer = BatchConsumer::open(&conn, queue, cfg.prefetch)
                .await
                .map_err(|e| format!("consume {queue}: {e}"))?;
            let ctx = ctx.clone();
            spawn(Box::pin(async move { pipeline::run(&ctx, consumer).await }));
        }
        if let Some(client) = es {
            let consumer = BatchConsumer::open_adjustable(&conn, INDEX_QUEUE, indexer::PREFETCH)
                .await
                .map_err(|e| format!("consume {INDEX_QUEUE}: {e}"))?;
            spawn(Box::pin(indexer::run(
                client.clone(),
                consumer,
                republisher.clone(),
                shutdown.clone(),
            )));
            let consumer = BatchConsumer::open(&conn, BACKFILL_QUEUE, 1)
                .await
                .map_err(|e| format!("consume {BACKFILL_QUEUE}: {e}"))?;
            spawn(Box::pin(backfill::run(
                store.clone(),
                client,
                consumer,
                republisher,
                shutdown.clone(),
            )));
        }
        let consuming = tasks.len();
        drop(tx);
        drop(ctx);
        log::info!("rabbitmq: connected; consuming {consuming} queues");
        m.consuming.set(1);
        let mut result = Ok(());
        while let Ok(r) = rx.recv().await {
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        // Cancel what still runs; its deliveries are unacked and return.
        drop(tasks);
        result
    }
    .await;
    m.consuming.set(0);
    m.set_up(Dependency::rabbitmq, false);
    let closing = smol::future::or(
        async {
            conn.close(200, "chat-writer closing".into())
                .await
                .map_err(|e| e.to_string())
        },
        async {
            async_io::Timer::after(Duration::from_secs(5)).await;
            Err("no answer within 5 s".to_string())
        },
    );
    if let Err(e) = closing.await {
        log::debug!("rabbitmq: connection close: {e}");
    }
    result
}
