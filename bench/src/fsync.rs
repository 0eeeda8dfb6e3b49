//! The disk's floor: how long one small append plus `fdatasync` takes in the
//! directory that holds the database, so a relay run prints the latency no
//! commit can beat (one WAL append and one sync per commit with
//! `synchronous = FULL`).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::json;

/// Appends one WAL-frame-sized page per sync, as a commit of a few messages does.
const PAGE: usize = 4096 + 24;

pub struct FsyncProbe {
    pub syncs: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl FsyncProbe {
    pub fn json(&self) -> serde_json::Value {
        json!({"syncs": self.syncs, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms})
    }
}

/// `count` appends, each followed by `fdatasync`, in a scratch file in `dir`.
pub fn probe(dir: &Path, count: u64) -> anyhow::Result<FsyncProbe> {
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let page = vec![0x5au8; PAGE];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..count {
        let start = Instant::now();
        file.write_all(&page)?;
        file.sync_data()?;
        hist.saturating_record(start.elapsed().as_micros() as u64);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(FsyncProbe {
        syncs: count,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
    })
}
