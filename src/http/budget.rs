//! A byte budget for response bodies in flight. A history page is built
//! whole (up to a few MB); a client that does not read would hold it until
//! the write timeout, and a hundred of them hundreds of MB. Each large body
//! takes its size from the budget before it is sent and gives it back when
//! hyper drops the body (all written, or the connection gone), so bodies
//! held for clients never exceed `server.inflight_response_bytes`. The
//! body is handed to hyper in 64 KiB frames: hyper polls for the next one
//! only when its own buffer has room, so the whole page is never copied
//! into hyper's buffer at once.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bodies up to this size are sent without taking from the budget.
const SMALL: usize = 64 * 1024;

pub struct ResponseBudget {
    /// Permits are KiB.
    kib: Arc<Semaphore>,
    total_kib: u32,
    wait: Duration,
}

impl ResponseBudget {
    pub fn new(bytes: usize, wait: Duration) -> ResponseBudget {
        let total_kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(1);
        ResponseBudget {
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            wait,
        }
    }

    /// A body for `bytes` that holds its share of the budget until it is
    /// dropped; `None` when the budget stayed exhausted for the wait.
    pub async fn body(&self, bytes: Vec<u8>) -> Option<Body> {
        let permit = if bytes.len() <= SMALL {
            None
        } else {
            let kib = u32::try_from(bytes.len().div_ceil(1024))
                .unwrap_or(u32::MAX)
                .min(self.total_kib);
            let acquire = self.kib.clone().acquire_many_owned(kib);
            match tokio::time::timeout(self.wait, acquire).await {
                Ok(Ok(permit)) => Some(permit),
                _ => return None,
            }
        };
        Some(Body::new(Budgeted {
            bytes: Bytes::from(bytes),
            _permit: permit,
        }))
    }
}

struct Budgeted {
    bytes: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

impl http_body::Body for Budgeted {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.bytes.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.bytes.len().min(SMALL);
        Poll::Ready(Some(Ok(Frame::data(self.bytes.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.bytes.len() as u64)
    }
}
