//! The executors: one glommio executor pinned to each core, and a watchdog that
//! notices a core that stopped making progress.
//!
//! User work is given as a *factory*: a `Fn(CoreContext) -> Future` that is `Send + Sync`,
//! called once on each core's own thread; the future it returns stays on that core and need
//! not be `Send`.
//!
//! Storage does not use glommio's `DmaFile` (segments are read through mmap and written with
//! `pwrite`), so the `DmaFile` IOPOLL probe problem of some virtual disks does not arise.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use glommio::{GlommioError, LocalExecutorBuilder, Placement, ReactorErrorKind};

/// Why the runtime could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// More cores were asked for than this process may use.
    #[error("{requested} cores requested, but only {available} are usable by this process (CPUs {cpus:?})")]
    TooManyCores {
        /// Cores asked for.
        requested: usize,
        /// Cores usable (the process's CPU affinity).
        available: usize,
        /// The usable CPUs.
        cpus: Vec<usize>,
    },
    /// The kernel refused io_uring.
    #[error(
        "io_uring is not available ({source}). faust needs Linux 5.8 or later with io_uring enabled. \
         Containers: Docker's default seccomp profile blocks io_uring; run with \
         `--security-opt seccomp=unconfined` or a profile that allows io_uring_setup, io_uring_enter \
         and io_uring_register (and check that sysctl kernel.io_uring_disabled is 0)"
    )]
    IoUringUnavailable {
        /// What the kernel said.
        source: std::io::Error,
    },
    /// Not enough locked memory for the io_uring rings.
    #[error(
        "not enough locked memory for io_uring: the limit is {limit} bytes, each core needs about \
         {needed} bytes. Raise `ulimit -l` (memlock, e.g. in /etc/security/limits.conf or the \
         service's LimitMEMLOCK=), run with CAP_IPC_LOCK, or lower the runtime's io_memory"
    )]
    LockedMemory {
        /// The current RLIMIT_MEMLOCK, in bytes.
        limit: u64,
        /// About what one core needs.
        needed: u64,
    },
    /// An executor failed to start or failed while running.
    #[error("core {core}: {message}")]
    Executor {
        /// The core.
        core: usize,
        /// What glommio reported.
        message: String,
    },
    /// A core's work panicked.
    #[error("core {core} panicked: {message}")]
    Panicked {
        /// The core.
        core: usize,
        /// The panic message.
        message: String,
    },
}

/// How the runtime lays out its executors.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// How many cores to run on; `None` means every CPU this process may use.
    pub cores: Option<usize>,
    /// Memory each executor registers for io_uring buffers. It counts against the locked
    /// memory limit three times (one per ring).
    pub io_memory: usize,
    /// Executor thread names start with this.
    pub name: String,
    /// A core that makes no progress for this long is reported as stalled.
    pub stall_threshold: Duration,
    /// How long an idle core polls for work before its thread sleeps (zero: at once).
    pub spin: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cores: None,
            io_memory: 1 << 20,
            name: "faust".to_string(),
            stall_threshold: Duration::from_secs(5),
            spin: Duration::ZERO,
        }
    }
}

/// Where a piece of work runs: which core, of how many, pinned to which CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreContext {
    /// This core's index, `0..cores`.
    pub index: usize,
    /// The number of cores the runtime runs on.
    pub cores: usize,
    /// The CPU this core's thread is pinned to.
    pub cpu: usize,
}

/// The CPUs this process may run on (its affinity mask), in order.
pub fn usable_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bit set the syscall fills; we only read it afterwards.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
    }
}

/// Chooses the CPUs for `requested` cores (all usable ones when `None`).
pub(crate) fn choose_cpus(requested: Option<usize>, usable: &[usize]) -> Result<Vec<usize>, RuntimeError> {
    let n = requested.unwrap_or(usable.len()).max(1);
    if n > usable.len() {
        return Err(RuntimeError::TooManyCores { requested: n, available: usable.len(), cpus: usable.to_vec() });
    }
    Ok(usable[..n].to_vec())
}

/// Turns glommio's start-up errors into ones that say what to do.
fn classify(core: usize, io_memory: usize, err: GlommioError<()>) -> RuntimeError {
    match err {
        GlommioError::ReactorError(ReactorErrorKind::MemLockLimit(limit, _)) => {
            RuntimeError::LockedMemory { limit, needed: 3 * io_memory as u64 }
        }
        GlommioError::IoError(e) | GlommioError::EnhancedIoError { source: e, .. } => classify_io(core, io_memory, e),
        other => RuntimeError::Executor { core, message: other.to_string() },
    }
}

fn classify_io(core: usize, io_memory: usize, e: std::io::Error) -> RuntimeError {
    match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EOPNOTSUPP) | Some(libc::EACCES) => {
            RuntimeError::IoUringUnavailable { source: e }
        }
        Some(libc::ENOMEM) => RuntimeError::LockedMemory { limit: memlock_limit(), needed: 3 * io_memory as u64 },
        _ => RuntimeError::Executor { core, message: e.to_string() },
    }
}

fn memlock_limit() -> u64 {
    // SAFETY: plain syscall filling a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) == 0 { r.rlim_cur } else { 0 }
    }
}

/// Heartbeats of every core, checked by a watchdog thread.
#[derive(Debug)]
pub(crate) struct Watchdog {
    start: Instant,
    /// Per core: milliseconds since `start` of its last heartbeat. Written by that core's
    /// heartbeat task only, read by the watchdog thread.
    beats: Vec<AtomicU64>,
    done: AtomicBool,
}

impl Watchdog {
    fn new(cores: usize) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            start: Instant::now(),
            beats: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            done: AtomicBool::new(false),
        })
    }

    fn beat(&self, core: usize) {
        if let Some(b) = self.beats.get(core) {
            b.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Cores whose last heartbeat is older than `threshold`, with how long ago it was.
    fn stalled(&self, threshold: Duration) -> Vec<(usize, Duration)> {
        let now = self.start.elapsed().as_millis() as u64;
        self.beats
            .iter()
            .enumerate()
            .filter_map(|(core, b)| {
                let age = Duration::from_millis(now.saturating_sub(b.load(Ordering::Relaxed)));
                (age > threshold).then_some((core, age))
            })
            .collect()
    }
}

/// What the watchdog does about a stalled core; by default it logs an error. (Once group
/// membership exists, a stalled worker leaves the group rather than hold partitions it does
/// not process.)
pub type StallHandler = Arc<dyn Fn(usize, Duration) + Send + Sync>;

/// Runs `factory` once on each core, each on its own executor pinned to its CPU, and waits
/// for all of them. Returns their results in core order.
///
/// ```
/// use faust::runtime::{RuntimeConfig, run_on_cores};
///
/// let config = RuntimeConfig { cores: Some(1), ..RuntimeConfig::default() };
/// let ids = run_on_cores(&config, |core| async move { core.index * 10 })?;
/// assert_eq!(ids, vec![0]);
/// # Ok::<(), faust::runtime::RuntimeError>(())
/// ```
pub fn run_on_cores<F, Fut, T>(config: &RuntimeConfig, factory: F) -> Result<Vec<T>, RuntimeError>
where
    F: Fn(CoreContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let on_stall: StallHandler = Arc::new(|core, age| {
        tracing::error!(
            core,
            stalled_ms = age.as_millis() as u64,
            "core made no progress: an agent may be blocking its thread (call yield_if_needed in long loops)"
        );
    });
    run_on_cores_with(config, on_stall, factory)
}

/// [`run_on_cores`] with a custom stall handler.
pub fn run_on_cores_with<F, Fut, T>(
    config: &RuntimeConfig,
    on_stall: StallHandler,
    factory: F,
) -> Result<Vec<T>, RuntimeError>
where
    F: Fn(CoreContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let cpus = choose_cpus(config.cores, &usable_cpus())?;
    let cores = cpus.len();
    let factory = Arc::new(factory);
    let watchdog = Watchdog::new(cores);
    let tick = (config.stall_threshold / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
    let mut handles = Vec::with_capacity(cores);
    for (index, &cpu) in cpus.iter().enumerate() {
        let factory = factory.clone();
        let beats = watchdog.clone();
        let ctx = CoreContext { index, cores, cpu };
        let spawned = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("{}-core{index}", config.name))
            .io_memory(config.io_memory)
            .spin_before_park(config.spin)
            .spawn(move || async move {
                beats.beat(index);
                glommio::spawn_local(async move {
                    while !beats.done.load(Ordering::Relaxed) {
                        beats.beat(index);
                        glommio::timer::sleep(tick).await;
                    }
                })
                .detach();
                // Catch a panic here, where its message is still known.
                futures_lite::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(factory(ctx)))
                    .await
                    .map_err(|p| crate::util::panic_message(&*p, "unknown panic"))
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                watchdog.done.store(true, Ordering::Relaxed);
                return Err(classify(index, config.io_memory, e));
            }
        }
    }
    let checker = {
        let (watchdog, threshold) = (watchdog.clone(), config.stall_threshold);
        std::thread::Builder::new()
            .name(format!("{}-watchdog", config.name))
            .spawn(move || {
                let mut reported = vec![false; watchdog.beats.len()];
                while !watchdog.done.load(Ordering::Relaxed) {
                    // Woken early when the cores are done, so stopping does not wait a tick.
                    std::thread::park_timeout(tick);
                    if watchdog.done.load(Ordering::Relaxed) {
                        break;
                    }
                    let stalled = watchdog.stalled(threshold);
                    for (core, flag) in reported.iter_mut().enumerate() {
                        match stalled.iter().find(|(c, _)| *c == core) {
                            Some(&(_, age)) if !*flag => {
                                *flag = true;
                                on_stall(core, age);
                            }
                            None => *flag = false,
                            _ => {}
                        }
                    }
                }
            })
            .map_err(|e| RuntimeError::Executor { core: 0, message: format!("starting the watchdog: {e}") })?
    };
    let mut results = Vec::with_capacity(cores);
    let mut first_error = None;
    for (index, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(value)) => results.push(value),
            Ok(Err(message)) => {
                first_error.get_or_insert(RuntimeError::Panicked { core: index, message });
            }
            Err(e) => {
                first_error.get_or_insert(classify(index, config.io_memory, e));
            }
        }
    }
    watchdog.done.store(true, Ordering::Relaxed);
    checker.thread().unpark();
    let _ = checker.join();
    match first_error {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_core_runs_the_factory_pinned_to_its_cpu() {
        let config = RuntimeConfig::default();
        let cpus = usable_cpus();
        let out = run_on_cores(&config, |core| async move {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            core
        })
        .unwrap();
        assert_eq!(out.len(), cpus.len());
        for (i, core) in out.iter().enumerate() {
            assert_eq!((core.index, core.cores, core.cpu), (i, cpus.len(), cpus[i]));
        }
    }

    #[test]
    fn asking_for_more_cores_than_usable_is_a_clear_error() {
        let usable = [0, 1];
        assert!(matches!(
            choose_cpus(Some(3), &usable),
            Err(RuntimeError::TooManyCores { requested: 3, available: 2, .. })
        ));
        assert_eq!(choose_cpus(None, &usable).unwrap(), vec![0, 1]);
        assert_eq!(choose_cpus(Some(1), &usable).unwrap(), vec![0]);
    }

    #[test]
    fn startup_errors_say_what_to_do() {
        let e = classify_io(0, 1 << 20, std::io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(matches!(e, RuntimeError::IoUringUnavailable { .. }));
        assert!(e.to_string().contains("seccomp"), "{e}");
        let e = classify(0, 1 << 20, GlommioError::ReactorError(ReactorErrorKind::MemLockLimit(65536, 524288)));
        assert!(matches!(e, RuntimeError::LockedMemory { limit: 65536, .. }));
        assert!(e.to_string().contains("ulimit -l"), "{e}");
    }

    #[test]
    fn a_blocked_core_is_reported_and_a_panic_is_an_error() {
        let stalls = Arc::new(Mutex::new(Vec::new()));
        let config =
            RuntimeConfig { cores: Some(1), stall_threshold: Duration::from_millis(100), ..RuntimeConfig::default() };
        let seen = stalls.clone();
        let handler: StallHandler = Arc::new(move |core, _| seen.lock().unwrap().push(core));
        run_on_cores_with(&config, handler, |_| async {
            glommio::timer::sleep(Duration::from_millis(50)).await;
            // Blocks the executor thread: no heartbeat can run.
            std::thread::sleep(Duration::from_millis(500));
        })
        .unwrap();
        assert_eq!(*stalls.lock().unwrap(), vec![0]);

        let err = run_on_cores(&config, |_| async { panic!("boom") }).unwrap_err();
        assert!(matches!(&err, RuntimeError::Panicked { core: 0, message } if message == "boom"), "{err}");
    }
}
