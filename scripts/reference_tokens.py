#!/usr/bin/env python3
"""Writes a tokenizer fixture: reference token ids for a set of texts, produced by
llama.cpp (through llama-cpp-python) from the same GGUF file the engine loads.

    python scripts/reference_tokens.py SmolLM2-135M-Instruct.Q4_1.gguf tests/fixtures/smollm2_tokens.json
    python scripts/reference_tokens.py --gemma3 gemma-3-270m-q4_k_m.gguf tests/fixtures/gemma3_tokens.json

--gemma3 appends cases with Gemma's own control tokens to the shared texts (whose ChatML
markers are plain text to Gemma's vocabulary). The engine's tokenizer tests compare their
own output against these files.
"""
import argparse
import json

from llama_cpp import Llama

TEXTS = [
    ("Hello world", False),
    (" Hello world", False),
    ("The capital of France is Paris.", False),
    ("In 1969, 3 astronauts flew 384,400 km; pi = 3.14159265358979.", False),
    ("Phone: +1-555-0123, ZIP 90210, version v2.11.3-rc1", False),
    ("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n", False),
    ("fn main() {\n\tlet x: Vec<u8> = vec![0xFF; 16];\n\tprintln!(\"{x:?}\");\n}", False),
    ("<div class=\"a\">&amp; {{ template }}</div>", False),
    ("Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية", False),
    ("Emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flags: 🇫🇷🇯🇵", False),
    ("   leading spaces, trailing spaces   ", False),
    ("tabs\t\tand\nnewlines\n\n\nand   multiple    spaces\r\nCRLF", False),
    ("\n\n", False),
    (" ", False),
    ("I'm sure you've heard they'll say it's 'quoted' and \"double\"", False),
    ("UPPER lower MiXeD CamelCaseWord snake_case_word kebab-case-word", False),
    ("1234567890 00 007 3.0e-10 -42 +7 1/2 50%", False),
    ("Mathematics: ∀x ∈ ℝ, x² ≥ 0 → √(x²) = |x|", False),
    ("a" * 40 + " " + "ab" * 30, False),
    ("<|im_start|>user\nHi<|im_end|>\n", True),
    ("<|im_start|>user\nHi<|im_end|>\n", False),
    ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", True),
    ("text <|endoftext|> more", True),
]


# Gemma's turn markers and BOS/EOS, parsed as control tokens and as plain text.
GEMMA3_TEXTS = [
    ("<start_of_turn>user\nHi<end_of_turn>\n", True),
    ("<start_of_turn>user\nHi<end_of_turn>\n", False),
    ("<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n", True),
    ("<bos>text", True),
    ("<bos>text", False),
    ("text <eos> more", True),
    ("<start_of_turn>model\n\n\nAnswer: Paris.<end_of_turn>", True),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_path")
    ap.add_argument("out_path")
    ap.add_argument("--gemma3", action="store_true", help="also the Gemma control-token cases")
    args = ap.parse_args()
    model_path, out_path = args.model_path, args.out_path
    texts = TEXTS + (GEMMA3_TEXTS if args.gemma3 else [])
    llm = Llama(model_path=model_path, vocab_only=True, verbose=False)
    cases = []
    for text, special in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        cases.append({"text": text, "parse_special": special, "ids": ids})
    # One case per line: reviewable diffs when the fixture is regenerated.
    header = {"model": model_path.rsplit("/", 1)[-1], "reference": "llama.cpp via llama-cpp-python"}
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(header, ensure_ascii=False)[:-1] + ', "cases": [\n')
        f.write(",\n".join(lines))
        f.write("\n]}\n")


if __name__ == "__main__":
    main()
