//! What the core asks the shell to do: the [`Effect`]s its entry points
//! return, and the answer a gate gives to a close ([`GateReport`]).
//!
//! Plain data: performing them is the shell's ([`super::shell`]), and a
//! core test reads them to see what a decision was.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::WaiterId;
use super::AcquireError;
use crate::config::ChildAddr;
use crate::events::{Event, ModelEvent};
use crate::supervisor::ChildSpec;

/// Something the shell does for the core.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Start a child; its events come back through [`super::core::Core::child_event`].
    Spawn(ChildSpec),
    /// Ask the model's child to stop; its `Exited` follows.
    StopChild {
        model: Arc<str>,
    },
    /// The model's child is gone: let go of its handle.
    ForgetChild {
        model: Arc<str>,
    },
    /// Open admission to a ready child, watched for its last lease.
    OpenGate {
        model: Arc<str>,
        instance: u64,
        addr: ChildAddr,
        max_connections: Option<usize>,
        gpu: Option<u32>,
    },
    /// The GPU the ready child runs on was learned.
    SetGateGpu {
        model: Arc<str>,
        gpu: Option<u32>,
    },
    /// Close the model's gate; the result goes to [`super::core::Core::gate_closed`]
    /// before anything else.
    CloseGate {
        model: Arc<str>,
        instance: u64,
        close: Close,
    },
    /// A removed model's gate goes away.
    DropGate {
        model: Arc<str>,
    },
    /// Give the waiter a lease on the model's gate.
    Lease {
        waiter: WaiterId,
        model: Arc<str>,
    },
    /// Answer the waiter with an error.
    Fail {
        waiter: WaiterId,
        error: AcquireError,
    },
    Emit(Event),
    /// A lifecycle step: stamp it with the wall clock (and, with
    /// `rss_of`, that process's resident memory) and emit it.
    Lifecycle {
        event: ModelEvent,
        rss_of: Option<u32>,
    },
    /// Ask for a fresh GPU reading.
    RefreshGpus,
    /// Work out the model's GGUF estimate off the loop; the answer goes to
    /// [`super::core::Core::estimated`].
    Estimate {
        model: Arc<str>,
        path: PathBuf,
        argv: Vec<String>,
    },
}

/// How a gate is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// Whatever leases are out: they drain.
    Now,
    /// Only if no lease is out.
    IfIdle,
    /// Only if no lease is out and none was taken or returned within this
    /// long (an idle TTL).
    IfIdleFor(Duration),
}

/// What a gate said when asked to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GateReport {
    pub(crate) closed: bool,
    /// Leases out after the attempt.
    pub(crate) leases: usize,
    /// Its last use (a lease taken or returned).
    pub(crate) last_used: Instant,
}
