//! Work that is not an agent: timers, crontabs, leader-only work, and the app's lifecycle
//! hooks.
//!
//! **Leader election** is Faust's: the app declares a one-partition topic,
//! `{id}-__assignor-__leader`, that every worker subscribes to; the group gives its one
//! partition to one worker, which is the leader until the partition moves (a worker leaves,
//! joins, or dies and its session expires). On `local://` the one worker leads; on
//! `memory://` and Kafka the group decides, as it does for every other partition, so
//! leadership moves with the same rebalances and at most one worker of a group holds it at
//! a time. `topic_disable_leader` turns the topic off (then no worker leads).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use faust_transport::TopicPartition;

use crate::app::{AgentSpec, App, lock};
use crate::cron::Crontab;
use crate::error::AgentError;
use crate::runtime::supervise::AgentRun;

/// A hook told of partitions (`on_partitions_assigned`, `on_partitions_revoked`).
pub(crate) type PartitionsHook = Arc<dyn Fn(&[TopicPartition]) + Send + Sync>;
/// A hook without arguments.
pub(crate) type Hook = Arc<dyn Fn() + Send + Sync>;

/// Leadership and the lifecycle hooks, shared by the app, its cores and its control thread.
#[derive(Default)]
pub(crate) struct Services {
    /// Whether this worker holds partition 0 of the leader topic.
    leader: AtomicBool,
    on_partitions_assigned: Mutex<Vec<PartitionsHook>>,
    on_partitions_revoked: Mutex<Vec<PartitionsHook>>,
    on_worker_init: Mutex<Vec<Hook>>,
    on_startup_finished: Mutex<Vec<Hook>>,
    on_before_shutdown: Mutex<Vec<Hook>>,
    /// Set once `on_before_shutdown` ran in this run of the worker (core 0 and the control
    /// thread both call it, whichever sees the stop first).
    shutting_down: AtomicBool,
    /// Set once `on_startup_finished` ran since the worker started.
    started: AtomicBool,
}

impl Services {
    /// Records what this worker owns after an assignment change: it leads while it owns
    /// `leader_topic`'s partition.
    pub(crate) fn note_owned<'a>(
        &self,
        leader_topic: Option<&str>,
        mut owned: impl Iterator<Item = &'a TopicPartition>,
    ) {
        let leads = leader_topic.is_some_and(|topic| owned.any(|tp| &*tp.topic == topic && tp.partition == 0));
        if self.leader.swap(leads, Ordering::AcqRel) != leads {
            tracing::info!(
                leader = leads,
                "{}",
                if leads { "this worker is now the app's leader" } else { "this worker no longer leads the app" }
            );
        }
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    pub(crate) fn partitions_assigned(&self, partitions: &[TopicPartition]) {
        Self::call_with(&self.on_partitions_assigned, partitions);
    }

    pub(crate) fn partitions_revoked(&self, partitions: &[TopicPartition]) {
        Self::call_with(&self.on_partitions_revoked, partitions);
    }

    pub(crate) fn worker_init(&self) {
        self.shutting_down.store(false, Ordering::Release);
        self.started.store(false, Ordering::Release);
        Self::call(&self.on_worker_init);
    }

    /// Once per start of the worker, not again when it restarts a run for new subscriptions.
    pub(crate) fn startup_finished(&self) {
        if !self.started.swap(true, Ordering::AcqRel) {
            Self::call(&self.on_startup_finished);
        }
    }

    pub(crate) fn before_shutdown(&self) {
        if !self.shutting_down.swap(true, Ordering::AcqRel) {
            Self::call(&self.on_before_shutdown);
        }
    }

    fn call_with(hooks: &Mutex<Vec<PartitionsHook>>, partitions: &[TopicPartition]) {
        if partitions.is_empty() {
            return;
        }
        // Called outside the lock: a hook may register another.
        let hooks = lock(hooks).clone();
        for hook in hooks {
            hook(partitions);
        }
    }

    fn call(hooks: &Mutex<Vec<Hook>>) {
        let hooks = lock(hooks).clone();
        for hook in hooks {
            hook();
        }
    }
}

/// The name of the app's leader topic (Faust's), or `None` with `topic_disable_leader`.
pub(crate) fn leader_topic(settings: &crate::settings::Settings) -> Option<String> {
    (!settings.topic_disable_leader).then(|| format!("{}-__assignor-__leader", settings.id))
}

/// The name of the agent that subscribes the worker to the leader topic.
const LEADER_AGENT: &str = "__leader";

impl App {
    /// Whether this worker is the app's leader now (Faust's `app.is_leader()`): the one worker
    /// of the app's group that holds the partition of its leader topic,
    /// `{id}-__assignor-__leader`. On `local://` the worker leads from its first assignment;
    /// with several workers the group chooses one, and another takes over when it leaves or
    /// dies. `false` before the worker runs, after it stops, and with `topic_disable_leader`.
    pub fn is_leader(&self) -> bool {
        self.inner.services.is_leader()
    }

    /// Declares the leader topic and the agent that subscribes to it (once; the worker calls
    /// this as it starts, unless `topic_disable_leader`).
    pub(crate) fn declare_leader_election(&self) {
        let Some(name) = leader_topic(&self.inner.settings) else { return };
        if lock(&self.inner.agents).iter().any(|a| a.name == LEADER_AGENT) {
            return;
        }
        let topic = self.topic::<serde_json::Value, serde_json::Value>(&name);
        if let Some(t) = lock(&self.inner.topics).iter_mut().find(|t| *t.name == *name) {
            t.partitions = Some(1);
        }
        // Nothing is sent to it: holding its partition is what matters.
        self.agent(LEADER_AGENT, &topic, |mut stream| async move {
            while stream.next().await.is_some() {}
            Ok(())
        });
    }

    /// Commits now what the calling core has processed (Faust's `await app.commit()`): the
    /// source offsets of the events acked so far, with the table writes and sends made for
    /// them, rather than at the next `commit_interval`. Each core commits its own partitions:
    /// call it from an agent, task or timer of the core to commit (`timer_on_every_core` for
    /// all of them). An error when called outside a core, or when the commit's writes fail
    /// (they are retried by the next commit).
    pub async fn commit(&self) -> Result<(), AgentError> {
        let core = crate::runtime::CoreRuntime::current()
            .ok_or("App::commit commits the calling core's partitions: call it on a worker's core")?;
        // A commit already under way, or acks that ran ahead of table state, defer this one:
        // it is tried again shortly (bounded).
        for _ in 0..500 {
            if core.commit_now().await.map_err(|e| e.to_string())? {
                return Ok(());
            }
            glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
        }
        Err("the commit kept being deferred for a second".into())
    }

    /// Registers work that runs once on core 0 when the worker starts (Faust's `@app.task`).
    pub fn task<F, Fut>(&self, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let f = Arc::new(f);
        self.add_service("task", false, move |_run: AgentRun| {
            let f = f.clone();
            async move {
                if let Err(e) = f().await {
                    tracing::error!(error = %e, "task failed");
                }
            }
        });
    }

    /// Registers `f` to run every `interval` (Faust's `@app.timer`): once per worker, on its
    /// first core, from one interval after start-up until the worker stops. Runs keep to the
    /// schedule (start + k × interval) rather than drifting by the time each run takes; a run
    /// that overruns skips the ticks it missed. A failing run is logged.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("ticker"));
    /// let ticks = app.topic::<String, u64>("ticks");
    /// app.timer(Duration::from_secs(1), move || {
    ///     let ticks = ticks.clone();
    ///     async move {
    ///         ticks.send(None, &1).await?;
    ///         Ok(())
    ///     }
    /// });
    /// ```
    pub fn timer<F, Fut>(&self, interval: Duration, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        self.add_timer(interval, f, Where::FirstCore);
    }

    /// [`App::timer`] on every core of the worker: a table read in it sees that core's shards
    /// (`Table::local_items`), which is how a worker gathers a table from all its cores.
    pub fn timer_on_every_core<F, Fut>(&self, interval: Duration, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        self.add_timer(interval, f, Where::EveryCore);
    }

    /// [`App::timer`] on the app's leader only (Faust's `@app.timer(on_leader=True)`): every
    /// worker keeps the schedule, and at each tick only the one that
    /// [`is_leader`](App::is_leader) runs `f` — once per interval for the whole app, whatever
    /// the number of workers, and on another worker when leadership moves.
    pub fn timer_on_leader<F, Fut>(&self, interval: Duration, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        self.add_timer(interval, f, Where::Leader);
    }

    fn add_timer<F, Fut>(&self, interval: Duration, f: F, at: Where)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let f = Arc::new(f);
        let interval = interval.max(Duration::from_micros(1));
        let services = self.inner.services.clone();
        self.add_service("timer", at == Where::EveryCore, move |run: AgentRun| {
            let (f, services) = (f.clone(), services.clone());
            async move {
                let mut next = Instant::now() + interval;
                loop {
                    let wait = next.saturating_duration_since(Instant::now());
                    if !run.core.sleep_unless_stopped(wait).await {
                        return;
                    }
                    if (at != Where::Leader || services.is_leader())
                        && let Err(e) = f().await
                    {
                        tracing::error!(error = %e, "timer failed");
                    }
                    next = next_tick(next, interval, Instant::now());
                }
            }
        });
    }

    /// Registers `f` to run on the schedule `crontab` (Faust's `@app.crontab`), once per
    /// worker on its first core — or on the leader only, for a schedule made
    /// [`on_leader`](Crontab::on_leader). Times are civil times in the crontab's time zone, or
    /// in the app's `timezone` setting (UTC by default). A failing run is logged; a run that
    /// overruns the next time skips it.
    ///
    /// ```no_run
    /// use faust::{App, Crontab, Settings};
    ///
    /// let app = App::new(Settings::new("reports"));
    /// app.crontab(Crontab::parse("0 6 * * *")?.in_time_zone("Europe/Paris")?.on_leader(), || async {
    ///     println!("good morning");
    ///     Ok(())
    /// })?;
    /// # Ok::<(), faust::CronError>(())
    /// ```
    pub fn crontab<F, Fut>(&self, crontab: Crontab, f: F) -> Result<(), crate::cron::CronError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let tz = match crontab.time_zone() {
            Some(tz) => tz.clone(),
            None => crate::cron::time_zone(&self.inner.settings.timezone)?,
        };
        let f = Arc::new(f);
        let (services, crontab) = (self.inner.services.clone(), Arc::new(crontab));
        self.add_service("crontab", false, move |run: AgentRun| {
            let (f, services, crontab, tz) = (f.clone(), services.clone(), crontab.clone(), tz.clone());
            async move {
                let mut after = SystemTime::now();
                loop {
                    let Some(due) = crontab.next_in(&tz, after) else {
                        tracing::warn!(crontab = %crontab, "the crontab has no more times to fire");
                        return;
                    };
                    // The timer may wake a little early: sleep until the wall clock says so, so
                    // that the next time is computed past this one.
                    loop {
                        let left = due.duration_since(SystemTime::now()).unwrap_or_default();
                        if left.is_zero() {
                            break;
                        }
                        if !run.core.sleep_unless_stopped(left).await {
                            return;
                        }
                    }
                    if (!crontab.is_on_leader() || services.is_leader())
                        && let Err(e) = f().await
                    {
                        tracing::error!(crontab = %crontab, error = %e, "crontab run failed");
                    }
                    after = due.max(SystemTime::now());
                }
            }
        });
        Ok(())
    }

    /// Registers `f` to run on the leader each time this worker becomes the app's leader
    /// (Faust's `@app.task(on_leader=True)`, which only looks at start-up): once on the first
    /// worker to lead, and again on whichever worker takes over.
    pub fn task_on_leader<F, Fut>(&self, f: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        let f = Arc::new(f);
        let services = self.inner.services.clone();
        self.add_service("task", false, move |run: AgentRun| {
            let (f, services) = (f.clone(), services.clone());
            async move {
                let mut led = false;
                loop {
                    let leads = services.is_leader();
                    if leads
                        && !led
                        && let Err(e) = f().await
                    {
                        tracing::error!(error = %e, "leader task failed");
                    }
                    led = leads;
                    // Leadership changes with rebalances, which take far longer than this.
                    if !run.core.sleep_unless_stopped(Duration::from_millis(50)).await {
                        return;
                    }
                }
            }
        });
    }

    /// Calls `f` with the partitions this worker has just been given, before their tables are
    /// recovered and their consumers started (as Faust's `on_partitions_assigned` signal is
    /// sent). The worker's assignments are incremental: `f` sees the partitions added, of
    /// every topic (sources, changelogs, the leader topic). It runs on the worker's control
    /// thread and should return quickly.
    pub fn on_partitions_assigned(&self, f: impl Fn(&[TopicPartition]) + Send + Sync + 'static) {
        lock(&self.inner.services.on_partitions_assigned).push(Arc::new(f));
    }

    /// Calls `f` with the partitions being taken from this worker, before they are released
    /// (Faust's `on_partitions_revoked` signal), and with all it holds when it stops. On the
    /// control thread, like [`on_partitions_assigned`](App::on_partitions_assigned).
    pub fn on_partitions_revoked(&self, f: impl Fn(&[TopicPartition]) + Send + Sync + 'static) {
        lock(&self.inner.services.on_partitions_revoked).push(Arc::new(f));
    }

    /// Calls `f` as the worker starts, before it opens its transport or creates topics
    /// (Faust's `on_worker_init`).
    pub fn on_worker_init(&self, f: impl Fn() + Send + Sync + 'static) {
        lock(&self.inner.services.on_worker_init).push(Arc::new(f));
    }

    /// Calls `f` once the worker is ready: its first partitions are recovered and being
    /// processed (Faust's `on_startup_finished`).
    pub fn on_startup_finished(&self, f: impl Fn() + Send + Sync + 'static) {
        lock(&self.inner.services.on_startup_finished).push(Arc::new(f));
    }

    /// Calls `f` when the worker is asked to stop, before its agents finish their events and
    /// it commits (Faust's `on_before_shutdown`).
    pub fn on_before_shutdown(&self, f: impl Fn() + Send + Sync + 'static) {
        lock(&self.inner.services.on_before_shutdown).push(Arc::new(f));
    }

    /// Registers work without a topic, on core 0 (or on every core).
    pub(crate) fn add_service<F, Fut>(&self, name: &str, every_core: bool, start: F)
    where
        F: Fn(AgentRun) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        lock(&self.inner.agents).push(AgentSpec {
            name: name.to_string(),
            topic: Arc::from(""),
            start: Arc::new(move |run: AgentRun| Box::pin(start(run))),
            also: Vec::new(),
            concurrency: 1,
            every_core,
            isolated: false,
            patterns: Vec::new(),
            supervision: None,
        });
    }
}

/// Where a timer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    FirstCore,
    EveryCore,
    Leader,
}

/// The tick after `last` on a schedule of `interval`, skipping those already past at `now`.
pub(crate) fn next_tick(last: Instant, interval: Duration, now: Instant) -> Instant {
    let next = last + interval;
    if next > now {
        return next;
    }
    let behind = now.duration_since(next).as_nanos() / interval.as_nanos().max(1);
    next + interval * (u32::try_from(behind + 1).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use faust_transport::TopicPartition;

    #[test]
    fn ticks_keep_to_the_schedule_and_skip_missed_ones() {
        let (t0, i) = (Instant::now(), Duration::from_millis(100));
        // On time: the next tick, not now + interval.
        assert_eq!(super::next_tick(t0, i, t0 + Duration::from_millis(30)), t0 + i);
        // A run that took 250 ms: ticks at 100 and 200 are past; the next is 300.
        assert_eq!(super::next_tick(t0, i, t0 + Duration::from_millis(250)), t0 + 3 * i);
        assert_eq!(super::next_tick(t0, i, t0 + i), t0 + 2 * i);
    }

    #[test]
    fn the_worker_holding_the_leader_partition_leads() {
        let services = super::Services::default();
        let leader = super::leader_topic(&crate::settings::Settings::new("shop")).expect("a leader topic");
        let owned = [TopicPartition::new("orders", 0), TopicPartition::new(leader.as_str(), 0)];
        services.note_owned(Some(&leader), owned.iter());
        assert!(services.is_leader());
        services.note_owned(Some(&leader), owned[..1].iter());
        assert!(!services.is_leader(), "partition 0 of orders is not leadership");
        services.note_owned(None, owned.iter());
        assert!(!services.is_leader(), "no election without the topic");
    }
}
