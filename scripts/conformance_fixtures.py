#!/usr/bin/env python3
"""Writes the engine's conformance fixtures: tiny random-weight GGUF models, one per
(architecture family, weight type), and reference logits for them and for two real models,
computed by llama.cpp through llama-cpp-python 0.3.36.

Output:
  <name>.gguf       (in --out, default $RAGCAKE_HOME/conformance; not committed: the test
                    script writes them, and the test checks each against its sha256) tiny models (llama, qwen2, qwen3, gemma3, phi3; F32, F16, Q8_0, Q4_0,
                    Q4_1, Q5_0, Q4_K, Q6_K), written with the `gguf` package from fixed seeds
  tests/fixtures/conformance/reference.json (committed)
                    per model and prompt: the prompt's token ids, the top-64 [id, logit] pairs
                    and the logsumexp of the full row at every position, for tiny models the
                    16-token greedy continuation (with llama.cpp's top-1 margin at each
                    step), and per model the "spread": how far llama.cpp moves from itself
                    between two of its own settings (see SETTINGS below);
                    for tiny models also "float64": how far llama.cpp (setting A) is from an
                    exact float64 forward pass over the same stored weights

Run (the GGUF writer alone needs only `gguf` and `numpy`; the reference run needs
llama-cpp-python==0.3.36):

    python3 -m venv /tmp/lcpp && /tmp/lcpp/bin/pip install llama-cpp-python==0.3.36 gguf numpy
    /tmp/lcpp/bin/python scripts/conformance_fixtures.py \\
        --smollm2 PATH/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --gemma3 PATH/gemma-3-270m-q4_k_m.gguf

    --gguf-only   write the tiny models and stop (no llama.cpp needed)

The tiny files and the token ids are deterministic; the logits are as deterministic as
llama.cpp on the machine that runs it (CPU, 2 threads).

The spread is the yardstick for the engine's own comparison: llama.cpp run with setting A
(one 512-token batch, no flash attention) against setting B (8-token batches, flash
attention). Per position, with p = softmax of the full row:
    KL(A||B) = sum_{i in top64(A)} pA_i (log pA_i - log pB_i) + pA_rest (log pA_rest - log pB_rest)
where pX_rest = 1 - sum_{i in top64(A)} pX_i, so the engine can compute the same figure from
A's stored top-64 and logsumexp with its own full row in place of B.

On the CPU backend the two settings differ through flash attention only (8- and 512-token
batches give bit-identical logits without it). For quantized weights that small change is
enough to move ggml's 8-bit rounding of the activations (it quantizes them before every
quantized matmul), so their spread is about as large as their distance from float64.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# The tiny models are not committed: the test script writes them (deterministic, checked
# against the sha256 in reference.json) into the model cache.
OUT_DIR = os.path.join(os.environ.get("RAGCAKE_HOME", os.path.expanduser("~/.cache/ragcake")),
                       "conformance")
REFERENCE = os.path.join(HERE, "..", "tests", "fixtures", "conformance", "reference.json")

SEED = 20240607
TOP_K = 64
GREEDY_STEPS = 16
N_THREADS = 2
LLAMA_CPP_PYTHON = "0.3.36"

SETTINGS = {
    "A": {"n_batch": 512, "n_ubatch": 512, "flash_attn": False},
    "B": {"n_batch": 8, "n_ubatch": 8, "flash_attn": True},
}
N_CTX_TINY = 512
N_CTX_REAL = 256

# Shared shape of every tiny model. Every matrix row width (256 or 512) is a multiple of
# QK_K = 256, so that the K-quants can hold every matrix.
HIDDEN = 256
N_HEAD = 4
N_KV_HEAD = 2
HEAD_DIM = 64
FFN = 512
CONTEXT = 512
N_VOCAB = 384

# Logit scale: the output projection (or the tied embedding) is drawn so that final logits
# have a standard deviation of a few units, which keeps top-1 margins far above float noise.
LOGIT_STD = 4.0

# name, family, weight type, vocabulary kind, options
TINY_MODELS = [
    ("llama-f32", "llama", "F32", "bpe", {}),
    ("llama-f16", "llama", "F16", "bpe", {}),
    ("llama-q8_0", "llama", "Q8_0", "bpe", {}),
    ("llama-q4_0", "llama", "Q4_0", "bpe", {}),
    ("llama-q4_1", "llama", "Q4_1", "bpe", {}),
    ("llama-q5_0", "llama", "Q5_0", "bpe", {}),
    ("llama-q4_k", "llama", "Q4_K", "bpe", {}),
    ("llama-q6_k", "llama", "Q6_K", "bpe", {}),
    # Llama 3 style per-pair rope frequency factors.
    ("llama-ropefreqs-q8_0", "llama", "Q8_0", "bpe", {"rope_freqs": True}),
    # SentencePiece vocabulary, as Llama 2 / Mistral files have.
    ("llama-spm-q6_k", "llama", "Q6_K", "spm", {}),
    ("qwen2-f16", "qwen2", "F16", "bpe", {}),
    ("qwen2-q8_0-tied", "qwen2", "Q8_0", "bpe", {"tied": True}),
    ("qwen3-f16", "qwen3", "F16", "bpe", {}),
    ("qwen3-q6_k", "qwen3", "Q6_K", "bpe", {}),
    ("phi3-f16", "phi3", "F16", "phi3", {}),
    ("phi3-q4_k", "phi3", "Q4_K", "phi3", {}),
    ("gemma3-f16", "gemma3", "F16", "gemma", {"tied": True}),
    ("gemma3-q4_k", "gemma3", "Q4_K", "gemma", {"tied": True}),
]

TINY_PROMPT_LENGTHS = [40, 52, 64]

REAL_TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than any scribe. Within fifty years, presses were running in more "
    "than two hundred cities across Europe, and the price of a book fell sharply.",
    "Honeybees communicate the location of food through a waggle dance. A forager returning to the "
    "hive runs a figure-eight pattern on the comb; the angle of the straight run relative to "
    "vertical gives the direction of the flowers relative to the sun, and the duration of the "
    "waggle tells the other bees how far away they are.",
    "To replace a bicycle inner tube, first shift to the smallest rear cog and open the brake. "
    "Remove the wheel, then use two tyre levers to lift one side of the tyre off the rim. Pull out "
    "the old tube, check the inside of the tyre for thorns or glass, and fit the new tube after "
    "inflating it just enough to hold its shape.",
    "Context:\nThe Rhine is a river that rises in the Swiss Alps and flows through Liechtenstein, "
    "Austria, Germany, France and the Netherlands before emptying into the North Sea. It is about "
    "1,230 kilometres long and is one of the most important waterways for shipping in Europe.\n\n"
    "Question: Into which sea does the Rhine flow?\nAnswer:",
]

# A small English text from which the tiny BPE merges and SentencePiece pieces are learned,
# so that the tiny vocabularies look like real ones (frequent pairs first).
CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs "
    "into the forest. In the morning the farmer opens the gate and the animals walk out to the "
    "field. There is water in the river and there are apples on the trees. She said that the "
    "answer is in the book on the table. We read the question, then we write the answer. "
    "It is a good day to learn something new about the world and the people in it. "
    "The number 42 is the answer; the year 2024 is the date. They went to the market to buy "
    "bread, cheese and wine for the evening."
)


# ----------------------------------------------------------------------------------------------
# Vocabularies


def byte_level_chars():
    """The printable stand-in character for each byte that GPT-2 style byte-level BPE uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def bpe_vocab():
    """256 byte tokens, merges learned from CORPUS, three control tokens at the end."""
    chars = byte_level_chars()
    words = re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", CORPUS)
    counts = {}
    for w in words:
        key = tuple(chars[b] for b in w.encode("utf-8"))
        counts[key] = counts.get(key, 0) + 1
    tokens = list(chars)
    known = set(tokens)
    merges = []
    n_control = 3
    while len(tokens) < N_VOCAB - n_control:
        pairs = {}
        for word, c in counts.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        # most frequent pair; ties broken by the pair's text so that the result is fixed
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best[0] + " " + best[1])
        merged = best[0] + best[1]
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        new_counts = {}
        for word, c in counts.items():
            out = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + c
        counts = new_counts
    assert len(tokens) == N_VOCAB - n_control, len(tokens)
    controls = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    token_types = [1] * len(tokens) + [3] * len(controls)
    tokens += controls
    eot = tokens.index("<|endoftext|>")
    return {
        "model": "gpt2",
        "tokens": tokens,
        "token_type": token_types,
        "merges": merges,
        "bos": eot,
        "eos": eot,
        "add_bos": False,
    }


def spm_pieces(n):
    """n SentencePiece pieces from CORPUS: the word boundary mark, letters, then whole words."""
    words = re.findall(r"[A-Za-z]+", CORPUS)
    freq = {}
    for w in words:
        freq[w] = freq.get(w, 0) + 1
    pieces = ["\u2581"]
    for ch in sorted(set("".join(words)) | set(".,;")):
        pieces.append(ch)
    for w in sorted(freq, key=lambda w: (-freq[w], w)):
        if len(pieces) >= n:
            break
        p = "\u2581" + w
        if p not in pieces:
            pieces.append(p)
    # then word-internal letter pairs, most frequent first
    pairs = {}
    for w in words:
        for i in range(len(w) - 1):
            pairs[w[i:i + 2]] = pairs.get(w[i:i + 2], 0) + 1
    for p in sorted(pairs, key=lambda p: (-pairs[p], p)):
        if len(pieces) >= n:
            break
        if p not in pieces:
            pieces.append(p)
    assert len(pieces) == n, len(pieces)
    return pieces


def spm_vocab(controls, trailing=()):
    """Control tokens first, the 256 byte tokens <0x00>..<0xFF>, scored pieces, then any
    trailing control tokens (added tokens, as Phi-3's sit after the SentencePiece vocabulary)."""
    tokens = [t for t, _ in controls]
    types = [ty for _, ty in controls]
    scores = [0.0] * len(tokens)
    tokens += ["<0x%02X>" % b for b in range(256)]
    types += [6] * 256
    scores += [0.0] * 256
    pieces = spm_pieces(N_VOCAB - len(tokens) - len(trailing))
    tokens += pieces
    types += [1] * len(pieces)
    scores += [-float(i) for i in range(len(pieces))]
    tokens += list(trailing)
    types += [3] * len(trailing)
    scores += [0.0] * len(trailing)
    assert len(set(tokens)) == len(tokens) == N_VOCAB
    return tokens, scores, types


def llama_spm_vocab():
    tokens, scores, types = spm_vocab([("<unk>", 2), ("<s>", 3), ("</s>", 3)])
    return {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos": 1,
        "eos": 2,
        "unk": 0,
        "add_bos": True,
    }


def gemma_vocab():
    controls = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3),
                ("<start_of_turn>", 3), ("<end_of_turn>", 3)]
    tokens, scores, types = spm_vocab(controls)
    return {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos": 2,
        "eos": 1,
        "unk": 3,
        "pad": 0,
        "add_bos": True,
        "add_space_prefix": False,
    }


def phi3_vocab():
    # Phi-3's own layout. It is also required: when general.name contains "phi3", llama.cpp
    # looks up <unk>, <s>, </s> and <|endoftext|> by text and fails to load without them.
    trailing = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
    tokens, scores, types = spm_vocab([("<unk>", 2), ("<s>", 3), ("</s>", 3)], trailing)
    eot = tokens.index("<|endoftext|>")
    return {
        "model": "llama",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos": 1,
        "eos": eot,
        "unk": 0,
        "pad": eot,
        "add_bos": True,
    }


def vocab_for(kind):
    return {"bpe": bpe_vocab, "spm": llama_spm_vocab, "gemma": gemma_vocab, "phi3": phi3_vocab}[kind]()


# ----------------------------------------------------------------------------------------------
# K-quant blocks. The `gguf` package can read Q4_K and Q6_K but not write them, so these
# quantize the random weights into the ggml block layouts directly; every block is checked
# against the package's own dequantizer.

QK_K = 256


def f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16)


def quantize_q4_k(w):
    """Q4_K: per 256 values f16 d and dmin, 8 sub-blocks of 32 with 6-bit scale and min,
    4-bit quants; value = d * sc * q - dmin * m."""
    rows, cols = w.shape
    x = w.reshape(-1, 8, 32).astype(np.float32)
    nb = x.shape[0]
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = x.max(axis=2)
    scale = (hi - lo) / 15.0
    mins = -lo
    d = f16(np.maximum(scale.max(axis=1), 1e-8) / 63.0)
    dmin = f16(np.maximum(mins.max(axis=1), 1e-8) / 63.0)
    df = d.astype(np.float32)[:, None]
    dminf = dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(scale / df), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(mins / dminf), 0, 63).astype(np.uint8)
    step = (df * sc)[:, :, None]
    q = np.clip(np.round((x + (dminf * mn)[:, :, None]) / step), 0, 15).astype(np.uint8)
    # 12 scale bytes: bytes 0-3 hold sc[0..3] (low 6 bits) and the top 2 bits of sc[4..7];
    # bytes 4-7 the same for the mins; bytes 8-11 the low 4 bits of sc[4..7] and mn[4..7].
    scales = np.zeros((nb, 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    # 128 quant bytes: chunk c of 32 bytes holds sub-block 2c in the low nibbles and
    # sub-block 2c+1 in the high nibbles.
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(nb, 128)
    blocks = np.concatenate(
        [d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), scales, qs], axis=1)
    assert blocks.shape[1] == 144
    value = (df * sc)[:, :, None] * q - (dminf * mn)[:, :, None]
    return blocks.reshape(rows, cols // QK_K * 144), value.reshape(rows, cols)


def quantize_q6_k(w):
    """Q6_K: per 256 values f16 d, 16 sub-blocks of 16 with signed 8-bit scales, 6-bit quants
    stored as 4 low bits (ql) and 2 high bits (qh); value = d * sc * (q - 32)."""
    rows, cols = w.shape
    x = w.reshape(-1, 16, 16).astype(np.float32)
    nb = x.shape[0]
    # As ggml's own quantizer does, the value of largest magnitude maps to -32, so that the
    # sub-block scales take both signs.
    idx = np.abs(x).argmax(axis=2)
    extreme = np.take_along_axis(x, idx[:, :, None], axis=2)[:, :, 0]
    scale = -extreme / 32.0
    d = f16(np.maximum(np.abs(scale).max(axis=1), 1e-8) / 127.0)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(scale / df), -128, 127).astype(np.int8)
    sc = np.where(sc == 0, np.int8(1), sc)
    step = (df * sc.astype(np.float32))[:, :, None]
    q = (np.clip(np.round(x / step), -32, 31) + 32).astype(np.uint8).reshape(nb, 8, 32)
    # Group g of 32 values (g = 0..7): half h = g // 4 of the block; within it, low nibbles go to
    # ql[h*64 + (g%2)*32 + e] (low half-byte for g%4 < 2, high otherwise), and the top two bits
    # go to qh[h*32 + e] at bit 2*(g%4).
    ql = np.zeros((nb, 128), dtype=np.uint8)
    qh = np.zeros((nb, 64), dtype=np.uint8)
    for g in range(8):
        h, t = g // 4, g % 4
        lo4 = q[:, g, :] & 0x0F
        hi2 = q[:, g, :] >> 4
        base = h * 64 + (t % 2) * 32
        shift = 0 if t < 2 else 4
        ql[:, base:base + 32] |= (lo4 << shift).astype(np.uint8)
        qh[:, h * 32:h * 32 + 32] |= (hi2 << (2 * t)).astype(np.uint8)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(nb, 1).view(np.uint8)], axis=1)
    assert blocks.shape[1] == 210
    value = step * (q.reshape(nb, 16, 16).astype(np.float32) - 32.0)
    return blocks.reshape(rows, cols // QK_K * 210), value.reshape(rows, cols)


def encode_matrix(w, wtype):
    """Returns (array to write, raw ggml type or None) for a [out, in] float matrix."""
    import gguf
    from gguf import GGMLQuantizationType as T

    if wtype == "F32":
        return w.astype(np.float32), None
    if wtype == "F16":
        return w.astype(np.float16), None
    qt = getattr(T, wtype)
    if wtype == "Q4_K":
        blocks, value = quantize_q4_k(w)
    elif wtype == "Q6_K":
        blocks, value = quantize_q6_k(w)
    else:
        blocks = gguf.quants.quantize(w.astype(np.float32), qt)
        value = None
    if value is not None:
        back = gguf.quants.dequantize(blocks, qt)
        assert np.allclose(back, value, rtol=1e-5, atol=1e-6), f"{wtype} block layout mismatch"
        rel = np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2))
        assert rel < (0.15 if wtype == "Q4_K" else 0.05), f"{wtype} relative error {rel}"
    return blocks, qt


# ----------------------------------------------------------------------------------------------
# Tiny models

FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q4_K": 14, "Q6_K": 18}


def rng_for(name):
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def normal(rng, shape, std):
    return (rng.standard_normal(shape) * std).astype(np.float32)


def norm_weight(rng, n):
    # RMSNorm gains near 1 (gemma3 files hold them with the +1 already folded in).
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def rope_freq_factors():
    """Llama 3 style factors per rotary pair: 1 for high frequencies, 8 for low ones, a smooth
    ramp in between."""
    n = HEAD_DIM // 2
    i = np.arange(n, dtype=np.float64)
    t = np.clip((i - 8.0) / (n - 1 - 16.0), 0.0, 1.0)
    smooth = t * t * (3 - 2 * t)
    return (1.0 / ((1 - smooth) * 1.0 + smooth / 8.0)).astype(np.float32)


def build_tensors(name, family, opts, rng):
    """Float tensors of one tiny model, as [out, in] matrices and 1-D vectors, in file order.
    Returns a list of (name, array, is_matrix)."""
    n_layer = 6 if family == "gemma3" else 2
    q_dim = N_HEAD * HEAD_DIM
    kv_dim = N_KV_HEAD * HEAD_DIM
    tied = opts.get("tied", False)
    out = []
    # A tied embedding is also the output projection. Drawn at the untied scale it makes every
    # random model echo its input token (the token's own embedding dominates the residual
    # stream and so its own logit). Tied models therefore get small embeddings, a large
    # output-norm gain to bring the logits back to LOGIT_STD, and gemma3, whose input is scaled
    # by sqrt(hidden), larger post-norm gains so that the layers outweigh the input.
    emb_std = (0.025 if family == "gemma3" else 0.05) if tied else 1.0
    out_gain = LOGIT_STD / (np.sqrt(HIDDEN) * emb_std) if tied else 1.0
    post_gain = 2.5 if family == "gemma3" else 1.0
    out.append(("token_embd.weight", normal(rng, (N_VOCAB, HIDDEN), emb_std), True))
    if opts.get("rope_freqs"):
        out.append(("rope_freqs.weight", rope_freq_factors(), False))
    for il in range(n_layer):
        p = f"blk.{il}."
        out.append((p + "attn_norm.weight", norm_weight(rng, HIDDEN), False))
        wq = normal(rng, (q_dim, HIDDEN), 1 / np.sqrt(HIDDEN))
        wk = normal(rng, (kv_dim, HIDDEN), 1 / np.sqrt(HIDDEN))
        wv = normal(rng, (kv_dim, HIDDEN), 1 / np.sqrt(HIDDEN))
        if family == "phi3":
            out.append((p + "attn_qkv.weight", np.concatenate([wq, wk, wv], axis=0), True))
        else:
            out.append((p + "attn_q.weight", wq, True))
            out.append((p + "attn_k.weight", wk, True))
            out.append((p + "attn_v.weight", wv, True))
        if family == "qwen2":
            out.append((p + "attn_q.bias", normal(rng, q_dim, 0.5), False))
            out.append((p + "attn_k.bias", normal(rng, kv_dim, 0.5), False))
            out.append((p + "attn_v.bias", normal(rng, kv_dim, 0.5), False))
        if family in ("qwen3", "gemma3"):
            out.append((p + "attn_q_norm.weight", norm_weight(rng, HEAD_DIM), False))
            out.append((p + "attn_k_norm.weight", norm_weight(rng, HEAD_DIM), False))
        out.append((p + "attn_output.weight", normal(rng, (HIDDEN, q_dim), 1 / np.sqrt(q_dim)), True))
        if family == "gemma3":
            out.append((p + "post_attention_norm.weight", post_gain * norm_weight(rng, HIDDEN), False))
        out.append((p + "ffn_norm.weight", norm_weight(rng, HIDDEN), False))
        gate = normal(rng, (FFN, HIDDEN), 1 / np.sqrt(HIDDEN))
        up = normal(rng, (FFN, HIDDEN), 1 / np.sqrt(HIDDEN))
        if family == "phi3":
            # fused: gate rows first, then up rows
            out.append((p + "ffn_up.weight", np.concatenate([gate, up], axis=0), True))
        else:
            out.append((p + "ffn_gate.weight", gate, True))
            out.append((p + "ffn_up.weight", up, True))
        out.append((p + "ffn_down.weight", normal(rng, (HIDDEN, FFN), 1 / np.sqrt(FFN)), True))
        if family == "gemma3":
            out.append((p + "post_ffw_norm.weight", post_gain * norm_weight(rng, HIDDEN), False))
    out.append(("output_norm.weight", out_gain * norm_weight(rng, HIDDEN), False))
    if not tied:
        out.append(("output.weight", normal(rng, (N_VOCAB, HIDDEN), LOGIT_STD / np.sqrt(HIDDEN)), True))
    return out, n_layer


def write_tiny(name, family, wtype, vocab_kind, opts, out_dir):
    import gguf

    rng = rng_for(name)
    tensors, n_layer = build_tensors(name, family, opts, rng)
    vocab = vocab_for(vocab_kind)
    path = os.path.join(out_dir, name + ".gguf")
    w = gguf.GGUFWriter(path, family)
    a = family
    w.add_string("general.name", name)
    w.add_uint32("general.file_type", FILE_TYPE[wtype])
    if wtype not in ("F32", "F16"):
        w.add_uint32("general.quantization_version", 2)
    w.add_uint32(f"{a}.context_length", CONTEXT)
    w.add_uint32(f"{a}.embedding_length", HIDDEN)
    w.add_uint32(f"{a}.block_count", n_layer)
    w.add_uint32(f"{a}.feed_forward_length", FFN)
    w.add_uint32(f"{a}.attention.head_count", N_HEAD)
    w.add_uint32(f"{a}.attention.head_count_kv", N_KV_HEAD)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6 if family == "gemma3" else 1e-5)
    w.add_float32(f"{a}.rope.freq_base", 1e6 if family == "gemma3" else 1e4)
    if family in ("llama", "phi3"):
        w.add_uint32(f"{a}.rope.dimension_count", HEAD_DIM)
    if family == "llama":
        w.add_uint32(f"{a}.vocab_size", N_VOCAB)
    if family in ("qwen3", "gemma3"):
        w.add_uint32(f"{a}.attention.key_length", HEAD_DIM)
        w.add_uint32(f"{a}.attention.value_length", HEAD_DIM)
    if family == "gemma3":
        # Layers 0-4 slide (llama.cpp's default gemma3 pattern: every 6th layer is global);
        # local layers use rope base 10000, llama.cpp's default when rope.freq_base_swa is absent.
        w.add_uint32(f"{a}.attention.sliding_window", 16)
    if family == "phi3":
        # Present in real Phi-3 files; llama.cpp ignores it (it runs Phi-3 with full attention).
        w.add_uint32(f"{a}.attention.sliding_window", 32)

    w.add_string("tokenizer.ggml.model", vocab["model"])
    if vocab["model"] == "gpt2":
        w.add_string("tokenizer.ggml.pre", "smollm" if family in ("llama", "qwen2") else "default")
    else:
        w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", vocab["tokens"])
    if "scores" in vocab:
        w.add_array("tokenizer.ggml.scores", vocab["scores"])
    w.add_array("tokenizer.ggml.token_type", vocab["token_type"])
    if "merges" in vocab:
        w.add_array("tokenizer.ggml.merges", vocab["merges"])
    w.add_uint32("tokenizer.ggml.bos_token_id", vocab["bos"])
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab["eos"])
    if "unk" in vocab:
        w.add_uint32("tokenizer.ggml.unknown_token_id", vocab["unk"])
    if "pad" in vocab:
        w.add_uint32("tokenizer.ggml.padding_token_id", vocab["pad"])
    w.add_bool("tokenizer.ggml.add_bos_token", vocab["add_bos"])
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    if "add_space_prefix" in vocab:
        w.add_bool("tokenizer.ggml.add_space_prefix", vocab["add_space_prefix"])

    for tname, arr, is_matrix in tensors:
        if is_matrix:
            data, raw = encode_matrix(arr, wtype)
            if raw is None:
                w.add_tensor(tname, data)
            else:
                w.add_tensor(tname, data, raw_dtype=raw)
        else:
            w.add_tensor(tname, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, vocab


def prompt_ids(name, vocab):
    """Random prompts over the model's ordinary tokens (no control or unknown tokens)."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode()), 1])
    normal_ids = np.array([i for i, t in enumerate(vocab["token_type"]) if t in (1, 6)])
    return [[int(t) for t in rng.choice(normal_ids, size=n)] for n in TINY_PROMPT_LENGTHS]


# ----------------------------------------------------------------------------------------------
# Float64 forward pass of the tiny models, from the weights as stored in the file. It checks
# that llama.cpp reads each file as intended (tensor roles, rope style, sliding window, norms),
# and it gives the second yardstick: llama.cpp's distance from exact arithmetic. For quantized
# files that distance is some 30 times larger than for F32/F16 ones, because ggml quantizes the
# activations to 8 bits (Q8_0 / Q8_K) before every quantized matmul; it also keeps the KV cache
# in F16.

GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_SWA_PERIOD = 6


def read_gguf(path):
    import gguf

    r = gguf.GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if not k.startswith("tokenizer."):
            meta[k] = f.contents()
    t = {}
    for ti in r.tensors:
        a = gguf.quants.dequantize(ti.data, ti.tensor_type).astype(np.float64)
        t[ti.name] = a.reshape([int(x) for x in reversed(ti.shape)])
    return meta, t


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def apply_rope(x, base, neox, factors=None):
    n, _, d = x.shape
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    if factors is not None:
        inv = inv / factors
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    # NEOX rotates dimension i with i + d/2; the original llama layout rotates 2i with 2i+1.
    a, b = (x[..., : d // 2], x[..., d // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * c - b * s, a * s + b * c
    return np.concatenate([ra, rb], axis=-1) if neox else np.stack([ra, rb], axis=-1).reshape(x.shape)


def exact_logits(path, tokens):
    meta, t = read_gguf(path)
    arch = meta["general.architecture"]

    def hp(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_layer, n_head, n_kv = hp("block_count"), hp("attention.head_count"), hp("attention.head_count_kv")
    hidden = hp("embedding_length")
    hd = hp("attention.key_length", hidden // n_head)
    eps = hp("attention.layer_norm_rms_epsilon")
    base = hp("rope.freq_base", 10000.0)
    # llama.cpp disables Phi-3's sliding window, so only gemma3's applies.
    n_swa = hp("attention.sliding_window", 0) if arch == "gemma3" else 0
    n = len(tokens)
    x = t["token_embd.weight"][tokens]
    if arch == "gemma3":
        x = x * np.float64(np.float32(np.sqrt(hidden)))
    factors = t.get("rope_freqs.weight")
    causal = np.tril(np.ones((n, n), dtype=bool))
    dist = np.arange(n)[:, None] - np.arange(n)[None, :]
    act = (lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))) \
        if arch == "gemma3" else (lambda g: g / (1 + np.exp(-g)))
    for il in range(n_layer):
        p = f"blk.{il}."
        h = rms_norm(x, t[p + "attn_norm.weight"], eps)
        if p + "attn_qkv.weight" in t:
            q, k, v = np.split(h @ t[p + "attn_qkv.weight"].T, [n_head * hd, (n_head + n_kv) * hd], axis=1)
        else:
            q, k, v = (h @ t[p + f"attn_{z}.weight"].T for z in "qkv")
        if p + "attn_q.bias" in t:
            q, k, v = q + t[p + "attn_q.bias"], k + t[p + "attn_k.bias"], v + t[p + "attn_v.bias"]
        q, k, v = q.reshape(n, n_head, hd), k.reshape(n, n_kv, hd), v.reshape(n, n_kv, hd)
        if p + "attn_q_norm.weight" in t:
            q = rms_norm(q, t[p + "attn_q_norm.weight"], eps)
            k = rms_norm(k, t[p + "attn_k_norm.weight"], eps)
        local = n_swa > 0 and il % GEMMA3_SWA_PERIOD < GEMMA3_SWA_PERIOD - 1
        b = GEMMA3_LOCAL_ROPE_BASE if local else base
        q, k = apply_rope(q, b, arch != "llama", factors), apply_rope(k, b, arch != "llama", factors)
        mask = causal & (dist < n_swa) if local else causal
        att = np.empty((n, n_head, hd))
        for hh in range(n_head):
            kv = hh // (n_head // n_kv)
            sc = np.where(mask, q[:, hh] @ k[:, kv].T / np.sqrt(hd), -np.inf)
            pr = np.exp(sc - sc.max(axis=1, keepdims=True))
            att[:, hh] = (pr / pr.sum(axis=1, keepdims=True)) @ v[:, kv]
        a = att.reshape(n, n_head * hd) @ t[p + "attn_output.weight"].T
        if arch == "gemma3":
            a = rms_norm(a, t[p + "post_attention_norm.weight"], eps)
        x = x + a
        h = rms_norm(x, t[p + "ffn_norm.weight"], eps)
        if arch == "phi3":
            g, u = np.split(h @ t[p + "ffn_up.weight"].T, 2, axis=1)
        else:
            g, u = h @ t[p + "ffn_gate.weight"].T, h @ t[p + "ffn_up.weight"].T
        f = (act(g) * u) @ t[p + "ffn_down.weight"].T
        if arch == "gemma3":
            f = rms_norm(f, t[p + "post_ffw_norm.weight"], eps)
        x = x + f
    x = rms_norm(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


# ----------------------------------------------------------------------------------------------
# llama.cpp reference


def load(path, setting, n_ctx):
    from llama_cpp import Llama

    s = SETTINGS[setting]
    return Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=s["n_batch"],
        n_ubatch=s["n_ubatch"],
        flash_attn=s["flash_attn"],
        logits_all=True,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        seed=SEED,
        verbose=False,
    )


def eval_prompt(llm, tokens, greedy_steps=0):
    """Full logits rows (float32, [n, vocab]) for the prompt, and the greedy continuation."""
    llm.reset()
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens)
    rows = np.array(llm.scores[: len(tokens), :], dtype=np.float32, copy=True)
    greedy = []
    for _ in range(greedy_steps):
        row = np.array(llm.scores[llm.n_tokens - 1, :], dtype=np.float32)
        nxt = int(np.argmax(row))
        two = np.partition(row, -2)[-2:]
        greedy.append((nxt, float(two[1] - two[0])))
        llm.eval([nxt])
    return rows, greedy


def logsumexp(rows):
    r = rows.astype(np.float64)
    m = r.max(axis=1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(r - m).sum(axis=1)))


def top_k(row, k):
    ids = np.arange(row.shape[0])
    order = np.lexsort((ids, -row.astype(np.float64)))[:k]
    return order


def spread(rows_a, rows_b):
    """Mean KL(A||B) over A's top-k plus the rest bucket, top-1 agreement, max |A-B| over A's
    top-k, and the top-1 margins of A."""
    kls, agree, max_diff, margins = [], [], 0.0, []
    for a, b in zip(rows_a, rows_b):
        a64 = a.astype(np.float64)
        b64 = b.astype(np.float64)
        top = top_k(a, TOP_K)
        la = a64 - logsumexp(a[None, :])[0]
        lb = b64 - logsumexp(b[None, :])[0]
        pa, pb = np.exp(la[top]), np.exp(lb[top])
        kl = float(np.sum(pa * (la[top] - lb[top])))
        rest = np.ones(a.shape[0], dtype=bool)
        rest[top] = False
        pa_rest = float(np.exp(la[rest]).sum())
        pb_rest = float(np.exp(lb[rest]).sum())
        if pa_rest > 0:
            kl += pa_rest * (np.log(pa_rest) - np.log(max(pb_rest, 1e-300)))
        kls.append(kl)
        agree.append(int(np.argmax(a)) == int(np.argmax(b)))
        max_diff = max(max_diff, float(np.max(np.abs(a64[top] - b64[top]))))
        margins.append(float(a64[top[0]] - a64[top[1]]))
    return kls, agree, max_diff, margins


def record(tokens, rows, greedy):
    lse = logsumexp(rows)
    top = []
    for row in rows:
        ids = top_k(row, TOP_K)
        top.append([[int(i), round(float(row[i]), 5)] for i in ids])
    rec = {"tokens": [int(t) for t in tokens], "top": top,
           "logsumexp": [round(float(x), 5) for x in lse]}
    if greedy is not None:
        rec["greedy"] = [t for t, _ in greedy]
        # llama.cpp's top-1 minus top-2 logit at each greedy step: a step whose margin is below
        # the model's noise floor may legitimately go either way.
        rec["greedy_margin"] = [round(m, 5) for _, m in greedy]
    return rec


def reference(entry, path, prompts, n_ctx, greedy):
    results = {}
    for setting in ("A", "B"):
        llm = load(path, setting, n_ctx)
        results[setting] = [eval_prompt(llm, p, GREEDY_STEPS if (greedy and setting == "A") else 0)
                            for p in prompts]
        llm.close()
    all_kl, all_agree, max_diff, margins = [], [], 0.0, []
    records = []
    for p, (rows_a, greedy_a), (rows_b, _) in zip(prompts, results["A"], results["B"]):
        kls, agree, md, mg = spread(rows_a, rows_b)
        all_kl += kls
        all_agree += agree
        max_diff = max(max_diff, md)
        margins += mg
        records.append(record(p, rows_a, greedy_a if greedy else None))
    entry["spread"] = summary(all_kl, all_agree, max_diff)
    line = (f"{entry['name']:22s} spread: {fmt(entry['spread'])}  "
            f"median top-1 margin {np.median(margins):.3f}")
    if greedy:
        # llama.cpp (setting A) against exact arithmetic on the same stored weights
        ex_kl, ex_agree, ex_diff = [], [], 0.0
        for p, (rows_a, _) in zip(prompts, results["A"]):
            kls, agree, md, _ = spread(rows_a, exact_logits(path, p))
            ex_kl += kls
            ex_agree += agree
            ex_diff = max(ex_diff, md)
        entry["float64"] = summary(ex_kl, ex_agree, ex_diff)
        assert entry["float64"]["top1_agreement"] > 0.8, "llama.cpp reads the file differently than intended"
        line += f"\n{'':22s} float64: {fmt(entry['float64'])}"
    entry["prompts"] = records
    print(line, flush=True)
    return entry


def summary(kls, agree, max_diff):
    return {
        "mean_kl": float("%.3g" % float(np.mean(kls))),
        "top1_agreement": round(float(np.mean(agree)), 6),
        "max_abs_diff": float("%.3g" % max_diff),
        "positions": len(kls),
    }


def fmt(s):
    return (f"mean KL {s['mean_kl']:.3g}, top-1 {s['top1_agreement']:.4f}, "
            f"max |d| {s['max_abs_diff']:.3g} over {s['positions']}")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, header, models):
    """One model header per line and one prompt per line, so that regenerated fixtures diff
    reviewably."""
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False)[:-1] + ', "models": [\n')
        for mi, m in enumerate(models):
            head = {k: v for k, v in m.items() if k != "prompts"}
            f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "prompts": [\n')
            f.write(",\n".join(json.dumps(p, **compact) for p in m["prompts"]))
            f.write("\n]}" + (",\n" if mi + 1 < len(models) else "\n"))
        f.write("]}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--gemma3", help="gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--out", default=OUT_DIR, help="directory of the tiny models")
    ap.add_argument("--reference", default=REFERENCE, help="the reference file to write")
    ap.add_argument("--gguf-only", action="store_true", help="write the tiny models only")
    args = ap.parse_args()
    out_dir = os.path.normpath(args.out)
    os.makedirs(out_dir, exist_ok=True)

    tiny = []
    for name, family, wtype, vocab_kind, opts in TINY_MODELS:
        path, vocab = write_tiny(name, family, wtype, vocab_kind, opts, out_dir)
        tiny.append((name, family, wtype, path, vocab))
        print(f"wrote {os.path.relpath(path)} ({os.path.getsize(path)} bytes)", flush=True)
    if args.gguf_only:
        return
    if not args.smollm2 or not args.gemma3:
        sys.exit("--smollm2 and --gemma3 are required for the reference run (or use --gguf-only)")

    import llama_cpp

    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        sys.exit(f"llama-cpp-python {LLAMA_CPP_PYTHON} expected, found {llama_cpp.__version__}")

    models = []
    for name, family, wtype, path, vocab in tiny:
        entry = {"name": name, "family": family, "weight_type": wtype,
                 "file": os.path.basename(path), "sha256": sha256(path)}
        models.append(reference(entry, path, prompt_ids(name, vocab), N_CTX_TINY, greedy=True))

    for real, family, path in (("smollm2", "llama", args.smollm2), ("gemma3-270m", "gemma3", args.gemma3)):
        from llama_cpp import Llama

        tok = Llama(model_path=path, vocab_only=True, verbose=False)
        prompts = [tok.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in REAL_TEXTS]
        tok.close()
        entry = {"name": real, "family": family, "real": real,
                 "file": os.path.basename(path), "sha256": sha256(path)}
        models.append(reference(entry, path, prompts, N_CTX_REAL, greedy=False))

    header = {
        "reference": "llama.cpp via llama-cpp-python",
        "llama_cpp_python": llama_cpp.__version__,
        "k": TOP_K,
        "settings": {
            "A": SETTINGS["A"], "B": SETTINGS["B"],
            "n_threads": N_THREADS, "n_ctx_tiny": N_CTX_TINY, "n_ctx_real": N_CTX_REAL,
            "kv_cache_type": "f16", "swa_full": True, "seed": SEED,
        },
        "recorded": "setting A: top-k [id, logit] and logsumexp per position; tiny models also "
                    "the greedy continuation; spread: A against B; float64 (tiny models): A "
                    "against an exact float64 forward pass of the stored weights",
    }
    out = os.path.normpath(args.reference)
    write_json(out, header, models)
    print(f"wrote {os.path.relpath(out)} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
