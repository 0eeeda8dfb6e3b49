//! The relay load: P pairs, both users of a pair send to each other, the
//! aggregate rate paced evenly over all senders. Each message carries its
//! *scheduled* send time, so latency counts any delay in sending too (a
//! stalled server cannot hide its delay behind a stalled client).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
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
    /// Messages the senders handed to the client (each counted once, however
    /// often it was resent).
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub delivered_per_sec: f64,
    /// Error and `resync` frames.
    pub errors: u64,
    /// Peer messages whose id did not grow (a repeat, or out of order).
    pub duplicates: u64,
    /// Connections the server closed with 4008 (slow consumer).
    pub closed_slow: u64,
    /// Connections that ended any other way while the load ran.
    pub closed_other: u64,
    /// Reconnects with `?since=` (each close is followed by one).
    pub resumed: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl StepResult {
    /// Sent, but never delivered to the peer, live or on resume, once
    /// nothing more arrived for [`DRAIN`].
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.delivered)
    }

    /// Sent, but never acknowledged (resends included).
    pub fn unacked(&self) -> u64 {
        self.sent.saturating_sub(self.acked)
    }

    pub fn closed(&self) -> u64 {
        self.closed_slow + self.closed_other
    }

    /// >= 99% delivered and p99 under 50 ms.
    pub fn sustained(&self) -> bool {
        self.sent > 0 && self.delivered as f64 >= 0.99 * self.sent as f64 && self.p99_ms < 50.0
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "offered_per_sec": self.rate, "sent": self.sent, "acked": self.acked,
            "delivered": self.delivered, "lost_after_drain": self.lost(),
            "unacked_after_drain": self.unacked(), "delivered_per_sec": self.delivered_per_sec,
            "errors": self.errors, "duplicates": self.duplicates,
            "closed_4008": self.closed_slow, "closed_other": self.closed_other,
            "resumed": self.resumed,
            "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms, "max_ms": self.max_ms, "sustained": self.sustained(),
        })
    }
}

/// The highest rate of the steps sustained in a row from the first one:
/// a step that passes after one that failed does not count.
pub fn highest_sustained(results: &[StepResult]) -> f64 {
    results
        .iter()
        .take_while(|s| s.sustained())
        .map(|s| s.delivered_per_sec)
        .fold(0.0, f64::max)
}

pub fn print_table(title: &str, results: &[StepResult]) {
    println!("{title}");
    println!(
        "{:>9} {:>9} {:>11} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>6} {:>9}",
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
        "4008",
        "sustained"
    );
    for r in results {
        println!(
            "{:>9} {:>9} {:>11.0} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>7} {:>6} {:>9}",
            r.rate,
            r.sent,
            r.delivered_per_sec,
            r.lost(),
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.p999_ms,
            r.max_ms,
            r.errors + r.duplicates,
            r.closed_slow,
            if r.sustained() { "yes" } else { "no" }
        );
    }
    let closes: u64 = results.iter().map(StepResult::closed).sum();
    let unacked: u64 = results.iter().map(StepResult::unacked).sum();
    if closes > 0 || unacked > 0 {
        println!(
            "  closed and resumed with ?since=: {} (4008: {}, other: {}); unacknowledged after drain: {unacked}",
            results.iter().map(|r| r.resumed).sum::<u64>(),
            results.iter().map(|r| r.closed_slow).sum::<u64>(),
            results.iter().map(|r| r.closed_other).sum::<u64>(),
        );
    }
}

#[derive(Default)]
struct StepCounters {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    duplicates: AtomicU64,
    closed_slow: AtomicU64,
    closed_other: AtomicU64,
    resumed: AtomicU64,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    id: i64,
    #[serde(default)]
    sender_id: i64,
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    client_msg_id: Option<std::borrow::Cow<'a, str>>,
}

type Sink = SplitSink<Ws, Message>;

/// What a reliable client keeps per connection: the frames sent and not
/// yet acknowledged, oldest first (acks come in send order). After a
/// reconnect they are resent with the same `client_msg_id`, so the server
/// stores each once and answers a repeat with the original ack.
#[derive(Default)]
struct Pending(Mutex<VecDeque<(String, Utf8Bytes)>>);

impl Pending {
    fn push(&self, key: String, frame: Utf8Bytes) {
        self.0.lock().expect("pending").push_back((key, frame));
    }

    /// Drops everything up to and including `key` (the baseline acks
    /// without a key: the oldest). Returns whether anything was dropped.
    fn settle(&self, key: Option<&str>) -> bool {
        let mut q = self.0.lock().expect("pending");
        match key {
            None => q.pop_front().is_some(),
            Some(key) => match q.iter().position(|(k, _)| k == key) {
                Some(i) => {
                    q.drain(..=i);
                    true
                }
                None => false,
            },
        }
    }

    fn frames(&self) -> Vec<Utf8Bytes> {
        let q = self.0.lock().expect("pending");
        q.iter().map(|(_, f)| f.clone()).collect()
    }
}

struct Sender {
    sink: Sink,
    user_id: i64,
    chat_id: i64,
    /// Sends so far (the `client_msg_id` suffix).
    seq: u64,
    pending: Arc<Pending>,
    /// New sinks from the receiver after it reconnected.
    relink: mpsc::Receiver<Sink>,
}

/// How long a sender whose socket failed waits for the receiver to reconnect.
const RELINK_WAIT: Duration = Duration::from_secs(10);

impl Sender {
    /// Switches to a new connection and resends what is unacknowledged.
    async fn adopt(&mut self, sink: Sink) -> Result<(), tungstenite::Error> {
        self.sink = sink;
        for frame in self.pending.frames() {
            self.sink.feed(Message::Text(frame)).await?;
        }
        self.sink.flush().await
    }

    /// After a failed write: waits for the receiver's reconnect and adopts
    /// it. False when no new connection comes.
    async fn relinked(&mut self) -> bool {
        loop {
            let sink = match tokio::time::timeout(RELINK_WAIT, self.relink.recv()).await {
                Ok(Some(sink)) => sink,
                _ => return false,
            };
            if self.adopt(sink).await.is_ok() {
                return true;
            }
        }
    }
}

pub async fn run(
    server: &Server,
    kind: Kind,
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
        current: AtomicUsize::new(0),
        nodes: server
            .nodes
            .iter()
            .map(|n| format!("ws://{n}/ws"))
            .collect(),
        resume: kind == Kind::Shindensen,
    });
    let mut senders = Vec::with_capacity(users.len());
    let mut receivers = Vec::with_capacity(users.len());
    for (i, u) in users.iter().enumerate() {
        let ws = client::connect(server, u).await?;
        let (sink, stream) = ws.split();
        let pending = Arc::new(Pending::default());
        let (relink_tx, relink) = mpsc::channel(4);
        senders.push(Sender {
            sink,
            user_id: u.id,
            chat_id: chats[i / 2],
            seq: 0,
            pending: pending.clone(),
            relink,
        });
        receivers.push(tokio::spawn(receive(
            stream,
            u.clone(),
            pending,
            relink_tx,
            steps.len(),
            shared.clone(),
        )));
    }

    let mut results = Vec::with_capacity(steps.len());
    for (step, &rate) in steps.iter().enumerate() {
        shared.current.store(step, Ordering::Relaxed);
        // Markers on stderr, so a harness can sample the servers' CPU over
        // exactly the step (setup logins excluded): scripts/bench-cluster.
        eprintln!("bench: step {step} start ({rate} msg/s)");
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
        // Drain: wait while deliveries and acks still arrive; what is
        // missing once nothing has arrived for DRAIN is lost (not merely late).
        let c = &counters[step];
        let progress = || c.delivered.load(Ordering::Relaxed) + c.acked.load(Ordering::Relaxed);
        let mut last = progress();
        let mut quiet_until = Instant::now() + DRAIN;
        while last < 2 * c.sent.load(Ordering::Relaxed) && Instant::now() < quiet_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            // A connection closed near the end of the step: resend its
            // pending frames now, not at the next step's first send.
            for s in &mut senders {
                if let Ok(sink) = s.relink.try_recv() {
                    let _ = s.adopt(sink).await;
                }
            }
            let now = progress();
            if now > last {
                last = now;
                quiet_until = Instant::now() + DRAIN;
            }
        }
        eprintln!("bench: step {step} drained");
        results.push(rate);
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
        .map(|(i, rate)| {
            let c = &counters[i];
            let h = &hists[i];
            let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            let delivered = get(&c.delivered);
            StepResult {
                rate,
                sent: get(&c.sent),
                acked: get(&c.acked),
                delivered,
                delivered_per_sec: delivered as f64 / duration.as_secs_f64(),
                errors: get(&c.errors),
                duplicates: get(&c.duplicates),
                closed_slow: get(&c.closed_slow),
                closed_other: get(&c.closed_other),
                resumed: get(&c.resumed),
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
/// is due is written at once and flushed together. A failed write waits
/// for the receiver's reconnect, resends what is unacknowledged and goes
/// on with the schedule (what fell due meanwhile goes out late, and its
/// latency shows it).
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
        if let Ok(sink) = s.relink.try_recv()
            && s.adopt(sink).await.is_err()
            && !s.relinked().await
        {
            return s;
        }
        let now = Instant::now();
        let mut ok = true;
        loop {
            let due = first + period * k;
            if due > now || due >= end {
                break;
            }
            let sched = due.duration_since(epoch).as_nanos();
            let mut content = format!("s{step}:{sched}:");
            content.push_str(&pad[..CONTENT_LEN.saturating_sub(content.len())]);
            let key = format!("{}-{}-{}", *RUN_TAG, s.user_id, s.seq);
            s.seq += 1;
            let frame: Utf8Bytes =
                json!({"chat_id": s.chat_id, "content": content, "client_msg_id": key})
                    .to_string()
                    .into();
            // Pending before it is written: a failed write resends it.
            s.pending.push(key, frame.clone());
            counters[step].sent.fetch_add(1, Ordering::Relaxed);
            k += 1;
            if ok && s.sink.feed(Message::Text(frame)).await.is_err() {
                ok = false;
            }
        }
        let flushed = ok && s.sink.flush().await.is_ok();
        if !flushed && !s.relinked().await {
            return s;
        }
    }
    s
}

/// Distinguishes this run's idempotency keys from earlier runs against the
/// same database (`--url`): a repeated key is a duplicate, acked but not
/// delivered again, and would count as lost.
static RUN_TAG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}{:x}", nanos, std::process::id())
});

/// What the receivers share with the driver.
struct Shared {
    epoch: Instant,
    counters: Arc<Vec<StepCounters>>,
    stop: CancellationToken,
    current: AtomicUsize,
    /// WebSocket URL of each node (one unless the target is a cluster).
    nodes: Vec<String>,
    /// Reconnect with `?since=` after a close (the bare relay has no history).
    resume: bool,
}

impl Shared {
    /// The counters of the step running now (or the last one, while draining).
    fn step_now(&self) -> &StepCounters {
        &self.counters[self
            .current
            .load(Ordering::Relaxed)
            .min(self.counters.len() - 1)]
    }
}

/// Reads one connection's frames; after a close it reconnects with
/// `?since=` (the highest id it has seen) and hands the new sending half
/// to the sender.
async fn receive(
    mut stream: SplitStream<Ws>,
    user: client::User,
    pending: Arc<Pending>,
    relink: mpsc::Sender<Sink>,
    steps: usize,
    shared: Arc<Shared>,
) -> Vec<Histogram<u64>> {
    let me = user.id;
    let Shared {
        epoch,
        counters,
        stop,
        ..
    } = &*shared;
    let epoch = *epoch;
    let step_now = || shared.step_now();
    let mut hists: Vec<Histogram<u64>> = (0..steps)
        .map(|_| Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"))
        .collect();
    // Highest message id seen (own and peer's): where a resume starts.
    let mut last_id = 0;
    // Highest id of the peer's messages: a lower or equal one is a duplicate.
    let mut last_peer_id = 0;
    loop {
        let msg = tokio::select! {
            m = stream.next() => m,
            _ = stop.cancelled() => break,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(
                Message::Ping(_) | Message::Pong(_) | Message::Binary(_) | Message::Frame(_),
            )) => {
                continue;
            }
            end => {
                // Closed by the server (4008 when it fell behind) or cut off.
                let slow =
                    matches!(&end, Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 4008);
                let c = step_now();
                let counter = if slow {
                    &c.closed_slow
                } else {
                    &c.closed_other
                };
                counter.fetch_add(1, Ordering::Relaxed);
                match resume(&shared, &user, last_id, &relink).await {
                    Some(s) => {
                        stream = s;
                        continue;
                    }
                    None => break,
                }
            }
        };
        let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
            continue;
        };
        match frame.kind {
            "message" => {
                last_id = last_id.max(frame.id);
                if frame.sender_id == me {
                    continue;
                }
                if frame.id <= last_peer_id {
                    step_now().duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                last_peer_id = frame.id;
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
            "ack" => {
                let settled = pending.settle(frame.client_msg_id.as_deref());
                if settled {
                    step_now().acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            "error" => {
                // Refused (rate_limited, …): not resent.
                pending.settle(frame.client_msg_id.as_deref());
                step_now().errors.fetch_add(1, Ordering::Relaxed);
            }
            "resync" => {
                step_now().errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    hists
}

/// Reconnects with `?since=last_id` and gives the sending half to the
/// sender; `None` when stopping, or when resuming is not possible.
async fn resume(
    shared: &Shared,
    user: &client::User,
    last_id: i64,
    relink: &mpsc::Sender<Sink>,
) -> Option<SplitStream<Ws>> {
    if !shared.resume || shared.stop.is_cancelled() {
        return None;
    }
    let node = &shared.nodes[user.id.rem_euclid(shared.nodes.len() as i64) as usize];
    let url = format!("{node}?since={last_id}");
    for _ in 0..50 {
        if let Ok(ws) = client::connect_url(&url, user).await {
            let (sink, stream) = ws.split();
            shared.step_now().resumed.fetch_add(1, Ordering::Relaxed);
            let _ = relink.send(sink).await;
            return Some(stream);
        }
        // Back off a little: the server may be busy accepting others.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
