//! `pixart worker`: takes runs from a shared queue and executes them under the
//! same rules as `pixart serve` (paths confined to the output and base folders,
//! per-run memory budgets, the disk quota), with one or more runs at a time.
//!
//! A run is acknowledged only when it has ended and its record is written. While
//! it runs, its worker renews its hold every half second; a worker that dies
//! (killed, its machine lost) stops renewing, and after the lease another
//! worker starts the run again from its beginning. Outputs are written
//! atomically, so the second execution replaces the first one's files.

use super::execute::{execute_run, load_request, Outcome};
use super::shared::{Claim, Heartbeat, QueueError, SharedQueue};
use super::state::{now_millis, RunRecord, RunState, ServerConfig};
use crate::executor::Executor;
use crate::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The folders, budgets and history limit, as a server has them; the output
    /// folder is the one the front ends serve files from (shared between hosts).
    pub server: ServerConfig,
    /// Runs executed at once.
    pub parallel_runs: usize,
    /// How long a worker may go without renewing its hold on a run before
    /// another takes the run over.
    pub lease: Duration,
    /// This worker's name in the queue (and in run records): unique among the
    /// workers of one queue.
    pub name: String,
}

/// The hold on a running run is renewed this often (and cancels are seen).
const HEARTBEAT: Duration = Duration::from_millis(500);

/// The shortest lease: a few heartbeats, so that a busy moment is not a death.
pub const MIN_LEASE: Duration = Duration::from_secs(2);

struct Worker {
    registry: Registry,
    executor: Executor,
    config: WorkerConfig,
    queue: SharedQueue,
    disk: Arc<crate::budget::DiskQuota>,
}

/// Runs runs from `queue` until `stop` fires, then lets the running ones end
/// (runs not started stay queued for other workers).
pub async fn run_worker(
    registry: Registry,
    executor: Executor,
    config: WorkerConfig,
    queue: SharedQueue,
    stop: CancellationToken,
) {
    let disk = Arc::new(crate::budget::DiskQuota::new(
        &config.server.out_dir,
        config.server.out_quota,
        config.server.keep_free,
    ));
    tokio::spawn(publish_events(executor.subscribe(), queue.clone()));
    let worker = Arc::new(Worker {
        registry,
        executor,
        config,
        queue,
        disk,
    });
    // Each slot is its own consumer and owner in the queue; the nonce keeps two
    // processes given one `--name` apart.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    let slots: Vec<_> = (0..worker.config.parallel_runs.max(1))
        .map(|i| {
            let consumer = format!("{}#{i}-{nonce:08x}", worker.config.name);
            tokio::spawn(worker.clone().slot(consumer, stop.clone()))
        })
        .collect();
    for slot in slots {
        let _ = slot.await;
    }
}

/// Sends this worker's run events to every front end.
async fn publish_events(
    mut events: tokio::sync::broadcast::Receiver<crate::Event>,
    queue: SharedQueue,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let text = match events.recv().await {
            Ok(e) => match serde_json::to_string(&e) {
                Ok(text) => text,
                Err(_) => continue,
            },
            Err(RecvError::Lagged(n)) => super::state::lagged_event(n).to_string(),
            Err(RecvError::Closed) => break,
        };
        if let Err(e) = queue.publish(&text).await {
            tracing::warn!("{e}");
        }
    }
}

impl Worker {
    /// One run at a time: takes a run (one of a dead worker first), executes
    /// it, records it; again until `stop`. `consumer` names this slot in the
    /// queue (unique: two slots never pass for each other).
    async fn slot(self: Arc<Self>, consumer: String, stop: CancellationToken) {
        let mut reading = None;
        while !stop.is_cancelled() {
            // Only the wait for an entry yields to `stop`: an entry read as it
            // stops stays pending and another worker claims it after the lease.
            let entry = tokio::select! {
                entry = self.next_entry(&consumer, &mut reading) => entry,
                _ = stop.cancelled() => break,
            };
            let taken = match entry {
                Ok(Some(entry)) => self
                    .queue
                    .claim(&entry, &consumer)
                    .await
                    .map(|claim| Some((entry, claim))),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            let ended = match taken {
                Ok(Some((entry, Claim::New(id)))) => {
                    self.execute(&consumer, &entry, &id, false).await
                }
                Ok(Some((entry, Claim::Takeover(id)))) => {
                    self.execute(&consumer, &entry, &id, true).await
                }
                Ok(Some((entry, Claim::Cancelled(id)))) => {
                    self.end_unstarted(&consumer, &entry, &id).await
                }
                Ok(Some((_, Claim::Nothing)) | None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = ended {
                tracing::warn!("{e}; trying again in a second");
                reading = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
                // Redis may have restarted empty: the group is made again.
                if let Err(e) = self.queue.ensure_group().await {
                    tracing::warn!("{e}");
                }
            }
        }
        if let Err(e) = self.queue.forget_consumer(&consumer).await {
            tracing::warn!("{e}");
        }
    }

    /// A stream entry: a dead worker's first, else a new one (waiting up to
    /// [`READ_BLOCK`](super::shared::READ_BLOCK) for it).
    async fn next_entry(
        &self,
        consumer: &str,
        reading: &mut Option<redis::aio::ConnectionManager>,
    ) -> Result<Option<String>, QueueError> {
        if let Some(entry) = self
            .queue
            .reclaim_entry(consumer, self.config.lease)
            .await?
        {
            return Ok(Some(entry));
        }
        if reading.is_none() {
            *reading = Some(self.queue.blocking_connection().await?);
        }
        match reading.as_mut() {
            Some(con) => self.queue.read_entry(con, consumer).await,
            None => Ok(None),
        }
    }

    /// Ends run `id`, cancelled while its dead worker held it, without running it.
    async fn end_unstarted(&self, consumer: &str, entry: &str, id: &str) -> Result<(), QueueError> {
        let Some(mut record) = self.queue.get(id).await? else {
            return Ok(());
        };
        record.state = RunState::Cancelled;
        record.finished_at = Some(now_millis());
        self.record_end(&record, consumer, entry).await
    }

    /// Executes run `id` (held through stream entry `entry`) and records its end.
    async fn execute(
        &self,
        consumer: &str,
        entry: &str,
        id: &str,
        takeover: bool,
    ) -> Result<(), QueueError> {
        let queue = &self.queue;
        let Some(mut record) = queue.get(id).await? else {
            tracing::warn!("run {id} has no record in the queue; skipped");
            return Ok(());
        };
        let request = queue.request(id).await?;
        record.state = RunState::Running;
        record.started_at = Some(now_millis());
        record.finished_at = None;
        record.worker = Some(self.config.name.clone());
        record.attempts += 1;
        if takeover {
            tracing::info!(
                "run {id}: its worker stopped renewing its hold; starting it again (attempt {})",
                record.attempts
            );
        }
        if !queue.save(&record, consumer).await? {
            return Ok(());
        }

        let cancel = CancellationToken::new();
        let lost = Arc::new(AtomicBool::new(false));
        // Held until the end is recorded (which may be retried), not just run.
        let holding = tokio::spawn(hold(
            queue.clone(),
            id.to_string(),
            consumer.to_string(),
            entry.to_string(),
            cancel.clone(),
            lost.clone(),
        ));
        let outcome = self.outcome(id, request, cancel).await;
        if lost.load(Ordering::SeqCst) {
            holding.abort();
            tracing::warn!("run {id} was taken over by another worker; its result here is dropped");
            return Ok(());
        }
        outcome.apply(&mut record, now_millis());
        let recorded = self.record_end(&record, consumer, entry).await;
        holding.abort();
        recorded
    }

    async fn outcome(
        &self,
        id: &str,
        request: Option<super::RunRequest>,
        cancel: CancellationToken,
    ) -> Outcome {
        let Some(request) = request else {
            return Outcome {
                state: RunState::Failed,
                outputs: Vec::new(),
                failures: vec![serde_json::json!({
                    "message": "what was submitted for this run is no longer in the queue"
                })],
                node_states: Vec::new(),
            };
        };
        // Loading a large workflow is CPU work: off the async threads.
        let loaded = tokio::task::block_in_place(|| {
            load_request(
                &self.registry,
                &self.config.server,
                &request.workflow,
                &request.params,
            )
        });
        match loaded {
            Ok(wf) => {
                execute_run(
                    &self.executor,
                    &self.config.server,
                    &self.disk,
                    id,
                    &wf,
                    request.targets,
                    cancel,
                )
                .await
            }
            Err(e) => Outcome::refused(&e),
        }
    }

    /// Writes the run's end, trying again while the queue cannot be reached
    /// (for up to twice the lease: past it, another worker runs it again anyway).
    async fn record_end(
        &self,
        record: &RunRecord,
        consumer: &str,
        entry: &str,
    ) -> Result<(), QueueError> {
        let give_up = tokio::time::Instant::now() + 2 * self.config.lease;
        loop {
            let limit = self.config.server.history_limit;
            match self.queue.finish(record, consumer, entry, limit).await {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    tracing::warn!(
                        "run {} was taken over by another worker before it ended here",
                        record.id
                    );
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() < give_up => {
                    tracing::warn!("{e}; recording run {} again in a second", record.id);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Renews the hold on run `id` until aborted; cancels the run when a front end
/// asks, or when another worker has taken it over (`lost` is set then).
async fn hold(
    queue: SharedQueue,
    id: String,
    worker: String,
    entry: String,
    cancel: CancellationToken,
    lost: Arc<AtomicBool>,
) {
    let mut ticks = tokio::time::interval(HEARTBEAT);
    loop {
        ticks.tick().await;
        match queue.heartbeat(&id, &worker, &entry).await {
            Ok(Heartbeat::Held) => {}
            Ok(Heartbeat::Cancel) => cancel.cancel(),
            Ok(Heartbeat::Lost) => {
                lost.store(true, Ordering::SeqCst);
                cancel.cancel();
                return;
            }
            Err(e) => tracing::warn!("renewing the hold on run {id}: {e}"),
        }
    }
}

/// A name for this worker: the host, the process and, when given, the device.
pub fn default_worker_name(device: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("{host}/{}/{device}", std::process::id())
}
