//! Which requests are retried, and how many retries a pod may spend.
//!
//! A request is retried only when it is idempotent (RFC 9110: GET, HEAD, OPTIONS, TRACE,
//! PUT, DELETE) and has no body (a streamed body is gone once sent), up to
//! [`MAX_RETRIES`] times, when no response came back (the connection could not be opened,
//! or closed before answering) or the answer was 502 or 503. Each retry picks its endpoint
//! anew. Retries draw on a [`RetryBudget`]: at most [`BUDGET_RATIO`] of the requests of the
//! last [`BUDGET_WINDOW`] plus [`BUDGET_FLOOR`], so a failing destination sees a bounded
//! extra load, never a retry storm.

use std::sync::Mutex;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;

/// Retries of one request at most.
pub const MAX_RETRIES: u32 = 2;
/// Retries allowed per window, as a share of the window's requests.
pub const BUDGET_RATIO: f64 = 0.2;
/// Retries allowed per window whatever the traffic.
pub const BUDGET_FLOOR: u64 = 10;
/// The budget's window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Whether a request of `method` may be sent twice.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a response with `status` is worth another attempt.
pub fn retriable_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
    )
}

/// Retries a pod may spend: counted over two consecutive windows so the allowance does not
/// reset all at once.
#[derive(Debug)]
pub struct RetryBudget {
    inner: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    requests: u64,
    retries: u64,
    previous_requests: u64,
    previous_retries: u64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            inner: Mutex::new(Window {
                start: Instant::now(),
                requests: 0,
                retries: 0,
                previous_requests: 0,
                previous_retries: 0,
            }),
        }
    }
}

impl RetryBudget {
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        let mut w = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = w.start.elapsed();
        if elapsed >= BUDGET_WINDOW * 2 {
            *w = Window {
                start: Instant::now(),
                requests: 0,
                retries: 0,
                previous_requests: 0,
                previous_retries: 0,
            };
        } else if elapsed >= BUDGET_WINDOW {
            w.previous_requests = w.requests;
            w.previous_retries = w.retries;
            w.requests = 0;
            w.retries = 0;
            w.start += BUDGET_WINDOW;
        }
        w
    }

    /// Counts a request (first attempts only).
    pub fn request(&self) {
        self.window().requests += 1;
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_retry(&self) -> bool {
        let mut w = self.window();
        let requests = w.requests + w.previous_requests;
        let retries = w.retries + w.previous_retries;
        // Whole retries: the floor plus the ratio of the requests seen.
        let allowed = BUDGET_FLOOR + (requests as f64 * BUDGET_RATIO) as u64;
        if retries >= allowed {
            return false;
        }
        w.retries += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bodiless_safe_methods_are_idempotent_and_only_gateway_errors_retried() {
        assert!(idempotent(&Method::GET));
        assert!(idempotent(&Method::PUT));
        assert!(!idempotent(&Method::POST));
        assert!(!idempotent(&Method::PATCH));
        assert!(retriable_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retriable_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!retriable_status(StatusCode::GATEWAY_TIMEOUT));
    }

    #[test]
    fn the_budget_allows_the_floor_plus_a_fifth_of_the_requests() {
        let budget = RetryBudget::default();
        let granted = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(granted as u64, BUDGET_FLOOR);
        for _ in 0..100 {
            budget.request();
        }
        let granted = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 20, "a fifth of 100 requests");
    }
}
