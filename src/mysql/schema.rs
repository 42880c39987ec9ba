//! `chat-writer migrate`: the MySQL schema (`applications`, `chats`,
//! `messages`, as [`TABLES`] and [`ADDED_COLUMNS`] below spell them).
//!
//! Creates the database if missing, then each table if missing, then the
//! columns added since a table was first created. Every step checks first,
//! so running it twice is harmless. InnoDB, utf8mb4 throughout (a 4-byte
//! character such as an emoji is stored byte for byte).

use super::sql::push_ident;
use crate::config::Config;
use async_compat::Compat;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;

/// The `CREATE TABLE IF NOT EXISTS` statements of docs/mysql-schema.md, in
/// dependency order (also used by perf/ to set up its own databases).
pub const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS applications (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        token VARCHAR(255) NOT NULL,
        name VARCHAR(255) NOT NULL,
        chats_count INT NOT NULL DEFAULT 0,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        UNIQUE KEY index_applications_on_token (token)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
    "CREATE TABLE IF NOT EXISTS chats (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        application_id BIGINT NOT NULL,
        token VARCHAR(255) NOT NULL,
        number INT NOT NULL,
        messages_count INT NOT NULL DEFAULT 0,
        creator_id BIGINT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        UNIQUE KEY index_chats_on_application_id_and_number (application_id, number),
        KEY index_chats_on_token_and_number (token, number),
        CONSTRAINT fk_chats_application_id FOREIGN KEY (application_id) REFERENCES applications (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
    "CREATE TABLE IF NOT EXISTS messages (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        chat_id BIGINT NOT NULL,
        token VARCHAR(255) NOT NULL,
        chat_number INT NOT NULL,
        number INT NOT NULL,
        body TEXT NOT NULL,
        creator_id BIGINT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        edit_version BIGINT NOT NULL DEFAULT 0,
        UNIQUE KEY index_messages_on_chat_id_and_number (chat_id, number),
        KEY index_messages_on_token_and_chat_number (token, chat_number),
        CONSTRAINT fk_messages_chat_id FOREIGN KEY (chat_id) REFERENCES chats (id)
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
];

/// Columns added after the first schema, as `(table, column, definition)`:
/// `migrate` adds each to a table created before it (the table keeps its
/// rows; existing rows get the column's default). `messages.edit_version`
/// is the version of the edit a row holds (microseconds since the epoch, 0
/// for a row as created): an older edit never overwrites a newer one.
pub const ADDED_COLUMNS: &[(&str, &str, &str)] =
    &[("messages", "edit_version", "BIGINT NOT NULL DEFAULT 0")];

/// How an added column is filled for the rows that exist when it is added,
/// as `(table, column, statement)`. A message edited before edit versions
/// existed holds an edit as new as its `updated_at` (set by MySQL's clock
/// when that edit was applied, at or after the writer received it): its
/// `edit_version` becomes `updated_at` in microseconds, so an edit still
/// in flight from before the upgrade (in a delay tier or a `.dlq`, received
/// before that) cannot overwrite it. Rows never edited keep 0.
const FILL_ADDED: &[(&str, &str, &str)] = &[(
    "messages",
    "edit_version",
    "UPDATE messages SET edit_version = \
     CAST(TIMESTAMPDIFF(MICROSECOND, '1970-01-01', updated_at) AS SIGNED) \
     WHERE updated_at > created_at",
)];

/// Adds `column` to `table` unless `information_schema` lists it already
/// (`ADD COLUMN IF NOT EXISTS` is MariaDB only). The column goes last, so
/// MySQL 8 adds it in place (`ALGORITHM=INSTANT`) and MariaDB without a
/// table copy; then fills it for existing rows ([`FILL_ADDED`]), once.
async fn add_column_if_missing(
    conn: &mut Conn,
    db: &str,
    table: &str,
    column: &str,
    definition: &str,
) -> Result<(), mysql_async::Error> {
    let present: Option<u8> = conn
        .exec_first(
            "SELECT 1 FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND COLUMN_NAME = ?",
            (db, table, column),
        )
        .await?;
    if present.is_some() {
        return Ok(());
    }
    let mut q = String::from("ALTER TABLE ");
    push_ident(&mut q, table);
    q.push_str(" ADD COLUMN ");
    push_ident(&mut q, column);
    q.push(' ');
    q.push_str(definition);
    conn.query_drop(q).await?;
    log::info!("migrate: added column {table}.{column} ({definition})");
    if let Some(fill) = FILL_ADDED
        .iter()
        .find(|(t, c, _)| *t == table && *c == column)
    {
        conn.query_drop(fill.2).await?;
        log::info!(
            "migrate: {table}.{column} set for {} existing rows",
            conn.affected_rows()
        );
    }
    Ok(())
}

/// Creates DATABASE_NAME (if missing) and the three tables (if missing),
/// then adds the `ADDED_COLUMNS` a table created earlier lacks.
///
/// Errors: any MySQL error, unclassified (the caller exits 1).
pub async fn migrate(cfg: &Config) -> Result<(), mysql_async::Error> {
    Compat::new(async {
        let mut conn = super::connect(cfg, None).await?;
        let mut create = String::from("CREATE DATABASE IF NOT EXISTS ");
        push_ident(&mut create, &cfg.database_name);
        create.push_str(" CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci");
        conn.query_drop(create).await?;
        let mut use_db = String::from("USE ");
        push_ident(&mut use_db, &cfg.database_name);
        conn.query_drop(use_db).await?;
        for t in TABLES {
            conn.query_drop(*t).await?;
        }
        for (table, column, definition) in ADDED_COLUMNS {
            add_column_if_missing(&mut conn, &cfg.database_name, table, column, definition).await?;
        }
        conn.disconnect().await
    })
    .await
}
