#!/usr/bin/env python3
"""Writes tests/fixtures/: tiny Hugging Face checkpoints with float64 reference log-probs computed
by transformers itself, and tokenizer fixtures with the ids HF's tokenizers give for a test text.

Runs where torch, transformers, tokenizers and sentencepiece are installed (the GPU machine; a CPU
is enough). Deterministic for a given library version: seeds are fixed.

    python3 scripts/make_fixtures.py --out tests/fixtures --c4 data/c4/c4-train-1800.json.gz
    python3 scripts/make_fixtures.py --torch-copies tests/fixtures   # PyTorch .bin copies only
    python3 scripts/make_fixtures.py --generation-references tests/fixtures models/kvtp-llama-2m models/kvtp-opt-3m
"""
import argparse
import gzip
import json
import math
import os
import shutil

import torch

try:  # --torch-copies can do without transformers (torch.save of the same state_dicts)
    import transformers
    from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                              OPTConfig, OPTForCausalLM)
except ImportError:
    transformers = None

# Unicode, emoji (with a zero-width joiner), whitespace runs, tabs, digits, contractions, newlines.
TEST_TEXT = ("Hello world! Ünïcödé — naïve café 😀🚀  multiple   spaces\n\nnew lines\ttabs "
             "12345 3.14159 don't I'll WE'RE\n  indented line   \n中文字符 and emoji 👩‍👩‍👧 end.")
VOCAB = 1000
MAX_POS = 128
SEQ_LENGTHS = [64, 23, 100]  # the reference sequences scored by each model fixture


def c4_texts(path, n):
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if len(out) == n:
                break
    return out


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def hf_ids(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    return {
        "hf_class": type(tok).__name__,
        "ids": tok(TEST_TEXT)["input_ids"],
        "ids_no_special": tok(TEST_TEXT, add_special_tokens=False)["input_ids"],
    }


# ---------------------------------------------------------------- tokenizers
def make_gpt2_bpe(folder, texts):
    """OPT's tokenizer: GPT-2 byte-level BPE as vocab.json + merges.txt; BOS is </s> (id 2)."""
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tok.save_model(folder)
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "bos_token": "</s>",
        "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>", "errors": "replace"})
    write_json(os.path.join(folder, "special_tokens_map.json"), {
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"})


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_tokenizer_json(folder, texts, vocab=VOCAB):
    """Llama 3's tokenizer: tokenizer.json byte-level BPE with the Llama 3 split regex,
    ignore_merges, and a TemplateProcessing post-processor that prepends <|begin_of_text|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2,
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(os.path.join(folder, "tokenizer.json"))
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>"})


def make_sentencepiece(folder, texts):
    """Llama 1/2's tokenizer: a SentencePiece BPE model with Llama 2's trainer settings."""
    import sentencepiece as spm
    lines = [l for t in texts for l in t.split("\n") if l.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=os.path.join(folder, "tokenizer"),
        vocab_size=VOCAB, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=100000,
        num_threads=4, minloglevel=2)
    os.remove(os.path.join(folder, "tokenizer.vocab"))
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False})
    sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    return sp.encode(TEST_TEXT)


# ---------------------------------------------------------------- models
def perturb(model, seed):
    """Random weights far from HF's init (norm weights 1, biases 0), so every parameter matters
    and logits are far from flat."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.25 * noise)


def reference(folder, seed):
    """Float64 log-probs of each actual next token, computed by transformers from the saved files
    (so f16/bf16 storage rounding is part of the reference)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64,
                                                 attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    seqs, nll, count = [], 0.0, 0
    lines = []
    for n in SEQ_LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=g)
        lines.append(" ".join(str(int(i)) for i in ids))
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
        lp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, ids[1:, None])[:, 0]
        s_nll = float(-lp.sum())
        seqs.append({"tokens": n - 1, "ppl": math.exp(s_nll / (n - 1)),
                     "logprobs": [float(x) for x in lp]})
        nll += s_nll
        count += n - 1
    with open(os.path.join(folder, "input_ids.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_json(os.path.join(folder, "reference.json"), {
        "generator": f"transformers {transformers.__version__}, torch {torch.__version__}, float64, eager",
        "ppl": math.exp(nll / count), "nll": nll, "tokens": count, "sequences": seqs})
    return math.exp(nll / count)


def save_model(model, folder, dtype, tokenizer_dir, **kw):
    os.makedirs(folder, exist_ok=True)
    model.to(dtype).save_pretrained(folder, safe_serialization=True, **kw)
    for f in os.listdir(tokenizer_dir):
        if f != "hf_ids.json":
            shutil.copy(os.path.join(tokenizer_dir, f), folder)


def read_safetensors(path):
    """name -> tensor of a .safetensors file (its JSON header, then the raw little-endian data)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[begin:end]), dtype=dtypes[t["dtype"]]).reshape(t["shape"]).clone()
    return out


def torch_copies(fixtures):
    """fixtures/torch/NAME: each model fixture saved again as PyTorch pickles by transformers
    (save_pretrained(safe_serialization=False), sharded as its safetensors are), the same weights
    bit for bit: kvtp must give the same log-probs from either copy."""
    models = os.path.join(fixtures, "models")
    for name in sorted(os.listdir(models)):
        src, dst = os.path.join(models, name), os.path.join(fixtures, "torch", name)
        shutil.rmtree(dst, ignore_errors=True)
        sharded = os.path.exists(os.path.join(src, "model.safetensors.index.json"))
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
            model.save_pretrained(dst, safe_serialization=False, **({"max_shard_size": "150KB"} if sharded else {}))
        except (NameError, TypeError, ValueError) as e:
            # No transformers, or one that writes safetensors only: what save_pretrained does
            # itself, torch.save of each shard's state_dict under its names.
            print(name, "save_pretrained:", repr(e), "-> torch.save of each shard")
            os.makedirs(dst, exist_ok=True)
            shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
            weight_map = {}
            for i, f in enumerate(shards):
                out = "pytorch_model.bin" if not sharded else f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
                tensors = read_safetensors(os.path.join(src, f))
                torch.save(tensors, os.path.join(dst, out))
                weight_map.update({k: out for k in tensors})
            if sharded:
                write_json(os.path.join(dst, "pytorch_model.bin.index.json"), {"metadata": {}, "weight_map": weight_map})
        for f in os.listdir(src):  # config, tokenizer, inputs and references as they are
            if not f.startswith("model"):
                shutil.copy(os.path.join(src, f), dst)
        print(name, "torch", torch.__version__, "transformers", transformers and transformers.__version__,
              sorted(os.listdir(dst)))


GENERATION_PROMPTS = ["The city council met on Tuesday to", "In the beginning", "Prices rose sharply after"]
GENERATION_NEW_TOKENS = 24


def generation_references(folders):
    """generate_reference.json in each model folder: transformers' greedy generate() (float64,
    eager) from a few prompts, stopping at the model's EOS as kvtp does, with each step's margin
    between the two most likely tokens (where it is tiny, float32 may pick the other one)."""
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained(folder)
        seqs = []
        for text in GENERATION_PROMPTS:
            ids = tok(text, return_tensors="pt").input_ids
            with torch.no_grad():  # an explicit mask: a pad id equal to BOS's would mask BOS (NaN rows in eager)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GENERATION_NEW_TOKENS,
                                     do_sample=False, output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=tok.eos_token_id if tok.eos_token_id is not None else 0)
            new = out.sequences[0, ids.shape[1]:]
            margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
            if not all(math.isfinite(m) for m in margins):
                raise SystemExit(f"{folder}: transformers' scores are not finite for {text!r}")
            seqs.append({"prompt": text, "prompt_ids": ids[0].tolist(), "ids": new.tolist(),
                         "text": tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                         "margins": margins})
        write_json(os.path.join(folder, "generate_reference.json"), {
            "generator": f"transformers {transformers.__version__}, torch {torch.__version__}, float64, eager, "
                         "generate(do_sample=False)",
            "max_new_tokens": GENERATION_NEW_TOKENS, "sequences": seqs})
        print(folder, [len(s["ids"]) for s in seqs])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--c4", default="data/c4/c4-train-1800.json.gz")
    ap.add_argument("--torch-copies", metavar="FIXTURES", help="only write FIXTURES/torch/ (PyTorch .bin copies)")
    ap.add_argument("--generation-references", nargs="+", metavar="FOLDER",
                    help="only write generate_reference.json in these model folders (tests/fixtures: each model)")
    args = ap.parse_args()
    if args.generation_references:
        folders = []
        for f in args.generation_references:
            models = os.path.join(f, "models")
            folders += [os.path.join(models, n) for n in sorted(os.listdir(models))] if os.path.isdir(models) else [f]
        return generation_references(folders)
    if args.torch_copies:
        return torch_copies(args.torch_copies)
    torch.manual_seed(0)
    texts = c4_texts(args.c4, 600)
    tok_root = os.path.join(args.out, "tokenizers")
    shutil.rmtree(args.out, ignore_errors=True)

    gpt2, tj, spd = (os.path.join(tok_root, n) for n in ("gpt2-bpe", "llama3-json", "llama2-spm"))
    for d in (gpt2, tj, spd):
        os.makedirs(d)
    make_gpt2_bpe(gpt2, texts)
    make_tokenizer_json(tj, texts)
    spm_ids = make_sentencepiece(spd, texts)
    for d in (gpt2, tj, spd):
        info = {"text": TEST_TEXT, "transformers": transformers.__version__}
        try:
            info.update(hf_ids(d))
        except Exception as e:  # recorded, so the C++ test can say what HF could not do
            info["hf_error"] = repr(e)
        if d == spd:
            info["sentencepiece_ids"] = spm_ids
        write_json(os.path.join(d, "hf_ids.json"), info)
        print(d, {k: (v if not isinstance(v, list) else len(v)) for k, v in info.items()})

    m = os.path.join(args.out, "models")
    common = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POS)

    torch.manual_seed(1)
    cfg = OPTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128,
                    word_embed_proj_dim=64, do_layer_norm_before=True, pad_token_id=1,
                    bos_token_id=2, eos_token_id=2, **common)
    model = OPTForCausalLM(cfg)
    perturb(model, 1)
    save_model(model, os.path.join(m, "opt-preln"), torch.float32, gpt2)

    torch.manual_seed(2)
    cfg = OPTConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128,
                    word_embed_proj_dim=32, do_layer_norm_before=False, pad_token_id=1,
                    bos_token_id=2, eos_token_id=2, **common)
    model = OPTForCausalLM(cfg)
    perturb(model, 2)
    save_model(model, os.path.join(m, "opt-postln-proj"), torch.float16, gpt2)

    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=2, intermediate_size=160, tie_word_embeddings=True,
                      rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      **common)
    model = LlamaForCausalLM(cfg)
    perturb(model, 3)
    save_model(model, os.path.join(m, "llama2-tied"), torch.float32, spd)

    torch.manual_seed(4)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                      num_hidden_layers=2, intermediate_size=160, tie_word_embeddings=False,
                      rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64},
                      **common)
    model = LlamaForCausalLM(cfg)
    perturb(model, 4)
    save_model(model, os.path.join(m, "llama3-gqa"), torch.float16, tj)

    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, intermediate_size=96, tie_word_embeddings=False,
                      rope_theta=10000.0, rms_norm_eps=1e-6, attention_bias=True,
                      rope_scaling={"rope_type": "linear", "factor": 2.0},
                      bos_token_id=1, eos_token_id=2, **common)
    model = LlamaForCausalLM(cfg)
    perturb(model, 5)
    save_model(model, os.path.join(m, "llama-sharded-bf16"), torch.bfloat16, spd,
               max_shard_size="150KB")

    for i, name in enumerate(sorted(os.listdir(m))):
        ppl = reference(os.path.join(m, name), 100 + i)
        files = sorted(os.listdir(os.path.join(m, name)))
        print(f"{name}: ppl {ppl:.4f} files {files}")
        print("   config:", open(os.path.join(m, name, "config.json")).read().replace("\n", " "))


if __name__ == "__main__":
    main()
