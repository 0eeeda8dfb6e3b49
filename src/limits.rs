//! Process limits. Every connection is a file descriptor: the server raises
//! its soft open-files limit to the hard one at start, and never lets its
//! connection cap exceed what that limit leaves after a reserve for the
//! database, logs and the listeners.

use rlimit::Resource;

/// Descriptors kept back from connections (database files and pool,
/// listeners, NATS, trace exporter, a margin for accepts in flight).
pub const FD_RESERVE: u64 = 256;

/// The open-files limit: `(soft, hard)`.
pub fn nofile() -> Option<(u64, u64)> {
    Resource::NOFILE.get().ok()
}

/// Raises the soft open-files limit to the hard limit; returns the limits
/// before and after (the same when nothing could be raised).
pub fn raise_nofile() -> Option<((u64, u64), (u64, u64))> {
    let before = nofile()?;
    let (soft, hard) = before;
    if soft < hard {
        let _ = Resource::NOFILE.set(hard, hard);
    }
    Some((before, nofile()?))
}

/// `configured`, lowered to what the soft open-files limit leaves for
/// connections (each WebSocket or HTTP connection holds one descriptor).
pub fn connection_cap(configured: usize) -> usize {
    match nofile() {
        Some((soft, _)) if soft != rlimit::INFINITY => {
            let room = soft.saturating_sub(FD_RESERVE).max(16);
            configured.min(usize::try_from(room).unwrap_or(usize::MAX))
        }
        _ => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit_and_the_cap_fits_under_the_soft_one() {
        let (_, (soft, hard)) = raise_nofile().expect("getrlimit works");
        assert_eq!(soft, hard);
        if soft != rlimit::INFINITY {
            let cap = connection_cap(usize::MAX) as u64;
            assert_eq!(cap, soft.saturating_sub(FD_RESERVE).max(16));
        }
        assert_eq!(connection_cap(10), 10);
    }
}
