//! The engine: claims ready tasks, runs them, renews their leases, and
//! takes back the leases of workers that died.
//!
//! The scheduler loop is the only code that starts attempts; every state
//! change it makes goes through the store's writer as one atomic operation.

pub mod clock;
mod history;
pub mod recovery;
pub mod retry;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::executor::service::RunningService;
use crate::executor::{self, ExecSettings, Handlers, StopReason, TaskContext, reaper::Reaper};
use crate::integrity;
use crate::model::{AttemptStatus, RetryPolicy, TaskKind, TaskSpec, TaskStatus};
use crate::store::{
    ClaimRequest, ClaimedTask, ExternalFilter, FinishAttempt, FinishOutcome, Reclaim, Store,
};
use clock::Clock;

/// A running attempt, as the engine tracks it.
struct Running {
    attempt: u32,
    stop: watch::Sender<Option<StopReason>>,
}

/// A service task that passed its health check and keeps running here.
struct LocalService {
    attempt: u32,
    workflow_id: Option<String>,
    service: RunningService,
}

/// What the engine measures about itself, for `/health` and `/metrics`.
#[derive(Debug, Default)]
struct EngineStats {
    running: bool,
    last_tick_ms: i64,
    attempt_durations: std::collections::BTreeMap<String, crate::rest::metrics::Histogram>,
    claim_latency: crate::rest::metrics::Histogram,
}

/// A snapshot of the engine of this process.
#[derive(Debug, Clone, Default)]
pub struct EngineStatus {
    /// The engine loop is running in this process.
    pub running: bool,
    /// Running and ticking (or not running at all, as for a pure client).
    pub healthy: bool,
    pub last_tick_ms_ago: Option<i64>,
    pub running_attempts: usize,
    pub services: usize,
    pub attempt_durations: std::collections::BTreeMap<String, crate::rest::metrics::Histogram>,
    pub claim_latency: crate::rest::metrics::Histogram,
}

/// State shared by the service handle and the engine loops.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub handlers: RwLock<Handlers>,
    /// Wakes the scheduler: new work, a free slot, a cancel.
    pub wake: Notify,
    pub worker_id: String,
    running: Mutex<HashMap<String, Running>>,
    /// Slots whose attempt ended and whose finish (with the claim of the
    /// slot's next task) is on its way to the store. Raised under the
    /// `running` lock as the attempt leaves `running`, lowered only after
    /// the next task entered it, and read under that lock: the two never
    /// add up to fewer slots than are in use.
    reserved: std::sync::atomic::AtomicUsize,
    services: Mutex<HashMap<String, LocalService>>,
    stats: Mutex<EngineStats>,
    pub exec: ExecSettings,
    /// Search tiers and their state.
    pub search: crate::search::Search,
}

impl Shared {
    pub fn new(
        store: Arc<dyn Store>,
        config: Config,
        clock: Arc<dyn Clock>,
        worker_id: String,
    ) -> Self {
        // One directory per engine instance: result files of concurrent engines never collide.
        let search = crate::search::Search::new(&config);
        let scratch_dir = std::env::temp_dir().join(format!("task-queue-{worker_id}"));
        let exec = ExecSettings {
            env_allowlist: config.execution.env_allowlist.clone(),
            kill_grace: config.execution.kill_grace.0,
            scratch_dir,
        };
        Shared {
            store,
            config,
            clock,
            handlers: RwLock::new(Handlers::new()),
            wake: Notify::new(),
            worker_id,
            running: Mutex::new(HashMap::new()),
            reserved: std::sync::atomic::AtomicUsize::new(0),
            services: Mutex::new(HashMap::new()),
            stats: Mutex::new(EngineStats::default()),
            exec,
            search,
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots in use: running attempts and slots reserved for a replacement.
    fn busy_slots(&self) -> usize {
        let running = self.running();
        running.len() + self.reserved.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops a task this process is running, if it is.
    pub fn stop_local(&self, task_id: &str, reason: StopReason) -> bool {
        match self.running().get(task_id) {
            Some(r) => {
                let _ = r.stop.send(Some(reason));
                true
            }
            None => false,
        }
    }

    fn claim_request(&self, limit: usize, only: &Scope) -> ClaimRequest {
        let now = self.clock.now_ms();
        let names: Vec<String> = self
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        ClaimRequest {
            worker_id: self.worker_id.clone(),
            now,
            lease_until: now + self.config.execution.lease_duration.as_millis() as i64,
            limit,
            server_kinds: true,
            external: (!names.is_empty()).then(|| ExternalFilter {
                names,
                ..ExternalFilter::default()
            }),
            only: only.clone(),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, EngineStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot for health checks and metrics.
    pub fn status(&self) -> EngineStatus {
        let now = Instant::now_ms();
        let running_attempts = self.running().len();
        let services = self.services().len();
        let s = self.stats();
        let ago = s.running.then_some(now - s.last_tick_ms);
        // The loop ticks at least every poll interval; allow generous slack.
        let stale = self.config.execution.poll_interval.0 * 20 + Duration::from_secs(5);
        EngineStatus {
            running: s.running,
            healthy: !s.running || ago.is_some_and(|a| a <= stale.as_millis() as i64),
            last_tick_ms_ago: ago,
            running_attempts,
            services,
            attempt_durations: s.attempt_durations.clone(),
            claim_latency: s.claim_latency.clone(),
        }
    }

    fn services(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalService>> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops a service task this process runs; false if it runs none by that id.
    pub async fn stop_service(&self, task_id: &str) -> bool {
        let svc = self.services().remove(task_id);
        match svc {
            Some(s) => {
                self.end_service(task_id, s, StopReason::Cancelled).await;
                true
            }
            None => false,
        }
    }

    /// Stops the services of a workflow that finished or was cancelled.
    pub async fn stop_workflow_services(&self, workflow_id: &str) {
        let ids: Vec<String> = self
            .services()
            .iter()
            .filter(|(_, s)| s.workflow_id.as_deref() == Some(workflow_id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let svc = self.services().remove(&id);
            if let Some(s) = svc {
                self.end_service(&id, s, StopReason::Cancelled).await;
            }
        }
    }

    async fn stop_all_services(&self) {
        let all: Vec<(String, LocalService)> = self.services().drain().collect();
        for (id, s) in all {
            self.end_service(&id, s, StopReason::Shutdown).await;
        }
    }

    async fn end_service(&self, task_id: &str, s: LocalService, reason: StopReason) {
        tracing::info!(task = %task_id, ?reason, "stopping a service task");
        let logs = s.service.stop(reason).await;
        if let Err(e) = self.store.put_logs(task_id, s.attempt, logs).await {
            tracing::warn!(task = %task_id, error = %e, "could not store the output of a stopped service");
        }
    }
}

/// Wall-clock milliseconds (health reporting only; scheduling uses the injected clock).
struct Instant;

impl Instant {
    fn now_ms() -> i64 {
        crate::model::Timestamp::now().0
    }
}

/// Longest a freed slot waits for others before the scheduler claims for it.
const CLAIM_WINDOW: Duration = Duration::from_millis(1);

/// Free slots that make the scheduler claim at once: a quarter of them.
fn claim_threshold(max: usize) -> usize {
    (max / 4).max(1)
}

/// Claims the scheduler has in flight at once. A claim is a write, and a
/// write waits for the batch before it to commit: with one claim at a
/// time, slots freed meanwhile wait a whole write for theirs, however
/// many writers the store has (four per PostgreSQL node). The second
/// claim takes the slots freed while the first is out.
const CLAIMS_IN_FLIGHT: usize = 2;

/// Shutdown phases sent to the engine loop.
const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const STOP_NOW: u8 = 2;

/// Controls a started engine.
pub struct EngineHandle {
    shutdown: watch::Sender<u8>,
    done: tokio::task::JoinHandle<Result<()>>,
}

impl EngineHandle {
    /// Stops claiming, lets running attempts finish for up to `grace`, then
    /// stops them; their tasks go back to the queue to run again.
    pub async fn shutdown(self, grace: Duration) -> Result<()> {
        self.stop_when(std::future::ready(()), grace, std::future::pending())
            .await
    }

    /// Runs until the engine ends on its own (one started with
    /// `until_idle`) or `stop` completes; then shuts down as
    /// [`shutdown`](Self::shutdown) does, except that the grace period
    /// ends early if `now` completes (a second Ctrl-C).
    pub async fn stop_when(
        self,
        stop: impl std::future::Future<Output = ()>,
        grace: Duration,
        now: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
            r.map_err(|e| Error::Store(format!("engine task failed: {e}")))?
        }
        let mut done = self.done;
        tokio::select! {
            r = &mut done => return joined(r),
            _ = stop => {}
        }
        let _ = self.shutdown.send(DRAINING);
        tokio::select! {
            r = &mut done => return joined(r),
            _ = tokio::time::sleep(grace) => {}
            _ = now => {}
        }
        let _ = self.shutdown.send(STOP_NOW);
        joined(done.await)
    }

    /// Waits for an engine started with `until_idle` to finish.
    pub async fn join(self) -> Result<()> {
        self.done
            .await
            .map_err(|e| Error::Store(format!("engine task failed: {e}")))?
    }
}

/// The tasks an engine may claim: `None` for any, or only these (a
/// `task-queue run` of a file runs that file's tasks, not the queue's).
pub(crate) type Scope = Option<Arc<Vec<String>>>;

/// Starts the engine loops on the current runtime.
pub(crate) fn start(shared: Arc<Shared>, until_idle: bool, only: Scope) -> EngineHandle {
    let (tx, rx) = watch::channel(RUNNING);
    let done = tokio::spawn(run(shared, rx, until_idle, only));
    EngineHandle { shutdown: tx, done }
}

async fn run(
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<u8>,
    until_idle: bool,
    only: Scope,
) -> Result<()> {
    std::fs::create_dir_all(&shared.exec.scratch_dir)?;
    let reaper = match Reaper::spawn() {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            tracing::warn!(error = %e, "could not start the process guard; task processes may outlive a crash");
            None
        }
    };
    recovery::register_and_recover(&shared).await?;
    let leases = tokio::spawn(lease_loop(shared.clone()));
    let cancels = tokio::spawn(cancel_watch(shared.clone()));
    let upkeep = tokio::spawn(history::run(shared.clone()));
    let remote = shared
        .store
        .subscribe_remote()
        .map(|rx| tokio::spawn(remote_wakeups(shared.clone(), rx)));
    let (watch_stop, watch_stop_rx) = watch::channel(false);
    let watcher = tokio::spawn(service_watch(shared.clone(), watch_stop_rx));
    let queue = crate::service::TaskQueue::from_shared(shared.clone());
    let mut last_schedule_check: Option<tokio::time::Instant> = None;
    // The earliest upcoming schedule slot seen at the last check, if it was
    // still ahead then: the loop checks again as soon as it comes, instead
    // of up to a poll interval later.
    let mut next_schedule: Option<i64> = None;
    let max = shared.config.execution.max_concurrent_tasks;
    let poll = shared.config.execution.poll_interval.0;
    let mut tasks: JoinSet<()> = JoinSet::new();
    // When the first slot of the current claim window became free.
    let mut free_since: Option<tokio::time::Instant> = None;
    let mut claims = Claims {
        only,
        ..Claims::default()
    };
    shared.stats().running = true;
    loop {
        shared.stats().last_tick_ms = Instant::now_ms();
        while tasks.try_join_next().is_some() {}
        while let Some(done) = claims.set.try_join_next_with_id() {
            claims.landed(&shared, done, &mut tasks, &reaper, &shutdown);
        }
        if *shutdown.borrow() != RUNNING {
            break;
        }
        // Schedules: once per poll interval, and when the earliest known
        // slot comes, create the runs after those that came due.
        let slot_came = next_schedule.is_some_and(|at| at <= shared.clock.now_ms());
        if slot_came || last_schedule_check.is_none_or(|t| t.elapsed() >= poll) {
            last_schedule_check = Some(tokio::time::Instant::now());
            let fired = queue.fire_due_schedules().await;
            // A slot still due after the check (its run could not be
            // built) waits for the next poll, not the next turn of the loop.
            let now = shared.clock.now_ms();
            next_schedule = match shared.store.next_schedule_at().await {
                Ok(at) => at.filter(|at| *at > now),
                Err(_) => None,
            };
            match fired {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "firing schedules failed; retrying"),
            }
        }
        // A slot frees when an attempt's execution ends and its finish
        // does not claim the slot's next task (see `run_attempt`).
        let asked: usize = claims.asked.values().sum();
        let free = max.saturating_sub(shared.busy_slots() + asked);
        if free == 0 {
            free_since = None;
        }
        // Claims are coalesced: while most slots are busy, a freed slot
        // waits until a quarter of them are free or `CLAIM_WINDOW` has
        // passed, so one claim (one write) serves many finished attempts
        // instead of one each.
        let mut hold = None;
        if free > 0 && free < claim_threshold(max) && !tasks.is_empty() {
            let since = *free_since.get_or_insert_with(tokio::time::Instant::now);
            let waited = since.elapsed();
            if waited < CLAIM_WINDOW {
                hold = Some(CLAIM_WINDOW - waited);
            }
        }
        if free > 0 && hold.is_none() && claims.may_claim() {
            free_since = None;
            let store = shared.store.clone();
            let req = shared.claim_request(free, &claims.only);
            let handle = claims.set.spawn(async move {
                let t = std::time::Instant::now();
                let result = store.claim(req).await;
                (result, t.elapsed())
            });
            claims.asked.insert(handle.id(), free);
            continue;
        }
        if until_idle && tasks.is_empty() && claims.set.is_empty() {
            let req = shared.claim_request(1, &claims.only);
            if shared.store.runnable_count(&req).await? == 0 {
                break;
            }
        }
        let now = shared.clock.now_ms();
        let mut sleep = poll;
        if let Some(h) = hold {
            sleep = h;
        } else if free > 0
            && let Ok(Some(at)) = shared.store.next_run_at(now).await
        {
            sleep = sleep.min(Duration::from_millis((at - now).max(1) as u64));
        }
        if let Some(at) = next_schedule {
            sleep = sleep.min(Duration::from_millis((at - now).max(1) as u64));
        }
        if let Some(t) = claims.after {
            sleep = sleep.min(t.saturating_duration_since(tokio::time::Instant::now()));
        }
        tokio::select! {
            _ = shared.wake.notified() => claims.dry = false,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => claims.dry = false,
            Some(done) = claims.set.join_next_with_id(), if !claims.set.is_empty() => claims.landed(&shared, done, &mut tasks, &reaper, &shutdown),
            _ = tokio::time::sleep(sleep) => claims.dry = false,
            _ = shutdown.changed() => {}
        }
    }
    // Tasks claimed by claims still in flight are this engine's: run them
    // with the others (or stop them, if the handle says stop).
    while let Some(done) = claims.set.join_next_with_id().await {
        claims.landed(&shared, done, &mut tasks, &reaper, &shutdown);
    }
    // Graceful stop: wait for running attempts until the handle says stop.
    drain(&shared, &mut tasks, &mut shutdown).await;
    shared.stats().running = false;
    // Let the watcher finish a service it is stopping, then stop the rest.
    let _ = watch_stop.send(true);
    let _ = watcher.await;
    shared.stop_all_services().await;
    leases.abort();
    cancels.abort();
    upkeep.abort();
    if let Some(r) = remote {
        r.abort();
    }
    drop(reaper);
    let _ = std::fs::remove_dir(&shared.exec.scratch_dir);
    Ok(())
}

async fn drain(shared: &Shared, tasks: &mut JoinSet<()>, shutdown: &mut watch::Receiver<u8>) {
    while *shutdown.borrow_and_update() != STOP_NOW {
        tokio::select! {
            r = tasks.join_next() => if r.is_none() { return },
            r = shutdown.changed() => if r.is_err() { break },
        }
    }
    for r in shared.running().values() {
        let _ = r.stop.send(Some(StopReason::Shutdown));
    }
    while tasks.join_next().await.is_some() {}
}

/// What a claim answers, and how long it took.
type ClaimAnswer = (Result<Vec<ClaimedTask>>, Duration);

/// The scheduler's claims in flight (at most [`CLAIMS_IN_FLIGHT`]).
#[derive(Default)]
struct Claims {
    set: JoinSet<ClaimAnswer>,
    /// The slots each claim in flight asked for.
    asked: HashMap<tokio::task::Id, usize>,
    /// A claim came back short (the queue ran dry): claim again when
    /// something happens (a wake-up, an ended attempt, the poll
    /// interval), not on the next turn of the loop.
    dry: bool,
    /// After a failed claim, the next waits until then.
    after: Option<tokio::time::Instant>,
    /// Claims failed in a row.
    errors: u32,
    /// The tasks this engine may claim.
    only: Scope,
}

impl Claims {
    fn may_claim(&self) -> bool {
        !self.dry
            && self.set.len() < CLAIMS_IN_FLIGHT
            && self.after.is_none_or(|t| t <= tokio::time::Instant::now())
    }

    /// Starts the tasks a claim brought, and notes whether the queue ran
    /// dry or the claim failed (the next waits longer after each failure).
    fn landed(
        &mut self,
        shared: &Arc<Shared>,
        done: std::result::Result<(tokio::task::Id, ClaimAnswer), tokio::task::JoinError>,
        tasks: &mut JoinSet<()>,
        reaper: &Option<Arc<Reaper>>,
        shutdown: &watch::Receiver<u8>,
    ) {
        let result = match done {
            Ok((id, (result, latency))) => {
                shared.stats().claim_latency.observe(latency);
                let asked = self.asked.remove(&id).unwrap_or(0);
                result.map(|claimed| (asked, claimed))
            }
            Err(e) => {
                self.asked.remove(&e.id());
                Err(Error::Store(format!("claim task failed: {e}")))
            }
        };
        match result {
            Ok((asked, claimed)) => {
                self.errors = 0;
                self.after = None;
                if claimed.len() < asked {
                    self.dry = true;
                }
                for c in claimed {
                    let stop = register_running(shared, &c);
                    tasks.spawn(run_slot(
                        shared.clone(),
                        c,
                        reaper.clone(),
                        stop,
                        shutdown.clone(),
                        self.only.clone(),
                    ));
                }
            }
            Err(e) => {
                self.errors += 1;
                tracing::warn!(error = %e, "claim failed; retrying");
                self.after = Some(
                    tokio::time::Instant::now()
                        + Duration::from_millis(100 * u64::from(self.errors.min(50))),
                );
            }
        }
    }
}

fn register_running(shared: &Shared, c: &ClaimedTask) -> watch::Receiver<Option<StopReason>> {
    let (tx, rx) = watch::channel(None);
    shared.running().insert(
        c.id.clone(),
        Running {
            attempt: c.attempt,
            stop: tx,
        },
    );
    rx
}

/// Runs a claimed attempt, then, in the same write as its finish, claims
/// the task that takes its slot and runs that, until a finish brings no
/// replacement or the engine stops.
async fn run_slot(
    shared: Arc<Shared>,
    mut c: ClaimedTask,
    reaper: Option<Arc<Reaper>>,
    mut stop: watch::Receiver<Option<StopReason>>,
    shutdown: watch::Receiver<u8>,
    only: Scope,
) {
    loop {
        match run_attempt(&shared, &c, reaper.clone(), stop, &shutdown, &only).await {
            Some((next, next_stop)) => {
                c = next;
                stop = next_stop;
            }
            None => return,
        }
    }
}

/// Runs one attempt and records it; returns the slot's next task, already
/// registered as running, if the finish claimed one.
async fn run_attempt(
    shared: &Arc<Shared>,
    c: &ClaimedTask,
    reaper: Option<Arc<Reaper>>,
    stop: watch::Receiver<Option<StopReason>>,
    engine_state: &watch::Receiver<u8>,
    only: &Scope,
) -> Option<(ClaimedTask, watch::Receiver<Option<StopReason>>)> {
    let t = std::time::Instant::now();
    let (report, policy, service) = execute(shared, c, reaper, stop.clone()).await;
    shared
        .stats()
        .attempt_durations
        .entry(report.status.as_str().to_string())
        .or_default()
        .observe(t.elapsed());
    if let Some(svc) = service {
        shared.services().insert(
            c.id.clone(),
            LocalService {
                attempt: c.attempt,
                workflow_id: c.workflow_id.clone(),
                service: svc,
            },
        );
    }
    let shutdown = *stop.borrow() == Some(StopReason::Shutdown);
    // The slot stays reserved for the task the finish claims, if the
    // store claims with finishes and the engine is not stopping; otherwise
    // it frees now, while the finish may still be on its way to the store.
    let replace =
        shared.store.claims_with_finish() && !shutdown && *engine_state.borrow() == RUNNING;
    {
        let mut running = shared.running();
        if running.get(&c.id).is_some_and(|r| r.attempt == c.attempt) {
            running.remove(&c.id);
        }
        if replace {
            shared
                .reserved
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    if !replace {
        shared.wake.notify_one();
    }
    let now = shared.clock.now_ms();
    let next = retry::next_state(&report, c.attempt, &policy, now, shutdown);
    let finish = FinishAttempt {
        task_id: c.id.clone(),
        attempt: c.attempt,
        worker_id: shared.worker_id.clone(),
        started_at: c.started_at,
        now,
        status: report.status,
        error: report.error,
        result: report.result,
        logs: report.logs,
        next,
    };
    // The result must not be lost to a passing store error: retry, and if
    // the store stays away the lease expires and the task runs again.
    let mut delay = Duration::from_millis(50);
    let mut claimed = Vec::new();
    for _ in 0..8 {
        let result = if replace {
            shared
                .store
                .finish_and_claim(finish.clone(), shared.claim_request(1, only))
                .await
        } else {
            shared
                .store
                .finish(finish.clone())
                .await
                .map(|o| (o, Vec::new()))
        };
        match result {
            Ok((FinishOutcome::Applied(s), next)) => {
                tracing::debug!(task = %c.id, name = %c.name, attempt = c.attempt, status = %s, "attempt finished");
                claimed = next;
                // The commit may have made dependents ready.
                if s.is_terminal() {
                    shared.wake.notify_one();
                }
                break;
            }
            Ok((FinishOutcome::Stale(s), next)) => {
                tracing::info!(task = %c.id, attempt = c.attempt, current = %s, "attempt ended after the task moved on; recorded only");
                claimed = next;
                break;
            }
            Err(Error::ShuttingDown) => break,
            Err(e) => {
                tracing::warn!(task = %c.id, error = %e, "could not record the attempt; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    if !replace {
        return None;
    }
    // Hand the reserved slot to the claimed task (at most one was asked for).
    let mut claimed = claimed.into_iter();
    let next = claimed.next().map(|n| {
        let stop = register_running(shared, &n);
        // Claimed while the engine was told to stop now: it goes back at once.
        if *engine_state.borrow() == STOP_NOW
            && let Some(r) = shared.running().get(&n.id)
        {
            let _ = r.stop.send(Some(StopReason::Shutdown));
        }
        (n, stop)
    });
    shared
        .reserved
        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    if next.is_none() {
        shared.wake.notify_one();
    }
    next
}

async fn execute(
    shared: &Shared,
    c: &ClaimedTask,
    reaper: Option<Arc<Reaper>>,
    stop: watch::Receiver<Option<StopReason>>,
) -> (executor::AttemptReport, RetryPolicy, Option<RunningService>) {
    let fatal = |msg: String| executor::AttemptReport {
        status: AttemptStatus::Failed,
        error: Some(msg),
        retryable: false,
        result: crate::model::TaskResult {
            attempt: c.attempt,
            ..Default::default()
        },
        logs: Vec::new(),
    };
    // Integrity: the spec must be exactly what was submitted.
    let computed = integrity::spec_hash(&c.spec_json);
    if computed != c.spec_hash {
        return (
            fatal(format!(
                "integrity check failed: the stored spec hashes to {computed} but {} was recorded at submit; the task was not run",
                c.spec_hash
            )),
            RetryPolicy::default(),
            None,
        );
    }
    let spec: TaskSpec = match serde_json::from_str(&c.spec_json) {
        Ok(s) => s,
        Err(e) => {
            return (
                fatal(format!("the stored spec cannot be read: {e}")),
                RetryPolicy::default(),
                None,
            );
        }
    };
    let timeout = spec
        .timeout
        .map(|t| t.0)
        .unwrap_or(shared.config.execution.default_timeout.0);
    let policy = spec.retry.clone().unwrap_or_default();
    let ctx = TaskContext {
        id: c.id.clone(),
        name: c.name.clone(),
        attempt: c.attempt,
        spec: Arc::new(spec),
    };
    let max_output = ctx
        .spec
        .limits
        .as_ref()
        .and_then(|l| l.max_output_bytes)
        .map(|b| b.0)
        .unwrap_or(10 << 20);
    let mut service = None;
    let report = match c.kind {
        TaskKind::Command => match ctx.spec.health_check.clone() {
            Some(h) => {
                let (r, s) =
                    executor::service::run_service(&ctx, &shared.exec, reaper, stop, &h).await;
                service = s;
                r
            }
            None => executor::run_command(&ctx, &shared.exec, reaper.as_deref(), stop).await,
        },
        TaskKind::Http => executor::http::run_http(&ctx, timeout, max_output, stop).await,
        TaskKind::External => {
            let handler = executor::find_handler(
                &shared.handlers.read().unwrap_or_else(|e| e.into_inner()),
                &c.name,
            );
            match handler {
                Some(h) => executor::run_handler(ctx, h, timeout, stop).await,
                None => {
                    let mut r = fatal(format!(
                        "no handler is registered for {:?} any more",
                        c.name
                    ));
                    r.retryable = true;
                    r
                }
            }
        }
    };
    (report, policy, service)
}

/// Stops services whose workflow finished (here or in another process),
/// and records the output of services that exited on their own.
async fn service_watch(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut events = shared.store.subscribe_workflows();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            e = events.recv() => match e {
                Ok(e) if e.status.is_terminal() => {
                    shared.stop_workflow_services(&e.workflow_id).await;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                let snapshot: Vec<(String, Option<String>, bool)> = shared
                    .services()
                    .iter()
                    .map(|(id, s)| (id.clone(), s.workflow_id.clone(), s.service.is_finished()))
                    .collect();
                for (id, wf, exited) in snapshot {
                    let done = match (&wf, exited) {
                        (_, true) => true,
                        (Some(w), false) => matches!(
                            shared.store.workflow(w).await,
                            Ok(Some(r)) if r.status.is_terminal()
                        ),
                        (None, false) => false,
                    };
                    if !done {
                        continue;
                    }
                    let svc = shared.services().remove(&id);
                    if let Some(s) = svc {
                        if exited {
                            tracing::warn!(task = %id, "a service task's process exited on its own");
                        }
                        shared.end_service(&id, s, StopReason::Cancelled).await;
                    }
                }
            }
        }
    }
}

/// Wakes the loop when another node sharing the database made work ready.
async fn remote_wakeups(shared: Arc<Shared>, mut rx: tokio::sync::broadcast::Receiver<()>) {
    loop {
        match rx.recv().await {
            Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                shared.wake.notify_one()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// How often the engine looks for its running tasks cancelled by another
/// process (a cancel in this process stops the attempt at once).
const CANCEL_CHECK: Duration = Duration::from_secs(1);

/// Stops local attempts whose task another process cancelled, within about
/// [`CANCEL_CHECK`] instead of at the next lease renewal.
async fn cancel_watch(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(CANCEL_CHECK).await;
        let running: Vec<(String, u32)> = shared
            .running()
            .iter()
            .map(|(k, v)| (k.clone(), v.attempt))
            .collect();
        for chunk in running.chunks(500) {
            let filter = crate::store::TaskFilter {
                ids: chunk.iter().map(|(id, _)| id.clone()).collect(),
                statuses: vec![TaskStatus::Cancelled],
                limit: chunk.len(),
                ..Default::default()
            };
            let cancelled = match shared.store.list(&filter).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::debug!(error = %e, "could not check for cancelled tasks");
                    continue;
                }
            };
            for (_, t) in cancelled {
                let attempt = chunk.iter().find(|(id, _)| *id == t.id).map(|(_, a)| *a);
                if let Some(r) = shared.running().get(&t.id)
                    && Some(r.attempt) == attempt
                    && r.stop.borrow().is_none()
                {
                    tracing::info!(task = %t.id, "stopping an attempt whose task was cancelled elsewhere");
                    let _ = r.stop.send(Some(StopReason::Cancelled));
                }
            }
        }
    }
}

/// Renews this worker's leases; stops local attempts whose lease is gone
/// (cancelled elsewhere, or expired and taken over). Also reclaims expired
/// leases of other workers.
async fn lease_loop(shared: Arc<Shared>) {
    let lease = shared.config.execution.lease_duration.0;
    let period = lease / 3;
    let mut ticks = 0u64;
    loop {
        tokio::time::sleep(period).await;
        ticks += 1;
        let snapshot: Vec<(String, u32)> = shared
            .running()
            .iter()
            .map(|(k, v)| (k.clone(), v.attempt))
            .collect();
        let now = shared.clock.now_ms();
        // Only the attempts this engine runs: a claim that committed while
        // its answer was lost is not renewed, and is taken back as lost
        // once its lease runs out. (A task claimed but not yet registered
        // has the fresh lease of its claim.)
        let ids: Vec<String> = snapshot.iter().map(|(id, _)| id.clone()).collect();
        match shared
            .store
            .renew_leases(&shared.worker_id, &ids, now, now + lease.as_millis() as i64)
            .await
        {
            Ok(held) => {
                let held: HashSet<String> = held.into_iter().collect();
                for (id, attempt) in snapshot {
                    if held.contains(&id) {
                        continue;
                    }
                    let reason = match shared.store.get(&id).await {
                        Ok(Some(t)) if t.status == TaskStatus::Cancelled => StopReason::Cancelled,
                        _ => StopReason::LeaseLost,
                    };
                    if let Some(r) = shared.running().get(&id)
                        && r.attempt == attempt
                    {
                        tracing::info!(task = %id, ?reason, "stopping an attempt whose lease is gone");
                        let _ = r.stop.send(Some(reason));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
        }
        // Reclaim others' expired leases about twice per lease period.
        if ticks.is_multiple_of(2) {
            match shared
                .store
                .reclaim(Reclaim::Expired, shared.clock.now_ms())
                .await
            {
                Ok(events) if !events.is_empty() => {
                    tracing::warn!(
                        count = events.len(),
                        "took back tasks whose worker stopped renewing its lease"
                    );
                    shared.wake.notify_one();
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lease reclaim failed"),
            }
        }
    }
}
