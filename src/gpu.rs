//! GPU readings (stand-in until the NVML sampler lands): the types the
//! scheduler places models by.

use std::sync::Arc;

use tokio::sync::watch;

/// One GPU at one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub utilization: Option<f64>,
    pub temperature_c: Option<u32>,
    pub power_watts: Option<f64>,
}

/// One process's memory on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessReading {
    pub pid: u32,
    pub gpu: u32,
    pub used_bytes: u64,
}

/// Every GPU and GPU process at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub taken_at_ms: i64,
    pub gpus: Vec<GpuReading>,
    pub processes: Vec<ProcessReading>,
}

impl Snapshot {
    pub fn gpu(&self, index: u32) -> Option<&GpuReading> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// GPU memory per GPU used by `pid` and its descendants.
    pub fn tree_usage(&self, pid: u32) -> Vec<(u32, u64)> {
        let mut out: Vec<(u32, u64)> = Vec::new();
        for p in self.processes.iter().filter(|p| p.pid == pid) {
            match out.iter_mut().find(|(g, _)| *g == p.gpu) {
                Some((_, b)) => *b += p.used_bytes,
                None => out.push((p.gpu, p.used_bytes)),
            }
        }
        out
    }
}

/// The readings' handle.
#[derive(Debug, Clone)]
pub struct Gpus {
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
    _tx: Arc<watch::Sender<Option<Arc<Snapshot>>>>,
}

impl Gpus {
    pub fn absent() -> Gpus {
        let (tx, rx) = watch::channel(None);
        Gpus {
            rx,
            _tx: Arc::new(tx),
        }
    }

    /// For tests: readings fed by hand.
    pub fn manual() -> (Gpus, Arc<watch::Sender<Option<Arc<Snapshot>>>>) {
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        (
            Gpus {
                rx,
                _tx: tx.clone(),
            },
            tx,
        )
    }

    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.rx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.rx.clone()
    }

    pub fn refresh(&self) {}

    pub fn present(&self) -> bool {
        self.rx.borrow().is_some()
    }
}
