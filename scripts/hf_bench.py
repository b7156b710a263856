#!/usr/bin/env python3
"""Hugging Face transformers on the shapes `kvtp bench --device cuda` measures, on the same GPU:
the side-by-side of docs/BENCHMARKS.md. Random weights (speed does not depend on them).

  prefill: B 2048-token windows (--batch, default 1) scored whole (logits for every position, as a perplexity job)
  decode:  batch 1, after a context of C tokens, one token per step through the KV cache

usage (GPU machine): python3 scripts/hf_bench.py [--model llama-2-7b] [--dtype fp16]
                     [--contexts 2048,8192,32768] [--attn sdpa] [--batch B] [--layers N]
(`kvtp bench --device cuda --compare-hf` runs it on its own shapes and prints the ratios.)
"""
import argparse
import json
import statistics
import time

import torch
import transformers

SHAPES = {  # the presets of runtime/presets.cpp
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
}


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--layers", type=int, default=0, help="override the shape's layers (0 = its own)")
    ap.add_argument("--batch", type=int, default=1, help="prefill: windows scored in one forward pass")
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",") if c]
    dtype = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    shape = dict(SHAPES[a.model], **({"num_hidden_layers": a.layers} if a.layers > 0 else {}))
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=max(contexts + [a.seq_len]) + 64)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=a.attn, dtype=dtype).eval()
    g = torch.Generator(device="cuda").manual_seed(2)
    result = {"model": a.model, "dtype": a.dtype, "attn": a.attn, "transformers": transformers.__version__,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "decode": []}
    with torch.inference_mode():
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len), device="cuda", generator=g)
        s = timed(lambda: model(ids, labels=ids, use_cache=False), a.repeats)
        tokens = a.batch * a.seq_len
        result["prefill"] = {"seq_len": a.seq_len, "batch": a.batch, "seconds": s, "tokens_per_second": tokens / s}
        print(f"prefill {a.batch} x {a.seq_len}: {1e3 * s:.2f} ms, {tokens / s:.0f} tok/s", flush=True)
        for C in contexts:
            ctx = torch.randint(0, cfg.vocab_size, (1, C + a.decode_steps), device="cuda", generator=g)
            try:
                out = model(ctx[:, :C], use_cache=True, logits_to_keep=1)
            except torch.OutOfMemoryError:
                print(f"decode at {C}: out of memory", flush=True)
                continue
            past = out.past_key_values
            times = []
            for i in range(C, C + a.decode_steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model(ctx[:, i:i + 1], past_key_values=past, use_cache=True)
                out.logits.log_softmax(-1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                past = out.past_key_values
            ms = 1e3 * statistics.median(times)
            result["decode"].append({"context": C, "batch": 1, "ms_per_token": ms})
            print(f"decode at {C}: {ms:.3f} ms/token", flush=True)
            del past, out
            torch.cuda.empty_cache()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
