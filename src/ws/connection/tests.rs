//! The connection loop over channels instead of a socket, against a real
//! store on a temporary SQLite file: drain on shutdown, the 4008 close,
//! and the resume merge.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::run;
use crate::app::AppState;
use crate::auth::Identity;
use crate::config::Settings;
use crate::ids::{ChatId, MessageId};
use crate::store::{self, NewMessage, SendOutcome};
use crate::ws::Hub;

const DEADLINE: Duration = Duration::from_secs(20);

struct Fixture {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    state: AppState,
    alice: Identity,
    bob: Identity,
    chat: ChatId,
}

async fn fixture(tweak: impl FnOnce(&mut Settings)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("conn.db");
    let mut settings = Settings::default();
    settings.database.url = format!("sqlite:{}", db.display());
    settings.ws.send_burst = 10_000;
    tweak(&mut settings);
    let hub = Arc::new(Hub::new());
    let store = store::open(&settings.database, &settings.cluster, hub.clone())
        .await
        .unwrap();
    let secret = SecretString::from("unit-test-secret-unit-test-secret-0123456789");
    let state = AppState::new(settings, store, hub.clone(), hub, &secret);
    let mut users = Vec::new();
    for name in ["alice", "bob"] {
        let u = state.store.create_user(name, None).await.unwrap().unwrap();
        users.push(Identity {
            id: u.id,
            username: u.username,
            token: std::sync::Arc::new(crate::auth::TokenRef {
                jti: format!("test-{name}"),
                key: String::new(),
                expires_at: u64::MAX,
            }),
        });
    }
    let (chat, _) = state
        .store
        .initiate_direct_chat(users[0].id, users[1].id)
        .await
        .unwrap();
    let bob = users.pop().unwrap();
    let alice = users.pop().unwrap();
    Fixture {
        _dir: dir,
        db,
        state,
        alice,
        bob,
        chat,
    }
}

/// The client's end of a connection served by [`run`] over channels.
struct Client {
    to_server: mpsc::Sender<Result<Message, axum::Error>>,
    from_server: mpsc::Receiver<Message>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// `window` frames may be in flight towards the client before the
    /// server's writes block (a client that does not read).
    fn connect(f: &Fixture, user: &Identity, since: Option<MessageId>, window: usize) -> Client {
        let (to_server, inbound) = mpsc::channel::<Result<Message, axum::Error>>(64);
        let (outbound, from_server) = mpsc::channel::<Message>(window);
        let stream = Box::pin(futures_util::stream::unfold(inbound, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        }));
        let sink = Box::pin(futures_util::sink::unfold(
            outbound,
            |tx, m: Message| async move {
                tx.send(m).await.map_err(axum::Error::new)?;
                Ok::<_, axum::Error>(tx)
            },
        ));
        let task = tokio::spawn(run(sink, stream, f.state.clone(), user.clone(), since));
        Client {
            to_server,
            from_server,
            task,
        }
    }

    async fn send(&self, v: Value) {
        self.to_server
            .send(Ok(Message::Text(v.to_string().into())))
            .await
            .unwrap();
    }

    /// Every frame until the close frame, and the close code.
    async fn until_close(&mut self) -> (Vec<Value>, u16) {
        let mut frames = Vec::new();
        loop {
            let next = tokio::time::timeout(DEADLINE, self.from_server.recv())
                .await
                .expect("a frame within the deadline");
            match next.expect("the server closes before ending the stream") {
                Message::Text(t) => frames.push(serde_json::from_str(t.as_str()).unwrap()),
                Message::Close(frame) => return (frames, frame.map_or(1005, |f| f.code)),
                Message::Ping(_) | Message::Pong(_) | Message::Binary(_) => {}
            }
        }
    }

    /// The next `n` message frames' ids (other frames skipped).
    async fn message_ids(&mut self, n: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let next = tokio::time::timeout(DEADLINE, self.from_server.recv())
                .await
                .expect("a frame within the deadline")
                .expect("the connection is open");
            if let Message::Text(t) = next {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "message" {
                    ids.push(v["id"].as_i64().unwrap());
                }
            }
        }
        ids
    }

    /// Ends the client's side and waits for the server's task to finish.
    async fn hang_up(self) {
        drop(self.to_server);
        drop(self.from_server);
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the connection task ends")
            .unwrap();
    }
}

/// Waits for `cond`, checking every few milliseconds, up to the deadline.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut poll = tokio::time::interval(Duration::from_millis(2));
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        poll.tick().await;
    }
}

async fn store_from(f: &Fixture, who: &Identity, content: &str) -> i64 {
    let outcome = f
        .state
        .store
        .send_message(NewMessage {
            chat_id: f.chat,
            sender_id: who.id,
            sender: who.username.as_str().into(),
            content: content.into(),
            client_msg_id: None,
        })
        .await
        .unwrap();
    match outcome {
        SendOutcome::Created(m) => m.message.id.get(),
        SendOutcome::Duplicate(_) => panic!("no key, no duplicate"),
    }
}

#[tokio::test]
async fn on_shutdown_every_received_send_is_acked_before_the_1001_close() {
    let f = fixture(|_| {}).await;
    // Another connection holds the write lock: the writer's next batch
    // waits, so the sends below are still in flight at shutdown.
    let lock = rusqlite::Connection::open(&f.db).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();

    let mut client = Client::connect(&f, &f.alice, None, 1024);
    for i in 0..20 {
        client
            .send(json!({"chat_id": f.chat, "content": format!("m{i}"), "client_msg_id": format!("k{i}")}))
            .await;
    }
    // The server has taken every frame off the socket.
    let to_server = client.to_server.clone();
    eventually("the server read all 20 frames", || {
        to_server.capacity() == to_server.max_capacity()
    })
    .await;
    drop(to_server);
    f.state.shutdown.cancel();
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);

    let (frames, code) = client.until_close().await;
    assert_eq!(code, 1001, "{frames:?}");
    let acks: Vec<&str> = frames
        .iter()
        .filter(|v| v["type"] == "ack")
        .map(|v| v["client_msg_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    assert_eq!(
        acks, expected,
        "every send acked, in order, before the close"
    );
    let page = f
        .state
        .store
        .history(f.chat, store::HistoryPage::Latest { limit: 50 })
        .await
        .unwrap();
    assert_eq!(page.len(), 20, "each ack stands for a stored message");
    client.hang_up().await;
}

#[tokio::test]
async fn a_connection_whose_queue_overflows_is_closed_with_4008() {
    let f = fixture(|s| s.ws.outbound_queue = 8).await;
    // One frame in flight to a client that does not read.
    let mut client = Client::connect(&f, &f.alice, None, 1);
    let hub = f.state.hub.clone();
    eventually("registered", || hub.connection_count() == 1).await;
    for i in 0..40 {
        store_from(&f, &f.bob, &format!("m{i}")).await;
    }
    let (frames, code) = client.until_close().await;
    assert_eq!(code, 4008);
    assert!(
        frames.len() < 40,
        "the queue was dropped, not delivered: {}",
        frames.len()
    );
    eventually("unregistered", || hub.connection_count() == 0).await;
    client.hang_up().await;
}

#[tokio::test]
async fn resume_merges_replay_and_live_messages_without_gap_or_duplicate() {
    let f = fixture(|_| {}).await;
    let first = store_from(&f, &f.bob, "m0").await;
    for i in 1..600 {
        store_from(&f, &f.bob, &format!("m{i}")).await;
    }
    // Resume from before everything. The client reads nothing yet, so the
    // replay stops after its first frame, with the first 500-row page read.
    let since = MessageId(first - 1);
    let mut client = Client::connect(&f, &f.alice, Some(since), 1);
    let hub = f.state.hub.clone();
    eventually("registered", || hub.connection_count() == 1).await;
    // Committed after registration and before the replay's second page:
    // these are both queued live and in the replay.
    let mut live = Vec::new();
    for i in 0..50 {
        live.push(store_from(&f, &f.bob, &format!("live{i}")).await);
    }

    let ids = client.message_ids(650).await;
    let expected: Vec<i64> = (first..first + 650).collect();
    assert_eq!(ids, expected, "every id once, ascending");
    assert_eq!(live.last(), expected.last());
    // Nothing else was queued: the next frame is the next message.
    let next = store_from(&f, &f.bob, "after").await;
    assert_eq!(client.message_ids(1).await, vec![next]);
    client.hang_up().await;
}
