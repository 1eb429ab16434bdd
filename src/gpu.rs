//! NVIDIA GPU readings through NVML, sampled off the request path.
//!
//! [`Gpus::start`] loads NVML at run time (nvml-wrapper `dlopen`s it; the
//! binary links nothing of NVIDIA's). Where it does not load or sees no GPU
//! (no driver: the usual case) the handle reports absence for good, said in
//! one log line. Where it loads, one std thread owns the `Nvml` handle and
//! is the only caller of NVML (its calls block, some for milliseconds): it
//! samples every GPU each `sample_interval`, or at once when
//! [`Gpus::refresh`] nudges it, and publishes an immutable [`Snapshot`] in
//! a watch channel. Readers clone the latest `Arc` and never wait on NVML.
//!
//! The NVML symbols the calls here resolve, and all that
//! `tests/fake-nvml/fake_nvml.c` provides: `nvmlInit_v2`, `nvmlShutdown`,
//! `nvmlSystemGetDriverVersion`, `nvmlDeviceGetCount_v2`,
//! `nvmlDeviceGetHandleByIndex_v2`, `nvmlDeviceGetName`,
//! `nvmlDeviceGetMemoryInfo_v2` (drivers from R510), `nvmlDeviceGetUtilizationRates`,
//! `nvmlDeviceGetTemperature`, `nvmlDeviceGetPowerUsage`,
//! `nvmlDeviceGetComputeRunningProcesses_v3` and
//! `nvmlDeviceGetGraphicsRunningProcesses_v3`. A symbol the library lacks
//! fails only the reading that needs it (nvml-wrapper resolves each one
//! when called), except `nvmlShutdown`, which its `Drop` calls unchecked.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::Nvml;
use tokio::sync::watch;

use crate::config::{GpuConfig, NIXOS_NVML_LIBRARY};
use crate::procfs;

/// The name NVIDIA's driver installs the library under; the dynamic
/// loader finds it in its usual search path.
const NVML_SONAME: &str = "libnvidia-ml.so.1";

/// One GPU at one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    /// NVML's index (the order of `nvidia-smi`, and of CUDA's with
    /// `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub index: u32,
    pub name: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Share of the last sample period a kernel ran, 0 to 1; `None` where
    /// the GPU does not say.
    pub utilization: Option<f64>,
    pub temperature_c: Option<u32>,
    pub power_watts: Option<f64>,
}

/// GPU memory one process holds on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessReading {
    pub pid: u32,
    /// The GPU's index.
    pub gpu: u32,
    pub used_bytes: u64,
}

/// Every GPU and every process on them, at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Unix time in milliseconds.
    pub taken_at_ms: i64,
    /// By index. A GPU whose memory could not be read is left out.
    pub gpus: Vec<GpuReading>,
    /// Processes with a compute or graphics context, one entry per (pid,
    /// GPU).
    pub processes: Vec<ProcessReading>,
}

/// How far up the process tree [`Snapshot::tree_usage`] looks: deeper than
/// any launcher nests a model, and a bound should /proc change under the
/// walk.
const MAX_ANCESTRY: usize = 64;

impl Snapshot {
    pub fn gpu(&self, index: u32) -> Option<&GpuReading> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// GPU memory held by `pid` and its descendants, per GPU index (sorted,
    /// GPUs it holds nothing on left out). Parents come from /proc now.
    pub fn tree_usage(&self, pid: u32) -> Vec<(u32, u64)> {
        self.tree_usage_with(pid, procfs::parent_of)
    }

    /// [`Snapshot::tree_usage`] with parents from `parent_of` (pid → ppid,
    /// `None` for a process that is gone).
    pub fn tree_usage_with(
        &self,
        pid: u32,
        parent_of: impl Fn(u32) -> Option<u32>,
    ) -> Vec<(u32, u64)> {
        let mut per_gpu: BTreeMap<u32, u64> = BTreeMap::new();
        for p in &self.processes {
            if descends_from(p.pid, pid, &parent_of) {
                let sum = per_gpu.entry(p.gpu).or_default();
                *sum = sum.saturating_add(p.used_bytes);
            }
        }
        per_gpu.into_iter().collect()
    }
}

/// Whether `pid` is `root` or below it. The walk goes up from the GPU
/// process, which is cheaper than finding every descendant of `root`: a
/// few GPU processes, each a few levels deep.
fn descends_from(pid: u32, root: u32, parent_of: &impl Fn(u32) -> Option<u32>) -> bool {
    let mut current = pid;
    for _ in 0..MAX_ANCESTRY {
        if current == root {
            return true;
        }
        match parent_of(current) {
            Some(parent) if parent != 0 && parent != current => current = parent,
            _ => return false,
        }
    }
    false
}

/// A cheap handle to the GPU readings; clones share one sampler.
#[derive(Clone)]
pub struct Gpus {
    shared: Arc<Shared>,
}

struct Shared {
    /// The latest snapshot, written only by the sampler thread (or, for
    /// [`Gpus::manual`], its caller); `None` before the first sample.
    latest: watch::Receiver<Option<Arc<Snapshot>>>,
    /// Wakes the sampler early; `None` without one. When the last handle
    /// goes, the sampler sees it disconnected and ends.
    nudge: Option<SyncSender<()>>,
    present: bool,
    /// Holds the channel open where no sampler does, so a subscriber waits
    /// for good instead of seeing it closed.
    _publisher: Option<watch::Sender<Option<Arc<Snapshot>>>>,
}

impl Gpus {
    /// Loads NVML and starts sampling, or says once why there are no GPU
    /// readings and returns an absent handle. Blocks for NVML's
    /// initialization (the first sample is the sampler's).
    pub fn start(config: &GpuConfig) -> Gpus {
        if !config.enabled {
            tracing::info!("no NVIDIA GPU readings: gpu.enabled = false");
            return Gpus::absent();
        }
        let (nvml, library) = match load(config) {
            Ok(loaded) => loaded,
            Err(reason) => {
                tracing::info!("no NVIDIA GPU readings: NVML did not load ({reason})");
                return Gpus::absent();
            }
        };
        let driver = nvml
            .sys_driver_version()
            .unwrap_or_else(|_| "unknown".into());
        let count = match nvml.device_count() {
            Ok(0) => {
                tracing::info!(library, driver, "no NVIDIA GPU readings: NVML sees no GPU");
                return Gpus::absent();
            }
            Ok(n) => n,
            Err(e) => {
                tracing::info!(
                    library,
                    driver,
                    "no NVIDIA GPU readings: NVML cannot count the GPUs ({e})"
                );
                return Gpus::absent();
            }
        };
        let mut names = Vec::new();
        let mut described = Vec::new();
        for index in 0..count {
            let device = nvml.device_by_index(index);
            let name = device
                .as_ref()
                .ok()
                .and_then(|d| d.name().ok())
                .unwrap_or_else(|| format!("GPU {index}"));
            let total = device
                .as_ref()
                .ok()
                .and_then(|d| d.memory_info().ok())
                .map_or_else(
                    || "memory unknown".to_string(),
                    |m| format!("{} MiB", m.total / (1024 * 1024)),
                );
            described.push(format!("{index}: {name} ({total})"));
            names.push(name);
        }
        let (publisher, latest) = watch::channel(None);
        let (nudge, nudges) = mpsc::sync_channel(1);
        let interval = config.sample_interval;
        // Said before the sampler can log about a reading.
        tracing::info!(
            library,
            driver,
            sample_interval = %humantime::format_duration(interval),
            "NVIDIA GPU readings from NVML: {}",
            described.join(", ")
        );
        let spawned = std::thread::Builder::new()
            .name("claracore-gpu".into())
            .spawn(move || sample_until_unused(&nvml, &names, interval, &publisher, &nudges));
        if let Err(e) = spawned {
            tracing::warn!(
                "no NVIDIA GPU readings after all: cannot start the sampling thread ({e})"
            );
            return Gpus::absent();
        }
        Gpus {
            shared: Arc::new(Shared {
                latest,
                nudge: Some(nudge),
                present: true,
                _publisher: None,
            }),
        }
    }

    /// No GPU readings, ever (`gpu.enabled = false`, and tests).
    pub fn absent() -> Gpus {
        let (publisher, latest) = watch::channel(None);
        Gpus {
            shared: Arc::new(Shared {
                latest,
                nudge: None,
                present: false,
                _publisher: Some(publisher),
            }),
        }
    }

    /// A present handle whose snapshots the caller publishes through the
    /// returned sender, for tests of what reads them (the planner).
    /// [`Gpus::refresh`] does nothing on it.
    pub fn manual() -> (Gpus, watch::Sender<Option<Arc<Snapshot>>>) {
        let (publisher, latest) = watch::channel(None);
        let gpus = Gpus {
            shared: Arc::new(Shared {
                latest,
                nudge: None,
                present: true,
                _publisher: None,
            }),
        };
        (gpus, publisher)
    }

    /// The latest snapshot; `None` without NVML or before the first
    /// sample. An `Arc` clone under the channel's read lock, which the
    /// sampler takes only to swap in a new `Arc`.
    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.shared.latest.borrow().clone()
    }

    /// A receiver that sees each new snapshot (`changed()`), starting from
    /// what is published now. Without NVML nothing is ever published and
    /// `changed()` never resolves.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.shared.latest.clone()
    }

    /// Asks for a sample now rather than at the next tick; never blocks.
    /// Nudges while one is pending add nothing.
    pub fn refresh(&self) {
        if let Some(nudge) = &self.shared.nudge {
            let _ = nudge.try_send(());
        }
    }

    /// Whether NVML loaded and sees at least one GPU.
    pub fn present(&self) -> bool {
        self.shared.present
    }
}

/// `gpu.nvml_library`, or the driver's soname and then NixOS's driver
/// directory; the library that loaded, or why none did.
fn load(config: &GpuConfig) -> Result<(Nvml, String), String> {
    let candidates: Vec<OsString> = match &config.nvml_library {
        Some(path) => vec![path.clone().into_os_string()],
        None => vec![NVML_SONAME.into(), NIXOS_NVML_LIBRARY.into()],
    };
    let mut failures = Vec::new();
    for library in &candidates {
        match Nvml::builder().lib_path(library).init() {
            Ok(nvml) => return Ok((nvml, library.to_string_lossy().into_owned())),
            Err(e) => failures.push(format!("{}: {e}", library.to_string_lossy())),
        }
    }
    Err(failures.join("; "))
}

/// The sampler thread's loop: a sample, then a wait for the interval or a
/// nudge; it ends when every [`Gpus`] handle is gone.
fn sample_until_unused(
    nvml: &Nvml,
    names: &[String],
    interval: Duration,
    publisher: &watch::Sender<Option<Arc<Snapshot>>>,
    nudges: &mpsc::Receiver<()>,
) {
    let mut failing = Failing::default();
    loop {
        let snapshot = sample(nvml, names, &mut failing);
        publisher.send_replace(Some(Arc::new(snapshot)));
        match nudges.recv_timeout(interval) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
}

/// Readings that failed at their last try, so each failure is logged
/// once, not every sample; a reading that works again is forgotten.
#[derive(Default)]
struct Failing(HashSet<(u32, &'static str)>);

impl Failing {
    /// The value, or `None` with a debug line the first time this reading
    /// of this GPU fails (NotSupported is common: power on small boards).
    fn ok<T>(&mut self, gpu: u32, what: &'static str, result: Result<T, NvmlError>) -> Option<T> {
        match result {
            Ok(v) => {
                self.0.remove(&(gpu, what));
                Some(v)
            }
            Err(e) => {
                if self.0.insert((gpu, what)) {
                    tracing::debug!(gpu, "NVML: no {what} reading: {e}");
                }
                None
            }
        }
    }

    /// Like [`Failing::ok`] for the readings without which a GPU is left
    /// out of the snapshot: a warning.
    fn required<T>(
        &mut self,
        gpu: u32,
        what: &'static str,
        result: Result<T, NvmlError>,
    ) -> Option<T> {
        match result {
            Ok(v) => {
                if self.0.remove(&(gpu, what)) {
                    tracing::info!(gpu, "NVML: {what} readable again");
                }
                Some(v)
            }
            Err(e) => {
                if self.0.insert((gpu, what)) {
                    tracing::warn!(
                        gpu,
                        "NVML: no {what} reading, GPU left out of the readings: {e}"
                    );
                }
                None
            }
        }
    }
}

/// One snapshot of every GPU. A failing query costs only its own field
/// (or, for the device handle and memory, that GPU's entry).
fn sample(nvml: &Nvml, names: &[String], failing: &mut Failing) -> Snapshot {
    let mut gpus = Vec::with_capacity(names.len());
    let mut processes: Vec<ProcessReading> = Vec::new();
    for (index, name) in (0u32..).zip(names) {
        let Some(device) = failing.required(index, "device", nvml.device_by_index(index)) else {
            continue;
        };
        let Some(memory) = failing.required(index, "memory", device.memory_info()) else {
            continue;
        };
        gpus.push(GpuReading {
            index,
            name: name.clone(),
            total_bytes: memory.total,
            used_bytes: memory.used,
            free_bytes: memory.free,
            utilization: failing
                .ok(index, "utilization", device.utilization_rates())
                .map(|u| f64::from(u.gpu.min(100)) / 100.0),
            temperature_c: failing.ok(
                index,
                "temperature",
                device.temperature(TemperatureSensor::Gpu),
            ),
            power_watts: failing
                .ok(index, "power", device.power_usage())
                .map(|milliwatts| f64::from(milliwatts) / 1000.0),
        });
        let lists = [
            failing.ok(
                index,
                "compute processes",
                device.running_compute_processes(),
            ),
            failing.ok(
                index,
                "graphics processes",
                device.running_graphics_processes(),
            ),
        ];
        for info in lists.into_iter().flatten().flatten() {
            add_process(&mut processes, index, &info);
        }
    }
    Snapshot {
        taken_at_ms: now_ms(),
        gpus,
        processes,
    }
}

/// Adds one NVML process entry; a process with both a compute and a
/// graphics context on a GPU is listed by both with the same memory.
fn add_process(processes: &mut Vec<ProcessReading>, gpu: u32, info: &ProcessInfo) {
    let used_bytes = match info.used_gpu_memory {
        UsedGpuMemory::Used(bytes) => bytes,
        UsedGpuMemory::Unavailable => 0,
    };
    match processes
        .iter_mut()
        .find(|p| p.pid == info.pid && p.gpu == gpu)
    {
        Some(known) => known.used_bytes = known.used_bytes.max(used_bytes),
        None => processes.push(ProcessReading {
            pid: info.pid,
            gpu,
            used_bytes,
        }),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn snapshot(processes: &[(u32, u32, u64)]) -> Snapshot {
        Snapshot {
            taken_at_ms: 1,
            gpus: vec![],
            processes: processes
                .iter()
                .map(|&(pid, gpu, used_bytes)| ProcessReading {
                    pid,
                    gpu,
                    used_bytes,
                })
                .collect(),
        }
    }

    #[test]
    fn tree_usage_sums_a_process_and_its_descendants_per_gpu() {
        // 1 ─ 10 (daemon) ─ 20 (model a) ─ 21 (its worker)
        //                 └ 30 (model b)
        //   └ 40 (someone else's)
        let parents: HashMap<u32, u32> = [(10, 1), (20, 10), (21, 20), (30, 10), (40, 1)].into();
        let parent_of = |pid| parents.get(&pid).copied();
        let s = snapshot(&[
            (20, 0, 100),
            (21, 1, 50),
            (21, 0, 7),
            (30, 1, 300),
            (40, 0, 1000),
        ]);
        assert_eq!(s.tree_usage_with(20, parent_of), [(0, 107), (1, 50)]);
        assert_eq!(s.tree_usage_with(21, parent_of), [(0, 7), (1, 50)]);
        assert_eq!(s.tree_usage_with(30, parent_of), [(1, 300)]);
        assert_eq!(s.tree_usage_with(10, parent_of), [(0, 107), (1, 350)]);
        assert_eq!(s.tree_usage_with(1, parent_of), [(0, 1107), (1, 350)]);
        assert!(s.tree_usage_with(99, parent_of).is_empty(), "unknown pid");
        assert!(snapshot(&[]).tree_usage_with(20, parent_of).is_empty());
    }

    #[test]
    fn tree_usage_stops_on_gone_processes_and_cycles() {
        // 21's parent is gone (None): not under 10 any more.
        let gone = |pid| match pid {
            20 => Some(10),
            _ => None,
        };
        let s = snapshot(&[(21, 0, 5), (20, 0, 1)]);
        assert_eq!(s.tree_usage_with(10, gone), [(0, 1)]);
        // A cycle from pids reused mid-walk ends at the depth bound.
        let cycle = |pid| Some(if pid == 5 { 6 } else { 5 });
        assert!(snapshot(&[(5, 0, 1)]).tree_usage_with(7, cycle).is_empty());
        // A process that is its own parent (pid 1's ppid is 0; be safe).
        let own = |pid| Some(pid);
        assert!(snapshot(&[(5, 0, 1)]).tree_usage_with(7, own).is_empty());
    }

    #[test]
    fn tree_usage_reads_parents_from_proc() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let s = snapshot(&[(child.id(), 2, 64)]);
        assert_eq!(s.tree_usage(std::process::id()), [(2, 64)]);
        assert_eq!(s.tree_usage(child.id()), [(2, 64)]);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn one_entry_per_process_and_gpu() {
        let mut list = Vec::new();
        let info = |pid, bytes| ProcessInfo {
            pid,
            used_gpu_memory: UsedGpuMemory::Used(bytes),
            gpu_instance_id: None,
            compute_instance_id: None,
        };
        add_process(&mut list, 0, &info(7, 10));
        add_process(&mut list, 0, &info(7, 12));
        add_process(&mut list, 1, &info(7, 3));
        add_process(
            &mut list,
            1,
            &ProcessInfo {
                used_gpu_memory: UsedGpuMemory::Unavailable,
                ..info(8, 0)
            },
        );
        let s = Snapshot {
            processes: list,
            ..Snapshot::default()
        };
        assert_eq!(
            s.processes,
            [
                ProcessReading {
                    pid: 7,
                    gpu: 0,
                    used_bytes: 12
                },
                ProcessReading {
                    pid: 7,
                    gpu: 1,
                    used_bytes: 3
                },
                ProcessReading {
                    pid: 8,
                    gpu: 1,
                    used_bytes: 0
                },
            ]
        );
    }

    #[test]
    fn absent_and_manual_handles() {
        let gpus = Gpus::absent();
        assert!(!gpus.present());
        assert!(gpus.latest().is_none());
        gpus.refresh();
        let rx = gpus.subscribe();
        assert!(!rx.has_changed().unwrap(), "nothing published, not closed");

        let (gpus, publisher) = Gpus::manual();
        assert!(gpus.present() && gpus.latest().is_none());
        let mut rx = gpus.clone().subscribe();
        let s = Arc::new(Snapshot {
            taken_at_ms: 5,
            gpus: vec![GpuReading {
                index: 1,
                name: "X".into(),
                total_bytes: 10,
                used_bytes: 4,
                free_bytes: 6,
                utilization: None,
                temperature_c: Some(40),
                power_watts: None,
            }],
            processes: vec![],
        });
        publisher.send_replace(Some(s.clone()));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_deref(), Some(&*s));
        assert_eq!(gpus.latest().unwrap().gpu(1).unwrap().free_bytes, 6);
        assert!(gpus.latest().unwrap().gpu(0).is_none());
    }

    #[test]
    fn disabled_or_missing_nvml_is_absent() {
        let off = GpuConfig {
            enabled: false,
            sample_interval: Duration::from_secs(2),
            nvml_library: None,
        };
        assert!(!Gpus::start(&off).present());
        let missing = GpuConfig {
            enabled: true,
            nvml_library: Some("/nonexistent/libnvidia-ml.so.1".into()),
            ..off
        };
        let gpus = Gpus::start(&missing);
        assert!(!gpus.present() && gpus.latest().is_none());
    }
}
