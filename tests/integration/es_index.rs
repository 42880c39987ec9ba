//! Elasticsearch (docs/elasticsearch.md): mapping, ids, whole documents,
//! external versions.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{assert_indexed, wait_for, wait_until, TestEnv, APP_ID, CHAT_ID, TOKEN};
use crate::consumers::{wait_message, T1};

#[test]
fn index_mapping_ids_and_documents() {
    let env = TestEnv::new("es_mapping_docs");
    smol::block_on(async {
        env.migrate_and_seed().await;
        env.db.seed_chat(2, APP_ID, TOKEN, 2, 0).await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[]);
        let e = &env;
        wait_until(
            "index created at start-up",
            Duration::from_secs(20),
            Duration::from_millis(100),
            move || async move { e.es.index_exists().await },
        )
        .await;
        let mapping = env.es.mapping().await;
        let props = &mapping[&env.index]["mappings"]["properties"];
        let types: serde_json::Map<String, Value> = props
            .as_object()
            .unwrap_or_else(|| panic!("no properties in mapping {mapping}"))
            .iter()
            .map(|(k, v)| (k.clone(), v["type"].clone()))
            .collect();
        assert_eq!(
            Value::Object(types),
            json!({"token": "keyword", "chat_number": "integer", "number": "integer",
                   "body": "text", "created_at": "date"}),
            "mapping {mapping}"
        );

        env.wait_consuming(&mut w).await;
        let msgs = [
            (1, 1, "one"),
            (1, 2, "two"),
            (2, 1, "other chat"),
            (2, 7, "seven"),
        ];
        for (chat, n, body) in msgs {
            amqp.publish_json(
                "create_messages",
                &json!({"chat_id": chat, "token": "app_x", "chat_number": chat, "number": n,
                        "body": body}),
                Some(T1 + n as u64),
            )
            .await;
        }
        for (chat, n, body) in msgs {
            let m = wait_message(&env, chat, n).await;
            let d = assert_indexed(&env, &m).await;
            assert_eq!(d["_id"], format!("app_x:{chat}:{n}"));
            assert_eq!(
                d["_source"],
                json!({"token": "app_x", "chat_number": chat, "number": n, "body": body,
                       "created_at": crate::common::time::rfc3339_micros(((T1 + n as u64) * 1_000_000) as i64)})
            );
        }
        wait_until(
            "_count = 4",
            Duration::from_secs(10),
            Duration::from_millis(200),
            move || async move { e.es.count().await == Some(4) },
        )
        .await;
        w.stop();
        amqp.close().await;
    });
}

#[test]
fn older_version_never_overwrites_newer() {
    let env = TestEnv::new("es_versions");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[]);
        env.wait_consuming(&mut w).await;

        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1, "body": "v1"}),
            Some(T1),
        )
        .await;
        let m0 = wait_message(&env, CHAT_ID, 1).await;
        assert_indexed(&env, &m0).await;
        // Two updates back to back: the document ends with the last one.
        for body in ["v2", "v3"] {
            amqp.publish_json(
                "update_messages",
                &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 1,
                        "body": body}),
                None,
            )
            .await;
        }
        let e = &env;
        let m2 = wait_for(
            "body v3",
            Duration::from_secs(20),
            Duration::from_millis(50),
            move || async move {
                match e.db.message(CHAT_ID, 1).await {
                    Some(m) if m.body == b"v3" => Ok(m),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        assert!(m2.updated_us > m0.updated_us);
        let d = assert_indexed(&env, &m2).await;
        assert_eq!(d["_source"]["body"], "v3");
        assert_eq!(d["_version"].as_i64(), Some(m2.updated_us));
        // Stays so (no late older write lands).
        smol::Timer::after(Duration::from_millis(700)).await;
        let d = env.es.doc("app_x:1:1").await.unwrap();
        assert_eq!(
            (d["_source"]["body"].as_str(), d["_version"].as_i64()),
            (Some("v3"), Some(m2.updated_us))
        );

        // A document already at a higher version (e.g. written by a newer
        // writer): the writer's older write loses, and the 409 is success.
        let future = 9_000_000_000_000_000i64;
        let planted = json!({"token": "app_x", "chat_number": 1, "number": 2,
                             "body": "from the future", "created_at": "2030-01-01T00:00:00.000000Z"});
        env.es.put_doc("app_x:1:2", future, &planted).await;
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 2, "body": "real"}),
            Some(T1),
        )
        .await;
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 3, "body": "after"}),
            Some(T1),
        )
        .await;
        let m3 = wait_message(&env, CHAT_ID, 3).await;
        assert_indexed(&env, &m3).await;
        wait_until(
            "the index queue drained (the version conflict counted as success)",
            Duration::from_secs(15),
            Duration::from_millis(300),
            move || async move {
                e.list_queues()
                    .get("chat_writer.index")
                    .map(|q| q.0)
                    .unwrap_or(0)
                    == 0
            },
        )
        .await;
        let d = env.es.doc("app_x:1:2").await.unwrap();
        assert_eq!(
            d["_source"], planted,
            "an older version overwrote a newer one"
        );
        assert_eq!(d["_version"].as_i64(), Some(future));
        w.stop();
        amqp.close().await;
    });
}
