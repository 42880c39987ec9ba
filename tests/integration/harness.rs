//! Checks the harness itself against the real services, without the writer:
//! a failure here means the machine is not ready, not that the writer is wrong.

use std::time::Duration;

use serde_json::json;

use crate::common::{rabbitmqctl, Db, TestEnv};

#[test]
fn harness_reaches_every_service_and_cleans_up() {
    let env = TestEnv::new("harness");
    let (db_name, vhost) = (env.db_name.clone(), env.vhost.clone());
    smol::block_on(async {
        // MySQL
        Db::server()
            .exec(&format!(
                "CREATE DATABASE `{db_name}` CHARACTER SET utf8mb4"
            ))
            .await;
        env.db
            .exec("CREATE TABLE t (b TEXT CHARACTER SET utf8mb4 NOT NULL)")
            .await;
        let one: Vec<i64> = env.db.query("SELECT 1").await;
        assert_eq!(one, vec![1]);
        // RabbitMQ: publish with confirm, headers and timestamp round-trip.
        let amqp = env.amqp().await;
        amqp.declare("q").await;
        amqp.publish("q", b"\xff raw", Some(1_795_953_600)).await;
        let g = amqp.get("q").await.expect("message back");
        assert_eq!(g.body, b"\xff raw");
        assert_eq!(g.timestamp, Some(1_795_953_600));
        assert_eq!(g.content_type.as_deref(), Some("application/json"));
        assert_eq!(g.delivery_mode, Some(2));
        assert!(amqp.get("q").await.is_none());
        assert!(amqp.get("does-not-exist").await.is_none());
        assert_eq!(amqp.queue_info("q").await, Some((0, 0)));
        assert_eq!(amqp.queue_info("does-not-exist").await, None);
        amqp.publish("q", b"1", None).await;
        amqp.publish("q", b"2", None).await;
        assert_eq!(amqp.peek_all("q").await.len(), 2);
        smol::Timer::after(Duration::from_millis(200)).await;
        assert_eq!(env.list_queues().get("q"), Some(&(2, 0)));
        assert_eq!(amqp.drain("q").await.len(), 2);
        amqp.close().await;
        // Redis
        env.kv.set("k", 3).await;
        assert_eq!(env.kv.incr("k").await, 4);
        env.kv.sadd("s", "a").await;
        assert_eq!(env.kv.smembers("s").await, vec!["a".to_string()]);
        // Elasticsearch
        assert!(!env.es.index_exists().await);
        env.es
            .put_doc("x:1:1", 5, &json!({"token": "x", "body": "b"}))
            .await;
        assert_eq!(env.es.doc("x:1:1").await.unwrap()["_version"], 5);
        assert_eq!(env.es.count().await, Some(1));
    });
    drop(env);
    // Everything is gone.
    smol::block_on(async {
        let dbs: Vec<String> = Db::server()
            .query(&format!("SHOW DATABASES LIKE '{db_name}'"))
            .await;
        assert!(dbs.is_empty(), "database {db_name} left behind");
    });
    let vhosts = rabbitmqctl(&["list_vhosts", "--no-table-headers"]);
    assert!(
        !vhosts.lines().any(|l| l.trim() == vhost),
        "vhost {vhost} left behind"
    );
}
