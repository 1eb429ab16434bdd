//! `[gpu]`: whether NVIDIA GPUs are read through NVML, how often, and
//! which NVML library is loaded.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawGpu, Source};
use super::{ConfigError, DEFAULT_GPU_ENABLED, DEFAULT_GPU_SAMPLE_INTERVAL};

/// `[gpu]`: NVIDIA GPU readings through NVML, loaded at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    /// Use NVML if it loads; `false` never tries.
    pub enabled: bool,
    /// Time between two samples of every GPU.
    pub sample_interval: Duration,
    /// The NVML library to load; `None`: `libnvidia-ml.so.1` by the
    /// dynamic loader's search, then NixOS's driver directory
    /// ([`NIXOS_NVML_LIBRARY`]).
    pub nvml_library: Option<PathBuf>,
}

/// Shortest `gpu.sample_interval`: NVML queries take milliseconds per GPU.
pub const MIN_GPU_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `gpu.sample_interval`.
pub const MAX_GPU_SAMPLE_INTERVAL: Duration = Duration::from_secs(3600);
/// Where NixOS puts the driver's libraries (`hardware.graphics`), outside
/// the loader's search path of a Nix-built binary.
pub const NIXOS_NVML_LIBRARY: &str = "/run/opengl-driver/lib/libnvidia-ml.so.1";

/// `[gpu]`.
pub(super) fn validate_gpu(src: &Source<'_>, raw: &RawGpu) -> Result<GpuConfig, ConfigError> {
    let sample_interval = match &raw.sample_interval {
        None => DEFAULT_GPU_SAMPLE_INTERVAL,
        Some(v) => {
            let d = src.duration("gpu.sample_interval", v)?;
            if !(MIN_GPU_SAMPLE_INTERVAL..=MAX_GPU_SAMPLE_INTERVAL).contains(&d) {
                return Err(src.error(v, "gpu.sample_interval: must be between 100ms and 1h"));
            }
            d
        }
    };
    let nvml_library = match &raw.nvml_library {
        None => None,
        Some(v) => {
            let path = PathBuf::from(v.get_ref());
            if !path.is_absolute() {
                return Err(src.error(
                    v,
                    format!(
                        "gpu.nvml_library: {:?} must be an absolute path (leave it out to let the dynamic loader find libnvidia-ml.so.1)",
                        v.get_ref()
                    ),
                ));
            }
            Some(path)
        }
    };
    Ok(GpuConfig {
        enabled: raw.enabled.unwrap_or(DEFAULT_GPU_ENABLED),
        sample_interval,
        nvml_library,
    })
}
