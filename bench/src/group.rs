//! The group load: one group of M members, every member connected once;
//! K of them send to the group at an aggregate rate R, paced evenly, so
//! each step asks for R x M deliveries a second. Each message carries its
//! scheduled send time; latency is from then to the frame's arrival at
//! each member's socket.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Http, Server};

/// After a step, deliveries still missing once none arrived for this long
/// count as lost.
const DRAIN: Duration = Duration::from_secs(1);

pub struct GroupStep {
    pub rate: u64,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    pub deliveries_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl GroupStep {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "messages_per_sec": self.rate, "sent": self.sent, "expected_deliveries": self.expected,
            "delivered": self.delivered, "lost": self.expected.saturating_sub(self.delivered),
            "deliveries_per_sec": self.deliveries_per_sec,
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
        })
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static bounds")
}

/// `"content":"s<step> <micros> ..."`: the step and the scheduled send
/// time, read without parsing the whole frame.
fn stamp(text: &str) -> Option<(usize, u64)> {
    let at = text.find("\"content\":\"s")? + "\"content\":\"s".len();
    let rest = &text[at..];
    let (step, rest) = rest.split_once(' ')?;
    let micros = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    Some((step.parse().ok()?, micros.parse().ok()?))
}

pub async fn run(
    server: &Server,
    members: usize,
    senders: usize,
    rates: &[u64],
    duration: Duration,
) -> anyhow::Result<Vec<GroupStep>> {
    let users = client::users(server, members).await?;
    let names: Vec<String> = (1..members).map(|i| format!("bench{i}")).collect();
    let mut http = Http::connect(&server.addr).await?;
    let group = http
        .json(
            "POST",
            "/chats",
            Some(&json!({"type": "group", "title": "bench group", "members": names})),
            users[0].token.as_deref(),
        )
        .await?;
    let chat = group["chat_id"]
        .as_i64()
        .ok_or_else(|| anyhow!("no chat id in {group}"))?;
    let conns = client::open_idle(server, &users, members).await?;

    let base = Instant::now();
    let steps = rates.len();
    let mut readers = Vec::with_capacity(members);
    let mut sinks = Vec::with_capacity(senders);
    let tallies: Vec<Arc<Mutex<Vec<Histogram<u64>>>>> = (0..members)
        .map(|_| Arc::new(Mutex::new((0..steps).map(|_| histogram()).collect())))
        .collect();
    let last_seen = Arc::new(Mutex::new(Instant::now()));
    for (i, ws) in conns.into_iter().enumerate() {
        let (sink, mut stream) = ws.split();
        if i < senders {
            sinks.push(sink);
        }
        let tally = tallies[i].clone();
        let last_seen = last_seen.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let Message::Text(text) = frame else { continue };
                if let Some((step, micros)) = stamp(text.as_str()) {
                    let now = base.elapsed().as_micros() as u64;
                    if let Ok(mut t) = tally.lock()
                        && let Some(h) = t.get_mut(step)
                    {
                        let _ = h.record(now.saturating_sub(micros).max(1));
                    }
                    if let Ok(mut l) = last_seen.lock() {
                        *l = Instant::now();
                    }
                }
            }
        }));
    }

    let mut out = Vec::with_capacity(steps);
    for (step, &rate) in rates.iter().enumerate() {
        let interval = Duration::from_secs_f64(senders as f64 / rate as f64);
        let per_sender = (rate as f64 * duration.as_secs_f64() / senders as f64).round() as u64;
        let started = Instant::now();
        let sending = sinks.iter_mut().enumerate().map(|(k, sink)| async move {
            // Senders start spread over one interval.
            let offset = interval.mul_f64(k as f64 / senders as f64);
            let mut sent = 0u64;
            for n in 0..per_sender {
                let due = started + offset + interval.mul_f64(n as f64);
                tokio::time::sleep_until(due.into()).await;
                let micros = (due - base).as_micros();
                let frame = json!({"chat_id": chat, "content": format!("s{step} {micros} group bench message")});
                if sink.send(Message::Text(frame.to_string().into())).await.is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        });
        let sent: u64 = futures_util::future::join_all(sending)
            .await
            .into_iter()
            .sum();
        let send_time = started.elapsed();
        // Drain until deliveries stop.
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let idle = last_seen.lock().map(|l| l.elapsed()).unwrap_or(DRAIN);
            if idle >= DRAIN {
                break;
            }
        }
        let mut total = histogram();
        for t in &tallies {
            if let Ok(t) = t.lock() {
                total.add(&t[step])?;
            }
        }
        let delivered = total.len();
        out.push(GroupStep {
            rate,
            sent,
            expected: sent * members as u64,
            delivered,
            deliveries_per_sec: delivered as f64 / send_time.as_secs_f64(),
            p50_ms: total.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: total.value_at_quantile(0.99) as f64 / 1000.0,
            max_ms: total.max() as f64 / 1000.0,
        });
    }
    for r in readers {
        r.abort();
    }
    Ok(out)
}

pub fn print_table(members: usize, senders: usize, results: &[GroupStep]) {
    println!("group: 1 group of {members} members, each connected once; {senders} of them send");
    println!(
        "{:>8} {:>9} {:>13} {:>9} {:>14} {:>8} {:>8} {:>8}",
        "msg/s", "sent", "deliveries", "lost", "deliveries/s", "p50 ms", "p99 ms", "max ms"
    );
    for r in results {
        println!(
            "{:>8} {:>9} {:>13} {:>9} {:>14.0} {:>8.2} {:>8.2} {:>8.2}",
            r.rate,
            r.sent,
            r.delivered,
            r.expected.saturating_sub(r.delivered),
            r.deliveries_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.max_ms
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps_are_read_from_the_frame() {
        let frame = r#"{"type":"message","id":9,"chat_id":1,"sender":"bench3","sender_id":4,"kind":"text","content":"s2 123456 group bench message","timestamp":"x"}"#;
        assert_eq!(super::stamp(frame), Some((2, 123_456)));
        assert_eq!(super::stamp(r#"{"type":"ack"}"#), None);
    }
}
