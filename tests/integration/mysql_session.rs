//! The writer's MySQL sessions keep the settings of `connection_init`
//! (utf8mb4, UTC, strict mode, READ COMMITTED) for their whole life, also
//! after a connection went back to the pool and came out again. (The
//! driver's default would reset a returned connection with
//! COM_RESET_CONNECTION, which puts every session variable back to the
//! server's global value.)

use async_compat::Compat;
use chat_writer::config::Config;
use chat_writer::mysql::Store;
use mysql_async::prelude::Queryable;
use std::time::Duration;

use crate::common::TestEnv;

type Session = (String, String, String, String, String, u64);

const SESSION: &str = "SELECT @@session.time_zone, @@session.sql_mode, @@session.tx_isolation, \
     @@session.character_set_connection, @@session.collation_connection, CONNECTION_ID()";

#[test]
fn pooled_connections_keep_their_session_settings() {
    let env = TestEnv::new("mysql_session");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let vars = env.writer_env();
        let cfg = Config::from_lookup(|k| vars.get(k).cloned()).expect("test config");
        let store = Store::new(&cfg);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let session: Session = Compat::new(async {
                let mut conn = store.get_conn().await.expect("connection");
                conn.query_first(SESSION)
                    .await
                    .expect("query")
                    .expect("a row")
            })
            .await;
            seen.push(session);
            // The connection is back in the pool (and would be reset there).
            smol::Timer::after(Duration::from_millis(200)).await;
        }
        let expected = (
            "+00:00".to_string(),
            "STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ENGINE_SUBSTITUTION".to_string(),
            "READ-COMMITTED".to_string(),
            "utf8mb4".to_string(),
            "utf8mb4_unicode_ci".to_string(),
        );
        for s in &seen {
            assert_eq!(
                (
                    s.0.clone(),
                    s.1.clone(),
                    s.2.clone(),
                    s.3.clone(),
                    s.4.clone()
                ),
                expected
            );
        }
        // The same pooled connection served every query: the check above
        // covered a returned and reused connection, not three new ones.
        assert_eq!(seen[0].5, seen[1].5);
        assert_eq!(seen[1].5, seen[2].5);
        store.close().await;
    });
}
