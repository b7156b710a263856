#!/usr/bin/env python3
"""Trains kvtp's embedded default models on C4 and saves them as Hugging Face folders under
models/: a Llama-architecture model (GQA, RoPE, tokenizer.json BPE) and an OPT-architecture
model (learned positions, GPT-2 vocab.json + merges.txt), each a few MB.

Data: data/c4/c4-train-1800.json.gz. Documents 0..1699 train, 1700..1799 pick the best step
(early stopping). data/c4/c4-heldout-200.json.gz is never seen here: it is the default
perplexity job's data. The reference perplexity of each model on it, by the protocol of
docs/PERPLEXITY.md computed in float64 by transformers, is written to
models/NAME/reference_ppl.json so that a test can compare `kvtp ppl` with it.

Runs on the GPU machine (PyTorch + transformers + tokenizers installed); about a minute each.
    python3 scripts/train_default.py --out models

--passkey: a third model, kvtp-llama-2m-passkey, that retrieves: kvtp-llama-2m fine-tuned on C4
windows mixed with passkey prompts (scripts/passkey_data.py, the construction `kvtp passkey`
tests; background from the training documents, the loss on the answer), so that the passkey test
measures what compression loses rather than the model's inability. Its full-cache accuracy on
held-out background goes to passkey_accuracy.json beside reference_ppl.json.
    python3 scripts/train_default.py --passkey --out models
"""
import argparse
import gzip
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import make_tokenizer_json, write_json  # noqa: E402
import passkey_data  # noqa: E402

VOCAB = 4096
MAX_POS = 1024


def read_docs(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(l)["text"] for l in f]


def make_gpt2(folder, texts):
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tok.save_model(folder)
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>",
        "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>", "errors": "replace"})


def encode(folder, docs):
    """The kvtp ppl protocol: documents joined with "\\n\\n", tokenized once (BOS as the
    tokenizer adds it)."""
    tok = AutoTokenizer.from_pretrained(folder)
    return torch.tensor(tok("\n\n".join(docs))["input_ids"], dtype=torch.long)


def windows(ids, seq_len):
    """Non-overlapping windows of seq_len; the last, shorter one is kept if it has 2+ tokens."""
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2]


@torch.no_grad()
def eval_ppl(model, ids, seq_len, device, dtype=None):
    nll, count = 0.0, 0
    for w in windows(ids, seq_len):
        w = w.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is None):
            logits = model(w[None]).logits[0].double()
        lp = torch.log_softmax(logits, -1)[:-1].gather(1, w[1:, None])
        nll -= float(lp.sum())
        count += len(w) - 1
    return math.exp(nll / count), nll, count


def train(name, model, folder, train_ids, val_ids, device, steps, batch, lr):
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    best, best_state, t0 = float("inf"), None, time.time()
    n = len(train_ids) - MAX_POS - 1
    for step in range(1, steps + 1):
        starts = torch.randint(0, n, (batch,), generator=g)
        x = torch.stack([train_ids[s:s + MAX_POS] for s in starts]).to(device)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            model.eval()
            ppl = eval_ppl(model, val_ids, MAX_POS, device)[0]
            print(f"{name} step {step} loss {loss.item():.3f} val ppl {ppl:.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if ppl < best:
                best, best_state = ppl, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return best


def finish(name, model, folder, tok_dir, heldout_docs, device):
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for f in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, f), folder)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64,
                                               attn_implementation="eager").to(device).eval()
    ids = encode(folder, heldout_docs)
    ppl, nll, count = eval_ppl(ref, ids, MAX_POS, device, dtype=torch.float64)
    write_json(os.path.join(folder, "reference_ppl.json"), {
        "generator": f"transformers {transformers.__version__}, torch {torch.__version__}, float64, eager",
        "data": "data/c4/c4-heldout-200.json.gz", "seq_len": MAX_POS, "ids": len(ids),
        "ppl": ppl, "nll": nll, "tokens": count})
    print(f"{name}: held-out C4 ppl {ppl:.4f} over {count} tokens (float64 reference)", flush=True)


@torch.no_grad()
def passkey_accuracy(model, tok, ws, device, cases=40, seed=1):
    """Greedy answers (12 new tokens) to held-out passkey prompts of up to 1000 tokens; exact
    match: the key appears in the answer."""
    rng, hits = random.Random(seed), 0
    model.eval()
    for _ in range(cases):
        text, key = passkey_data.example(ws, rng, max_words=550)
        ids = tok(text, return_tensors="pt").input_ids[:, -(MAX_POS - 12):].to(device)
        # An explicit mask: the pad id would be the BOS id, which generate() then masks out.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        hits += key in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return hits / cases


def train_passkey(args, device):
    """kvtp-llama-2m fine-tuned on C4 windows (LM loss) and passkey prompts (loss on the answer)."""
    base, folder = os.path.join(args.out, "kvtp-llama-2m"), os.path.join(args.out, "kvtp-llama-2m-passkey")
    docs = read_docs(os.path.join(args.data, "c4-train-1800.json.gz"))
    heldout = read_docs(os.path.join(args.data, "c4-heldout-200.json.gz"))
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    train_ids = encode(base, docs[:1700])
    train_words, test_words = passkey_data.words(docs[:1700]), passkey_data.words(heldout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.passkey_steps, pct_start=0.05)
    rng, g, t0 = random.Random(0), torch.Generator().manual_seed(0), time.time()
    best, best_state = -1.0, None
    for step in range(1, args.passkey_steps + 1):
        # 16 C4 windows and 16 passkey prompts + answers, right-padded (causal: pads after the answer)
        starts = torch.randint(0, len(train_ids) - MAX_POS - 1, (16,), generator=g)
        c4 = torch.stack([train_ids[s:s + MAX_POS] for s in starts])
        rows, labels = [], []
        for _ in range(16):
            text, key = passkey_data.example(train_words, rng, max_words=550)
            p = tok(text).input_ids[-(MAX_POS - 8):]
            a = tok(key + ".", add_special_tokens=False).input_ids
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(r) for r in rows)
        pk = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        pk_labels = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(c4.to(device), labels=c4.to(device)).loss + model(pk.to(device), labels=pk_labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.passkey_steps:
            acc = passkey_accuracy(model, tok, test_words, device)
            print(f"passkey step {step} loss {loss.item():.3f} held-out exact match {acc:.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if acc > best:
                best, best_state = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    shutil.rmtree(folder, ignore_errors=True)
    tok_dir = os.path.join(args.out, ".tok-passkey")
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.makedirs(tok_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(base, f), tok_dir)
    finish("llama-passkey", model, folder, tok_dir, heldout, device)
    shutil.rmtree(tok_dir)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").to(device)
    write_json(os.path.join(folder, "passkey_accuracy.json"), {
        "generator": f"transformers {transformers.__version__}, torch {torch.__version__}, float64, greedy",
        "cases": 40, "max_prompt_tokens": MAX_POS - 12, "background": "data/c4/c4-heldout-200.json.gz",
        "exact_match": passkey_accuracy(ref, tok, test_words, device)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models")
    ap.add_argument("--data", default="data/c4")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--passkey", action="store_true", help="only train kvtp-llama-2m-passkey (needs kvtp-llama-2m)")
    ap.add_argument("--passkey-steps", type=int, default=2000)
    args = ap.parse_args()
    device = "cuda"
    if args.passkey:
        return train_passkey(args, device)
    docs = read_docs(os.path.join(args.data, "c4-train-1800.json.gz"))
    heldout = read_docs(os.path.join(args.data, "c4-heldout-200.json.gz"))
    train_docs, val_docs = docs[:1700], docs[1700:]

    # Llama architecture: GQA (6 query heads, 2 KV heads), RoPE, SwiGLU, tied head.
    folder = os.path.join(args.out, "kvtp-llama-2m")
    tok_dir = os.path.join(args.out, ".tok-llama")
    for d in (folder, tok_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    make_tokenizer_json(tok_dir, train_docs, vocab=VOCAB)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=192, num_attention_heads=6,
                      num_key_value_heads=2, num_hidden_layers=4, intermediate_size=512,
                      max_position_embeddings=MAX_POS, tie_word_embeddings=True,
                      rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg)
    train("llama", model, folder, encode(tok_dir, train_docs), encode(tok_dir, val_docs),
          device, args.steps, 32, 2e-3)
    finish("llama", model, folder, tok_dir, heldout, device)
    shutil.rmtree(tok_dir)

    # OPT architecture: pre-LN, learned positions, ReLU, biases, tied head.
    folder = os.path.join(args.out, "kvtp-opt-3m")
    tok_dir = os.path.join(args.out, ".tok-opt")
    for d in (folder, tok_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    make_gpt2(tok_dir, train_docs)
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=192, num_attention_heads=6,
                    num_hidden_layers=4, ffn_dim=768, max_position_embeddings=MAX_POS,
                    word_embed_proj_dim=192, do_layer_norm_before=True, dropout=0.0,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    model = OPTForCausalLM(cfg)
    train("opt", model, folder, encode(tok_dir, train_docs), encode(tok_dir, val_docs),
          device, args.steps, 32, 2e-3)
    finish("opt", model, folder, tok_dir, heldout, device)
    shutil.rmtree(tok_dir)


if __name__ == "__main__":
    main()
