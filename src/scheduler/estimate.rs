//! The GGUF estimate of a model's GPU memory need, which placement goes
//! by before the model has ever run: GGUF header + file size +
//! llama-server arguments → bytes (offloaded weights + f16 KV cache + a
//! fixed overhead). Pure arithmetic on a parsed [`Header`]; reading the
//! file is the shell's (off the loop), and a measurement of a real run
//! replaces the estimate (see `Slot::vram_need`).

use crate::gguf::{names, Header};

/// CUDA context, cuBLAS workspace and compute buffers of a child with
/// any layer on a GPU: measured real runs put these at a few hundred MiB.
pub const GPU_OVERHEAD_BYTES: u64 = 384 << 20;
/// llama-server's context size when its arguments give none.
const DEFAULT_CONTEXT: u64 = 4096;

/// A first estimate of the GPU memory llama-server takes for this model
/// with these arguments, before it has ever been measured: the offloaded
/// share of the weights (the file's size, by layers: `-ngl`/
/// `--n-gpu-layers`, all when absent or `auto`/-1), the f16 KV cache of
/// those layers for the context (`-c`/`--ctx-size`, else 4096, at most the
/// trained context; 0 = the trained context) from the header's attention
/// dimensions, plus [`GPU_OVERHEAD_BYTES`]. Zero with no layer offloaded.
/// Replaced by the measurement as soon as the model has run.
pub fn vram_estimate(header: &Header, file_size: u64, args: &[String]) -> u64 {
    let layers = header.arch_u64(names::BLOCK_COUNT).unwrap_or(1).max(1);
    let offloaded = match arg_value(args, &["-ngl", "--n-gpu-layers", "--gpu-layers"]) {
        None => layers,
        Some(v) if v == "auto" || v == "all" => layers,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n < 0 => layers,
            Ok(n) => u64::try_from(n).unwrap_or(0).min(layers),
            Err(_) => layers,
        },
    };
    if offloaded == 0 {
        return 0;
    }
    let weights = if offloaded >= layers {
        file_size
    } else {
        file_size / layers * offloaded
    };
    let trained = header.context_length().unwrap_or(DEFAULT_CONTEXT);
    let context = match arg_value(args, &["-c", "--ctx-size"]).and_then(|v| v.parse::<u64>().ok()) {
        Some(0) => trained,
        Some(n) => n,
        None => DEFAULT_CONTEXT.min(trained),
    };
    let heads = header.arch_u64(names::HEAD_COUNT).unwrap_or(1).max(1);
    let kv_heads = header.arch_u64(names::HEAD_COUNT_KV).unwrap_or(heads);
    let embedding = header.embedding_length().unwrap_or(0);
    let key_len = header
        .arch_u64(names::KEY_LENGTH)
        .unwrap_or(embedding / heads);
    let value_len = header.arch_u64(names::VALUE_LENGTH).unwrap_or(key_len);
    let per_token_layer = kv_heads
        .saturating_mul(key_len + value_len)
        .saturating_mul(2);
    let kv = per_token_layer
        .saturating_mul(context)
        .saturating_mul(offloaded);
    weights
        .saturating_add(kv)
        .saturating_add(GPU_OVERHEAD_BYTES)
}

/// The value after the first of `names` in `args` (`-c 8192` or
/// `--ctx-size=8192`).
fn arg_value<'a>(args: &'a [String], names: &[&str]) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if names.contains(&a.as_str()) {
            return it.next().map(String::as_str);
        }
        if let Some((name, value)) = a.split_once('=') {
            if names.contains(&name) {
                return Some(value);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::testing::{parse_bytes, Builder};

    #[test]
    fn the_vram_estimate_counts_offloaded_weights_kv_cache_and_overhead() {
        // 32 layers, 4096 wide, 32 heads of which 8 hold K/V (GQA), trained
        // for 8192 tokens.
        let header = parse_bytes(
            &Builder::new(3)
                .string("general.architecture", "llama")
                .u32("llama.block_count", 32)
                .u32("llama.embedding_length", 4096)
                .u32("llama.attention.head_count", 32)
                .u32("llama.attention.head_count_kv", 8)
                .u32("llama.context_length", 8192)
                .bytes(),
        )
        .unwrap();
        let file = 4u64 << 30;
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // K and V: 8 heads x 128 dims x 2 bytes each, per token and layer.
        let kv_per_token_layer = 8 * 128 * 2 * 2;
        let all = vram_estimate(&header, file, &[]);
        assert_eq!(
            all,
            file + kv_per_token_layer * 4096 * 32 + GPU_OVERHEAD_BYTES,
            "all layers, the default 4096 context"
        );
        assert_eq!(
            vram_estimate(&header, file, &args(&["-c", "8192"])),
            file + kv_per_token_layer * 8192 * 32 + GPU_OVERHEAD_BYTES
        );
        assert_eq!(
            vram_estimate(&header, file, &args(&["--ctx-size=0"])),
            file + kv_per_token_layer * 8192 * 32 + GPU_OVERHEAD_BYTES,
            "0 is the trained context"
        );
        assert_eq!(
            vram_estimate(&header, file, &args(&["-ngl", "16"])),
            file / 2 + kv_per_token_layer * 4096 * 16 + GPU_OVERHEAD_BYTES,
            "half the layers, half the weights and half the cache"
        );
        assert_eq!(vram_estimate(&header, file, &args(&["-ngl", "0"])), 0);
        assert_eq!(
            vram_estimate(&header, file, &args(&["--n-gpu-layers", "-1"])),
            all
        );
        assert_eq!(vram_estimate(&header, file, &args(&["-ngl", "auto"])), all);
        assert_eq!(vram_estimate(&header, file, &args(&["-ngl", "999"])), all);
    }
}
