//! Watching the index, so a lost index converges on its own
//! (docs/elasticsearch.md).
//!
//! The indexer checks the index before bulks (at most every second), before
//! each retry of a failed bulk, and when idle (every few seconds):
//!
//! - missing: created with the mapping, whose `_meta` marker says
//!   `backfilled: false`, claimed by this writer; the writer whose creation
//!   succeeded requests the backfill (with several replicas, one of them);
//! - ours (token is a keyword) with `backfilled: false`: a backfill from
//!   MySQL is requested, once per index per process, unless another writer
//!   claimed it less than [`CLAIM_TTL`] ago (the creator, or the backfill
//!   running: it refreshes the claim). The backfill sets the marker when
//!   every row is queued, so an index whose backfill was cut short (a
//!   reconnect, a restart, a SIGKILL between creating the index and queuing
//!   the backfill) is backfilled again once its claim is stale;
//! - ours without a marker (created by an operator): adopted; backfilled
//!   only if it replaced the index seen before while this process ran;
//! - auto-created (a `_bulk` into a missing index makes Elasticsearch
//!   create it with a dynamic mapping: token as text): deleted and created
//!   again with the mapping, then backfilled. It holds only what bulks wrote
//!   into it, and the backfill rewrites that;
//! - another mapping: logged as an error and used as it is.

use super::Client;
use std::time::{Duration, Instant};

/// A backfill claimed this recently is left to the writer that claimed it;
/// an older claim is taken over (its writer died before queuing the
/// backfill, or the backfill has stalled: a second pass is harmless, only
/// more work). The running backfill refreshes its claim far more often
/// (`backfill::CLAIM_REFRESH`).
pub const CLAIM_TTL: Duration = Duration::from_secs(60);

/// How long a writer that took over a stale claim waits before reading it
/// back: replicas that took it over at the same moment each wrote their
/// own; the last one written stands and only its writer requests.
pub const CLAIM_SETTLE: Duration = Duration::from_secs(1);

/// What the watch last saw.
#[derive(Debug, Default)]
pub struct IndexWatch {
    /// `index.uuid` of the index last seen.
    known: Option<String>,
    /// Nothing left to do for `known` (backfilled, or not ours to fill).
    settled: bool,
    /// The index a backfill was requested for by this process.
    requested: Option<String>,
    /// The index whose backfill was seen claimed by another writer (logged
    /// once).
    deferred: Option<String>,
    last_check: Option<Instant>,
}

impl IndexWatch {
    /// A watch that has seen nothing yet.
    pub fn new() -> IndexWatch {
        IndexWatch::default()
    }

    /// True when the last check is older than `every` (or there was none).
    pub fn due(&self, every: Duration) -> bool {
        self.last_check.is_none_or(|t| t.elapsed() >= every)
    }

    /// Checks the index; creates or repairs it.
    ///
    /// Returns `true` when a backfill from MySQL must be requested now.
    /// Errors: Elasticsearch unreachable or answering unexpectedly (check
    /// again later).
    pub async fn check(&mut self, client: &Client) -> Result<bool, String> {
        self.last_check = Some(Instant::now());
        let Some(uuid) = client.index_uuid().await? else {
            if client.create_index().await? {
                log::warn!(
                    "elasticsearch: index {} is missing; created it with the mapping",
                    client.index()
                );
                return self.adopt_new(client).await;
            }
            // Another writer created it a moment ago, with its claim: the
            // next check inspects it.
            return Ok(false);
        };
        let replaced = self.known.as_deref().is_some_and(|k| k != uuid);
        if replaced {
            // Whatever was settled was about the index seen before.
            self.settled = false;
        }
        if self.known.as_deref() == Some(uuid.as_str()) && self.settled {
            return Ok(false);
        }
        let state = client.inspect().await?;
        if state.auto_created {
            log::warn!(
                "elasticsearch: index {} was auto-created by a write without the mapping; creating it again",
                client.index()
            );
            client.delete_index().await?;
            if client.create_index().await? {
                return self.adopt_new(client).await;
            }
            return Ok(false);
        }
        self.known = Some(uuid.clone());
        if !state.ours {
            if !self.settled || replaced {
                log::error!(
                    "elasticsearch: index {} has another mapping (token is not a keyword); indexing into it as it is",
                    client.index()
                );
            }
            self.settled = true;
            return Ok(false);
        }
        match state.backfilled {
            Some(true) => {
                self.settled = true;
                Ok(false)
            }
            Some(false) => {
                if self.requested.as_deref() == Some(uuid.as_str()) {
                    return Ok(false);
                }
                let claimed_ago = state
                    .backfill_claimed_us
                    .map(|c| (crate::time::now_micros() - c).max(0) as u64)
                    .map(Duration::from_micros);
                if let Some(ago) = claimed_ago.filter(|a| *a < CLAIM_TTL) {
                    if self.deferred.as_deref() != Some(uuid.as_str()) {
                        log::info!(
                            "elasticsearch: index {} is being backfilled by another writer (claimed {:.1} s ago)",
                            client.index(),
                            ago.as_secs_f64()
                        );
                        self.deferred = Some(uuid);
                    }
                    return Ok(false);
                }
                // Replicas whose checks run in step all see the claim go
                // stale at once: each writes its own claim, and after a
                // moment only the one whose claim is still there (the last
                // written) requests the backfill.
                let mine = client.claim_backfill().await?;
                async_io::Timer::after(CLAIM_SETTLE).await;
                if client.inspect().await?.backfill_claimed_us != Some(mine) {
                    log::info!(
                        "elasticsearch: index {}: another writer took over the stale backfill claim",
                        client.index()
                    );
                    self.deferred = Some(uuid);
                    return Ok(false);
                }
                Ok(self.request_once(uuid))
            }
            None => {
                if replaced {
                    log::warn!("elasticsearch: index {} was replaced", client.index());
                    client.claim_backfill().await?;
                    self.requested = Some(uuid);
                }
                self.settled = true;
                Ok(replaced)
            }
        }
    }

    /// Records a freshly created index and asks for its backfill.
    async fn adopt_new(&mut self, client: &Client) -> Result<bool, String> {
        self.settled = false;
        match client.index_uuid().await? {
            Some(uuid) => {
                self.known = Some(uuid.clone());
                Ok(self.request_once(uuid))
            }
            None => Err(format!(
                "index {} vanished right after its creation",
                client.index()
            )),
        }
    }

    /// True the first time it is asked for `uuid`.
    fn request_once(&mut self, uuid: String) -> bool {
        if self.requested.as_deref() == Some(uuid.as_str()) {
            return false;
        }
        self.requested = Some(uuid);
        true
    }
}
