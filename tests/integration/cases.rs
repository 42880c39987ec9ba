//! Every line of tests/fixtures/malformed-and-edge.jsonl (its format is in
//! tests/fixtures/README.md), published to its queue, with the exact
//! expected outcome.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{
    assert_indexed, base64_decode, check_dead_letter, wait_for, Got, TestEnv, APP_ID, CHAT_ID,
};

const CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/malformed-and-edge.jsonl"
);

struct Case {
    line: usize,
    queue: String,
    payload: Vec<u8>,
    expect: String,
    why: String,
}

fn load_cases() -> Vec<Case> {
    let text = std::fs::read_to_string(CASES).unwrap_or_else(|e| panic!("read {CASES}: {e}"));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{CASES}:{}: {e}", i + 1));
            let payload = match (v["payload"].as_str(), v["payload_base64"].as_str()) {
                (Some(p), _) => p.as_bytes().to_vec(),
                (None, Some(b)) => base64_decode(b),
                _ => panic!("{CASES}:{}: no payload", i + 1),
            };
            Case {
                line: i + 1,
                queue: v["queue"].as_str().expect("queue").to_string(),
                payload,
                expect: v["expect"].as_str().expect("expect").to_string(),
                why: v["why"].as_str().unwrap_or_default().to_string(),
            }
        })
        .collect()
}

/// The field an `x-error` must name for a dead letter, from the case's reason.
fn field_named(c: &Case) -> Option<&'static str> {
    let why = c.why.as_str();
    // "number below 1", "body null", "empty token", "required field body missing"...
    [
        "application_id",
        "chat_number",
        "chat_id",
        "creator_id",
        "body",
        "token",
        "number",
    ]
    .into_iter()
    .find(|f| {
        why.split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
            .any(|w| w == *f)
    })
}

#[test]
fn malformed_and_edge_cases() {
    let cases = load_cases();
    assert!(!cases.is_empty(), "{CASES} has no case");
    let env = TestEnv::new("malformed_and_edge");
    smol::block_on(async {
        env.migrate_and_seed().await;
        let amqp = env.amqp().await;
        amqp.declare_work_queues().await;
        let mut w = env.start_writer(&[]);
        env.wait_consuming(&mut w).await;

        for c in &cases {
            amqp.publish(&c.queue, &c.payload, None).await;
        }
        let mut failures: Vec<String> = Vec::new();

        // Dead letters: wait until each queue's .dlq holds as many as expected.
        let mut want_dl: BTreeMap<String, usize> = BTreeMap::new();
        for c in cases.iter().filter(|c| c.expect == "dead-letter") {
            *want_dl.entry(format!("{}.dlq", c.queue)).or_default() += 1;
        }
        let mut dead: BTreeMap<String, Vec<Got>> = BTreeMap::new();
        for (dlq, n) in &want_dl {
            let amqp = &amqp;
            let dlq_name = dlq.clone();
            let n = *n;
            let mut taken: Vec<Got> = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while taken.len() < n && std::time::Instant::now() < deadline {
                taken.extend(amqp.drain(&dlq_name).await);
                if taken.len() < n {
                    smol::Timer::after(Duration::from_millis(200)).await;
                }
            }
            if taken.len() != n {
                failures.push(format!(
                    "{dlq}: expected {n} dead letter(s), found {} within 30 s",
                    taken.len()
                ));
            }
            dead.insert(dlq.clone(), taken);
        }

        for c in &cases {
            let label = format!("line {} ({} / {}: {})", c.line, c.queue, c.expect, c.why);
            match c.expect.as_str() {
                "dead-letter" => {
                    let dlq = format!("{}.dlq", c.queue);
                    let found = dead
                        .get(&dlq)
                        .and_then(|v| v.iter().find(|g| g.body == c.payload));
                    match found {
                        None => failures
                            .push(format!("{label}: not in {dlq} with its body byte for byte")),
                        Some(g) => {
                            if let Err(e) = check_dead_letter(g, &c.queue, field_named(c)) {
                                failures.push(format!("{label}: {e}"));
                            }
                        }
                    }
                }
                "stored" => {
                    if let Err(e) = check_stored(&env, c).await {
                        failures.push(format!("{label}: {e}"));
                    }
                }
                other => panic!("line {}: unknown expect {other:?}", c.line),
            }
        }

        // Nothing else was dead-lettered.
        for (dlq, got) in &dead {
            for g in got {
                if !cases
                    .iter()
                    .any(|c| c.payload == g.body && c.expect == "dead-letter")
                {
                    failures.push(format!(
                        "{dlq} holds an unexpected message: {}",
                        String::from_utf8_lossy(&g.body)
                    ));
                }
            }
        }

        // The consumers went on: valid messages published after the cases
        // are processed.
        amqp.publish_json(
            "create_chats",
            &json!({"application_id": 7, "token": "app_x", "number": 100}),
            None,
        )
        .await;
        amqp.publish_json(
            "create_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 100,
                    "body": "after the cases"}),
            None,
        )
        .await;
        let e = &env;
        wait_for(
            "sentinel chat 100",
            Duration::from_secs(15),
            Duration::from_millis(100),
            move || async move { e.db.chat(APP_ID, 100).await.ok_or("missing".to_string()) },
        )
        .await;
        let m = crate::consumers::wait_message(&env, CHAT_ID, 100).await;
        amqp.publish_json(
            "update_messages",
            &json!({"chat_id": 1, "token": "app_x", "chat_number": 1, "number": 100,
                    "body": "edited after the cases"}),
            None,
        )
        .await;
        let id = m.id;
        wait_for(
            "sentinel update",
            Duration::from_secs(15),
            Duration::from_millis(100),
            move || async move {
                match e.db.message(CHAT_ID, 100).await {
                    Some(m) if m.body == b"edited after the cases" && m.id == id => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;

        assert!(
            failures.is_empty(),
            "{} case failure(s):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
        w.stop();
        amqp.close().await;
    });
}

/// A `stored` case: the row exists with exactly the payload's fields, body
/// byte for byte, and (for messages) the document is indexed.
async fn check_stored(env: &TestEnv, c: &Case) -> Result<(), String> {
    let v: Value = serde_json::from_slice(&c.payload).map_err(|e| format!("payload: {e}"))?;
    let int = |k: &str| v[k].as_i64();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    match c.queue.as_str() {
        "create_messages" => {
            let (chat_id, number) = (int("chat_id").unwrap(), int("number").unwrap());
            let want_body = v["body"].as_str().unwrap().as_bytes().to_vec();
            loop {
                // The row must exist with the stored-case body; another
                // message with the same number must not have won.
                if let Some(m) = env.db.message(chat_id, number).await {
                    let got = (
                        m.token.as_str(),
                        m.chat_number,
                        m.creator_id,
                        m.body.len(),
                        m.body == want_body,
                    );
                    let want = (
                        v["token"].as_str().unwrap(),
                        int("chat_number").unwrap(),
                        int("creator_id"),
                        want_body.len(),
                        true,
                    );
                    if got != want {
                        return Err(format!(
                            "row differs: (token, chat_number, creator_id, body bytes, body equal) \
                             expected {want:?}, got {got:?}"
                        ));
                    }
                    if m.updated_at != m.created_at {
                        return Err(format!(
                            "updated_at {} != created_at {}",
                            m.updated_at, m.created_at
                        ));
                    }
                    assert_indexed(env, &m).await;
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err("row not stored within 20 s".into());
                }
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
        "create_chats" => {
            let (app, number) = (int("application_id").unwrap(), int("number").unwrap());
            loop {
                if let Some(r) = env.db.chat(app, number).await {
                    let got = (r.token.as_str(), r.creator_id, r.messages_count);
                    let want = (v["token"].as_str().unwrap(), int("creator_id"), 0);
                    if got != want {
                        return Err(format!("row differs: expected {want:?}, got {got:?}"));
                    }
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err("row not stored within 20 s".into());
                }
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
        "update_messages" => {
            let (chat_id, number) = (int("chat_id").unwrap(), int("number").unwrap());
            let want_body = v["body"].as_str().unwrap().as_bytes().to_vec();
            loop {
                if let Some(m) = env.db.message(chat_id, number).await {
                    if m.body == want_body {
                        return Ok(());
                    }
                }
                if std::time::Instant::now() > deadline {
                    return Err("update not applied within 20 s".into());
                }
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
        q => Err(format!("unknown queue {q}")),
    }
}
