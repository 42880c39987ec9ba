//! MySQL helpers: mysql_async driven through async_compat (it is tokio-based).

use async_compat::Compat;
use mysql_async::prelude::{FromRow, Queryable};
use mysql_async::{Conn, Opts, Params};

#[derive(Clone)]
pub struct Db {
    url: String,
}

/// A `chats` row, every column; datetimes as MySQL prints them
/// (`YYYY-MM-DD HH:MM:SS.ffffff`) plus microseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRow {
    pub id: i64,
    pub application_id: i64,
    pub token: String,
    pub number: i64,
    pub messages_count: i64,
    pub creator_id: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
    pub created_us: i64,
    pub updated_us: i64,
}

/// A `messages` row, every column; `body` as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    pub id: i64,
    pub chat_id: i64,
    pub token: String,
    pub chat_number: i64,
    pub number: i64,
    pub body: Vec<u8>,
    pub creator_id: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
    pub created_us: i64,
    pub updated_us: i64,
}

impl MessageRow {
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An `applications` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRow {
    pub id: i64,
    pub token: String,
    pub name: String,
    pub chats_count: i64,
    pub created_at: String,
    pub updated_at: String,
}

const US: &str = "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', ";

impl Db {
    /// The test's database `name`.
    pub fn new(name: &str) -> Db {
        Db {
            url: format!("{}/{name}", super::MYSQL_URL),
        }
    }

    /// Another server (e.g. the TLS tests' own MariaDB), by URL.
    pub fn with_url(url: &str) -> Db {
        Db {
            url: url.to_string(),
        }
    }

    /// The server, no default database.
    pub fn server() -> Db {
        Db {
            url: format!("{}/", super::MYSQL_URL),
        }
    }

    async fn conn(&self) -> Conn {
        let opts = Opts::from_url(&self.url).expect("mysql url");
        Conn::new(opts)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.url))
    }

    /// Runs a query and returns all rows.
    pub async fn query<T: FromRow + Send + 'static>(&self, sql: &str) -> Vec<T> {
        self.exec_rows(sql, Params::Empty).await
    }

    pub async fn exec_rows<T: FromRow + Send + 'static>(
        &self,
        sql: &str,
        params: Params,
    ) -> Vec<T> {
        let sql = sql.to_string();
        Compat::new(async {
            let mut c = self.conn().await;
            let rows = match params {
                // text protocol: also for statements that cannot be prepared
                Params::Empty => c.query(sql.as_str()).await,
                params => c.exec(sql.as_str(), params).await,
            }
            .unwrap_or_else(|e| panic!("query `{sql}`: {e}"));
            let _ = c.disconnect().await;
            rows
        })
        .await
    }

    /// Runs a statement.
    pub async fn exec(&self, sql: &str) {
        self.exec_params(sql, Params::Empty).await
    }

    pub async fn exec_params(&self, sql: &str, params: Params) {
        let sql = sql.to_string();
        Compat::new(async {
            let mut c = self.conn().await;
            match params {
                Params::Empty => c.query_drop(sql.as_str()).await,
                params => c.exec_drop(sql.as_str(), params).await,
            }
            .unwrap_or_else(|e| panic!("statement `{sql}`: {e}"));
            let _ = c.disconnect().await;
        })
        .await
    }

    pub async fn seed_app(&self, id: i64, token: &str, chats_count: i64) {
        self.exec_params(
            "INSERT INTO applications (id, token, name, chats_count, created_at, updated_at) \
             VALUES (?, ?, ?, ?, '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
            Params::Positional(vec![
                id.into(),
                token.into(),
                format!("app {token}").into(),
                chats_count.into(),
            ]),
        )
        .await
    }

    pub async fn seed_chat(
        &self,
        id: i64,
        app_id: i64,
        token: &str,
        number: i64,
        messages_count: i64,
    ) {
        self.exec_params(
            "INSERT INTO chats (id, application_id, token, number, messages_count, creator_id, \
             created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, NULL, '2026-01-01 00:00:00', '2026-01-01 00:00:00')",
            Params::Positional(vec![
                id.into(),
                app_id.into(),
                token.into(),
                number.into(),
                messages_count.into(),
            ]),
        )
        .await
    }

    /// `n` chats of application `app_id`: ids `first_id..`, numbers `1..=n`.
    pub async fn seed_chats(&self, first_id: i64, app_id: i64, token: &str, n: i64) {
        let values: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "({}, {app_id}, '{token}', {}, 0, NULL, '2026-01-01 00:00:00', \
                     '2026-01-01 00:00:00')",
                    first_id + i,
                    i + 1
                )
            })
            .collect();
        self.exec(&format!(
            "INSERT INTO chats (id, application_id, token, number, messages_count, creator_id, \
             created_at, updated_at) VALUES {}",
            values.join(", ")
        ))
        .await
    }

    /// MySQL's UTC clock, microseconds since the epoch.
    pub async fn utc_now_us(&self) -> i64 {
        let r: Vec<i64> = self
            .query("SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))")
            .await;
        r[0]
    }

    pub async fn app(&self, id: i64) -> Option<AppRow> {
        let rows: Vec<(i64, String, String, i64, String, String)> = self
            .query(&format!(
                "SELECT id, token, name, chats_count, CAST(created_at AS CHAR), \
                 CAST(updated_at AS CHAR) FROM applications WHERE id = {id}"
            ))
            .await;
        rows.into_iter().next().map(|r| AppRow {
            id: r.0,
            token: r.1,
            name: r.2,
            chats_count: r.3,
            created_at: r.4,
            updated_at: r.5,
        })
    }

    pub async fn chats_count(&self, app_id: i64) -> Option<i64> {
        self.app(app_id).await.map(|a| a.chats_count)
    }

    pub async fn messages_count(&self, chat_id: i64) -> Option<i64> {
        let rows: Vec<i64> = self
            .query(&format!(
                "SELECT messages_count FROM chats WHERE id = {chat_id}"
            ))
            .await;
        rows.into_iter().next()
    }

    /// Chats matching `where_` (an SQL condition), ordered by number.
    pub async fn chats_where(&self, where_: &str) -> Vec<ChatRow> {
        type R = (
            i64,
            i64,
            String,
            i64,
            i64,
            Option<i64>,
            String,
            String,
            i64,
            i64,
        );
        let rows: Vec<R> = self
            .query(&format!(
                "SELECT id, application_id, token, number, messages_count, creator_id, \
                 CAST(created_at AS CHAR), CAST(updated_at AS CHAR), {US}created_at), \
                 {US}updated_at) FROM chats WHERE {where_} ORDER BY number, id"
            ))
            .await;
        rows.into_iter()
            .map(|r| ChatRow {
                id: r.0,
                application_id: r.1,
                token: r.2,
                number: r.3,
                messages_count: r.4,
                creator_id: r.5,
                created_at: r.6,
                updated_at: r.7,
                created_us: r.8,
                updated_us: r.9,
            })
            .collect()
    }

    /// The chat `(application_id, number)`.
    pub async fn chat(&self, app_id: i64, number: i64) -> Option<ChatRow> {
        self.chats_where(&format!("application_id = {app_id} AND number = {number}"))
            .await
            .into_iter()
            .next()
    }

    /// Messages matching `where_`, ordered by number.
    pub async fn messages_where(&self, where_: &str) -> Vec<MessageRow> {
        type R = (
            i64,
            i64,
            String,
            i64,
            i64,
            Vec<u8>,
            Option<i64>,
            String,
            String,
            i64,
            i64,
        );
        let rows: Vec<R> = self
            .query(&format!(
                "SELECT id, chat_id, token, chat_number, number, body, creator_id, \
                 CAST(created_at AS CHAR), CAST(updated_at AS CHAR), {US}created_at), \
                 {US}updated_at) FROM messages WHERE {where_} ORDER BY number, id"
            ))
            .await;
        rows.into_iter()
            .map(|r| MessageRow {
                id: r.0,
                chat_id: r.1,
                token: r.2,
                chat_number: r.3,
                number: r.4,
                body: r.5,
                creator_id: r.6,
                created_at: r.7,
                updated_at: r.8,
                created_us: r.9,
                updated_us: r.10,
            })
            .collect()
    }

    /// The message `(chat_id, number)`.
    pub async fn message(&self, chat_id: i64, number: i64) -> Option<MessageRow> {
        self.messages_where(&format!("chat_id = {chat_id} AND number = {number}"))
            .await
            .into_iter()
            .next()
    }

    /// `messages.edit_version` of the message `(chat_id, number)`.
    pub async fn edit_version(&self, chat_id: i64, number: i64) -> Option<i64> {
        let rows: Vec<i64> = self
            .query(&format!(
                "SELECT edit_version FROM messages WHERE chat_id = {chat_id} AND number = {number}"
            ))
            .await;
        rows.into_iter().next()
    }

    pub async fn count(&self, table: &str, where_: &str) -> i64 {
        let rows: Vec<i64> = self
            .query(&format!("SELECT COUNT(*) FROM {table} WHERE {where_}"))
            .await;
        rows[0]
    }

    /// The numbers of all messages of chat `chat_id`.
    pub async fn message_numbers(&self, chat_id: i64) -> Vec<i64> {
        self.query(&format!(
            "SELECT number FROM messages WHERE chat_id = {chat_id} ORDER BY number"
        ))
        .await
    }
}
