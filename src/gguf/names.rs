//! Names in and for GGUF files: the metadata keys read here (the
//! `general.*` and `tokenizer.*` keys, and the suffixes of an
//! architecture's own `{arch}.*` keys), llama.cpp's file types and ggml's
//! tensor types by name, and counts written as Ollama writes them.

/// `general.architecture`: e.g. "llama"; the prefix of the model's own
/// `{arch}.*` keys.
pub const ARCHITECTURE: &str = "general.architecture";
/// `general.name`: the model's display name.
pub const NAME: &str = "general.name";
/// `general.file_type`: llama.cpp's `llama_ftype` id.
pub const FILE_TYPE: &str = "general.file_type";
/// `general.parameter_count`, as Ollama's `model_info` shows it.
pub const PARAMETER_COUNT: &str = "general.parameter_count";
/// `tokenizer.chat_template`: the Jinja chat template.
pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Suffixes of `{arch}.*` keys: the trained context.
pub const CONTEXT_LENGTH: &str = "context_length";
/// The embedding width.
pub const EMBEDDING_LENGTH: &str = "embedding_length";
/// The number of layers.
pub const BLOCK_COUNT: &str = "block_count";
/// Attention heads.
pub const HEAD_COUNT: &str = "attention.head_count";
/// Heads holding keys and values (fewer than [`HEAD_COUNT`] with GQA).
pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
/// One key's width per head.
pub const KEY_LENGTH: &str = "attention.key_length";
/// One value's width per head.
pub const VALUE_LENGTH: &str = "attention.value_length";

/// llama.cpp's `llama_ftype` (include/llama.h) → the name Ollama shows.
/// 4 is "MXFP4" as Ollama numbers it (llama.cpp retired 4 and uses 38).
pub fn file_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "MXFP4",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// ggml's `ggml_type` (ggml/include/ggml.h) → its name; the ids ggml
/// removed have none.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// A count as Ollama's `format.HumanNumber` writes it: "8.0B" (one decimal
/// for billions), "4.18M" (two for millions), whole numbers bare ("7B",
/// "135M"), thousands rounded ("1K"), smaller counts as they are.
pub fn human_number(n: u64) -> String {
    const THOUSAND: u64 = 1_000;
    const MILLION: u64 = 1_000_000;
    const BILLION: u64 = 1_000_000_000;
    let scaled = |unit: u64, decimals: usize, suffix: &str| {
        if n % unit == 0 {
            format!("{}{suffix}", n / unit)
        } else {
            format!("{:.*}{suffix}", decimals, n as f64 / unit as f64)
        }
    };
    if n >= BILLION {
        scaled(BILLION, 1, "B")
    } else if n >= MILLION {
        scaled(MILLION, 2, "M")
    } else if n >= THOUSAND {
        format!("{:.0}K", n as f64 / THOUSAND as f64)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_sizes_as_ollama_writes_them() {
        for (n, shown) in [
            (8_030_261_248u64, "8.0B"),
            (7_000_000_000, "7B"),
            (7_615_616_512, "7.6B"),
            (135_000_000, "135M"),
            (4_178_240, "4.18M"),
            (1_200, "1K"),
            (999, "999"),
            (0, "0"),
        ] {
            assert_eq!(human_number(n), shown, "{n}");
        }
    }
}
