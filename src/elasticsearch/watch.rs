//! Watching the index's identity, so a lost index converges on its own
//! (CONTRACT section 7).
//!
//! The indexer remembers the `index.uuid` it writes into and compares it
//! before bulks (at most every second) and when idle (every few seconds).
//! A missing index is created with the mapping; a replaced one (a search
//! cluster rebuilt empty) is taken as it is if it has the mapping. Either
//! way the caller starts a backfill from MySQL. Because a `_bulk` into a
//! missing index makes Elasticsearch auto-create it with a dynamic mapping,
//! an index that appeared while we were not looking and lacks the mapping is
//! deleted and created again properly; it holds only what we just wrote,
//! and the backfill rewrites that.

use super::Client;
use std::time::{Duration, Instant};

/// The index identity last seen.
#[derive(Debug, Default)]
pub struct IndexWatch {
    known: Option<String>,
    last_check: Option<Instant>,
}

impl IndexWatch {
    /// A watch that has seen nothing yet (the first check adopts what it
    /// finds, or creates the index).
    pub fn new() -> IndexWatch {
        IndexWatch::default()
    }

    /// True when the last check is older than `every` (or there was none).
    pub fn due(&self, every: Duration) -> bool {
        self.last_check.is_none_or(|t| t.elapsed() >= every)
    }

    /// Compares the index with what was seen before; creates or repairs it.
    ///
    /// Returns `true` when the index was created or replaced since the last
    /// check, so its documents must be backfilled from MySQL. Errors:
    /// Elasticsearch unreachable or answering unexpectedly (try again later).
    pub async fn check(&mut self, client: &Client) -> Result<bool, String> {
        self.last_check = Some(Instant::now());
        let first = self.known.is_none();
        match client.index_uuid().await? {
            None => {
                if client.create_index().await? {
                    log::warn!(
                        "elasticsearch: index {} is missing; created it with the mapping",
                        client.index()
                    );
                }
                self.known = client.index_uuid().await?;
                Ok(true)
            }
            Some(uuid) if self.known.as_deref() == Some(uuid.as_str()) => Ok(false),
            Some(uuid) => {
                if client.has_our_mapping().await? {
                    self.known = Some(uuid);
                    if !first {
                        log::warn!("elasticsearch: index {} was replaced", client.index());
                    }
                    return Ok(!first);
                }
                if first {
                    log::error!(
                        "elasticsearch: index {} exists with another mapping (token is not a keyword); indexing into it as it is",
                        client.index()
                    );
                    self.known = Some(uuid);
                    return Ok(false);
                }
                log::warn!(
                    "elasticsearch: index {} reappeared without the mapping (auto-created by a write); recreating it",
                    client.index()
                );
                client.delete_index().await?;
                client.create_index().await?;
                self.known = client.index_uuid().await?;
                Ok(true)
            }
        }
    }
}
