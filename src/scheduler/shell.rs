//! The scheduler's run loop: a thin async shell around the [`Core`].
//!
//! One task receives everything that happens (messages from
//! [`super::Scheduler`] handles and gates, child events, GPU readings, the
//! core's next deadline), calls the core with tokio's `now` (so tests
//! drive TTLs and backoff under `tokio::time::pause()`), and performs the
//! [`Effect`]s it returns, in order: children through the [`Spawner`],
//! gates, replies to waiters, the event bus, GPU refreshes, GGUF reads on
//! a blocking thread. A result the core needs comes back to it as a call:
//! a gate's close report at once (before the next message), an estimate
//! as `Msg::Estimated` later.
//!
//! The shell keeps what the core must not hold: the waiters' reply
//! channels (by [`WaiterId`]), the children's handles and the gates.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::core::{Close, Core, Effect, GateReport};
use super::gate::{Gate, Gates};
use super::placement::Reading;
use super::queue::WaiterId;
use super::slot::StatusDraft;
use super::{Lease, ModelStatus, Msg, Reply};
use crate::config::Config;
use crate::events::{Bus, Event};
use crate::gpu::{Gpus, Snapshot};
use crate::supervisor::{ChildEvent, ChildHandle, Spawner};
use crate::upstream::Upstream;

/// Starts the run loop for `config`'s models.
pub(super) fn spawn(
    config: &Config,
    bus: Bus,
    spawner: Arc<dyn Spawner>,
    gpus: Gpus,
    gates: Gates,
    self_tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
) {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let readings = gpus.subscribe();
    let snapshot = readings.borrow().clone();
    let reading = Reading {
        snapshot,
        trees: HashMap::new(),
    };
    let mut shell = Shell {
        core: Core::new(config, reading, std_now()),
        gates,
        children: HashMap::new(),
        replies: HashMap::new(),
        shutdown_replies: Vec::new(),
        gpus,
        events_tx,
        self_tx,
        bus,
        spawner,
    };
    if shell.gpus.present() {
        shell.core.expect_readings(std_now());
    }
    let first = shell.core.start();
    shell.perform(first);
    tokio::spawn(shell.run(rx, events_rx, readings));
}

/// tokio's now (paused in tests) as the core's clock.
fn std_now() -> std::time::Instant {
    Instant::now().into_std()
}

struct Shell {
    core: Core,
    gates: Gates,
    children: HashMap<Arc<str>, ChildHandle>,
    /// Where each waiter the core holds is answered.
    replies: HashMap<WaiterId, Reply>,
    /// Who to tell when the last child is gone after shutdown began.
    shutdown_replies: Vec<oneshot::Sender<()>>,
    /// Where GPU readings come from (none without NVML).
    gpus: Gpus,
    events_tx: mpsc::UnboundedSender<ChildEvent>,
    self_tx: mpsc::UnboundedSender<Msg>,
    bus: Bus,
    spawner: Arc<dyn Spawner>,
}

impl Shell {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut events: mpsc::UnboundedReceiver<ChildEvent>,
        mut readings: watch::Receiver<Option<Arc<Snapshot>>>,
    ) {
        let mut readings_open = true;
        let mut rx_open = true;
        loop {
            let deadline = self.core.next_deadline().map(Instant::from_std);
            tokio::select! {
                msg = rx.recv(), if rx_open => match msg {
                    Some(msg) => self.handle(msg),
                    // Every Scheduler handle is gone: nothing can ask again.
                    None => {
                        rx_open = false;
                        let effects = self.core.shutdown();
                        self.perform(effects);
                    }
                },
                Some(event) = events.recv() => {
                    let effects = self.core.child_event(event, std_now());
                    self.perform(effects);
                }
                _ = sleep_until_opt(deadline) => {
                    let effects = self.core.tick(std_now());
                    self.perform(effects);
                }
                changed = readings.changed(), if readings_open => match changed {
                    Ok(()) => {
                        let snapshot = readings.borrow_and_update().clone();
                        self.on_reading(snapshot);
                    }
                    Err(_) => readings_open = false,
                },
            }
            if self.core.shut_down() {
                for reply in self.shutdown_replies.drain(..) {
                    let _ = reply.send(());
                }
                if !rx_open {
                    return;
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        let now = std_now();
        let effects = match msg {
            Msg::Acquire {
                model,
                waiter,
                priority,
                reply,
            } => {
                self.replies.insert(waiter, reply);
                self.core.acquire(&model, waiter, priority, now)
            }
            Msg::Left { model, waiter } => {
                self.replies.remove(&waiter);
                self.core.left(&model, waiter)
            }
            Msg::Drained { model, instance } => self.core.drained(&model, instance),
            Msg::Idle { model, instance } => {
                // The gate's own last use: the message may be read late.
                let used = self
                    .gates
                    .get(&model)
                    .filter(|g| g.instance == instance)
                    .map_or(now, |g| g.last_used().into_std());
                self.core.idle(&model, instance, used, now)
            }
            Msg::Stop { model, reply } => {
                let (answer, effects) = self.core.stop(&model);
                self.perform(effects);
                let _ = reply.send(answer);
                return;
            }
            Msg::Preload => self.core.preload(now),
            Msg::SetKeepAlive { model, keep, reply } => {
                let (answer, effects) = self.core.set_keep_alive(&model, keep, now);
                self.perform(effects);
                let _ = reply.send(answer);
                return;
            }
            Msg::Status { reply } => {
                let _ = reply.send(self.status());
                return;
            }
            Msg::Reconfigure {
                limits,
                models,
                reply,
            } => {
                let effects = self.core.reconfigure(limits, models, now);
                self.perform(effects);
                let _ = reply.send(());
                return;
            }
            Msg::Shutdown { reply } => {
                self.shutdown_replies.push(reply);
                self.core.shutdown()
            }
            Msg::SeedVram { peaks } => self.core.seed_vram(peaks),
            Msg::Estimated { model, bytes } => self.core.estimated(&model, bytes, now),
            Msg::SeedLoadTimes { loads } => self.core.seed_load_times(loads),
        };
        self.perform(effects);
    }

    /// A new GPU reading, with the process trees of the loaded children
    /// read from /proc.
    fn on_reading(&mut self, snapshot: Option<Arc<Snapshot>>) {
        let trees = match &snapshot {
            Some(snap) => self
                .core
                .measured_pids()
                .into_iter()
                .map(|pid| (pid, snap.tree_usage(pid)))
                .collect(),
            None => HashMap::new(),
        };
        let effects = self.core.reading(Reading { snapshot, trees }, std_now());
        self.perform(effects);
    }

    /// Performs `effects` in order, and those that the core's answers to
    /// gate reports bring after them.
    fn perform(&mut self, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::CloseGate {
                    model,
                    instance,
                    close,
                } => {
                    let report = self.close_gate(&model, instance, close);
                    let more = self.core.gate_closed(&model, instance, report, std_now());
                    queue.extend(more);
                }
                other => self.perform_one(other),
            }
        }
    }

    fn perform_one(&mut self, effect: Effect) {
        match effect {
            Effect::Spawn(spec) => {
                let model = spec.model.clone();
                let child = self.spawner.spawn(spec, self.events_tx.clone());
                self.children.insert(model, child);
            }
            Effect::StopChild { model } => {
                if let Some(child) = self.children.get_mut(&model) {
                    child.stop();
                }
            }
            Effect::ForgetChild { model } => {
                self.children.remove(&model);
            }
            Effect::OpenGate {
                model,
                instance,
                addr,
                max_connections,
                gpu,
            } => {
                let upstream = Upstream::new(addr, max_connections);
                let gate = Gate::new(model.clone(), instance, upstream, self.self_tx.clone());
                gate.set_gpu(gpu);
                // The core hears of every last lease (see core.rs).
                gate.watch_idle(true);
                self.gates.insert(model, Arc::new(gate));
            }
            Effect::SetGateGpu { model, gpu } => {
                if let Some(gate) = self.gates.get(&model) {
                    gate.set_gpu(gpu);
                }
            }
            Effect::DropGate { model } => self.gates.remove(&model),
            Effect::Lease { waiter, model } => self.lease(waiter, &model),
            Effect::Fail { waiter, error } => {
                if let Some(reply) = self.replies.remove(&waiter) {
                    let _ = reply.send(Err(error));
                }
            }
            Effect::Emit(event) => self.bus.emit(event),
            Effect::Lifecycle { mut event, rss_of } => {
                event.at_ms = crate::events::now_ms();
                if let Some(pid) = rss_of {
                    event.rss_bytes = crate::procfs::pid_figures(pid).map(|(rss, _)| rss);
                }
                self.bus.emit(Event::Model(Arc::new(event)));
            }
            Effect::RefreshGpus => self.gpus.refresh(),
            Effect::Estimate { model, path, argv } => {
                let tx = self.self_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let bytes = std::fs::metadata(&path).ok().and_then(|meta| {
                        crate::gguf::read(&path)
                            .ok()
                            .map(|h| super::vram_estimate(&h, meta.len(), &argv))
                    });
                    let _ = tx.send(Msg::Estimated {
                        model: model.to_string(),
                        bytes,
                    });
                });
            }
            Effect::CloseGate { .. } => {}
        }
    }

    /// Hands `waiter` a lease on `model`'s gate (a requester that left
    /// drops it again, which the gate reports).
    fn lease(&mut self, waiter: WaiterId, model: &str) {
        let Some(reply) = self.replies.remove(&waiter) else {
            return;
        };
        let Some(gate) = self.gates.get(model).filter(|g| g.enter()) else {
            return;
        };
        if let Err(Ok(lease)) = reply.send(Ok(Lease { gate })) {
            drop(lease);
        }
    }

    fn close_gate(&self, model: &str, instance: u64, close: Close) -> GateReport {
        let now = Instant::now();
        let Some(gate) = self.gates.get(model).filter(|g| g.instance == instance) else {
            return GateReport {
                closed: true,
                leases: 0,
                last_used: now.into_std(),
            };
        };
        let (closed, leases) = match close {
            Close::Now => (true, gate.close()),
            Close::IfIdle => (gate.close_if_unused(), gate.leases()),
            Close::IfIdleFor(ttl) => (gate.close_if_idle(ttl, now), gate.leases()),
        };
        GateReport {
            closed,
            leases,
            last_used: gate.last_used().into_std(),
        }
    }

    /// Every model's status: the core's, with the live figures of each
    /// running gate and /proc.
    fn status(&self) -> Vec<ModelStatus> {
        let now = std_now();
        let drafts = self.core.status(now);
        drafts.into_iter().map(|d| self.complete(d, now)).collect()
    }

    fn complete(&self, draft: StatusDraft, now: std::time::Instant) -> ModelStatus {
        let StatusDraft {
            mut status,
            running,
            last_used,
        } = draft;
        if let Some(gate) = self.gates.get(&status.name).filter(|_| running) {
            status.inflight = gate.leases();
            status.port = gate.upstream.addr().port();
            status.socket = gate.upstream.addr().socket().map(Into::into);
            let last = gate.last_used().into_std().max(last_used);
            status.idle_s =
                (status.inflight == 0).then(|| now.saturating_duration_since(last).as_secs_f64());
        }
        status.rss_bytes = status
            .pid
            .and_then(crate::procfs::pid_figures)
            .and_then(|(rss, _)| u64::try_from(rss).ok());
        status
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The shell and core together, through the public [`Scheduler`] with a
    //! fake [`Spawner`] whose children the tests play, under tokio's paused
    //! clock.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::sync::{mpsc, oneshot};

    use crate::config::{ChildAddr, Config};
    use crate::events::{Bus, Event, LoadProgress};
    use crate::gpu::{Gpus, Snapshot};
    use crate::scheduler::slot::{backoff, MAX_BACKOFF};
    use crate::scheduler::{
        AcquireError, KeepAlive, Lease, ModelState, ModelStatus, Scheduler, VramSource,
    };
    use crate::supervisor::{
        ChildEvent, ChildHandle, ChildSpec, ExitReason, Spawner, StartFailure,
    };

    /// One child the fake spawner was asked for.
    struct Spawned {
        spec: ChildSpec,
        events: mpsc::UnboundedSender<ChildEvent>,
        stop: oneshot::Receiver<()>,
        /// The stop was seen (the receiver yields it once).
        stopped: bool,
    }

    /// Records every start; the test plays the child's part.
    #[derive(Default)]
    struct Fake(Mutex<Vec<Spawned>>);

    impl Spawner for Fake {
        fn spawn(&self, spec: ChildSpec, events: mpsc::UnboundedSender<ChildEvent>) -> ChildHandle {
            let (tx, stop) = oneshot::channel();
            self.0.lock().unwrap().push(Spawned {
                spec,
                events,
                stop,
                stopped: false,
            });
            ChildHandle::detached(tx)
        }
    }

    impl Fake {
        fn starts_of(&self, model: &str) -> usize {
            self.started().iter().filter(|m| *m == model).count()
        }

        fn started(&self) -> Vec<String> {
            let all = self.0.lock().unwrap();
            all.iter().map(|s| s.spec.model.to_string()).collect()
        }

        fn with_last<T>(&self, model: &str, f: impl FnOnce(&mut Spawned) -> T) -> T {
            let mut all = self.0.lock().unwrap();
            let s = all
                .iter_mut()
                .rev()
                .find(|s| &*s.spec.model == model)
                .unwrap_or_else(|| panic!("{model} was never started"));
            f(s)
        }

        fn ready(&self, model: &str) {
            self.with_last(model, |s| {
                let _ = s.events.send(ChildEvent::Ready {
                    model: s.spec.model.clone(),
                    instance: s.spec.instance,
                    addr: ChildAddr::Unix("/run/test/model-1.sock".into()),
                    pid: 4242,
                    load_time: Duration::from_millis(5),
                });
            });
        }

        fn exit(&self, model: &str, reason: ExitReason) {
            self.with_last(model, |s| {
                let _ = s.events.send(ChildEvent::Exited {
                    model: s.spec.model.clone(),
                    instance: s.spec.instance,
                    reason,
                });
            });
        }

        /// Whether the scheduler asked the newest child of `model` to stop.
        fn stop_asked(&self, model: &str) -> bool {
            self.with_last(model, |s| {
                s.stopped |= s.stop.try_recv().is_ok();
                s.stopped
            })
        }
    }

    const TWO_MODELS: &str =
        "[models.a]\ncmd = [\"a\", \"{port}\"]\n[models.b]\ncmd = [\"b\", \"{port}\"]\n";

    fn config(text: &str) -> Config {
        Config::from_toml(std::path::Path::new("test.toml"), text).unwrap()
    }

    fn start(text: &str) -> (Scheduler, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        let s = Scheduler::with_spawner(&config(text), Bus::detached(), fake.clone());
        (s, fake)
    }

    /// Polls `done` (what the fake or the scheduler shows) until it holds,
    /// letting the run loop and the spawned requests run between polls;
    /// fails naming `what` if it never does.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }

    /// Lets the actor (and any spawned requests) run until idle: only
    /// where a test checks that something does *not* happen.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    async fn state_of(s: &Scheduler, model: &str) -> ModelState {
        settle().await;
        let all = s.status().await;
        all.into_iter().find(|m| m.name == model).unwrap().state
    }

    fn acquire(s: &Scheduler, model: &str) -> tokio::task::JoinHandle<Result<Lease, AcquireError>> {
        let (s, model) = (s.clone(), model.to_string());
        tokio::spawn(async move { s.acquire(&model, 0).await })
    }

    /// Starts `model` through a request and returns that request's lease.
    async fn lease(s: &Scheduler, fake: &Fake, model: &str) -> Lease {
        let before = fake.starts_of(model);
        let waiting = acquire(s, model);
        until("the start", || fake.starts_of(model) > before).await;
        fake.ready(model);
        waiting.await.unwrap().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_model_is_drained_before_a_swap_and_the_other_starts_after() {
        // Grouping off: the busy model is drained for the other at once.
        let (s, fake) = start(&format!(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"0s\"\n{TWO_MODELS}"
        ));
        let a = lease(&s, &fake, "a").await;
        let b = acquire(&s, "b");
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
        assert!(!fake.stop_asked("a"), "a busy model is not stopped");
        assert_eq!(fake.started(), ["a"]);
        drop(a);
        until("a stop of a", || fake.stop_asked("a")).await;
        assert!(fake.stop_asked("a"), "the last lease ends the drain");
        fake.exit("a", ExitReason::Stopped);
        until("2 starts", || fake.started().len() >= 2).await;
        assert_eq!(fake.started(), ["a", "b"], "b starts once a is gone");
        fake.ready("b");
        assert_eq!(b.await.unwrap().unwrap().model(), "b");
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_model_restarts_with_its_new_command_once_idle() {
        let (s, fake) = start(TWO_MODELS);
        let a = lease(&s, &fake, "a").await;
        s.reconfigure(&config(
            &TWO_MODELS.replace("\"a\", \"{port}\"", "\"a2\", \"{port}\""),
        ))
        .await;
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
        assert!(!fake.stop_asked("a"), "busy: waits for its request");
        drop(a);
        until("a stop of a", || fake.stop_asked("a")).await;
        assert!(fake.stop_asked("a"));
        fake.exit("a", ExitReason::Stopped);
        assert_eq!(state_of(&s, "a").await, ModelState::Stopped);
        let again = acquire(&s, "a");
        until("2 starts", || fake.started().len() >= 2).await;
        assert_eq!(fake.started(), ["a", "a"]);
        assert_eq!(fake.with_last("a", |c| c.spec.argv[0].clone()), "a2");
        fake.ready("a");
        assert!(again.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_crashes_back_off_and_the_backoff_runs_out() {
        let (s, fake) = start(TWO_MODELS);
        drop(lease(&s, &fake, "a").await);
        fake.exit("a", ExitReason::Crashed("signal 9".into()));
        assert_eq!(state_of(&s, "a").await, ModelState::Failed);
        // The first retry is immediate.
        drop(lease(&s, &fake, "a").await);
        fake.exit("a", ExitReason::Crashed("signal 9".into()));
        assert_eq!(state_of(&s, "a").await, ModelState::Failed);
        match s.acquire("a", 0).await {
            Err(AcquireError::BackingOff { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(1))
            }
            other => panic!("expected a backoff, got {other:?}"),
        }
        assert_eq!(fake.started().len(), 2, "no start while backing off");
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(lease(&s, &fake, "a").await);
        assert_eq!(fake.started().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_racing_the_ttl_stop_waits_for_a_fresh_start() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"10s\"\n[models.b]"));
        drop(lease(&s, &fake, "a").await);
        // A use inside the TTL moves the deadline.
        tokio::time::advance(Duration::from_secs(9)).await;
        drop(s.acquire("a", 0).await.unwrap());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
        assert!(fake.stop_asked("a"));
        let late = acquire(&s, "a");
        settle().await;
        assert!(!late.is_finished(), "waits for the restart, is not failed");
        fake.exit("a", ExitReason::Stopped);
        until("2 starts", || fake.started().len() >= 2).await;
        assert_eq!(fake.started(), ["a", "a"]);
        fake.ready("a");
        assert!(late.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_client_left_starts_and_evicts_nothing() {
        let (s, fake) = start(&format!("[scheduler]\nmax_loaded = 1\n{TWO_MODELS}"));
        let a = acquire(&s, "a");
        settle().await;
        // b must wait: a is still starting and takes the only place.
        let b = acquire(&s, "b");
        assert_eq!(state_of(&s, "b").await, ModelState::Starting);
        b.abort();
        settle().await;
        fake.ready("a");
        let a = a.await.unwrap().unwrap();
        assert_eq!(state_of(&s, "b").await, ModelState::Stopped);
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        assert!(
            !fake.stop_asked("a"),
            "a is not evicted for a request that left"
        );
        assert_eq!(fake.started(), ["a"], "b never starts");
        let status = s.status().await;
        assert!(status.iter().all(|m| m.waiting == 0), "{status:?}");
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn lifecycle_and_state_changes_go_out_on_the_bus() {
        let fake = Arc::new(Fake::default());
        let bus = Bus::detached();
        let mut models = bus.subscribe(crate::events::Topic::Models);
        let s = Scheduler::with_spawner(&config(TWO_MODELS), bus, fake.clone());
        drop(lease(&s, &fake, "a").await);
        let mut seen = Vec::new();
        while let Ok(e) = models.try_recv() {
            match e {
                Event::State { model, state } if &*model == "a" => {
                    seen.push(state.as_str().to_string())
                }
                Event::Model(m) if m.model == "a" => seen.push(m.event.as_str().to_string()),
                _ => {}
            }
        }
        assert_eq!(
            seen,
            ["stopped", "start_requested", "starting", "ready", "ready"],
            "{seen:?}"
        );
    }

    const PINNED_A: &str = "[scheduler]\nmax_loaded = 1\n[models.a]\ncmd = [\"a\", \"{port}\"]\npin = true\n[models.b]\ncmd = [\"b\", \"{port}\"]\n";

    #[tokio::test(start_paused = true)]
    async fn a_pinned_model_is_not_evicted_and_the_other_start_fails_at_once() {
        let (s, fake) = start(PINNED_A);
        drop(lease(&s, &fake, "a").await);
        tokio::time::advance(Duration::from_secs(60)).await;
        let b = tokio::time::timeout(Duration::from_secs(1), s.acquire("b", 0))
            .await
            .expect("fails at once, does not wait");
        match b {
            Err(e @ AcquireError::Pinned { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("pinned model a") && text.contains("max_loaded = 1"),
                    "{text}"
                );
            }
            other => panic!("expected Pinned, got {other:?}"),
        }
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        assert_eq!(state_of(&s, "b").await, ModelState::Stopped);
        assert!(!fake.stop_asked("a"));
        assert_eq!(fake.started(), ["a"]);
        let status = s.status().await;
        assert!(
            status.iter().any(|m| m.name == "a" && m.pinned),
            "{status:?}"
        );
        assert!(
            status.iter().any(|m| m.name == "b" && !m.pinned),
            "{status:?}"
        );
        // An admin stop still stops it; then b may start.
        assert_eq!(s.stop("a").await, Some(true));
        until("a stop of a", || fake.stop_asked("a")).await;
        assert!(fake.stop_asked("a"));
        fake.exit("a", ExitReason::Stopped);
        drop(lease(&s, &fake, "b").await);
        assert_eq!(fake.started(), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pinned_group_member_blocks_its_group_at_once() {
        let (s, fake) = start(
            "[models.a]\ncmd = [\"a\", \"{port}\"]\ngroup = \"g\"\npin = true\n\
             [models.b]\ncmd = [\"b\", \"{port}\"]\ngroup = \"g\"\n",
        );
        drop(lease(&s, &fake, "a").await);
        match s.acquire("b", 0).await {
            Err(AcquireError::Pinned { pinned, why, .. }) => {
                assert_eq!(
                    (pinned, why.to_string().as_str()),
                    (vec!["a".to_string()], "group g")
                )
            }
            other => panic!("expected Pinned, got {other:?}"),
        }
        assert_eq!(fake.started(), ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unpinned_model_is_evicted_instead_of_an_older_pinned_one() {
        let (s, fake) = start(
            "[scheduler]\nmax_loaded = 2\nmax_wait_before_swap = \"0s\"\n[models.a]\ncmd = [\"a\", \"{port}\"]\npin = true\n\
             [models.b]\ncmd = [\"b\", \"{port}\"]\n[models.c]\ncmd = [\"c\", \"{port}\"]\n",
        );
        drop(lease(&s, &fake, "a").await);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(lease(&s, &fake, "b").await);
        let c = acquire(&s, "c");
        until("a stop of b", || fake.stop_asked("b")).await;
        assert!(fake.stop_asked("b"), "b goes, though a was used longer ago");
        assert!(!fake.stop_asked("a"));
        fake.exit("b", ExitReason::Stopped);
        settle().await;
        fake.ready("c");
        assert!(c.await.unwrap().is_ok());
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_zero_unloads_once_idle_and_not_while_busy() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"1h\"\n[models.b]"));
        let held = lease(&s, &fake, "a").await;
        assert!(s.set_keep_alive("a", KeepAlive::For(Duration::ZERO)).await);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready, "busy");
        assert!(!fake.stop_asked("a"));
        let status = s.status().await;
        assert_eq!(status[0].ttl_s, Some(0.0), "{status:?}");
        // A second request in and out while the first is held: not idle yet.
        drop(s.acquire("a", 0).await.unwrap());
        settle().await;
        assert!(!fake.stop_asked("a"), "one lease is still out");
        drop(held);
        // No time passes: the last lease itself ends it.
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
        assert!(fake.stop_asked("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_never_keeps_a_model_past_its_ttl() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"10s\"\n[models.b]"));
        drop(lease(&s, &fake, "a").await);
        assert!(s.set_keep_alive("a", KeepAlive::Never).await);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        assert_eq!(s.status().await[0].ttl_s, None);
        assert!(
            !s.set_keep_alive("nope", KeepAlive::Never).await,
            "unknown model"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_for_counts_from_the_last_use() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"1h\"\n[models.b]"));
        drop(lease(&s, &fake, "a").await);
        assert!(
            s.set_keep_alive("a", KeepAlive::For(Duration::from_secs(30)))
                .await
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        drop(s.acquire("a", 0).await.unwrap());
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Ready,
            "45 s in, 25 s idle"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_that_already_ran_out_stops_an_idle_model_now() {
        let (s, fake) = start(&TWO_MODELS.replace("[models.b]", "ttl = \"1h\"\n[models.b]"));
        drop(lease(&s, &fake, "a").await);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(
            s.set_keep_alive("a", KeepAlive::For(Duration::from_secs(10)))
                .await
        );
        // Asked right after the call, with no time passing.
        let a = s
            .status()
            .await
            .into_iter()
            .find(|m| m.name == "a")
            .unwrap();
        assert_eq!(a.state, ModelState::Stopping);
        assert!(fake.stop_asked("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_outlives_a_restart_until_a_reload_changes_the_ttl() {
        let text = TWO_MODELS.replace("[models.b]", "ttl = \"1h\"\n[models.b]");
        let (s, fake) = start(&text);
        // Set while stopped; applies to the child started later.
        assert!(s.set_keep_alive("a", KeepAlive::For(Duration::ZERO)).await);
        for _ in 0..2 {
            drop(lease(&s, &fake, "a").await);
            assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
            fake.exit("a", ExitReason::Stopped);
            assert_eq!(state_of(&s, "a").await, ModelState::Stopped);
        }
        // A reload that leaves the ttl alone keeps the override…
        s.reconfigure(&config(&text)).await;
        assert_eq!(s.status().await[0].ttl_s, Some(0.0));
        // …one that changes it ends it.
        s.reconfigure(&config(&text.replace("\"1h\"", "\"2h\"")))
            .await;
        assert_eq!(s.status().await[0].ttl_s, Some(7200.0));
        drop(lease(&s, &fake, "a").await);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn preload_starts_a_model_with_no_request_and_a_failure_shows_as_failed() {
        let text = "[models.a]\ncmd = [\"a\", \"{port}\"]\npreload = true\n\
                    [models.b]\ncmd = [\"b\", \"{port}\"]\n[models.c]\ncmd = [\"c\", \"{port}\"]\n";
        let (s, fake) = start(&format!("[scheduler]\nmax_loaded = 3\n{text}"));
        settle().await;
        assert!(fake.started().is_empty(), "nothing before the daemon asks");
        s.preload();
        assert_eq!(state_of(&s, "a").await, ModelState::Starting);
        assert_eq!(fake.started(), ["a"], "only the model with preload = true");
        tokio::time::advance(Duration::from_secs(30)).await;
        fake.ready("a");
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        let a = s
            .status()
            .await
            .into_iter()
            .find(|m| m.name == "a")
            .unwrap();
        assert_eq!((a.inflight, a.waiting), (0, 0));
        // A reload that turns preload on for b (and adds d with it) starts them.
        let reloaded = format!(
            "[scheduler]\nmax_loaded = 3\n{}[models.d]\ncmd = [\"d\", \"{{port}}\"]\npreload = true\n",
            text.replace("[models.c]", "preload = true\n[models.c]")
        );
        s.reconfigure(&config(&reloaded)).await;
        settle().await;
        let mut started = fake.started();
        started.sort();
        assert_eq!(started, ["a", "b", "d"]);
        fake.with_last("b", |c| {
            let _ = c.events.send(ChildEvent::StartFailed {
                model: c.spec.model.clone(),
                instance: c.spec.instance,
                reason: crate::supervisor::StartFailure::Exited {
                    status: "exit status: 1".into(),
                },
                pid: None,
            });
        });
        assert_eq!(state_of(&s, "b").await, ModelState::Failed);
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Ready,
            "others unaffected"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn load_waits_for_ready_holds_no_lease_and_is_instant_when_ready() {
        let (s, fake) = start(TWO_MODELS);
        let loading = {
            let s = s.clone();
            tokio::spawn(async move { s.load("a").await })
        };
        settle().await;
        tokio::time::advance(Duration::from_millis(1500)).await;
        fake.ready("a");
        let took = loading.await.unwrap().unwrap();
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        let a = s
            .status()
            .await
            .into_iter()
            .find(|m| m.name == "a")
            .unwrap();
        assert_eq!((a.state, a.inflight), (ModelState::Ready, 0));
        assert_eq!(s.load("a").await.unwrap(), Duration::ZERO);
        assert!(matches!(s.load("zz").await, Err(AcquireError::Unknown(_))));
        assert_eq!(fake.started(), ["a"]);
    }

    fn ready_after(fake: &Fake, model: &str, took: Duration) {
        fake.with_last(model, |c| {
            let _ = c.events.send(ChildEvent::Ready {
                model: c.spec.model.clone(),
                instance: c.spec.instance,
                addr: ChildAddr::Unix("/run/test/model-1.sock".into()),
                pid: 4242,
                load_time: took,
            });
        });
    }

    async fn status_of(s: &Scheduler, model: &str) -> ModelStatus {
        s.status()
            .await
            .into_iter()
            .find(|m| m.name == model)
            .unwrap()
    }

    fn progress_events(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<LoadProgress> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            if let Event::Progress(p) = e {
                out.push((*p).clone());
            }
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn progress_counts_from_the_spawn_and_expects_the_median_of_past_loads() {
        let fake = Arc::new(Fake::default());
        let bus = Bus::detached();
        let mut models = bus.subscribe(crate::events::Topic::Models);
        let s = Scheduler::with_spawner(&config(TWO_MODELS), bus, fake.clone());
        let first = acquire(&s, "a");
        settle().await;
        for _ in 0..4 {
            tokio::time::advance(Duration::from_millis(250)).await;
            settle().await;
        }
        let a = status_of(&s, "a").await;
        let p = a.progress.expect("starting shows progress");
        assert_eq!(
            (p.elapsed_ms, p.expected_ms, p.fraction),
            (1000, None, None)
        );
        assert_eq!(a.load_ms, None);
        let seen = progress_events(&mut models);
        assert_eq!(seen.len(), 4, "one every 250 ms: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0].elapsed_ms < w[1].elapsed_ms));
        ready_after(&fake, "a", Duration::from_millis(1000));
        drop(first.await.unwrap().unwrap());
        let a = status_of(&s, "a").await;
        assert_eq!((a.progress, a.load_ms), (None, Some(1000)));
        let at_ready = progress_events(&mut models);
        assert_eq!(at_ready.last().and_then(|p| p.fraction), Some(1.0));
        assert_eq!(at_ready.last().map(|p| p.elapsed_ms), Some(1000));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(progress_events(&mut models).is_empty(), "none once ready");

        // The next start expects what the first took.
        assert_eq!(s.stop("a").await, Some(true));
        fake.exit("a", ExitReason::Stopped);
        let second = acquire(&s, "a");
        settle().await;
        tokio::time::advance(Duration::from_millis(500)).await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!((p.elapsed_ms, p.expected_ms), (500, Some(1000)));
        assert_eq!(p.fraction, Some(0.5));
        tokio::time::advance(Duration::from_millis(1500)).await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!(p.fraction, Some(0.99), "capped while still starting");
        // The child's own figure wins over the estimate.
        fake.with_last("a", |c| {
            let _ = c.events.send(ChildEvent::Progress {
                model: c.spec.model.clone(),
                instance: c.spec.instance,
                fraction: 0.25,
            });
        });
        // Child events and requests are separate channels: let it land.
        settle().await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!(p.fraction, Some(0.25));
        ready_after(&fake, "a", Duration::from_millis(3000));
        drop(second.await.unwrap().unwrap());
        // Median of 1000 and 3000.
        assert_eq!(status_of(&s, "a").await.load_ms, Some(3000));
        assert_eq!(s.stop("a").await, Some(true));
        fake.exit("a", ExitReason::Stopped);
        let third = acquire(&s, "a");
        settle().await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!(p.expected_ms, Some(2000));
        third.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn seeded_load_times_set_the_expectation_until_the_model_loads_itself() {
        let (s, fake) = start(TWO_MODELS);
        let ms = Duration::from_millis;
        s.seed_load_times(HashMap::from([
            (
                "a".to_string(),
                vec![
                    ms(9000),
                    ms(9000),
                    ms(100),
                    ms(200),
                    ms(300),
                    ms(400),
                    ms(500),
                ],
            ),
            ("gone".to_string(), vec![ms(1)]),
        ]));
        let a = status_of(&s, "a").await;
        assert_eq!(a.load_ms, Some(500), "the newest seeded");
        let waiting = acquire(&s, "a");
        settle().await;
        let p = status_of(&s, "a").await.progress.unwrap();
        assert_eq!(p.expected_ms, Some(300), "median of the last five");
        assert_eq!(status_of(&s, "b").await.load_ms, None);
        ready_after(&fake, "a", ms(50));
        drop(waiting.await.unwrap().unwrap());
        // A later seed does not replace what this run has measured.
        s.seed_load_times(HashMap::from([("a".to_string(), vec![ms(7)])]));
        assert_eq!(status_of(&s, "a").await.load_ms, Some(50));
    }

    fn acquire_with(
        s: &Scheduler,
        model: &str,
        priority: i32,
    ) -> tokio::task::JoinHandle<Result<Lease, AcquireError>> {
        let (s, model) = (s.clone(), model.to_string());
        tokio::spawn(async move { s.acquire(&model, priority).await })
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_in_use_is_not_swapped_out_until_the_fairness_bound() {
        let (s, fake) = start(&format!(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"5s\"\n{TWO_MODELS}"
        ));
        let a = lease(&s, &fake, "a").await;
        let b = acquire(&s, "b");
        settle().await;
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Ready,
            "a keeps serving"
        );
        // More requests for the loaded model go straight in meanwhile.
        let again = s.acquire("a", 0).await.unwrap();
        drop(a);
        tokio::time::advance(Duration::from_millis(4800)).await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Stopping,
            "b's request has waited 5 s: a drains for it"
        );
        drop(again);
        settle().await;
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        fake.ready("b");
        assert_eq!(b.await.unwrap().unwrap().model(), "b");
        assert_eq!(fake.started(), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_model_is_swapped_at_once_and_a_busy_one_once_it_goes_idle() {
        let (s, fake) = start(&format!(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"5s\"\n{TWO_MODELS}"
        ));
        // A lone client alternating models waits for no bound.
        drop(lease(&s, &fake, "a").await);
        let b = acquire(&s, "b");
        until("a stop of a", || fake.stop_asked("a")).await;
        assert!(fake.stop_asked("a"), "an idle model does not hold b back");
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        fake.ready("b");
        let b = b.await.unwrap().unwrap();
        // Busy: held; idle before the bound: it goes at the next look.
        let _a = acquire(&s, "a");
        tokio::time::advance(Duration::from_millis(1000)).await;
        settle().await;
        assert!(!fake.stop_asked("b"));
        drop(b);
        until("a stop of b", || fake.stop_asked("b")).await;
        assert!(fake.stop_asked("b"), "once idle, b goes before the bound");
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_priority_request_swaps_a_busy_model_at_once_and_goes_first() {
        let (s, fake) = start(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"60s\"\n\
             [models.a]\ncmd = [\"a\", \"{port}\"]\n[models.b]\ncmd = [\"b\", \"{port}\"]\n\
             [models.c]\ncmd = [\"c\", \"{port}\"]\n",
        );
        let a = lease(&s, &fake, "a").await;
        let _b = acquire_with(&s, "b", 0);
        settle().await;
        assert_eq!(state_of(&s, "a").await, ModelState::Ready);
        let c = acquire_with(&s, "c", 10);
        assert_eq!(
            state_of(&s, "a").await,
            ModelState::Stopping,
            "priority 10 outranks a"
        );
        let status = s.status().await;
        let c_status = status.iter().find(|m| m.name == "c").unwrap();
        assert_eq!(c_status.waiting_priority, Some(10));
        drop(a);
        settle().await;
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        assert_eq!(
            fake.started(),
            ["a", "c"],
            "c, waiting later, starts before b"
        );
        fake.ready("c");
        assert!(c.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_priority_counts_for_its_requests() {
        let (s, fake) = start(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"60s\"\n\
             [models.a]\ncmd = [\"a\", \"{port}\"]\n\
             [models.urgent]\ncmd = [\"u\", \"{port}\"]\npriority = 5\n",
        );
        let _a = lease(&s, &fake, "a").await;
        let _u = acquire(&s, "urgent");
        assert_eq!(state_of(&s, "a").await, ModelState::Stopping);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_client_left_leaves_the_queue_at_once() {
        let (s, fake) = start(&format!(
            "[scheduler]\nmax_loaded = 1\nmax_wait_before_swap = \"60s\"\n{TWO_MODELS}"
        ));
        let _a = lease(&s, &fake, "a").await;
        let b = acquire(&s, "b");
        settle().await;
        assert_eq!(status_of(&s, "b").await.waiting, 1);
        b.abort();
        settle().await;
        let st = status_of(&s, "b").await;
        assert_eq!((st.waiting, st.state), (0, ModelState::Stopped));
        tokio::time::advance(Duration::from_secs(61)).await;
        settle().await;
        assert!(
            !fake.stop_asked("a"),
            "the bound of a gone waiter evicts nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_max_queue_a_request_is_refused_with_retry_after_and_no_start() {
        let (s, fake) = start(&format!("[scheduler]\nmax_queue = 2\n{TWO_MODELS}"));
        let w1 = acquire(&s, "a");
        let w2 = acquire(&s, "a");
        settle().await;
        match s.acquire("b", 0).await {
            Err(AcquireError::QueueFull {
                waiting,
                retry_after,
            }) => {
                assert_eq!(waiting, 2);
                assert!(retry_after >= Duration::from_secs(1));
            }
            other => panic!("expected QueueFull, got {other:?}"),
        }
        assert_eq!(fake.started(), ["a"], "the refused request started nothing");
        // A waiter whose client left makes room.
        w2.abort();
        settle().await;
        let w3 = acquire(&s, "a");
        settle().await;
        fake.ready("a");
        assert!(w1.await.unwrap().is_ok());
        assert!(w3.await.unwrap().is_ok());
    }

    fn reading(gpus: &[(u32, u64, u64)], procs: &[(u32, u32, u64)]) -> Option<Arc<Snapshot>> {
        const MB: u64 = 1 << 20;
        Some(Arc::new(Snapshot {
            taken_at_ms: 0,
            gpus: gpus
                .iter()
                .map(|&(index, total, used)| crate::gpu::GpuReading {
                    index,
                    name: "fake".into(),
                    total_bytes: total * MB,
                    used_bytes: used * MB,
                    free_bytes: (total - used) * MB,
                    utilization: Some(0.5),
                    temperature_c: None,
                    power_watts: None,
                })
                .collect(),
            processes: procs
                .iter()
                .map(|&(pid, gpu, used)| crate::gpu::ProcessReading {
                    pid,
                    gpu,
                    used_bytes: used * MB,
                })
                .collect(),
        }))
    }

    type Readings = tokio::sync::watch::Sender<Option<Arc<Snapshot>>>;

    /// Asks for `model`, then sends `fresh` as the reading (taken after it
    /// began to wait) that it is placed by.
    async fn ask_placed(
        s: &Scheduler,
        tx: &Readings,
        model: &str,
        fresh: Option<Arc<Snapshot>>,
    ) -> tokio::task::JoinHandle<Result<Lease, AcquireError>> {
        let waiting = acquire(s, model);
        settle().await;
        tx.send_replace(fresh);
        settle().await;
        waiting
    }

    fn start_with_gpus(text: &str) -> (Scheduler, Arc<Fake>, Readings) {
        let fake = Arc::new(Fake::default());
        let (gpus, tx) = Gpus::manual();
        let s =
            Scheduler::with_spawner_and_gpus(&config(text), Bus::detached(), fake.clone(), gpus);
        (s, fake, tx)
    }

    /// Starts `a` (pid 101) on GPU 0 of `total_mib`, 500 MiB used by others,
    /// measures it at 6000 MiB and leaves it idle for a second.
    async fn a_resident_and_idle(s: &Scheduler, fake: &Fake, tx: &Readings, total_mib: u64) {
        let empty = [(0, total_mib, 500)];
        tx.send_replace(reading(&empty, &[]));
        settle().await;
        let a = ask_placed(s, tx, "a", reading(&empty, &[])).await;
        fake.ready_as("a", 101);
        drop(a.await.unwrap().unwrap());
        tx.send_replace(reading(&[(0, total_mib, 6500)], &[(101, 0, 6000)]));
        settle().await;
        tokio::time::advance(Duration::from_secs(1)).await;
    }

    impl Fake {
        fn ready_as(&self, model: &str, pid: u32) {
            self.with_last(model, |s| {
                let _ = s.events.send(ChildEvent::Ready {
                    model: s.spec.model.clone(),
                    instance: s.spec.instance,
                    addr: ChildAddr::Unix("/run/test/model-1.sock".into()),
                    pid,
                    load_time: Duration::from_millis(5),
                });
            });
        }

        fn env_of(&self, model: &str, key: &str) -> Option<String> {
            self.with_last(model, |s| {
                s.spec
                    .env
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            })
        }

        fn fail_start(&self, model: &str, reason: StartFailure) {
            self.with_last(model, |s| {
                let _ = s.events.send(ChildEvent::StartFailed {
                    model: s.spec.model.clone(),
                    instance: s.spec.instance,
                    reason,
                    pid: None,
                });
            });
        }
    }

    const GPU_MODELS: &str = "[scheduler]\nmax_loaded = 4\nvram_reserve_mb = 500\n\
         [models.a]\ncmd = [\"a\", \"{port}\"]\nvram_mb = 6000\n\
         [models.b]\ncmd = [\"b\", \"{port}\"]\nvram_mb = 6000\n\
         [models.big]\ncmd = [\"big\", \"{port}\"]\nvram_mb = 20000\n\
         [models.one]\ncmd = [\"one\", \"{port}\"]\nvram_mb = 1000\ngpus = [1]\n";

    #[tokio::test(start_paused = true)]
    async fn a_model_goes_on_a_gpu_it_fits_by_a_fresh_reading_with_cuda_visible_devices() {
        let (s, fake, tx) = start_with_gpus(GPU_MODELS);
        tx.send_replace(reading(&[(0, 8000, 4000), (1, 8000, 500)], &[]));
        settle().await;
        let a = acquire(&s, "a");
        settle().await;
        assert!(
            fake.started().is_empty(),
            "waits for a reading taken after it asked"
        );
        tx.send_replace(reading(&[(0, 8000, 4000), (1, 8000, 500)], &[]));
        until("a start", || !fake.started().is_empty()).await;
        assert_eq!(fake.started(), ["a"]);
        assert_eq!(
            fake.env_of("a", "CUDA_VISIBLE_DEVICES").as_deref(),
            Some("1")
        );
        assert_eq!(
            fake.env_of("a", "CUDA_DEVICE_ORDER").as_deref(),
            Some("PCI_BUS_ID")
        );
        fake.ready_as("a", 101);
        let lease = a.await.unwrap().unwrap();
        assert_eq!(lease.gpu(), Some(1));
        // The reading after the start is its measurement.
        tx.send_replace(reading(
            &[(0, 8000, 4000), (1, 8000, 5500)],
            &[(101, 1, 5000)],
        ));
        settle().await;
        let st = status_of(&s, "a").await;
        assert_eq!((st.gpu, st.vram_bytes), (Some(1), Some(5000 << 20)));
        assert_eq!(st.vram_need_source, Some(VramSource::Declared));
    }

    #[tokio::test(start_paused = true)]
    async fn short_of_memory_the_idle_least_recently_used_model_on_that_gpu_goes() {
        let (s, fake, tx) = start_with_gpus(GPU_MODELS);
        let gpus = [(0, 8000, 500)];
        a_resident_and_idle(&s, &fake, &tx, 8000).await;
        let b = ask_placed(&s, &tx, "b", reading(&[(0, 8000, 6500)], &[(101, 0, 6000)])).await;
        assert!(fake.stop_asked("a"), "a (idle) makes room for b");
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        // A reading taken as a went still lists it: not one to place by.
        tx.send_replace(reading(&[(0, 8000, 6500)], &[(101, 0, 6000)]));
        until("a start", || !fake.started().is_empty()).await;
        assert_eq!(fake.started(), ["a"], "nor a failure: b waits");
        assert_eq!(status_of(&s, "b").await.state, ModelState::Starting);
        tx.send_replace(reading(&gpus, &[]));
        until("2 starts", || fake.started().len() >= 2).await;
        assert_eq!(fake.started(), ["a", "b"]);
        fake.ready_as("b", 102);
        assert!(b.await.unwrap().is_ok());
        let st = status_of(&s, "a").await;
        assert_eq!(st.vram_need_source, Some(VramSource::Declared));
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_that_can_never_fit_fails_at_once_with_the_numbers() {
        let (s, fake, tx) = start_with_gpus(GPU_MODELS);
        tx.send_replace(reading(&[(0, 16000, 1000), (1, 8000, 500)], &[]));
        settle().await;
        let big = ask_placed(
            &s,
            &tx,
            "big",
            reading(&[(0, 16000, 1000), (1, 8000, 500)], &[]),
        )
        .await;
        match big.await.unwrap() {
            Err(AcquireError::NoRoom { model, detail }) => {
                assert_eq!(model, "big");
                assert!(detail.contains("needs 20000 MiB"), "{detail}");
                assert!(detail.contains("GPU 0: 16000 MiB total"), "{detail}");
                assert!(detail.contains("other processes 1000 MiB"), "{detail}");
            }
            other => panic!("expected NoRoom, got {other:?}"),
        }
        assert!(fake.started().is_empty());
        // `gpus` that name no present GPU never fit either.
        tx.send_replace(reading(&[(0, 16000, 1000)], &[]));
        let one = ask_placed(&s, &tx, "one", reading(&[(0, 16000, 1000)], &[])).await;
        assert!(matches!(
            one.await.unwrap(),
            Err(AcquireError::NoRoom { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn measured_use_is_learned_and_replaces_the_estimate() {
        let (s, fake, tx) = start_with_gpus(
            "[models.m]\ncmd = [\"m\", \"{port}\"]\n[models.n]\ncmd = [\"n\", \"{port}\"]\n",
        );
        s.seed_vram(HashMap::from([("n".to_string(), vec![3 << 30, 2 << 30])]));
        let gpus = [(0, 8000, 500)];
        tx.send_replace(reading(&gpus, &[]));
        settle().await;
        assert_eq!(
            status_of(&s, "m").await.vram_need_bytes,
            None,
            "no estimate for a cmd model"
        );
        let n = status_of(&s, "n").await;
        assert_eq!(
            (n.vram_need_bytes, n.vram_need_source),
            (Some(3 << 30), Some(VramSource::Measured))
        );
        let m = ask_placed(&s, &tx, "m", reading(&gpus, &[])).await;
        fake.ready_as("m", 201);
        drop(m.await.unwrap().unwrap());
        tx.send_replace(reading(&[(0, 8000, 2548)], &[(201, 0, 2048)]));
        settle().await;
        let st = status_of(&s, "m").await;
        assert_eq!(st.vram_need_bytes, Some(2048 << 20));
        assert_eq!(st.gpu, Some(0), "learned from where it was measured");
        s.stop("m").await;
        fake.exit("m", ExitReason::Stopped);
        settle().await;
        let st = status_of(&s, "m").await;
        assert_eq!(
            (st.vram_need_bytes, st.vram_need_source),
            (Some(2048 << 20), Some(VramSource::Measured)),
            "the run's peak outlives the run"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_memory_while_starting_evicts_one_more_and_retries_once() {
        let (s, fake, tx) = start_with_gpus(GPU_MODELS);
        let gpus = [(0, 16000, 500)];
        a_resident_and_idle(&s, &fake, &tx, 16000).await;
        // b fits by the numbers, but runs out of memory while loading.
        let b = ask_placed(
            &s,
            &tx,
            "b",
            reading(&[(0, 16000, 6500)], &[(101, 0, 6000)]),
        )
        .await;
        assert_eq!(fake.started(), ["a", "b"]);
        let oom = || StartFailure::OutOfMemory {
            status: "exit status 1".into(),
        };
        fake.fail_start("b", oom());
        until("a stop of a", || fake.stop_asked("a")).await;
        assert!(fake.stop_asked("a"), "one more model is evicted");
        fake.exit("a", ExitReason::Stopped);
        settle().await;
        tx.send_replace(reading(&gpus, &[]));
        until("3 starts", || fake.started().len() >= 3).await;
        assert_eq!(fake.started(), ["a", "b", "b"], "and b tries once more");
        fake.fail_start("b", oom());
        match b.await.unwrap() {
            Err(AcquireError::StartFailed { reason, .. }) => assert_eq!(reason, oom()),
            other => panic!("a second out-of-memory fails the request, got {other:?}"),
        }
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(50), MAX_BACKOFF);
    }
}
