//! The batched writes of the three consumers (docs/mysql-schema.md).
//!
//! Each call writes a whole batch in ONE transaction (READ COMMITTED):
//! a parent check (`SELECT id … IN (…)`), one multi-row
//! `INSERT … ON DUPLICATE KEY UPDATE id = id` (a duplicate is success and
//! never overwrites), or one multi-row `UPDATE … JOIN (SELECT … UNION ALL …)`,
//! then, where indexing needs it, one read-back of the stored rows. If the
//! database refuses a value, the batch is bisected to isolate the poison
//! message(s) in O(k log n) transactions instead of one per message.

use super::sql::{push_int, push_int_list, push_tuples, push_union_table, Lit};
use super::{classify, Fault, Store};
use crate::payload::{CreateChat, CreateMessage, UpdateMessage};
use crate::time::Micros;
use async_compat::Compat;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Transaction};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

/// What happened to one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed (or already there: duplicates are success).
    Stored,
    /// The parent row (application or chat) does not exist yet.
    ParentMissing,
    /// An update whose message row does not exist yet.
    RowMissing,
    /// An update older (by edit version) than the edit its row holds:
    /// success, nothing written.
    Superseded,
    /// The database refused a value of this message; the reason is one line.
    Rejected(String),
}

/// A message row as stored, read back for indexing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// `messages.id`.
    pub id: i64,
    /// `messages.chat_id`.
    pub chat_id: i64,
    /// `messages.number`.
    pub number: i32,
    /// `messages.token`.
    pub token: String,
    /// `messages.chat_number`.
    pub chat_number: i32,
    /// `messages.body`.
    pub body: String,
    /// `created_at` in microseconds since the epoch.
    pub created_at: Micros,
    /// `updated_at` in microseconds since the epoch (the ES version).
    pub updated_at: Micros,
}

type Attempt<'a> = Pin<Box<dyn Future<Output = Result<Vec<Outcome>, mysql_async::Error>> + 'a>>;

/// Largest statement a batch is cut to, in estimated bytes: well under the
/// smallest common `max_allowed_packet` (4 MiB in MySQL 5.7, 16 MiB in
/// MariaDB 10.11, 64 MiB in MySQL 8), whatever the prefetch.
pub const MAX_STATEMENT_BYTES: usize = 4 << 20;

/// Upper bound of the SQL size of one item: every byte of its strings may
/// be escaped to two, plus the fixed columns.
fn sql_bytes(strings: &[&str]) -> usize {
    256 + strings.iter().map(|s| 2 * s.len()).sum::<usize>()
}

/// Runs `attempt` on chunks of the items (each under
/// [`MAX_STATEMENT_BYTES`] by `size`); on a message fault, bisects until the
/// refused messages are alone. Infrastructure errors are returned at once.
async fn isolate<'a>(
    n: usize,
    size: impl Fn(usize) -> usize,
    mut attempt: impl FnMut(Range<usize>) -> Attempt<'a>,
) -> Result<Vec<Outcome>, mysql_async::Error> {
    let mut out = vec![Outcome::Stored; n];
    let mut todo: Vec<Range<usize>> = Vec::with_capacity(8);
    let (mut start, mut bytes) = (0, 0);
    for i in 0..n {
        let b = size(i);
        if i > start && bytes + b > MAX_STATEMENT_BYTES {
            todo.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += b;
    }
    todo.push(start..n);
    todo.reverse();
    while let Some(r) = todo.pop() {
        if r.is_empty() {
            continue;
        }
        match attempt(r.clone()).await {
            Ok(outcomes) => out[r].clone_from_slice(&outcomes),
            Err(e) => match classify(&e) {
                Fault::Infrastructure(_) => return Err(e),
                Fault::Message(reason) if r.len() == 1 => out[r.start] = Outcome::Rejected(reason),
                Fault::Message(_) => {
                    let mid = r.start + r.len() / 2;
                    todo.push(mid..r.end);
                    todo.push(r.start..mid);
                }
            },
        }
    }
    Ok(out)
}

/// A transaction (READ COMMITTED, set per connection in `connection_init`).
async fn begin(store: &Store) -> Result<Transaction<'static>, mysql_async::Error> {
    store.begin().await
}

/// `SELECT id FROM <table> WHERE id IN (ids)` as a set.
async fn existing_ids(
    tx: &mut impl Queryable,
    table: &str,
    ids: impl Iterator<Item = i64>,
) -> Result<HashSet<i64>, mysql_async::Error> {
    let mut uniq: Vec<i64> = ids.collect();
    uniq.sort_unstable();
    uniq.dedup();
    let mut q = format!("SELECT id FROM {table} WHERE id IN (");
    push_int_list(&mut q, uniq);
    q.push(')');
    Ok(tx.query::<i64, _>(q).await?.into_iter().collect())
}

/// Parent ids known to exist. Applications and chats are never deleted
/// (docs/mysql-schema.md), so once seen a parent stays; the set only saves
/// the `SELECT … IN` of later batches. Bounded: cleared past 200,000 ids.
#[derive(Debug, Default)]
pub struct KnownParents {
    applications: HashSet<i64>,
    chats: HashSet<i64>,
}

/// Which parent table a batch checks.
#[derive(Debug, Clone, Copy)]
enum Parent {
    Applications,
    Chats,
}

impl Parent {
    fn table(self) -> &'static str {
        match self {
            Parent::Applications => "applications",
            Parent::Chats => "chats",
        }
    }
    /// The work queue whose rows have this parent (metrics label).
    fn queue(self) -> &'static str {
        match self {
            Parent::Applications => "create_chats",
            Parent::Chats => "create_messages",
        }
    }
    fn set(self, k: &mut KnownParents) -> &mut HashSet<i64> {
        match self {
            Parent::Applications => &mut k.applications,
            Parent::Chats => &mut k.chats,
        }
    }
}

const KNOWN_PARENTS_MAX: usize = 200_000;

/// What [`insert_children`] did.
struct Inserted {
    /// `Stored` or `ParentMissing` per input row, in order.
    outcomes: Vec<Outcome>,
    /// True when every stored row was new (no duplicate met), so the rows
    /// are exactly what was sent and need no read-back.
    all_new: bool,
}

/// The multi-row insert shared by chats and messages, in autocommit (one
/// statement is one transaction): checks the parents not yet known to exist
/// (one `SELECT … IN`), then inserts the rows whose parent exists with one
/// `INSERT … VALUES (…),(…) ON DUPLICATE KEY UPDATE id = id`. The affected
/// row count tells duplicates apart: 1 per new row, 0 per duplicate.
async fn insert_children<'a, const N: usize>(
    store: &Store,
    conn: &mut Conn,
    parent: Parent,
    insert: &str,
    rows: impl Iterator<Item = (i64, [Lit<'a>; N])> + Clone,
) -> Result<Inserted, mysql_async::Error> {
    let unknown: Vec<i64> = {
        let mut known = store.known.lock().unwrap_or_else(|p| p.into_inner());
        let set = parent.set(&mut known);
        rows.clone()
            .map(|(p, _)| p)
            .filter(|p| !set.contains(p))
            .collect()
    };
    let found = if unknown.is_empty() {
        HashSet::new()
    } else {
        existing_ids(conn, parent.table(), unknown.into_iter()).await?
    };
    let exists: HashSet<i64> = {
        let mut known = store.known.lock().unwrap_or_else(|p| p.into_inner());
        let set = parent.set(&mut known);
        if set.len() + found.len() > KNOWN_PARENTS_MAX {
            set.clear();
        }
        set.extend(found.iter().copied());
        rows.clone()
            .map(|(p, _)| p)
            .filter(|p| set.contains(p) || found.contains(p))
            .collect()
    };
    let outcomes: Vec<Outcome> = rows
        .clone()
        .map(|(p, _)| {
            if exists.contains(&p) {
                Outcome::Stored
            } else {
                Outcome::ParentMissing
            }
        })
        .collect();
    let stored = outcomes.iter().filter(|o| **o == Outcome::Stored).count() as u64;
    let mut all_new = true;
    if stored > 0 {
        let mut q = String::with_capacity(insert.len() + 64 + outcomes.len() * 160);
        q.push_str(insert);
        push_tuples(
            &mut q,
            rows.filter(|(p, _)| exists.contains(p)).map(|(_, row)| row),
        );
        q.push_str(" ON DUPLICATE KEY UPDATE id = id");
        conn.query_drop(q).await?;
        let affected = conn.affected_rows();
        all_new = affected == stored;
        let m = crate::metrics::get();
        m.duplicates
            .get_or_create(&crate::metrics::Metrics::queue(parent.queue()))
            .inc_by(stored.saturating_sub(affected));
    }
    Ok(Inserted { outcomes, all_new })
}

/// The columns of a [`MessageRow`], in its field order.
const MESSAGE_COLUMNS: &str = "SELECT id, chat_id, number, token, chat_number, body, \
    CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', created_at) AS SIGNED), \
    CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', updated_at) AS SIGNED) \
    FROM messages ";

type RawMessageRow = (i64, i64, i32, String, i32, String, i64, i64);

fn message_row(r: RawMessageRow) -> MessageRow {
    let (id, chat_id, number, token, chat_number, body, created_at, updated_at) = r;
    MessageRow {
        id,
        chat_id,
        number,
        token,
        chat_number,
        body,
        created_at,
        updated_at,
    }
}

/// Appends `(chat_id,number),(…)` for a row-value `IN` list.
fn push_key_list(q: &mut String, keys: impl Iterator<Item = (i64, i32)>) {
    push_tuples(
        q,
        keys.map(|(chat_id, number)| [Lit::Int(chat_id), Lit::Int(i64::from(number))]),
    );
}

/// Reads back the rows `(chat_id, number)` as stored.
async fn read_back(
    tx: &mut impl Queryable,
    keys: impl Iterator<Item = (i64, i32)>,
) -> Result<Vec<MessageRow>, mysql_async::Error> {
    let mut q = String::from(MESSAGE_COLUMNS);
    q.push_str("WHERE (chat_id, number) IN (");
    push_key_list(&mut q, keys);
    q.push(')');
    let rows: Vec<RawMessageRow> = tx.query(q).await?;
    Ok(rows.into_iter().map(message_row).collect())
}

impl Store {
    /// Inserts a batch of chats: `(payload, created_at)` pairs.
    ///
    /// Returns one [`Outcome`] per input, in order: `Stored`,
    /// `ParentMissing` (no such application yet) or `Rejected`.
    /// Errors: infrastructure faults only (see [`classify`]).
    pub async fn create_chats(
        &self,
        items: &[(&CreateChat, Micros)],
    ) -> Result<Vec<Outcome>, mysql_async::Error> {
        isolate(
            items.len(),
            |i| sql_bytes(&[&items[i].0.token]),
            |r| Box::pin(Compat::new(self.try_create_chats(&items[r]))),
        )
        .await
    }

    async fn try_create_chats(
        &self,
        items: &[(&CreateChat, Micros)],
    ) -> Result<Vec<Outcome>, mysql_async::Error> {
        let mut conn = self.get_conn().await?;
        let rows = items.iter().map(|(c, at)| {
            let row = [
                Lit::Int(c.application_id),
                Lit::Str(&c.token),
                Lit::Int(i64::from(c.number)),
                Lit::Int(0),
                Lit::OptInt(c.creator_id),
                Lit::DateTime(*at),
                Lit::DateTime(*at),
            ];
            (c.application_id, row)
        });
        let inserted = insert_children(
            self,
            &mut conn,
            Parent::Applications,
            "INSERT INTO chats (application_id, token, number, messages_count, creator_id, \
             created_at, updated_at) VALUES ",
            rows,
        )
        .await?;
        Ok(inserted.outcomes)
    }

    /// Inserts a batch of messages: `(payload, created_at)` pairs. With
    /// `read_back`, also returns the stored rows of every `Stored` message
    /// (for a duplicate: the row as first stored, possibly updated since).
    ///
    /// Errors: infrastructure faults only.
    pub async fn create_messages(
        &self,
        items: &[(&CreateMessage, Micros)],
        read_back: bool,
    ) -> Result<(Vec<Outcome>, Vec<MessageRow>), mysql_async::Error> {
        let mut rows = Vec::new();
        let rows_ref = std::cell::RefCell::new(&mut rows);
        let size = |i: usize| sql_bytes(&[&items[i].0.token, &items[i].0.body]);
        let outcomes = isolate(items.len(), size, |r| {
            let rows_ref = &rows_ref;
            Box::pin(Compat::new(async move {
                let (o, mut got) = self.try_create_messages(&items[r], read_back).await?;
                rows_ref.borrow_mut().append(&mut got);
                Ok(o)
            }))
        })
        .await?;
        Ok((outcomes, rows))
    }

    async fn try_create_messages(
        &self,
        items: &[(&CreateMessage, Micros)],
        want_rows: bool,
    ) -> Result<(Vec<Outcome>, Vec<MessageRow>), mysql_async::Error> {
        let mut conn = self.get_conn().await?;
        let rows = items.iter().map(|(m, at)| {
            let row = [
                Lit::Int(m.chat_id),
                Lit::Str(&m.token),
                Lit::Int(i64::from(m.chat_number)),
                Lit::Int(i64::from(m.number)),
                Lit::Str(&m.body),
                Lit::OptInt(m.creator_id),
                Lit::DateTime(*at),
                Lit::DateTime(*at),
            ];
            (m.chat_id, row)
        });
        let inserted = insert_children(
            self,
            &mut conn,
            Parent::Chats,
            "INSERT INTO messages (chat_id, token, chat_number, number, body, creator_id, \
             created_at, updated_at) VALUES ",
            rows,
        )
        .await?;
        let stored = items
            .iter()
            .zip(&inserted.outcomes)
            .filter(|(_, o)| **o == Outcome::Stored);
        let rows = if !want_rows {
            Vec::new()
        } else if inserted.all_new {
            // Exactly what was sent: no read-back needed (`id` is not known
            // and not needed for indexing).
            stored
                .map(|((m, at), _)| MessageRow {
                    id: 0,
                    chat_id: m.chat_id,
                    number: m.number,
                    token: m.token.clone(),
                    chat_number: m.chat_number,
                    body: m.body.clone(),
                    created_at: *at,
                    updated_at: *at,
                })
                .collect()
        } else {
            // A duplicate is indexed as stored (the original, possibly
            // updated since), never as sent.
            read_back(&mut conn, stored.map(|((m, _), _)| (m.chat_id, m.number))).await?
        };
        Ok((inserted.outcomes, rows))
    }

    /// Applies a batch of updates, each `(payload, edit version)`: body,
    /// `edit_version` and `updated_at` of the row `(chat_id, number)`, if
    /// the edit's version is at least the row's `edit_version` (an older
    /// edit never overwrites a newer one; on a tie the later processed
    /// wins; see `edit_order`). `updated_at` becomes
    /// `GREATEST(UTC_TIMESTAMP(6), updated_at + 1 µs)`, so it strictly
    /// increases on every applied update, identical body or not.
    /// Several updates of one row in a batch: the highest version wins (on
    /// a tie the last delivered); the others are `Superseded` when their
    /// version is lower, else share its outcome; if MySQL refuses the
    /// winner's value, the next newest is tried on its own. Returns one [`Outcome`]
    /// per input (`Stored`, `Superseded`, `RowMissing` or `Rejected`) and
    /// the rows found, as stored after the batch (superseded ones too, so
    /// their document follows the row).
    ///
    /// Errors: infrastructure faults only.
    pub async fn update_messages(
        &self,
        items: &[(&UpdateMessage, Micros)],
    ) -> Result<(Vec<Outcome>, Vec<MessageRow>), mysql_async::Error> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; items.len()];
        let mut rows = Vec::new();
        // Rounds: the newest edit of each message is written; when MySQL
        // refuses it, the next newest of that message gets its own turn
        // (it is not to blame for the newer one's value).
        let mut left: Vec<usize> = (0..items.len()).collect();
        while !left.is_empty() {
            // The newest of each key wins; on a tie, the last delivered.
            let mut best: HashMap<(i64, i32), usize> = HashMap::with_capacity(left.len());
            for &i in &left {
                let (u, v) = items[i];
                best.entry((u.chat_id, u.number))
                    .and_modify(|b| {
                        if v >= items[*b].1 {
                            *b = i;
                        }
                    })
                    .or_insert(i);
            }
            let winners: Vec<usize> = left
                .iter()
                .copied()
                .filter(|&i| best[&(items[i].0.chat_id, items[i].0.number)] == i)
                .collect();
            let is_winner: HashSet<usize> = winners.iter().copied().collect();
            let slice: Vec<(&UpdateMessage, Micros)> = winners.iter().map(|&i| items[i]).collect();
            let rows_ref = std::cell::RefCell::new(&mut rows);
            let size = |i: usize| sql_bytes(&[&slice[i].0.body]);
            let winner_outcomes = isolate(slice.len(), size, |r| {
                let rows_ref = &rows_ref;
                let part = &slice[r];
                Box::pin(Compat::new(async move {
                    let (o, mut got) = self.try_update_messages(part).await?;
                    rows_ref.borrow_mut().append(&mut got);
                    Ok(o)
                }))
            })
            .await?;
            let by_key: HashMap<(i64, i32), (Micros, &Outcome)> = winners
                .iter()
                .zip(&winner_outcomes)
                .map(|(&i, o)| ((items[i].0.chat_id, items[i].0.number), (items[i].1, o)))
                .collect();
            let mut next = Vec::new();
            for &i in &left {
                let (u, v) = items[i];
                let (winner_version, o) = by_key[&(u.chat_id, u.number)];
                outcomes[i] = match o {
                    _ if is_winner.contains(&i) => Some(o.clone()),
                    Outcome::Rejected(_) => {
                        next.push(i);
                        None
                    }
                    Outcome::Stored | Outcome::Superseded if v < winner_version => {
                        Some(Outcome::Superseded)
                    }
                    o => Some(o.clone()),
                };
            }
            left = next;
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::RowMissing))
            .collect();
        Ok((outcomes, rows))
    }

    async fn try_update_messages(
        &self,
        items: &[(&UpdateMessage, Micros)],
    ) -> Result<(Vec<Outcome>, Vec<MessageRow>), mysql_async::Error> {
        let mut tx = begin(self).await?;
        // Lock the rows that exist now, with the version of the edit each
        // holds. Only these are updated and reported found: a row created
        // by another transaction after this point is "missing" for this
        // batch (retried later), never "found but not updated" (READ
        // COMMITTED would show it to a later SELECT).
        let mut q = String::from(
            "SELECT chat_id, number, edit_version FROM messages WHERE (chat_id, number) IN (",
        );
        push_key_list(&mut q, items.iter().map(|(u, _)| (u.chat_id, u.number)));
        q.push_str(") FOR UPDATE");
        let locked: HashMap<(i64, i32), i64> = tx
            .query::<(i64, i32, i64), _>(q)
            .await?
            .into_iter()
            .map(|(c, n, v)| ((c, n), v))
            .collect();
        let outcomes: Vec<Outcome> = items
            .iter()
            .map(|(u, v)| match locked.get(&(u.chat_id, u.number)) {
                None => Outcome::RowMissing,
                Some(held) if v < held => Outcome::Superseded,
                Some(_) => Outcome::Stored,
            })
            .collect();
        let apply: Vec<(&UpdateMessage, Micros)> = items
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| **o == Outcome::Stored)
            .map(|(w, _)| *w)
            .collect();
        if !apply.is_empty() {
            let body_bytes: usize = apply.iter().map(|(u, _)| u.body.len()).sum();
            let mut q = String::with_capacity(256 + apply.len() * 80 + body_bytes * 11 / 10);
            q.push_str("UPDATE messages m JOIN (");
            let values = apply.iter().map(|(u, v)| {
                [
                    Lit::Int(u.chat_id),
                    Lit::Int(i64::from(u.number)),
                    Lit::Str(&u.body),
                    Lit::Int(*v),
                ]
            });
            push_union_table(&mut q, &["chat_id", "number", "body", "ev"], values);
            // The version check is repeated in SQL (the rows are locked, so
            // it holds), so that no statement of this shape can ever
            // overwrite a newer edit.
            q.push_str(
                ") u ON m.chat_id = u.chat_id AND m.number = u.number \
                 SET m.body = u.body, m.edit_version = u.ev, \
                 m.updated_at = GREATEST(UTC_TIMESTAMP(6), m.updated_at + INTERVAL 1 MICROSECOND) \
                 WHERE u.ev >= m.edit_version",
            );
            tx.query_drop(q).await?;
        }
        let mut rows = Vec::new();
        if !locked.is_empty() {
            rows = read_back(&mut tx, locked.keys().copied()).await?;
        }
        tx.commit().await?;
        Ok((outcomes, rows))
    }

    /// Count sync: `applications.chats_count = count` for each
    /// `(token, count)`, only where the stored count is lower (counts never
    /// move down; unchanged rows are not written). Tokens match byte for
    /// byte (the column's collation ignores case; the index still serves the
    /// lookup). Returns rows changed.
    pub async fn raise_chat_counts(
        &self,
        counts: &[(&str, i64)],
    ) -> Result<u64, mysql_async::Error> {
        if counts.is_empty() {
            return Ok(0);
        }
        let mut q = String::from("UPDATE applications a JOIN (");
        let rows = counts
            .iter()
            .map(|(token, n)| [Lit::Str(token), Lit::Int(*n)]);
        push_union_table(&mut q, &["token", "cnt"], rows);
        q.push_str(
            ") u ON a.token = u.token AND BINARY a.token = BINARY u.token \
             SET a.chats_count = u.cnt WHERE a.chats_count < u.cnt",
        );
        self.run_update(q).await
    }

    /// Count sync: `chats.messages_count = count` for each
    /// `(token, chat_number, count)`, only where the stored count is lower.
    /// Returns rows changed.
    pub async fn raise_message_counts(
        &self,
        counts: &[(&str, i32, i64)],
    ) -> Result<u64, mysql_async::Error> {
        if counts.is_empty() {
            return Ok(0);
        }
        let mut q = String::from("UPDATE chats c JOIN (");
        let rows = counts.iter().map(|(token, number, n)| {
            [Lit::Str(token), Lit::Int(i64::from(*number)), Lit::Int(*n)]
        });
        push_union_table(&mut q, &["token", "number", "cnt"], rows);
        q.push_str(
            ") u ON c.token = u.token AND c.number = u.number AND BINARY c.token = BINARY u.token \
             SET c.messages_count = u.cnt WHERE c.messages_count < u.cnt",
        );
        self.run_update(q).await
    }

    /// Up to `limit` message rows with `id > after_id`, in id order: the
    /// unit of a backfill or `reindex` pass (docs/elasticsearch.md).
    ///
    /// Errors: any MySQL error (the caller retries or exits).
    pub async fn messages_after(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<MessageRow>, mysql_async::Error> {
        let mut q = String::from(MESSAGE_COLUMNS);
        q.push_str("WHERE id > ");
        push_int(&mut q, after_id);
        q.push_str(" ORDER BY id LIMIT ");
        push_int(&mut q, limit as i64);
        Compat::new(async {
            let mut conn = self.get_conn().await?;
            let rows: Vec<RawMessageRow> = conn.query(q).await?;
            Ok(rows.into_iter().map(message_row).collect())
        })
        .await
    }

    /// `SELECT COUNT(*) FROM messages`, for progress lines.
    pub async fn count_messages(&self) -> Result<u64, mysql_async::Error> {
        Compat::new(async {
            let mut conn = self.get_conn().await?;
            Ok(conn
                .query_first::<u64, _>("SELECT COUNT(*) FROM messages")
                .await?
                .unwrap_or(0))
        })
        .await
    }

    async fn run_update(&self, q: String) -> Result<u64, mysql_async::Error> {
        Compat::new(async {
            let mut conn = self.get_conn().await?;
            conn.query_drop(q).await?;
            Ok(conn.affected_rows())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn refused() -> mysql_async::Error {
        mysql_async::Error::Server(mysql_async::ServerError {
            code: 4025,
            message: "CONSTRAINT `no_poison` failed".into(),
            state: "23000".into(),
        })
    }

    /// Runs `isolate` over `n` items of `size` bytes each, refusing every
    /// range that holds a poison index; returns the outcomes and the ranges tried.
    fn run(n: usize, size: usize, poison: &[usize]) -> (Vec<Outcome>, Vec<Range<usize>>) {
        let tried = RefCell::new(Vec::new());
        let out = smol::block_on(isolate(
            n,
            |_| size,
            |r| {
                tried.borrow_mut().push(r.clone());
                let bad = poison.iter().any(|p| r.contains(p));
                let len = r.len();
                Box::pin(async move {
                    if bad {
                        Err(refused())
                    } else {
                        Ok(vec![Outcome::Stored; len])
                    }
                })
            },
        ))
        .unwrap();
        (out, tried.into_inner())
    }

    #[test]
    fn one_poison_among_many_is_isolated_in_log_steps() {
        let (out, tried) = run(201, 100, &[137]);
        assert_eq!(out.iter().filter(|o| **o == Outcome::Stored).count(), 200);
        assert!(matches!(&out[137], Outcome::Rejected(r) if r.contains("4025")));
        // 1 whole batch + 2 per level of bisection (log2 201 ≈ 8), not 201.
        assert!(tried.len() <= 1 + 2 * 8, "{} attempts", tried.len());
    }

    #[test]
    fn batches_are_cut_under_the_statement_limit() {
        let item = 300 << 10; // 300 KiB of SQL each
        let (out, tried) = run(40, item, &[]);
        assert!(out.iter().all(|o| *o == Outcome::Stored));
        assert!(
            tried.iter().all(|r| r.len() * item <= MAX_STATEMENT_BYTES),
            "{tried:?}"
        );
        assert_eq!(tried.iter().map(|r| r.len()).sum::<usize>(), 40);
        assert_eq!(tried.first(), Some(&(0..13)));
    }

    #[test]
    fn an_outage_is_not_bisected() {
        let out = smol::block_on(isolate(
            10,
            |_| 1,
            |_| {
                Box::pin(async {
                    Err(mysql_async::Error::Io(
                        std::io::Error::other("reset").into(),
                    ))
                })
            },
        ));
        assert!(out.is_err());
    }
}
