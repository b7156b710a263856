#!/usr/bin/env python3
"""transformers' own fp16 and bf16 log-probs for the fixture checkpoints (on a GPU), beside the
float64 ones of make_fixtures.py: how far reduced precision moves transformers itself, the yardstick
for kvtp's fp16/bf16 CUDA engine (tests/cuda_engine_test.cpp).

    python3 scripts/lowp_references.py tests/fixtures/models OUT_DIR
writes OUT_DIR/<model>/reference_lowp.json for every model folder.
"""
import json
import os
import sys

import torch
import transformers


def main():
    src, out = sys.argv[1], sys.argv[2]
    for name in sorted(os.listdir(src)):
        folder = os.path.join(src, name)
        if not os.path.exists(os.path.join(folder, "config.json")):
            continue
        with open(os.path.join(folder, "input_ids.txt")) as f:
            seqs = [[int(t) for t in line.split()] for line in f if line.strip()]
        result = {"generator": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                               f"{torch.cuda.get_device_name()}, eager attention, prefill"}
        for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, attn_implementation="eager").cuda().eval()
            per_seq = []
            with torch.inference_mode():
                for ids in seqs:
                    x = torch.tensor([ids], device="cuda")
                    logits = model(x).logits[0, :-1].double()  # as HF computes them, then float64
                    lp = logits.log_softmax(-1).gather(1, x[0, 1:, None])[:, 0]
                    per_seq.append(lp.tolist())
            result[dtype_name] = {"logprobs": per_seq}
        os.makedirs(os.path.join(out, name), exist_ok=True)
        with open(os.path.join(out, name, "reference_lowp.json"), "w") as f:
            json.dump(result, f)
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
