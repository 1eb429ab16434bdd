#!/usr/bin/env python3
"""Write a tiny llama-architecture GGUF model with random weights.

The model is useless as a language model but loads and runs in llama.cpp's
`llama-server`, which is all the integration tests need: real processes,
real HTTP, real (random) tokens, with nothing downloaded from a model hub.

The tokenizer (every `tokenizer.ggml.*` key) is copied from a vocab-only GGUF,
normally `models/ggml-vocab-llama-spm.gguf` from llama.cpp's source tree, and
the embedding/output tensors are sized to its token count.

Usage: make-tiny-model.py --vocab VOCAB.gguf --out OUT.gguf [--seed N]
           [--n-layer N] [--n-embd N] [--n-head N] [--n-ff N]

The size flags make larger random models of the same shape (the GPU proof,
tests/gpu/prove.sh, uses them); left out, the output is the tiny model,
byte for byte.

Requires the PyPI packages `gguf` and `numpy`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import gguf

ARCH = "llama"

# Default hyperparameters (the size flags override them). Small enough to
# load in well under a second and to generate quickly on a CPU; the tensor
# data is dominated by token_embd/output (n_vocab x N_EMBD each, f32), about
# 16 MB for the 32000-token llama vocab.
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 4
HEAD_DIM = N_EMBD // N_HEAD  # 16
N_FF = 128
N_CTX_TRAIN = 2048
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5
INIT_STD = 0.02

# ChatML-style template so /v1/chat/completions works. The markers are not
# special tokens in the llama vocab; they are simply tokenized as text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def copy_tokenizer(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> int:
    """Copy all tokenizer.ggml.* keys, keeping their GGUF types. Returns n_vocab."""
    n_vocab = None
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            sub_type = gguf.GGUFValueType(field.types[-1])
            if sub_type == gguf.GGUFValueType.STRING:
                # Raw bytes: byte-exact copy, no utf-8 round trip.
                value = [bytes(field.parts[i]) for i in field.data]
            elif sub_type == gguf.GGUFValueType.ARRAY:
                raise SystemExit(f"nested array in {key} is not supported")
            else:
                value = field.contents()
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
            if key == gguf.Keys.Tokenizer.LIST:
                n_vocab = len(value)
        else:
            writer.add_key_value(key, field.contents(), vtype)
        copied += 1
    if n_vocab is None:
        raise SystemExit("vocab file has no tokenizer.ggml.tokens")
    print(f"copied {copied} tokenizer keys, n_vocab={n_vocab}", file=sys.stderr)
    return n_vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", required=True, help="vocab-only GGUF to take the tokenizer from")
    ap.add_argument("--out", required=True, help="output GGUF path")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    ap.add_argument("--n-layer", type=int, default=N_LAYER, help=f"blocks (default {N_LAYER})")
    ap.add_argument("--n-embd", type=int, default=N_EMBD, help=f"embedding width (default {N_EMBD})")
    ap.add_argument("--n-head", type=int, default=N_HEAD,
                    help=f"attention heads, also the KV heads; must divide --n-embd (default {N_HEAD})")
    ap.add_argument("--n-ff", type=int, default=N_FF, help=f"feed-forward width (default {N_FF})")
    args = ap.parse_args()
    if min(args.n_layer, args.n_embd, args.n_head, args.n_ff) < 1 or args.n_embd % args.n_head:
        ap.error("sizes must be positive and --n-head must divide --n-embd")
    n_layer, n_embd, n_head, n_ff = args.n_layer, args.n_embd, args.n_head, args.n_ff
    n_head_kv = n_head
    head_dim = n_embd // n_head

    reader = gguf.GGUFReader(args.vocab)

    tmp = f"{args.out}.tmp.{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, ARCH)  # also writes general.architecture
    try:
        writer.add_name(f"claracore-tiny-llama-seed{args.seed}")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)

        n_vocab = copy_tokenizer(reader, writer)
        writer.add_chat_template(CHAT_TEMPLATE)

        writer.add_vocab_size(n_vocab)
        writer.add_context_length(N_CTX_TRAIN)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)

        rng = np.random.default_rng(args.seed)

        def weight(*shape: int) -> np.ndarray:
            return (rng.standard_normal(shape) * INIT_STD).astype(np.float32)

        def norm() -> np.ndarray:
            return np.ones(n_embd, dtype=np.float32)

        # numpy shapes are ggml's ne[] reversed: ggml {n_embd, n_vocab} is
        # numpy (n_vocab, n_embd), i.e. one row of n_embd per token.
        n_q = n_head * head_dim
        n_kv = n_head_kv * head_dim
        writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
        for i in range(n_layer):
            p = f"blk.{i}."
            writer.add_tensor(p + "attn_norm.weight", norm())
            writer.add_tensor(p + "attn_q.weight", weight(n_q, n_embd))       # ggml {n_embd, n_q}
            writer.add_tensor(p + "attn_k.weight", weight(n_kv, n_embd))      # ggml {n_embd, n_kv}
            writer.add_tensor(p + "attn_v.weight", weight(n_kv, n_embd))      # ggml {n_embd, n_kv}
            writer.add_tensor(p + "attn_output.weight", weight(n_embd, n_q))  # ggml {n_q, n_embd}
            writer.add_tensor(p + "ffn_norm.weight", norm())
            writer.add_tensor(p + "ffn_gate.weight", weight(n_ff, n_embd))    # ggml {n_embd, n_ff}
            writer.add_tensor(p + "ffn_up.weight", weight(n_ff, n_embd))      # ggml {n_embd, n_ff}
            writer.add_tensor(p + "ffn_down.weight", weight(n_embd, n_ff))    # ggml {n_ff, n_embd}
        writer.add_tensor("output_norm.weight", norm())
        writer.add_tensor("output.weight", weight(n_vocab, n_embd))           # ggml {n_embd, n_vocab}

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, args.out)
    except BaseException:
        writer.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
