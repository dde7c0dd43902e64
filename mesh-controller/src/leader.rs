//! Leader election between controller replicas (`--leader-elect`), on a
//! `coordination.k8s.io/v1` Lease.
//!
//! Every replica serves agents (each signs with the same CA, loaded from the same Secret);
//! only the leader writes to the API: SMI status conditions and the trust bundle. Two
//! replicas writing at once for a moment is harmless (both write the same thing), so the
//! election needs no fencing.
//!
//! - A replica takes the Lease when it does not exist, names no holder, or has not changed
//!   for its `leaseDurationSeconds` as this replica has watched it (its own clock, never the
//!   holder's timestamps, so clock skew between nodes does not matter).
//! - Every write carries the `resourceVersion` it read: of two replicas taking the Lease at
//!   once, the API server lets one through and answers the other 409.
//! - The leader renews every third of the duration; one that has not renewed for the whole
//!   duration (the API server unreachable) stops leading before another replica may start.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a Lease not renewed keeps its holder.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often a replica that does not lead looks at the Lease.
const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Whether this replica leads, as the election says now; `always()` without an election.
#[derive(Debug, Clone)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// A replica without an election: it always leads.
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(true);
        // Kept forever: `changed()` then never resolves.
        std::mem::forget(tx);
        Leadership(rx)
    }

    pub fn leads(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until this replica leads.
    pub async fn until_leading(&mut self) {
        // A closed channel (the election stopped) leaves the last answer standing.
        let _ = self.0.wait_for(|leads| *leads).await;
    }

    /// Waits until this replica stops leading; never, if the election stopped.
    pub async fn until_not_leading(&mut self) {
        if self.0.wait_for(|leads| !*leads).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Leadership as a test sets it.
#[cfg(test)]
pub(crate) fn testing(rx: watch::Receiver<bool>) -> Leadership {
    Leadership(rx)
}

/// One replica's view of the Lease.
pub struct Election {
    api: Api<Lease>,
    name: String,
    holder: String,
    duration: Duration,
    /// The Lease's `resourceVersion` when it last changed, and when this replica saw it.
    observed: Option<(String, Instant)>,
    /// When this replica last renewed the Lease, while it leads.
    renewed: Option<Instant>,
}

impl Election {
    pub fn new(api: Api<Lease>, name: &str, holder: &str, duration: Duration) -> Election {
        Election {
            api,
            name: name.to_string(),
            holder: holder.to_string(),
            duration,
            observed: None,
            renewed: None,
        }
    }

    /// Runs the election until the returned task is aborted.
    pub fn start(mut self) -> (Leadership, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let leads = self.step().await;
                tx.send_if_modified(|was| {
                    if *was != leads {
                        match leads {
                            true => info!(lease = %self.name, holder = %self.holder, "leading"),
                            false => warn!(lease = %self.name, holder = %self.holder, "no longer leading"),
                        }
                        *was = leads;
                        true
                    } else {
                        false
                    }
                });
                let wait = if leads {
                    self.duration / 3
                } else {
                    RETRY_PERIOD
                };
                tokio::time::sleep(wait).await;
            }
        });
        (Leadership(rx), task)
    }

    /// One look at the Lease: takes or renews it when it may. Whether this replica leads.
    pub async fn step(&mut self) -> bool {
        match self.try_step().await {
            Ok(leads) => {
                if leads {
                    self.renewed = Some(Instant::now());
                } else {
                    self.renewed = None;
                }
                leads
            }
            Err(e) => {
                // Keeps leading only while the last renewal still holds.
                let holds = self.renewed.is_some_and(|at| at.elapsed() < self.duration);
                warn!(lease = %self.name, error = %e, leading = holds, "cannot reach the Lease");
                if !holds {
                    self.renewed = None;
                }
                holds
            }
        }
    }

    async fn try_step(&mut self) -> Result<bool, kube::Error> {
        let now = Instant::now();
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return self.write(None).await;
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        match &self.observed {
            Some((seen, _)) if *seen == version => {}
            _ => self.observed = Some((version, now)),
        }
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        if holder == self.holder {
            return self.write(Some(lease)).await;
        }
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.duration, Duration::from_secs);
        let unchanged_since = self.observed.as_ref().map_or(now, |(_, at)| *at);
        if holder.is_empty() || now.duration_since(unchanged_since) >= duration {
            return self.write(Some(lease)).await;
        }
        Ok(false)
    }

    /// Creates the Lease naming this replica, or takes or renews `current`. A conflict (another
    /// replica wrote first) is not leading, not an error.
    async fn write(&mut self, current: Option<Lease>) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.holder.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
                    spec.holder_identity = Some(self.holder.clone());
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(now);
                // `lease.metadata.resourceVersion` is the one read: a stale one gets 409.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(written) => {
                let version = written.metadata.resource_version.unwrap_or_default();
                self.observed = Some((version, Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
