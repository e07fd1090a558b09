//! The run queue, run records, history and events in Redis, shared by any number
//! of `pixart serve --queue redis://…` front ends and `pixart worker`s.
//!
//! Keys (all share the hash tag `{pixart}`, so they live on one Redis Cluster slot):
//! - `records` (hash): run id → its [`RunRecord`] as JSON, for queued, running
//!   and kept finished runs; `requests` (hash): run id → what was submitted,
//!   until the run ends;
//! - `order` (list): the waiting runs, first to start first; `running` (set);
//!   `history` (list): finished runs, newest first, trimmed to the history limit;
//! - `tokens` (stream, consumer group `workers`): one entry per run made
//!   waiting. A worker reads an entry, then takes the first run of `order` and
//!   notes the pair in `claims`; it acknowledges the entry only when the run has
//!   ended. While it runs, the worker re-claims its entry every half second,
//!   which keeps the entry's idle time near zero: an entry idle longer than the
//!   lease belongs to a worker that died, and another worker claims it
//!   (`XAUTOCLAIM`) and starts that run again from its beginning;
//! - `owners` (hash): run id → the worker running it; a worker that lost its run
//!   to another (it stalled past the lease) may no longer write its record;
//! - `cancels` (set): running runs a front end asked to stop;
//! - `paused` (string): set while no run may start;
//! - `files` (hash): file id → path below the shared output folder, counted in
//!   `filerefs` and listed per run in `runfiles`, so they leave with the run;
//! - channel `events`: every run event and queue notice, as the event stream sends it.
//!
//! Every change that moves a run between these keys is one Lua script, so two
//! front ends and a worker acting on one run at once cannot lose or double it.

use super::state::{
    lagged_event, queue_changed_event, run_number, CancelError, QueueView, RunRecord, RunRequest,
    RunState,
};
use crate::events::Event;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

const RECORDS: &str = "{pixart}:records";
const REQUESTS: &str = "{pixart}:requests";
const ORDER: &str = "{pixart}:order";
const RUNNING: &str = "{pixart}:running";
const HISTORY: &str = "{pixart}:history";
const FILES: &str = "{pixart}:files";
const FILEREFS: &str = "{pixart}:filerefs";
const RUNFILES: &str = "{pixart}:runfiles";
const CLAIMS: &str = "{pixart}:claims";
const OWNERS: &str = "{pixart}:owners";
const CANCELS: &str = "{pixart}:cancels";
const PAUSED: &str = "{pixart}:paused";
const TOKENS: &str = "{pixart}:tokens";
const COUNTER: &str = "{pixart}:counter";
const WAITING_BYTES: &str = "{pixart}:waiting_bytes";
const EVENTS: &str = "{pixart}:events";
const GROUP: &str = "workers";

/// The keys every script is given, in the order the prelude names them.
const SCRIPT_KEYS: [&str; 14] = [
    RECORDS,
    REQUESTS,
    ORDER,
    RUNNING,
    HISTORY,
    FILES,
    FILEREFS,
    RUNFILES,
    CLAIMS,
    OWNERS,
    CANCELS,
    PAUSED,
    TOKENS,
    WAITING_BYTES,
];

const PRELUDE: &str = r#"
local RECORDS, REQUESTS, ORDER, RUNNING, HISTORY, FILES, FILEREFS, RUNFILES, CLAIMS, OWNERS, CANCELS, PAUSED, TOKENS, WAITING_BYTES = unpack(KEYS)
local GROUP = 'workers'
-- A run leaves the waiting ones: its request no longer counts against the bound.
local function unwait(id)
  local bytes = redis.call('HSTRLEN', REQUESTS, id)
  if bytes > 0 then redis.call('DECRBY', WAITING_BYTES, bytes) end
end
local function drop_entry(entry)
  redis.call('XACK', TOKENS, GROUP, entry)
  redis.call('XDEL', TOKENS, entry)
  redis.call('HDEL', CLAIMS, entry)
end
local function push_history(id, limit)
  redis.call('LPUSH', HISTORY, id)
  while redis.call('LLEN', HISTORY) > limit do
    local old = redis.call('RPOP', HISTORY)
    redis.call('HDEL', RECORDS, old)
    local files = redis.call('HGET', RUNFILES, old)
    if files then
      for fid in string.gmatch(files, '%S+') do
        if redis.call('HINCRBY', FILEREFS, fid, -1) <= 0 then
          redis.call('HDEL', FILEREFS, fid)
          redis.call('HDEL', FILES, fid)
        end
      end
      redis.call('HDEL', RUNFILES, old)
    end
  end
end
"#;

/// ARGV: id, record, request, most runs waiting, most request bytes waiting.
/// The bounds are checked with the queuing, so concurrent submits cannot pass them.
static ENQUEUE: Lua = Lua::new(
    r#"
local id, request = ARGV[1], ARGV[3]
if redis.call('LLEN', ORDER) >= tonumber(ARGV[4]) then return 'runs' end
local bytes = tonumber(redis.call('GET', WAITING_BYTES) or '0')
if bytes + #request > tonumber(ARGV[5]) then return 'bytes' end
redis.call('HSET', RECORDS, id, ARGV[2])
redis.call('HSET', REQUESTS, id, request)
redis.call('INCRBY', WAITING_BYTES, #request)
redis.call('RPUSH', ORDER, id)
redis.call('XADD', TOKENS, '*', 'run', id)
return 'queued'
"#,
);

/// ARGV: id, the record as cancelled, history limit.
static CANCEL: Lua = Lua::new(
    r#"
local id = ARGV[1]
if redis.call('LREM', ORDER, 0, id) > 0 then
  unwait(id)
  redis.call('HSET', RECORDS, id, ARGV[2])
  redis.call('HDEL', REQUESTS, id)
  push_history(id, tonumber(ARGV[3]))
  return 'cancelled'
end
if redis.call('SISMEMBER', RUNNING, id) == 1 then
  redis.call('SADD', CANCELS, id)
  return 'running'
end
if redis.call('HEXISTS', RECORDS, id) == 1 then return 'done' end
return 'unknown'
"#,
);

/// ARGV: id, position among the waiting runs (at most [`MAX_POSITION`]).
static MOVE: Lua = Lua::new(
    r#"
if redis.call('LREM', ORDER, 0, ARGV[1]) == 0 then return 0 end
local pivot = redis.call('LINDEX', ORDER, tonumber(ARGV[2]))
if pivot then
  redis.call('LINSERT', ORDER, 'BEFORE', pivot, ARGV[1])
else
  redis.call('RPUSH', ORDER, ARGV[1])
end
return 1
"#,
);

/// Resuming: the entries read while paused were dropped, so each waiting run
/// gets one again (an entry more than runs is dropped by the worker reading it).
static RESUME: Lua = Lua::new(
    r#"
redis.call('DEL', PAUSED)
for i = 1, redis.call('LLEN', ORDER) do
  redis.call('XADD', TOKENS, '*', 'run', '')
end
return 1
"#,
);

/// ARGV: entry, worker. The entry must still be pending and this worker's (a
/// worker that stalled past its lease may have finished and acknowledged it
/// since it was claimed from it). A run whose worker died (the entry names it
/// in `claims` and it still runs) is taken over, or ended if a front end
/// cancelled it meanwhile; otherwise the first waiting run is taken, unless
/// the queue is paused or empty.
static CLAIM: Lua = Lua::new(
    r#"
local entry, worker = ARGV[1], ARGV[2]
local pending = redis.call('XPENDING', TOKENS, GROUP, entry, entry, 1)
if #pending == 0 or pending[1][2] ~= worker then
  return {'none', ''}
end
local held = redis.call('HGET', CLAIMS, entry)
if held then
  if redis.call('SISMEMBER', RUNNING, held) == 1 then
    redis.call('HSET', OWNERS, held, worker)
    if redis.call('SISMEMBER', CANCELS, held) == 1 then return {'cancelled', held} end
    return {'takeover', held}
  end
  drop_entry(entry)
  return {'none', ''}
end
if redis.call('EXISTS', PAUSED) == 1 then
  drop_entry(entry)
  return {'paused', ''}
end
local id = redis.call('LPOP', ORDER)
if not id then
  drop_entry(entry)
  return {'none', ''}
end
unwait(id)
redis.call('HSET', CLAIMS, entry, id)
redis.call('SADD', RUNNING, id)
redis.call('HSET', OWNERS, id, worker)
return {'new', id}
"#,
);

/// ARGV: id, worker, record. Written only by the run's owner.
static SAVE: Lua = Lua::new(
    r#"
if redis.call('HGET', OWNERS, ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', RECORDS, ARGV[1], ARGV[3])
return 1
"#,
);

/// ARGV: id, worker, entry.
static HEARTBEAT: Lua = Lua::new(
    r#"
if redis.call('HGET', OWNERS, ARGV[1]) ~= ARGV[2] then return 'lost' end
redis.call('XCLAIM', TOKENS, GROUP, ARGV[2], 0, ARGV[3], 'JUSTID')
if redis.call('SISMEMBER', CANCELS, ARGV[1]) == 1 then return 'cancel' end
return 'held'
"#,
);

/// ARGV: id, worker, entry, record, history limit, then file id and path pairs.
static FINISH: Lua = Lua::new(
    r#"
local id, worker, entry = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', OWNERS, id) ~= worker then return 0 end
redis.call('HSET', RECORDS, id, ARGV[4])
local ids = {}
for i = 6, #ARGV - 1, 2 do
  redis.call('HSET', FILES, ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', FILEREFS, ARGV[i], 1)
  table.insert(ids, ARGV[i])
end
if #ids > 0 then redis.call('HSET', RUNFILES, id, table.concat(ids, ' ')) end
redis.call('HDEL', REQUESTS, id)
redis.call('SREM', RUNNING, id)
redis.call('SREM', CANCELS, id)
redis.call('HDEL', OWNERS, id)
drop_entry(entry)
push_history(id, tonumber(ARGV[5]))
return 1
"#,
);

/// ARGV: consumer. A stopping worker leaves the group, unless an entry is
/// still pending for it (read as it stopped: another worker claims it later).
static FORGET: Lua = Lua::new(
    r#"
if #redis.call('XPENDING', TOKENS, GROUP, '-', '+', 1, ARGV[1]) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', TOKENS, GROUP, ARGV[1])
end
return 1
"#,
);

/// The largest position a move takes (past the end is last anyway): Lua reads
/// numbers as doubles, and Redis refuses list indices that are not integers.
const MAX_POSITION: usize = 1 << 30;

/// A script with the prelude, compiled once per process: `Script` keeps its
/// SHA1 and sends the body only when Redis does not know it yet.
struct Lua {
    body: &'static str,
    compiled: std::sync::OnceLock<redis::Script>,
}

impl Lua {
    const fn new(body: &'static str) -> Lua {
        Lua {
            body,
            compiled: std::sync::OnceLock::new(),
        }
    }
}

impl std::ops::Deref for Lua {
    type Target = redis::Script;
    fn deref(&self) -> &redis::Script {
        self.compiled
            .get_or_init(|| redis::Script::new(&format!("{PRELUDE}{}", self.body)))
    }
}

/// The shared queue cannot be reached, or holds what this version cannot read.
#[derive(Debug, thiserror::Error)]
#[error("the shared queue at {at}: {message}")]
pub struct QueueError {
    at: Arc<str>,
    message: String,
}

/// Whether a run was queued, or which bound refused it.
#[derive(Debug, PartialEq)]
pub enum Enqueued {
    Queued,
    TooManyRuns,
    TooManyBytes,
}

/// What a worker got for a stream entry.
pub(crate) enum Claim {
    /// A waiting run, to start.
    New(String),
    /// A run whose worker died, to start again.
    Takeover(String),
    /// A run whose worker died and that a front end cancelled since: to end
    /// as cancelled without running it.
    Cancelled(String),
    /// Nothing (the run the entry stood for was cancelled or taken), or the
    /// queue is paused.
    Nothing,
}

/// What a running run's worker learns on its heartbeat.
#[derive(Debug, PartialEq)]
pub(crate) enum Heartbeat {
    Held,
    /// A front end asked to stop it.
    Cancel,
    /// Another worker took it over (this one stalled past the lease).
    Lost,
}

/// A connection to the shared queue (cheap to clone: one multiplexed connection).
#[derive(Clone)]
pub struct SharedQueue {
    client: redis::Client,
    con: ConnectionManager,
    /// The URL without a password, for messages.
    at: Arc<str>,
}

impl SharedQueue {
    /// Connects to `url` (`redis://HOST:PORT/DB`, `rediss://…`, `unix:///…`)
    /// and makes the consumer group if it is not there yet.
    pub async fn connect(url: &str) -> Result<SharedQueue, QueueError> {
        let at: Arc<str> = Arc::from(without_password(url));
        let fail = |e: redis::RedisError| QueueError {
            at: at.clone(),
            message: e.to_string(),
        };
        let client = redis::Client::open(url).map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(Duration::from_secs(10))
            .set_number_of_retries(2);
        let con = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(fail)?;
        let queue = SharedQueue { client, con, at };
        queue.ensure_group().await?;
        Ok(queue)
    }

    /// Makes the stream and its consumer group unless they are there (they go
    /// with a Redis that restarts without persistence, or a `FLUSHALL`).
    pub(crate) async fn ensure_group(&self) -> Result<(), QueueError> {
        let made: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(TOKENS)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.con())
            .await;
        match made {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(self.error(e)),
            _ => Ok(()),
        }
    }

    fn error(&self, e: impl std::fmt::Display) -> QueueError {
        QueueError {
            at: self.at.clone(),
            message: e.to_string(),
        }
    }

    /// Where the queue is, without a password.
    pub fn location(&self) -> &str {
        &self.at
    }

    fn con(&self) -> ConnectionManager {
        self.con.clone()
    }

    async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        args: &[&str],
    ) -> Result<T, QueueError> {
        let mut invocation = script.prepare_invoke();
        for k in SCRIPT_KEYS {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(*a);
        }
        invocation
            .invoke_async(&mut self.con())
            .await
            .map_err(|e| self.error(e))
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, QueueError> {
        cmd.query_async(&mut self.con())
            .await
            .map_err(|e| self.error(e))
    }

    /// Sends `text` to every front end's event streams.
    pub async fn publish(&self, text: &str) -> Result<(), QueueError> {
        self.query(redis::cmd("PUBLISH").arg(EVENTS).arg(text))
            .await
    }

    async fn publish_event(&self, event: Event) {
        if let Ok(text) = serde_json::to_string(&event) {
            if let Err(e) = self.publish(&text).await {
                tracing::warn!("{e}");
            }
        }
    }

    /// A new run id, unique across front ends.
    pub async fn next_id(&self) -> Result<String, QueueError> {
        let n: u64 = self.query(redis::cmd("INCR").arg(COUNTER)).await?;
        Ok(format!("q-{n}"))
    }

    /// Queues run `record.id`: its record, what was submitted, its place last
    /// in the order and a stream entry for a worker, all at once, unless
    /// `max_runs` runs or `max_bytes` of requests are already waiting.
    pub async fn enqueue(
        &self,
        record: &RunRecord,
        req: &RunRequest,
        max_runs: usize,
        max_bytes: usize,
    ) -> Result<Enqueued, QueueError> {
        let json = serde_json::to_string(record).map_err(|e| self.error(e))?;
        let request = serde_json::to_string(req).map_err(|e| self.error(e))?;
        let id = record.id.as_str();
        let said: String = self
            .run_script(
                &ENQUEUE,
                &[
                    id,
                    &json,
                    &request,
                    &max_runs.to_string(),
                    &max_bytes.to_string(),
                ],
            )
            .await?;
        let outcome = match said.as_str() {
            "runs" => Enqueued::TooManyRuns,
            "bytes" => Enqueued::TooManyBytes,
            _ => Enqueued::Queued,
        };
        if outcome == Enqueued::Queued {
            self.publish_event(Event::RunQueued {
                run_id: Arc::from(id),
            })
            .await;
        }
        Ok(outcome)
    }

    pub async fn get(&self, id: &str) -> Result<Option<RunRecord>, QueueError> {
        let json: Option<String> = self.query(redis::cmd("HGET").arg(RECORDS).arg(id)).await?;
        json.map(|j| self.parse(&j)).transpose()
    }

    fn parse(&self, json: &str) -> Result<RunRecord, QueueError> {
        serde_json::from_str(json)
            .map_err(|e| self.error(format!("a run record does not read: {e}")))
    }

    /// The records of `ids`, in that order (ids without one are left out).
    async fn records(&self, ids: &[String]) -> Result<Vec<RunRecord>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<Option<String>> = self
            .query(redis::cmd("HMGET").arg(RECORDS).arg(ids))
            .await?;
        found
            .into_iter()
            .flatten()
            .map(|j| self.parse(&j))
            .collect()
    }

    /// Running runs (in the order they started), then waiting ones in queue order.
    pub async fn queue_view(&self) -> Result<QueueView, QueueError> {
        let (paused, waiting, running): (bool, Vec<String>, Vec<String>) = redis::pipe()
            .atomic()
            .exists(PAUSED)
            .lrange(ORDER, 0, -1)
            .smembers(RUNNING)
            .query_async(&mut self.con())
            .await
            .map_err(|e| self.error(e))?;
        let mut started = self.records(&running).await?;
        started.sort_by_key(|r| (r.started_at, run_number(&r.id)));
        started.extend(self.records(&waiting).await?);
        Ok(QueueView {
            paused,
            runs: started,
        })
    }

    /// Finished runs, newest first.
    pub async fn history(&self) -> Result<Vec<RunRecord>, QueueError> {
        let ids: Vec<String> = self
            .query(redis::cmd("LRANGE").arg(HISTORY).arg(0).arg(-1))
            .await?;
        self.records(&ids).await
    }

    /// Cancels a waiting run at once; asks the worker of a running one to stop it.
    pub async fn cancel(&self, id: &str, history_limit: usize) -> Result<RunState, CancelError> {
        let mut record = self.get(id).await?.ok_or(CancelError::Unknown)?;
        if record.state.is_done() {
            return Err(CancelError::AlreadyDone(record.state));
        }
        record.state = RunState::Cancelled;
        record.finished_at = Some(super::state::now_millis());
        let json = serde_json::to_string(&record).map_err(|e| self.error(e))?;
        let outcome: String = self
            .run_script(&CANCEL, &[id, &json, &history_limit.max(1).to_string()])
            .await?;
        match outcome.as_str() {
            "cancelled" => {
                self.publish_event(Event::RunCancelled {
                    run_id: Arc::from(id),
                })
                .await;
                Ok(RunState::Cancelled)
            }
            "running" => Ok(RunState::Running),
            "done" => {
                let now = self.get(id).await?.ok_or(CancelError::Unknown)?;
                Err(CancelError::AlreadyDone(now.state))
            }
            _ => Err(CancelError::Unknown),
        }
    }

    /// Moves waiting run `id` to `position` among the waiting runs.
    pub async fn move_run(&self, id: &str, position: usize) -> Result<(), super::MoveError> {
        let position = position.min(MAX_POSITION).to_string();
        let moved: i64 = self.run_script(&MOVE, &[id, &position]).await?;
        if moved == 0 {
            let record = self.get(id).await?.ok_or(super::MoveError::Unknown)?;
            return Err(super::MoveError::NotQueued(record.state));
        }
        Ok(self.queue_changed().await?)
    }

    async fn queue_changed(&self) -> Result<(), QueueError> {
        let paused: bool = self.query(redis::cmd("EXISTS").arg(PAUSED)).await?;
        self.publish(&queue_changed_event(paused)).await
    }

    /// Pauses (no worker starts a run; running ones go on) or resumes the queue.
    pub async fn set_paused(&self, paused: bool) -> Result<(), QueueError> {
        if paused {
            self.query::<()>(redis::cmd("SET").arg(PAUSED).arg(1))
                .await?;
        } else {
            self.run_script::<i64>(&RESUME, &[]).await?;
        }
        self.queue_changed().await
    }

    /// Where file `id` is, below the output folder.
    pub async fn file(&self, id: &str) -> Result<Option<PathBuf>, QueueError> {
        let rel: Option<String> = self.query(redis::cmd("HGET").arg(FILES).arg(id)).await?;
        Ok(rel.map(PathBuf::from))
    }

    /// Makes file `id` (an upload) known to every front end.
    pub async fn register_file(&self, id: &str, rel: &Path) -> Result<(), QueueError> {
        self.query(
            redis::cmd("HSET")
                .arg(FILES)
                .arg(id)
                .arg(rel.to_string_lossy().as_ref()),
        )
        .await
    }

    /// Sends what is published on the events channel to `feed` for as long as
    /// the process runs, connecting again when the connection is lost.
    pub async fn forward_events(self, feed: broadcast::Sender<Arc<str>>) {
        use futures_util::StreamExt;
        let mut connected_before = false;
        loop {
            match self.client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(EVENTS).await {
                    Ok(()) => {
                        if connected_before {
                            // Events were missed while away: clients reload.
                            let _ = feed.send(lagged_event(0));
                        }
                        connected_before = true;
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            if let Ok(text) = msg.get_payload::<String>() {
                                let _ = feed.send(Arc::from(text));
                            }
                        }
                        tracing::warn!("{}: the event subscription ended; reconnecting", self.at);
                    }
                    Err(e) => tracing::warn!("{}", self.error(e)),
                },
                Err(e) => tracing::warn!("{}", self.error(e)),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    // What workers do.

    /// A connection for blocking reads (which would hold up every other command
    /// on the shared one), with room for the time a read blocks.
    pub(crate) async fn blocking_connection(&self) -> Result<ConnectionManager, QueueError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(5))
            .set_response_timeout(READ_BLOCK + Duration::from_secs(10))
            .set_number_of_retries(2);
        ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .map_err(|e| self.error(e))
    }

    /// The next new stream entry for `worker`, waiting up to [`READ_BLOCK`].
    pub(crate) async fn read_entry(
        &self,
        blocking: &mut ConnectionManager,
        worker: &str,
    ) -> Result<Option<String>, QueueError> {
        use redis::streams::{StreamReadOptions, StreamReadReply};
        use redis::AsyncCommands;
        let opts = StreamReadOptions::default()
            .group(GROUP, worker)
            .count(1)
            .block(READ_BLOCK.as_millis() as usize);
        let reply: Option<StreamReadReply> = blocking
            .xread_options(&[TOKENS], &[">"], &opts)
            .await
            .map_err(|e| self.error(e))?;
        Ok(reply
            .and_then(|r| r.keys.into_iter().next())
            .and_then(|k| k.ids.into_iter().next())
            .map(|e| e.id))
    }

    /// An entry idle for longer than `lease` (its worker died), now `worker`'s.
    /// Redis looks at a few entries a call: the cursor is followed through
    /// every pending entry until one is found.
    pub(crate) async fn reclaim_entry(
        &self,
        worker: &str,
        lease: Duration,
    ) -> Result<Option<String>, QueueError> {
        let mut cursor = "0-0".to_string();
        loop {
            let reply: redis::Value = self
                .query(
                    redis::cmd("XAUTOCLAIM")
                        .arg(TOKENS)
                        .arg(GROUP)
                        .arg(worker)
                        .arg(lease.as_millis() as u64)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(1)
                        .arg("JUSTID"),
                )
                .await?;
            // [next cursor, [ids], (Redis 7: deleted ids)]
            let redis::Value::Array(parts) = reply else {
                return Ok(None);
            };
            let next: String = match parts.first() {
                Some(v) => redis::from_redis_value(v).map_err(|e| self.error(e))?,
                None => return Ok(None),
            };
            let ids: Vec<String> = match parts.get(1) {
                Some(v) => redis::from_redis_value(v).map_err(|e| self.error(e))?,
                None => Vec::new(),
            };
            if let Some(id) = ids.into_iter().next() {
                return Ok(Some(id));
            }
            if next == "0-0" {
                return Ok(None);
            }
            cursor = next;
        }
    }

    /// Takes the run stream entry `entry` stands for (see [`CLAIM`]).
    pub(crate) async fn claim(&self, entry: &str, worker: &str) -> Result<Claim, QueueError> {
        let (what, id): (String, String) = self.run_script(&CLAIM, &[entry, worker]).await?;
        Ok(match what.as_str() {
            "new" => Claim::New(id),
            "takeover" => Claim::Takeover(id),
            "cancelled" => Claim::Cancelled(id),
            _ => Claim::Nothing,
        })
    }

    /// Takes `consumer` out of the group when nothing is pending for it.
    pub(crate) async fn forget_consumer(&self, consumer: &str) -> Result<(), QueueError> {
        self.run_script::<i64>(&FORGET, &[consumer]).await?;
        Ok(())
    }

    /// What was submitted as run `id`.
    pub(crate) async fn request(&self, id: &str) -> Result<Option<RunRequest>, QueueError> {
        let json: Option<String> = self.query(redis::cmd("HGET").arg(REQUESTS).arg(id)).await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| self.error(e)))
            .transpose()
    }

    /// Writes run `id`'s record, if `worker` still owns the run.
    pub(crate) async fn save(&self, record: &RunRecord, worker: &str) -> Result<bool, QueueError> {
        let json = serde_json::to_string(record).map_err(|e| self.error(e))?;
        let saved: i64 = self.run_script(&SAVE, &[&record.id, worker, &json]).await?;
        Ok(saved == 1)
    }

    /// Keeps `worker`'s hold on run `id` and says whether to go on.
    pub(crate) async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        entry: &str,
    ) -> Result<Heartbeat, QueueError> {
        let said: String = self.run_script(&HEARTBEAT, &[id, worker, entry]).await?;
        Ok(match said.as_str() {
            "lost" => Heartbeat::Lost,
            "cancel" => Heartbeat::Cancel,
            _ => Heartbeat::Held,
        })
    }

    /// Ends run `record.id`: its final record and files, its place in the
    /// history, and the stream entry acknowledged; `false` if `worker` no
    /// longer owns it (nothing is written then).
    pub(crate) async fn finish(
        &self,
        record: &RunRecord,
        worker: &str,
        entry: &str,
        history_limit: usize,
    ) -> Result<bool, QueueError> {
        let json = serde_json::to_string(record).map_err(|e| self.error(e))?;
        let mut files: Vec<(String, String)> = record
            .outputs
            .iter()
            .flat_map(|o| &o.files)
            .filter_map(|f| {
                Some((
                    f.id.clone(),
                    f.path.as_ref()?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        files.sort();
        files.dedup_by(|a, b| a.0 == b.0);
        let limit = history_limit.max(1).to_string();
        let mut args: Vec<&str> = vec![&record.id, worker, entry, &json, &limit];
        for (id, rel) in &files {
            args.push(id);
            args.push(rel);
        }
        let done: i64 = self.run_script(&FINISH, &args).await?;
        Ok(done == 1)
    }
}

/// How long a worker's read waits for a new run before it looks for runs of
/// dead workers again.
pub(crate) const READ_BLOCK: Duration = Duration::from_secs(1);

/// `url` with the password, if any, left out.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            super::without_password("redis://:secret@db:6379/2"),
            "redis://:***@db:6379/2"
        );
        assert_eq!(
            super::without_password("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }
}
