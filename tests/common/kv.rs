//! Redis helpers (redis crate, smol runtime). Never touches DB 0.

use redis::aio::MultiplexedConnection;
use redis::{Client, FromRedisValue};

#[derive(Clone)]
pub struct Kv {
    client: Client,
    pub db: u8,
}

impl Kv {
    pub fn new(db: u8) -> Kv {
        assert!((1..=15).contains(&db), "tests never use Redis DB {db}");
        Kv {
            client: Client::open(format!("redis://127.0.0.1:6379/{db}")).expect("redis url"),
            db,
        }
    }

    /// A Redis the test owns (e.g. a private `redis-server`), any DB.
    pub fn with_url(url: &str) -> Kv {
        Kv {
            client: Client::open(url).expect("redis url"),
            db: 0,
        }
    }

    pub async fn con(&self) -> MultiplexedConnection {
        self.client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }

    /// Runs one command.
    pub async fn cmd<T: FromRedisValue>(&self, args: &[&str]) -> T {
        let mut con = self.con().await;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    pub async fn flushdb(&self) {
        let _: () = self.cmd(&["FLUSHDB"]).await;
    }

    pub async fn set(&self, key: &str, v: i64) {
        let _: () = self.cmd(&["SET", key, &v.to_string()]).await;
    }

    pub async fn incr(&self, key: &str) -> i64 {
        self.cmd(&["INCR", key]).await
    }

    pub async fn sadd(&self, key: &str, member: &str) {
        let _: i64 = self.cmd(&["SADD", key, member]).await;
    }

    pub async fn smembers(&self, key: &str) -> Vec<String> {
        let mut m: Vec<String> = self.cmd(&["SMEMBERS", key]).await;
        m.sort();
        m
    }

    /// Counter of application `token` plus its change marker, as the API does.
    pub async fn set_chat_counter(&self, token: &str, v: i64, mark: bool) {
        self.set(&format!("chat_counter:{token}"), v).await;
        if mark {
            self.sadd("chat_changes", token).await;
        }
    }

    /// Counter of chat `token:chat_number` plus its change marker.
    pub async fn set_message_counter(&self, token: &str, chat_number: i64, v: i64, mark: bool) {
        self.set(&format!("message_counter:{token}:{chat_number}"), v)
            .await;
        if mark {
            self.sadd("message_changes", &format!("{token}:{chat_number}"))
                .await;
        }
    }
}
