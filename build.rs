//! Embeds the git commit and the build date (UTC) for `--version`.
//! VCS_REF, when set (a container build has no .git), names the commit;
//! SOURCE_DATE_EPOCH, when set, fixes the date for reproducible builds.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

#[path = "src/time.rs"]
#[allow(dead_code)]
mod time;

fn main() {
    let from_env = std::env::var("VCS_REF")
        .ok()
        .filter(|s| !s.is_empty() && s != "unknown");
    let commit = from_env
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
    let date = time::rfc3339(secs * 1_000_000);
    println!("cargo:rustc-env=CHAT_WRITER_COMMIT={commit}");
    println!("cargo:rustc-env=CHAT_WRITER_BUILD_DATE={}", &date[..10]);
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-env-changed=VCS_REF");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-changed=build.rs");
}
