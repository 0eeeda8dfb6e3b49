//! `shindensen-bench`: drives a real shindensen over loopback and prints a
//! table and JSON. See the README's Performance section.
//!
//! By default it starts the server itself (the `shindensen` binary next to
//! this one) on a fresh database with limits raised for load, and reads the
//! server's RSS and CPU from /proc. `relay` and `ramp` also run the same
//! load against a bare WebSocket relay (no auth, no validation, no
//! database; the same frames) to print the ratio to what the machine allows.

mod baseline;
mod client;
mod fsync;
mod group;
mod relay;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use client::Server;

/// Syncs the fsync probe times before a relay or ramp run.
const FSYNC_PROBES: u64 = 2_000;

#[derive(Parser)]
#[command(name = "shindensen-bench", about = "Load generator for shindensen")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args, Clone)]
struct Target {
    /// Use a running server instead of starting one (its limits must allow
    /// the load); several comma-separated URLs spread the users over nodes.
    #[arg(long)]
    url: Option<String>,
    /// The server binary to start (default: `shindensen` next to this binary).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Write the JSON result here as well as to stdout.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Mode {
    /// P pairs, one WebSocket per user, aggregate rate R paced evenly, S seconds.
    Relay {
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Skip the bare-relay baseline run.
        #[arg(long)]
        no_baseline: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Steps the rate up; reports the highest sustained (>= 99% delivered, p99 < 50 ms).
    Ramp {
        #[arg(long, default_value_t = 50)]
        pairs: usize,
        /// Comma-separated rates to try, ascending.
        #[arg(
            long,
            default_value = "10000,20000,30000,40000,50000,60000,70000,80000"
        )]
        rates: String,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long)]
        no_baseline: bool,
        #[command(flatten)]
        target: Target,
    },
    /// One group of M members, all connected; K members send at each rate (messages/s).
    Group {
        #[arg(long, default_value_t = 1000)]
        members: usize,
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Comma-separated message rates to try, ascending.
        #[arg(long, default_value = "10,20,50,100")]
        rates: String,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Holds N authenticated idle connections; server RSS per connection and idle CPU.
    Idle {
        #[arg(long, default_value_t = 15_000)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Closed-loop keep-alive HTTP load: history (50 messages), chat list, login.
    Http {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Internal: serve the bare relay baseline.
    BaselineServer {
        #[arg(long)]
        listen: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.mode {
            Mode::BaselineServer { listen } => baseline::serve(&listen).await,
            Mode::Relay {
                pairs,
                rate,
                seconds,
                no_baseline,
                target,
            } => {
                let steps = vec![rate];
                run_relay(&target, pairs, &steps, seconds, no_baseline, false).await
            }
            Mode::Ramp {
                pairs,
                rates,
                seconds,
                no_baseline,
                target,
            } => {
                let steps: Vec<u64> = rates
                    .split(',')
                    .map(|r| r.trim().parse())
                    .collect::<Result<_, _>>()?;
                run_relay(&target, pairs, &steps, seconds, no_baseline, true).await
            }
            Mode::Group {
                members,
                senders,
                rates,
                seconds,
                target,
            } => {
                let steps: Vec<u64> = rates
                    .split(',')
                    .map(|r| r.trim().parse())
                    .collect::<Result<_, _>>()?;
                run_group(&target, members, senders, &steps, seconds).await
            }
            Mode::Idle {
                connections,
                seconds,
                target,
            } => run_idle(&target, connections, seconds).await,
            Mode::Http {
                concurrency,
                seconds,
                target,
            } => run_http(&target, concurrency, seconds).await,
        }
    })
}

async fn start(target: &Target) -> anyhow::Result<Server> {
    match &target.url {
        Some(url) => Ok(Server::external(url)),
        None => Server::spawn(target.server.clone()).await,
    }
}

fn emit(target: &Target, value: serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string(&value)?;
    println!("JSON {text}");
    if let Some(path) = &target.json {
        std::fs::write(path, serde_json::to_string_pretty(&value)?)?;
    }
    Ok(())
}

async fn run_relay(
    target: &Target,
    pairs: usize,
    steps: &[u64],
    seconds: u64,
    no_baseline: bool,
    ramp: bool,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs(seconds);
    let server = start(target).await?;
    // The disk's floor, measured before the load where the database lives
    // (for a server given by URL: this machine's temporary directory).
    let fsync_dir = server
        .data_dir()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let floor =
        tokio::task::spawn_blocking(move || fsync::probe(&fsync_dir, FSYNC_PROBES)).await??;
    let results = relay::run(&server, relay::Kind::Shindensen, pairs, steps, duration).await?;
    let usage = server.usage();
    drop(server);
    let baseline = if no_baseline {
        None
    } else {
        let base = Server::spawn_baseline().await?;
        let r = relay::run(&base, relay::Kind::Baseline, pairs, steps, duration).await?;
        Some(r)
    };
    println!();
    println!(
        "relay: {pairs} pairs ({} connections), {seconds} s per step, synchronous=FULL",
        pairs * 2
    );
    relay::print_table("shindensen", &results);
    if let Some(b) = &baseline {
        relay::print_table("bare relay (no persistence)", b);
    }
    let sustained = relay::highest_sustained(&results);
    let base_sustained = baseline.as_deref().map(relay::highest_sustained);
    if ramp {
        println!("highest sustained rate: shindensen {sustained:.0}/s");
        if let Some(b) = base_sustained {
            println!(
                "highest sustained rate: bare relay {b:.0}/s; ratio {:.2}",
                sustained / b.max(1.0)
            );
        }
    } else if let (Some(b), Some(s)) = (baseline.as_ref().and_then(|b| b.first()), results.first())
    {
        println!(
            "ratio to bare relay: delivered {:.2}, p99 {:.2}x",
            s.delivered_per_sec / b.delivered_per_sec.max(1.0),
            s.p99_ms / b.p99_ms.max(0.001)
        );
    }
    println!(
        "fsync floor ({} appends + fdatasync where the database lives): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        floor.syncs, floor.p50_ms, floor.p99_ms, floor.max_ms
    );
    if let Some(u) = usage {
        println!(
            "server: peak RSS {:.1} MiB, CPU {:.2} s",
            u.rss_kib as f64 / 1024.0,
            u.cpu_secs
        );
    }
    emit(
        target,
        json!({
            "fsync": floor.json(),
            "mode": if ramp { "ramp" } else { "relay" },
            "pairs": pairs,
            "seconds_per_step": seconds,
            "shindensen": results.iter().map(relay::StepResult::json).collect::<Vec<_>>(),
            "baseline": baseline.as_ref().map(|b| b.iter().map(relay::StepResult::json).collect::<Vec<_>>()),
            "highest_sustained": sustained,
            "baseline_highest_sustained": base_sustained,
        }),
    )
}

async fn run_group(
    target: &Target,
    members: usize,
    senders: usize,
    steps: &[u64],
    seconds: u64,
) -> anyhow::Result<()> {
    let server = start(target).await?;
    let results = group::run(
        &server,
        members,
        senders.clamp(1, members),
        steps,
        Duration::from_secs(seconds),
    )
    .await?;
    let metrics = client::scrape(&server).await.unwrap_or_default();
    let encodings = client::sample(&metrics, "shindensen_message_encodings_total");
    let accepted = client::sample(&metrics, "shindensen_messages_accepted_total");
    let per_message = match (encodings, accepted) {
        (Some(e), Some(a)) if a > 0.0 => Some(e / a),
        _ => None,
    };
    let usage = server.usage();
    println!();
    group::print_table(members, senders, &results);
    if let Some(p) = per_message {
        println!("frames encoded per message (server metrics): {p:.2}");
    }
    if let Some(u) = usage {
        println!(
            "server: peak RSS {:.1} MiB, CPU {:.2} s",
            u.rss_kib as f64 / 1024.0,
            u.cpu_secs
        );
    }
    emit(
        target,
        json!({"mode": "group", "members": members, "senders": senders, "seconds_per_step": seconds,
               "steps": results.iter().map(group::GroupStep::json).collect::<Vec<_>>(),
               "encodings_per_message": per_message}),
    )
}

async fn run_idle(target: &Target, n: usize, seconds: u64) -> anyhow::Result<()> {
    let server = start(target).await?;
    let users = client::users(&server, 100.min(n)).await?;
    let settle = || tokio::time::sleep(Duration::from_millis(1500));
    settle().await;
    let before = server.usage().map(|u| u.rss_now_kib);
    let conns = client::open_idle(&server, &users, n).await?;
    settle().await;
    let after = server.usage().map(|u| u.rss_now_kib);
    let cpu0 = server.usage().map(|u| u.cpu_secs);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu1 = server.usage().map(|u| u.cpu_secs);
    // Close them all, wait until the server has let go of every one, and
    // give the allocator a moment to return what they held.
    let held = conns.len();
    drop(conns);
    let closed = wait_for_gauge(&server, "shindensen_ws_connections", 0.0).await;
    let closed_at = Instant::now();
    settle().await;
    let after_close = server.usage().map(|u| u.rss_now_kib);
    // Then how long until RSS is back within 20% of the level before
    // (allocators return freed pages on a timer), up to 30 s.
    // (RSS then, seconds since the last close)
    let returned = match before {
        Some(b) => wait_for_rss(&server, b + b / 5, Duration::from_secs(30))
            .await
            .map(|rss| (rss, closed_at.elapsed().as_secs_f64())),
        None => None,
    };
    let per_conn = match (before, after) {
        (Some(b), Some(a)) => Some((a.saturating_sub(b)) as f64 / n as f64),
        _ => None,
    };
    let idle_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) / seconds as f64 * 100.0),
        _ => None,
    };
    println!();
    println!("idle: {held} connections held ({} users)", users.len());
    if let (Some(b), Some(a), Some(p)) = (before, after, per_conn) {
        println!(
            "server RSS {:.1} MiB -> {:.1} MiB: {:.2} KiB per connection",
            b as f64 / 1024.0,
            a as f64 / 1024.0,
            p
        );
    }
    if let Some(c) = idle_cpu {
        println!("server CPU while idle: {c:.2}% of one core over {seconds} s");
    }
    if let (Some(b), Some(c)) = (before, after_close) {
        println!(
            "after closing them ({}): server RSS {:.1} MiB, {:+.0}% of the level before they opened",
            if closed {
                "server count back to 0"
            } else {
                "server count NOT back to 0 within 30 s"
            },
            c as f64 / 1024.0,
            (c as f64 / b.max(1) as f64 - 1.0) * 100.0
        );
        match returned {
            Some((r, t)) => println!(
                "back within 20% of the level before {t:.1} s after the last close: {:.1} MiB",
                r as f64 / 1024.0
            ),
            None => println!(
                "NOT back within 20% of the level before 30 s after the last close: {:.1} MiB",
                server
                    .usage()
                    .map_or(0.0, |u| u.rss_now_kib as f64 / 1024.0)
            ),
        }
    }
    emit(
        target,
        json!({"mode": "idle", "connections": held, "rss_before_kib": before,
               "rss_after_kib": after, "rss_after_close_kib": after_close, "all_closed": closed,
               "rss_returned_kib": returned.map(|r| r.0), "rss_returned_after_s": returned.map(|r| r.1),
               "kib_per_connection": per_conn, "idle_cpu_percent": idle_cpu}),
    )
}

/// Waits until the server's RSS is at most `limit_kib`; its RSS then, or
/// None after `deadline`.
async fn wait_for_rss(server: &Server, limit_kib: u64, deadline: Duration) -> Option<u64> {
    let start = Instant::now();
    loop {
        let rss = server.usage()?.rss_now_kib;
        if rss <= limit_kib {
            return Some(rss);
        }
        if start.elapsed() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits (up to 30 s) until an unlabelled gauge in the server's /metrics
/// reads `value`; false if it did not.
async fn wait_for_gauge(server: &Server, name: &str, value: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(metrics) = client::scrape(server).await
            && client::sample(&metrics, name) == Some(value)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn run_http(target: &Target, concurrency: usize, seconds: u64) -> anyhow::Result<()> {
    let server = start(target).await?;
    let results = client::http_load(&server, concurrency, Duration::from_secs(seconds)).await?;
    println!();
    println!("http: closed loop, keep-alive, {concurrency} connections, {seconds} s each");
    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>9}",
        "endpoint", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for r in &results {
        println!(
            "{:<28} {:>10.0} {:>9.2} {:>9.2} {:>9}",
            r.name, r.per_sec, r.p50_ms, r.p99_ms, r.errors
        );
    }
    emit(
        target,
        json!({"mode": "http", "concurrency": concurrency, "results": results.iter().map(|r| json!({
            "endpoint": r.name, "requests_per_sec": r.per_sec, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors
        })).collect::<Vec<_>>()}),
    )
}
