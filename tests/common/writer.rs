//! The writer as a child process, its stderr in a log file.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, `None` when killed by a signal.
    pub code: Option<i32>,
    /// How long after the wait started it ended.
    pub after: Duration,
}

pub struct Writer {
    child: Option<Child>,
    pub log_path: PathBuf,
    pub stdout_path: PathBuf,
    exit: Option<Exit>,
}

impl Writer {
    pub fn spawn(args: &[&str], vars: &BTreeMap<String, String>, log: &Path) -> Writer {
        let stdout_path = log.with_extension("stdout");
        let err = File::create(log).expect("create writer log");
        let out = File::create(&stdout_path).expect("create writer stdout file");
        let mut cmd = Command::new(super::BIN);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(vars)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", super::BIN));
        Writer {
            child: Some(child),
            log_path: log.to_path_buf(),
            stdout_path,
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The captured stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// The captured stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stdout_path).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(n);
        format!(
            "--- {} (last {} of {} lines) ---\n{}",
            self.log_path.display(),
            lines.len() - start,
            lines.len(),
            lines[start..].join("\n")
        )
    }

    /// `Some(exit)` once the process has ended.
    pub fn try_exit(&mut self) -> Option<Exit> {
        if self.exit.is_some() {
            return self.exit;
        }
        let child = self.child.as_mut()?;
        match child.try_wait().expect("try_wait") {
            Some(status) => {
                self.exit = Some(Exit {
                    code: status.code(),
                    after: Duration::ZERO,
                });
                self.exit
            }
            None => None,
        }
    }

    /// Panics (with the log) if the process has already ended.
    pub fn assert_running(&mut self) {
        if let Some(exit) = self.try_exit() {
            panic!(
                "the writer exited unexpectedly ({exit:?})\n{}",
                self.log_tail(80)
            );
        }
    }

    /// Sends a signal with `kill -<sig> <pid>`.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().to_string();
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {pid} failed");
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Waits for the process to end; after `timeout` kills it and panics.
    pub fn wait_exit(&mut self, timeout: Duration) -> Exit {
        let start = Instant::now();
        loop {
            if let Some(mut e) = self.try_exit() {
                if e.after == Duration::ZERO {
                    e.after = start.elapsed();
                    self.exit = Some(e);
                }
                return e;
            }
            if start.elapsed() > timeout {
                self.kill();
                panic!(
                    "the process did not exit within {timeout:?}; killed it\n{}",
                    self.log_tail(80)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then expects exit code 0 within `timeout`.
    pub fn stop_within(&mut self, timeout: Duration) -> Exit {
        self.assert_running();
        self.sigterm();
        let exit = self.wait_exit(timeout);
        assert_eq!(
            exit.code,
            Some(0),
            "the writer should exit 0 after SIGTERM, got {exit:?}\n{}",
            self.log_tail(80)
        );
        exit
    }

    /// SIGTERM and expect exit 0 within 25 s.
    pub fn stop(&mut self) -> Exit {
        self.stop_within(Duration::from_secs(25))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.exit.is_none() {
            self.exit = Some(Exit {
                code: None,
                after: Duration::ZERO,
            });
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let running = self.try_exit().is_none();
        if running {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!(
                "writer pid {} ({}):\n{}",
                self.pid(),
                if running {
                    "was still running; killed"
                } else {
                    "had exited"
                },
                self.log_tail(120)
            );
        }
    }
}
