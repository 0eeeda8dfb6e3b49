//! What a bad day in operations does (issue 19): a clock behind after a
//! restart, a token of an account the database does not have, the
//! database file deleted under the writer, connections that never speak.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::TestApp;

fn timestamp_of(page: &Value, id: i64) -> String {
    page.as_array()
        .expect("a page")
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("message {id} in {page}"))["timestamp"]
        .as_str()
        .expect("a timestamp")
        .to_string()
}

#[tokio::test]
async fn timestamps_never_go_backwards_across_a_restart_with_the_clock_behind() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let first = app.say_and_ack(&alice, chat, "before the restart").await;
    let dir = app.stop().await;
    // The run that stored `first` had a clock an hour ahead of this one's.
    crate::db::execute(
        dir.path(),
        &format!("UPDATE messages SET created_at = created_at + 3600000 WHERE id = {first}"),
    )
    .await;

    let app = TestApp::spawn_in(dir, |_| {}).await;
    let second = app.say_and_ack(&alice, chat, "after the restart").await;
    let group = app.group(&alice, "after the restart", &[&bob]).await;
    let (status, page) = app.history(&alice, &chat.to_string(), "?limit=10").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (t1, t2) = (timestamp_of(&page, first), timestamp_of(&page, second));
    // RFC 3339 in UTC with a fixed width: string order is time order.
    assert_eq!(t1.len(), t2.len(), "{t1} {t2}");
    assert!(
        t2 >= t1,
        "message {second} at {t2} is before message {first} at {t1}"
    );
    let (status, events) = app.history(&alice, &group.to_string(), "?limit=10").await;
    assert_eq!(status, StatusCode::OK, "{events}");
    let created = events[0]["timestamp"].as_str().unwrap().to_string();
    assert!(created >= t2, "group event at {created} is before {t2}");
}
