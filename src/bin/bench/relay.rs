//! The relay load: P pairs, both users of a pair send to each other, the
//! aggregate rate paced evenly over all senders. Each message carries its
//! *scheduled* send time, so latency counts any delay in sending too (a
//! stalled server cannot hide its delay behind a stalled client).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Server, Ws};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Shindensen,
    Baseline,
}

/// After a step, messages still missing once none has arrived for this long
/// count as lost.
const DRAIN: Duration = Duration::from_secs(5);
/// Message content is padded to about this many bytes.
const CONTENT_LEN: usize = 64;

pub struct StepResult {
    pub rate: u64,
    pub sent: u64,
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub errors: u64,
    pub closed: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl StepResult {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.delivered)
    }

    /// >= 99% delivered and p99 under 50 ms.
    pub fn sustained(&self) -> bool {
        self.sent > 0 && self.delivered as f64 >= 0.99 * self.sent as f64 && self.p99_ms < 50.0
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "offered_per_sec": self.rate, "sent": self.sent, "delivered": self.delivered,
            "lost_after_drain": self.lost(), "delivered_per_sec": self.delivered_per_sec,
            "errors": self.errors, "closed": self.closed,
            "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms, "max_ms": self.max_ms, "sustained": self.sustained(),
        })
    }
}

pub fn print_table(title: &str, results: &[StepResult]) {
    println!("{title}");
    println!(
        "{:>9} {:>9} {:>11} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>9}",
        "offered/s",
        "sent",
        "delivered/s",
        "lost",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "sustained"
    );
    for r in results {
        println!(
            "{:>9} {:>9} {:>11.0} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>7} {:>9}",
            r.rate,
            r.sent,
            r.delivered_per_sec,
            r.lost(),
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            r.errors,
            if r.sustained() { "yes" } else { "no" }
        );
    }
}

#[derive(Default)]
struct StepCounters {
    sent: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    sender_id: i64,
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

type Sink = SplitSink<Ws, Message>;

struct Sender {
    sink: Sink,
    chat_id: i64,
}

pub async fn run(
    server: &Server,
    _kind: Kind,
    pairs: usize,
    steps: &[u64],
    duration: Duration,
) -> anyhow::Result<Vec<StepResult>> {
    let users = client::users(server, pairs * 2).await?;
    let mut chats = Vec::with_capacity(pairs);
    for p in 0..pairs {
        chats.push(client::chat(server, &users[2 * p], 2 * p + 1, p).await?);
    }
    let epoch = Instant::now();
    let counters: Arc<Vec<StepCounters>> =
        Arc::new((0..steps.len()).map(|_| StepCounters::default()).collect());
    let shared = Arc::new(Shared {
        epoch,
        counters: counters.clone(),
        stop: CancellationToken::new(),
        closed: AtomicU64::new(0),
        current: AtomicUsize::new(0),
    });
    let mut senders = Vec::with_capacity(users.len());
    let mut receivers = Vec::with_capacity(users.len());
    for (i, u) in users.iter().enumerate() {
        let ws = client::connect(server, u).await?;
        let (sink, stream) = ws.split();
        senders.push(Sender {
            sink,
            chat_id: chats[i / 2],
        });
        receivers.push(tokio::spawn(receive(
            stream,
            u.id,
            steps.len(),
            shared.clone(),
        )));
    }

    let mut results = Vec::with_capacity(steps.len());
    for (step, &rate) in steps.iter().enumerate() {
        shared.current.store(step, Ordering::Relaxed);
        let n = senders.len();
        let per_sender = rate as f64 / n as f64;
        let period = Duration::from_secs_f64(1.0 / per_sender);
        let start = Instant::now() + Duration::from_millis(200);
        let end = start + duration;
        let tasks: Vec<_> = senders
            .drain(..)
            .enumerate()
            .map(|(i, s)| {
                let offset = period.mul_f64(i as f64 / n as f64);
                tokio::spawn(send_paced(
                    s,
                    step,
                    start + offset,
                    end,
                    period,
                    epoch,
                    counters.clone(),
                ))
            })
            .collect();
        for t in tasks {
            senders.push(t.await?);
        }
        // Drain: wait while deliveries still arrive; what is missing once
        // nothing has arrived for DRAIN is lost (not merely late).
        let c = &counters[step];
        let mut last = c.delivered.load(Ordering::Relaxed);
        let mut quiet_until = Instant::now() + DRAIN;
        while last < c.sent.load(Ordering::Relaxed) && Instant::now() < quiet_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = c.delivered.load(Ordering::Relaxed);
            if now > last {
                last = now;
                quiet_until = Instant::now() + DRAIN;
            }
        }
        results.push((rate, end));
    }
    shared.stop.cancel();
    let mut hists: Vec<Histogram<u64>> = (0..steps.len())
        .map(|_| Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"))
        .collect();
    for r in receivers {
        for (i, h) in r.await?.into_iter().enumerate() {
            hists[i].add(h)?;
        }
    }
    for mut s in senders {
        let _ = s.sink.close().await;
    }
    Ok(results
        .into_iter()
        .enumerate()
        .map(|(i, (rate, _))| {
            let c = &counters[i];
            let h = &hists[i];
            let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            let delivered = c.delivered.load(Ordering::Relaxed);
            StepResult {
                rate,
                sent: c.sent.load(Ordering::Relaxed),
                delivered,
                delivered_per_sec: delivered as f64 / duration.as_secs_f64(),
                errors: c.errors.load(Ordering::Relaxed),
                closed: shared.closed.load(Ordering::Relaxed),
                p50_ms: q(0.5),
                p90_ms: q(0.9),
                p99_ms: q(0.99),
                p999_ms: q(0.999),
                max_ms: h.max() as f64 / 1000.0,
            }
        })
        .collect())
}

/// Sends on schedule: message k is due at `first + k * period`; whatever
/// is due is written at once and flushed together.
async fn send_paced(
    mut s: Sender,
    step: usize,
    first: Instant,
    end: Instant,
    period: Duration,
    epoch: Instant,
    counters: Arc<Vec<StepCounters>>,
) -> Sender {
    let mut k: u32 = 0;
    let pad = "x".repeat(CONTENT_LEN);
    loop {
        let due = first + period * k;
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        let mut batch = 0;
        loop {
            let due = first + period * k;
            if due > now || due >= end {
                break;
            }
            let sched = due.duration_since(epoch).as_nanos();
            let mut content = format!("s{step}:{sched}:");
            content.push_str(&pad[..CONTENT_LEN.saturating_sub(content.len())]);
            let frame = json!({"chat_id": s.chat_id, "content": content}).to_string();
            if s.sink.feed(Message::Text(frame.into())).await.is_err() {
                return s;
            }
            k += 1;
            batch += 1;
        }
        if s.sink.flush().await.is_err() {
            return s;
        }
        counters[step].sent.fetch_add(batch, Ordering::Relaxed);
    }
    s
}

/// What the receivers share with the driver.
struct Shared {
    epoch: Instant,
    counters: Arc<Vec<StepCounters>>,
    stop: CancellationToken,
    closed: AtomicU64,
    current: AtomicUsize,
}

async fn receive(
    mut stream: SplitStream<Ws>,
    me: i64,
    steps: usize,
    shared: Arc<Shared>,
) -> Vec<Histogram<u64>> {
    let Shared {
        epoch,
        counters,
        stop,
        closed,
        current,
    } = &*shared;
    let epoch = *epoch;
    let mut hists: Vec<Histogram<u64>> = (0..steps)
        .map(|_| Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"))
        .collect();
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = stop.cancelled() => break,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Some(Ok(_)) => continue,
        };
        let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
            continue;
        };
        match frame.kind {
            "message" if frame.sender_id != me => {
                let Some(content) = frame.content else {
                    continue;
                };
                let mut parts = content.trim_start_matches('s').split(':');
                let (Some(step), Some(sched)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let (Ok(step), Ok(sched)) = (step.parse::<usize>(), sched.parse::<u128>()) else {
                    continue;
                };
                let now = epoch.elapsed().as_nanos();
                let latency_us = (now.saturating_sub(sched) / 1000) as u64;
                if let Some(h) = hists.get_mut(step) {
                    let _ = h.record(latency_us.max(1));
                    counters[step].delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            "error" => {
                let step = current.load(Ordering::Relaxed).min(steps - 1);
                counters[step].errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    hists
}
