//! The disposition table: what becomes of a message, decided in one pure function.
//!
//! Contract §4 (and §2 for the dead-letter kinds) is a table from what happened to what the
//! worker does. [`decide`] is that table, row by row; [`handle`](super::handle) carries the
//! answer out and decides nothing itself. Keeping the policy here, free of I/O, lets every
//! row be unit-tested and read in one place.
//!
//! | what happened | breaker | disposition |
//! |---|---|---|
//! | token ready | any | publish the ready event, then ack |
//! | invalid input | any | dead-letter `invalid` (attempts unchanged) |
//! | issuer `4xx` (not 401/403) | any | dead-letter `rejected` with the status |
//! | an error retrying cannot fix (poison) | any | dead-letter `exhausted` |
//! | tenant deleted (contract §10) | any | dead-letter `gone` |
//! | deletion done | any | ack (its revocations are due; nothing to publish) |
//! | issuer `401`/`403` | — (trips it) | hold as the probe, or requeue if one runs |
//! | transient issuer failure | closed | retry later (attempts + 1), or dead-letter `exhausted` at `MAX_ATTEMPTS` |
//! | transient issuer failure | open | hold as the probe, or requeue if one runs; no attempt counted |
//! | a stored token's key is not configured | any | retry later (attempts + 1), or dead-letter `exhausted` at `MAX_ATTEMPTS` |
//! | shutting down | any | requeue |

use std::time::Duration;

/// The kinds of dead letter (contract §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadKind {
    /// Bad input, never retried.
    Invalid,
    /// The issuer refused the request (4xx other than 401/403).
    Rejected,
    /// `MAX_ATTEMPTS` deliveries failed with retryable errors, or one failed with an error
    /// that retrying cannot fix.
    Exhausted,
    /// The tenant was deleted: its ids are never reused.
    Gone,
}

impl DeadKind {
    /// The `x-tt-error-kind` header value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Rejected => "rejected",
            Self::Exhausted => "exhausted",
            Self::Gone => "gone",
        }
    }
}

/// What happened to one message, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Happened {
    /// The tenant has its token; the event is decided.
    Ready,
    /// The message is not a valid request (contract §3).
    Invalid,
    /// The issuer refused the master token (401/403).
    Unauthorized,
    /// The issuer refused the request (another 4xx).
    Rejected {
        /// The HTTP status.
        status: u16,
    },
    /// The issuer was unavailable past the in-process retry budget.
    Transient,
    /// The event must carry the stored token and no configured key opens it: a configuration
    /// fault (add the key), not the issuer's, so the breaker ignores it.
    KeyMissing,
    /// Provisioning this message alone failed with an error retrying cannot fix.
    Unrecoverable,
    /// The tenant was deleted before this request.
    Gone,
    /// A deletion was carried out (or had been): nothing to publish.
    Done,
    /// The process is shutting down before the message was settled.
    Interrupted,
}

/// The breaker as the policy sees it, after the outcome was recorded with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerState {
    /// The issuer is taken to work.
    Closed,
    /// Consumption is paused and no delivery is probing the issuer.
    OpenIdle,
    /// Consumption is paused and another delivery is already the probe.
    OpenProbing,
}

/// The retry policy of the process (`MAX_ATTEMPTS`, `RETRY_DELAYS`).
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// Deliveries failing with a retryable error before `exhausted`.
    pub max_attempts: u32,
    /// Delays of the retry queues; attempt n waits the n-th, the last one repeating.
    pub retry_delays: Vec<Duration>,
}

/// What the handler does with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Publish the ready event (confirmed), then ack.
    Publish,
    /// Publish a copy to the retry queue of `delay` with `x-tt-attempts = attempts`, then ack.
    RetryLater {
        /// The retry queue's delay.
        delay: Duration,
        /// Attempts including this delivery's.
        attempts: u32,
    },
    /// Publish a copy to `tenant-tokens.dlx` with the `x-tt-*` headers, then ack.
    DeadLetter {
        /// `x-tt-error-kind`.
        kind: DeadKind,
        /// `x-tt-attempts`.
        attempts: u32,
        /// `x-tt-issuer-status`, for `rejected`.
        issuer_status: Option<u16>,
    },
    /// Settle the message; nothing to publish.
    Ack,
    /// Give the message back to the queue untouched (no attempt counted).
    Requeue,
    /// Keep the message unacked and retry its provisioning until the issuer answers.
    HoldAsProbe,
}

/// The table of the module docs. `attempts` counts earlier deliveries that failed with a
/// retryable error (`x-tt-attempts`).
pub(crate) fn decide(
    happened: Happened,
    attempts: u32,
    breaker: BreakerState,
    policy: &Policy,
) -> Disposition {
    let dead = |kind, attempts, issuer_status| Disposition::DeadLetter {
        kind,
        attempts,
        issuer_status,
    };
    let pause = match breaker {
        BreakerState::OpenProbing => Disposition::Requeue,
        BreakerState::Closed | BreakerState::OpenIdle => Disposition::HoldAsProbe,
    };
    match happened {
        Happened::Ready => Disposition::Publish,
        Happened::Invalid => dead(DeadKind::Invalid, attempts, None),
        Happened::Rejected { status } => dead(DeadKind::Rejected, attempts, Some(status)),
        Happened::Unrecoverable => dead(DeadKind::Exhausted, attempts, None),
        Happened::Gone => dead(DeadKind::Gone, attempts, None),
        Happened::Done => Disposition::Ack,
        Happened::Unauthorized => pause,
        Happened::Transient if breaker != BreakerState::Closed => pause,
        Happened::Transient | Happened::KeyMissing => {
            let attempts = attempts.saturating_add(1);
            if attempts >= policy.max_attempts {
                return dead(DeadKind::Exhausted, attempts, None);
            }
            match retry_delay(&policy.retry_delays, attempts) {
                Some(delay) => Disposition::RetryLater { delay, attempts },
                None => Disposition::Requeue,
            }
        }
        Happened::Interrupted => Disposition::Requeue,
    }
}

/// The delay before attempt `attempts + 1`: the n-th delay for the n-th failure, the last
/// one repeating.
fn retry_delay(delays: &[Duration], attempts: u32) -> Option<Duration> {
    let tier = (attempts as usize).saturating_sub(1);
    delays.get(tier).or(delays.last()).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            max_attempts: 4,
            retry_delays: vec![Duration::from_secs(1), Duration::from_secs(5)],
        }
    }

    fn decide_closed(h: Happened, attempts: u32) -> Disposition {
        decide(h, attempts, BreakerState::Closed, &policy())
    }

    const ALL_BREAKERS: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::OpenIdle,
        BreakerState::OpenProbing,
    ];

    #[test]
    fn a_ready_token_is_published_whatever_the_breaker() {
        for b in ALL_BREAKERS {
            assert_eq!(
                decide(Happened::Ready, 3, b, &policy()),
                Disposition::Publish
            );
        }
    }

    #[test]
    fn invalid_input_is_dead_lettered_at_once_without_counting_an_attempt() {
        for b in ALL_BREAKERS {
            assert_eq!(
                decide(Happened::Invalid, 2, b, &policy()),
                Disposition::DeadLetter {
                    kind: DeadKind::Invalid,
                    attempts: 2,
                    issuer_status: None
                }
            );
        }
    }

    #[test]
    fn another_4xx_is_dead_lettered_as_rejected_with_its_status() {
        assert_eq!(
            decide_closed(Happened::Rejected { status: 422 }, 1),
            Disposition::DeadLetter {
                kind: DeadKind::Rejected,
                attempts: 1,
                issuer_status: Some(422)
            }
        );
    }

    #[test]
    fn an_error_retrying_cannot_fix_is_dead_lettered_as_exhausted() {
        assert_eq!(
            decide_closed(Happened::Unrecoverable, 0),
            Disposition::DeadLetter {
                kind: DeadKind::Exhausted,
                attempts: 0,
                issuer_status: None
            }
        );
    }

    #[test]
    fn a_request_for_a_deleted_tenant_is_dead_lettered_as_gone_whatever_the_breaker() {
        for b in ALL_BREAKERS {
            assert_eq!(
                decide(Happened::Gone, 1, b, &policy()),
                Disposition::DeadLetter {
                    kind: DeadKind::Gone,
                    attempts: 1,
                    issuer_status: None
                }
            );
        }
    }

    #[test]
    fn a_done_deletion_is_acked_with_nothing_published() {
        for b in ALL_BREAKERS {
            assert_eq!(decide(Happened::Done, 0, b, &policy()), Disposition::Ack);
        }
    }

    #[test]
    fn a_refused_master_token_is_never_dead_lettered_but_probes_or_goes_back() {
        assert_eq!(
            decide(Happened::Unauthorized, 7, BreakerState::OpenIdle, &policy()),
            Disposition::HoldAsProbe
        );
        assert_eq!(
            decide(
                Happened::Unauthorized,
                7,
                BreakerState::OpenProbing,
                &policy()
            ),
            Disposition::Requeue
        );
    }

    #[test]
    fn a_transient_failure_waits_in_the_retry_queue_of_its_attempt() {
        assert_eq!(
            decide_closed(Happened::Transient, 0),
            Disposition::RetryLater {
                delay: Duration::from_secs(1),
                attempts: 1
            }
        );
        assert_eq!(
            decide_closed(Happened::Transient, 1),
            Disposition::RetryLater {
                delay: Duration::from_secs(5),
                attempts: 2
            }
        );
        // The last delay repeats.
        assert_eq!(
            decide_closed(Happened::Transient, 2),
            Disposition::RetryLater {
                delay: Duration::from_secs(5),
                attempts: 3
            }
        );
    }

    #[test]
    fn the_max_attempts_th_transient_failure_is_dead_lettered_as_exhausted() {
        assert_eq!(
            decide_closed(Happened::Transient, 3),
            Disposition::DeadLetter {
                kind: DeadKind::Exhausted,
                attempts: 4,
                issuer_status: None
            }
        );
    }

    #[test]
    fn a_missing_key_is_retried_whatever_the_breaker_then_exhausted() {
        for b in ALL_BREAKERS {
            assert_eq!(
                decide(Happened::KeyMissing, 0, b, &policy()),
                Disposition::RetryLater {
                    delay: Duration::from_secs(1),
                    attempts: 1
                }
            );
            assert_eq!(
                decide(Happened::KeyMissing, 3, b, &policy()),
                Disposition::DeadLetter {
                    kind: DeadKind::Exhausted,
                    attempts: 4,
                    issuer_status: None
                }
            );
        }
    }

    #[test]
    fn while_the_breaker_is_open_a_transient_failure_costs_no_attempt() {
        assert_eq!(
            decide(Happened::Transient, 3, BreakerState::OpenIdle, &policy()),
            Disposition::HoldAsProbe
        );
        assert_eq!(
            decide(Happened::Transient, 3, BreakerState::OpenProbing, &policy()),
            Disposition::Requeue
        );
    }

    #[test]
    fn without_retry_queues_a_transient_failure_goes_back_to_the_queue() {
        let p = Policy {
            max_attempts: 4,
            retry_delays: Vec::new(),
        };
        assert_eq!(
            decide(Happened::Transient, 0, BreakerState::Closed, &p),
            Disposition::Requeue
        );
    }

    #[test]
    fn shutdown_hands_the_message_back() {
        for b in ALL_BREAKERS {
            assert_eq!(
                decide(Happened::Interrupted, 1, b, &policy()),
                Disposition::Requeue
            );
        }
    }
}
