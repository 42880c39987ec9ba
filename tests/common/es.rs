//! The Elasticsearch-compatible test server (osmem-server) and HTTP helpers.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Starts one osmem-server for this test process (it exits with the
/// process: `-parent-pid`) and returns its base URL.
pub fn start_osmem_server() -> String {
    let bin = osmem_bin();
    let log = std::fs::File::create(
        super::artefact_dir().join(format!("osmem-server-{}.log", std::process::id())),
    )
    .expect("create osmem log");
    start_with(&bin, log)
}

/// The osmem-server binary: `OSMEM_SERVER_BIN`, else the pip package's.
pub fn osmem_bin() -> String {
    match std::env::var("OSMEM_SERVER_BIN") {
        Ok(b) if !b.is_empty() => b,
        _ => {
            let out = Command::new("python3")
                .args([
                    "-c",
                    "import osmem_server; print(osmem_server.resolve_binary())",
                ])
                .output()
                .expect("run python3 to find osmem-server (pip install osmem-server)");
            assert!(
                out.status.success(),
                "osmem-server not found: pip install osmem-server, or set OSMEM_SERVER_BIN: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    }
}

fn start_with(bin: &str, log: std::fs::File) -> String {
    let mut child = Command::new(bin)
        .args([
            "-addr",
            "127.0.0.1:0",
            "-no-stdin-watch",
            "-parent-pid",
            &std::process::id().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    // First stdout line: {"url":"http://127.0.0.1:PORT",...}
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read osmem-server banner");
    let banner: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("osmem-server banner {line:?}: {e}"));
    let url = banner["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no url in osmem-server banner {line:?}"))
        .to_string();
    // Keep draining its stdout so it never blocks on a full pipe; the child
    // handle is leaked on purpose: the server lives as long as this process.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
        drop(child);
    });
    url
}

#[derive(Clone)]
pub struct Es {
    pub base: String,
    pub index: String,
    agent: ureq::Agent,
}

impl Es {
    pub fn new(base: &str, index: &str) -> Es {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(15)))
            .build()
            .into();
        Es {
            base: base.trim_end_matches('/').to_string(),
            index: index.to_string(),
            agent,
        }
    }

    /// A blocking request; returns (status, JSON body or Null).
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            ("PUT", Some(b)) => self
                .agent
                .put(&url)
                .header("Content-Type", "application/json")
                .send(b),
            ("POST", Some(b)) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(b),
            ("POST", None) => self.agent.post(&url).send_empty(),
            _ => panic!("unsupported request {method} {path}"),
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The same request on smol's blocking pool.
    pub async fn req(&self, method: &str, path: &str, body: Option<String>) -> (u16, Value) {
        let es = self.clone();
        let (m, p) = (method.to_string(), path.to_string());
        smol::unblock(move || es.request(&m, &p, body.as_deref())).await
    }

    /// `GET /<index>/_doc/<id>`: the whole response when found.
    pub async fn doc(&self, id: &str) -> Option<Value> {
        let (status, v) = self
            .req("GET", &format!("/{}/_doc/{id}", self.index), None)
            .await;
        (status == 200 && v["found"] == Value::Bool(true)).then_some(v)
    }

    pub async fn index_exists(&self) -> bool {
        let (status, _) = self
            .req("GET", &format!("/{}/_mapping", self.index), None)
            .await;
        status == 200
    }

    pub async fn mapping(&self) -> Value {
        let (status, v) = self
            .req("GET", &format!("/{}/_mapping", self.index), None)
            .await;
        assert_eq!(status, 200, "GET _mapping: {v}");
        v
    }

    /// The writer's `_meta.chat_writer.backfilled` marker of the index;
    /// `None` if the index or the marker is missing.
    pub async fn backfilled(&self) -> Option<bool> {
        let (status, v) = self
            .req("GET", &format!("/{}/_mapping", self.index), None)
            .await;
        if status != 200 {
            return None;
        }
        v[self.index.as_str()]["mappings"]["_meta"]["chat_writer"]["backfilled"].as_bool()
    }

    /// `_count` of the index after a refresh; `None` if the index is missing.
    pub async fn count(&self) -> Option<u64> {
        let _ = self
            .req("POST", &format!("/{}/_refresh", self.index), None)
            .await;
        let (status, v) = self
            .req("GET", &format!("/{}/_count", self.index), None)
            .await;
        if status != 200 {
            return None;
        }
        v["count"].as_u64()
    }

    /// Writes a document directly (not through the writer), external version.
    pub async fn put_doc(&self, id: &str, version: i64, source: &Value) {
        let (status, v) = self
            .req(
                "PUT",
                &format!(
                    "/{}/_doc/{id}?version={version}&version_type=external_gte&refresh=true",
                    self.index
                ),
                Some(source.to_string()),
            )
            .await;
        assert!(status == 200 || status == 201, "PUT doc {id}: {status} {v}");
    }

    pub fn delete_index(&self) {
        let _ = self.request("DELETE", &format!("/{}", self.index), None);
    }
}
