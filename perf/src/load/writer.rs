//! The writer under test as a child process, and what the OS says about it.
//!
//! [`Writer::start`] runs the binary with the sandbox's environment
//! (the README's variables, `HTTP_ADDR` empty), its stderr to a log file, and a
//! sampler thread that reads `/proc/<pid>` every 50 ms: `VmHWM` (peak RSS),
//! `VmRSS`, `Threads`, utime+stime (CPU seconds) and the number of open
//! sockets (links `socket:[…]` in `/proc/<pid>/fd`: the writer's TCP
//! connections; it opens no Unix sockets). [`Writer::stop`] sends SIGTERM
//! and waits for the exit code (SIGKILL after 45 s).

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One reading of `/proc/<pid>`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snap {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// `RssAnon` (heap, stacks, relocated data) and `RssFile` (the binary's
    /// pages that are mapped in).
    pub anon_kib: u64,
    pub file_kib: u64,
    pub threads: u64,
    pub sockets: u64,
    pub cpu_s: f64,
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Reads `/proc/<pid>`; None once the process is gone.
pub fn snapshot(pid: u32, ticks: f64) -> Option<Snap> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut s = Snap::default();
    for line in status.lines() {
        let val = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("VmRSS:") {
            s.rss_kib = val(line);
        } else if line.starts_with("VmHWM:") {
            s.hwm_kib = val(line);
        } else if line.starts_with("RssAnon:") {
            s.anon_kib = val(line);
        } else if line.starts_with("RssFile:") {
            s.file_kib = val(line);
        } else if line.starts_with("Threads:") {
            s.threads = val(line);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" closing the command name: state is field 3,
    // utime 14, stime 15 (1-based).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    s.cpu_s = (ut + st) / ticks;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        s.sockets = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count() as u64;
    }
    Some(s)
}

/// Maxima over the samples, and the RSS series (seconds, MiB).
#[derive(Clone, Debug, Default)]
pub struct Peaks {
    pub hwm_kib: u64,
    pub threads: u64,
    pub sockets: u64,
    pub last: Snap,
    pub rss_series: Vec<(f64, f64)>,
}

pub struct Writer {
    child: Child,
    pub pid: u32,
    pub log: PathBuf,
    pub started: Instant,
    ticks: f64,
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<Peaks>>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(bin: &str, sb: &Sandbox, log: &Path) -> Res<Writer> {
        Self::start_with(bin, sb, log, &[])
    }

    /// [`Writer::start`] with `extra` variables over the sandbox's
    /// environment (a later value wins), e.g. `HTTP_ADDR`.
    pub fn start_with(
        bin: &str,
        sb: &Sandbox,
        log: &Path,
        extra: &[(String, String)],
    ) -> Res<Writer> {
        let file = std::fs::File::create(log).ctx(&format!("creating {}", log.display()))?;
        let started = Instant::now();
        let child = Command::new(bin)
            .envs(sb.writer_env())
            .envs(extra.iter().cloned())
            .stdin(Stdio::null())
            .stdout(file.try_clone().ctx("log file")?)
            .stderr(file)
            .spawn()
            .ctx(&format!("starting {bin}"))?;
        let pid = child.id();
        let ticks = clock_ticks();
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(Peaks::default()));
        let sampler = {
            let stop = stop.clone();
            let peaks = peaks.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let Some(s) = snapshot(pid, ticks) else { break };
                    if let Ok(mut p) = peaks.lock() {
                        p.hwm_kib = p.hwm_kib.max(s.hwm_kib);
                        p.threads = p.threads.max(s.threads);
                        p.sockets = p.sockets.max(s.sockets);
                        p.last = s;
                        p.rss_series
                            .push((t0.elapsed().as_secs_f64(), s.rss_kib as f64 / 1024.0));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Ok(Writer {
            child,
            pid,
            log: log.to_path_buf(),
            started,
            ticks,
            stop,
            peaks,
            sampler: Some(sampler),
        })
    }

    pub fn snap(&self) -> Option<Snap> {
        snapshot(self.pid, self.ticks)
    }

    pub fn peaks(&self) -> Peaks {
        self.peaks.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Err with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Res<()> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Err(format!(
                "the writer exited early ({st}); log tail:\n{}",
                log_tail(&self.log)
            ));
        }
        Ok(())
    }

    /// Waits until the writer consumes `create_messages` (a consumer on the
    /// queue) and its index exists.
    pub async fn wait_ready(&mut self, sb: &Sandbox, timeout: Duration) -> Res<Duration> {
        let conn = sb.amqp().await?;
        let agent = http_agent();
        let deadline = Instant::now() + timeout;
        let r = loop {
            self.check_alive()?;
            let consuming = matches!(
                queue_state(&conn, "create_messages").await?,
                Some((_, c)) if c >= 1
            );
            let index = !sb.indexing()
                || http_request(&agent, "GET", &sb.index_url(), None)
                    .await
                    .map(|(s, _)| s == 200)
                    .unwrap_or(false);
            if consuming && index {
                break Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "the writer was not consuming within {timeout:?}; log tail:\n{}",
                    log_tail(&self.log)
                ));
            }
            smol::Timer::after(Duration::from_millis(20)).await;
        };
        let _ = conn.close(200, "OK".into()).await;
        r
    }

    /// SIGTERM, then the exit code (None: killed after 45 s).
    pub fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(45);
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
            }
        };
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
        code
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// What the writer's debug log says about its batches (RUST_LOG=debug):
/// `batch queue=… size=N … write_us=W publish_us=P duration_us=D` and
/// `indexed documents=N … messages=M bulk_us=B`. A batch is "full" when it
/// has the largest size seen (the writer's batch limit under load).
#[derive(Debug, Default)]
pub struct LogStats {
    pub batches: u64,
    pub batch_rows: u64,
    pub full_batches: u64,
    pub batch_us_total: u64,
    pub write_us_total: u64,
    pub publish_us_total: u64,
    pub bulks: u64,
    pub bulk_docs: u64,
    pub bulk_messages: u64,
    pub bulk_us_total: u64,
}

pub fn parse_debug_log(path: &Path) -> LogStats {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let field = |line: &str, key: &str| -> Option<u64> {
        let at = line.find(&format!(" {key}="))? + key.len() + 2;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let mut s = LogStats::default();
    let mut sizes = Vec::new();
    for line in text.lines() {
        if line.contains("batch queue=create_messages") {
            let size = field(line, "size").unwrap_or(0);
            sizes.push(size);
            s.batches += 1;
            s.batch_rows += size;
            s.batch_us_total += field(line, "duration_us").unwrap_or(0);
            s.write_us_total += field(line, "write_us").unwrap_or(0);
            s.publish_us_total += field(line, "publish_us").unwrap_or(0);
        } else if line.contains("indexed documents=") {
            s.bulks += 1;
            s.bulk_docs += field(line, "documents").unwrap_or(0);
            s.bulk_messages += field(line, "messages").unwrap_or(0);
            s.bulk_us_total += field(line, "bulk_us").unwrap_or(0);
        }
    }
    let largest = sizes.iter().copied().max().unwrap_or(0);
    s.full_batches = sizes.iter().filter(|&&n| n == largest).count() as u64;
    s
}

/// CPU seconds used so far by each process taking part in a run, and by the
/// whole machine: the writer (by pid), this load generator, RabbitMQ
/// (`beam.smp`), MariaDB (`mariadbd`), Redis (`redis-server`) and the
/// search server (`osmem-server` processes whose command line names
/// `es_port`). Two readings give who used the CPU in between: on a 2-core
/// machine shared by all of them, this says whether a rate was bounded by
/// CPU (machine busy ≈ 2 cores) or by latency.
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    pub by: std::collections::BTreeMap<&'static str, f64>,
    /// Busy time of all cores together (`/proc/stat`: all but idle and iowait).
    pub machine_busy_s: f64,
}

pub fn cpu_use(writer_pid: u32, es_port: &str) -> CpuUse {
    let ticks = clock_ticks();
    let mut u = CpuUse::default();
    let own = std::process::id();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let group = match comm.trim() {
                _ if pid == writer_pid => "writer",
                _ if pid == own => "load",
                "beam.smp" => "rabbitmq",
                "mariadbd" | "mysqld" => "mariadb",
                "redis-server" => "redis",
                "osmem-server" => {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if !String::from_utf8_lossy(&cmd).contains(&format!(":{es_port}")) {
                        continue;
                    }
                    "search"
                }
                _ => continue,
            };
            if let Some(s) = snapshot(pid, ticks) {
                *u.by.entry(group).or_default() += s.cpu_s;
            }
        }
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/stat") {
        if let Some(cpu) = stat.lines().next() {
            let f: Vec<f64> = cpu
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            if f.len() >= 5 {
                let total: f64 = f.iter().take(8).sum();
                u.machine_busy_s = (total - f[3] - f[4]) / ticks;
            }
        }
    }
    u
}

/// `later − earlier` per group, as JSON `{group: seconds, …, "machine": s}`.
pub fn cpu_between(earlier: &CpuUse, later: &CpuUse) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in &later.by {
        let d = v - earlier.by.get(k).copied().unwrap_or(0.0);
        m.insert(
            (*k).to_string(),
            serde_json::json!((d * 100.0).round() / 100.0),
        );
    }
    let d = later.machine_busy_s - earlier.machine_busy_s;
    m.insert(
        "machine".into(),
        serde_json::json!((d * 100.0).round() / 100.0),
    );
    serde_json::Value::Object(m)
}
