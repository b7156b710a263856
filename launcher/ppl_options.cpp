#include "launcher/ppl_options.h"

namespace kvtp::launcher {

void addPplOptions(CLI::App* cmd, PplOptions& o) {
  PplJob& j = o.job;
  cmd->add_option("--model", j.model_dir, "Hugging Face model folder (config.json + safetensors + tokenizer)");
  cmd->add_option("--synthetic", j.synthetic, "random weights of a preset shape (e.g. opt-125m) or config.json");
  cmd->add_option("--seed", j.seed, "seed of --synthetic weights");
  cmd->add_option("--layers", j.layers, "with --synthetic: use only the first K layers");
  cmd->add_option("--data", j.data, "C4-style documents: .json.gz / .jsonl / .json with a \"text\" field");
  cmd->add_option("--input-ids", j.input_ids, "file of token-id lines, each scored on its own");
  cmd->add_option("--preset", o.preset, "evaluation protocol: default, gptq (docs/PERPLEXITY.md)");
  o.seq_len = cmd->add_option("--seq-len", j.seq_len, "window length (capped at the model's max positions)");
  o.stride = cmd->add_option("--stride", j.stride, "slide windows by S, scoring only new tokens");
  o.max_windows = cmd->add_option("--max-windows", j.max_windows, "score at most K windows (0 = all)");
  o.max_docs = cmd->add_option("--max-docs", j.max_docs, "read at most D documents (0 = all)");
  o.join = cmd->add_option("--join", j.join, "separator between documents (default two newlines)");
  o.drop_partial = cmd->add_flag("--drop-partial", j.drop_partial, "drop a last window shorter than --seq-len");
  o.mode_option = cmd->add_option("--mode", o.mode, "prefill (a window at once) or decode (token by token through the KV cache)")
      ->check(CLI::IsMember({"prefill", "decode"}));
  cmd->add_option("--kv", j.kv, "KV eviction, e.g. h2o:budget=0.2,recent=16 (docs/KV.md); implies --mode decode");
  cmd->add_option("--kv-quant", j.kv_quant, "KV quantization: int8 | kivi:bits=2,group=32,residual=128");
  cmd->add_option("--kv-lowrank", j.kv_lowrank, "low-rank KV channels: cskv:rank=R,window=W (docs/KV.md)");
  cmd->add_option("--prefill", j.prefill, "decode mode: the first N tokens of each window go through at once");
  cmd->add_option("--batch", j.batch, "decode mode, cuda: windows decoded together, a token of each per step (same log-probs)");
  cmd->add_option("--device", j.device, "cpu, or cuda (one GPU per rank: the rank's local index on its node)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dtype", j.dtype, "weights and activations: fp32, fp16, bf16 (default: fp32 on cpu, fp16 on cuda)")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}));
  cmd->add_flag("--time-collectives", j.time_collectives,
                "cuda, tp > 1: measure the GPU time inside the all-reduces (collective_share; slows decode a little)");
  cmd->add_option("--tp", o.tp, "tensor-parallel degree (default: the world size under mpirun; submit: any)");
}

PplJob PplOptions::resolve() const {
  PplJob j = job;
  PplJob p;
  applyPreset(p, preset);
  if (!seq_len->count()) j.seq_len = p.seq_len;
  if (!stride->count()) j.stride = p.stride;
  if (!max_windows->count()) j.max_windows = p.max_windows;
  if (!max_docs->count()) j.max_docs = p.max_docs;
  if (!join->count()) j.join = p.join;
  if (!drop_partial->count()) j.drop_partial = p.drop_partial;
  j.mode = parseMode(mode);
  // KV compression is evaluated token by token through the cache (the Scissorhands protocol).
  if ((!j.kv.empty() || !j.kv_quant.empty() || !j.kv_lowrank.empty() || j.prefill > 0) && !mode_option->count())
    j.mode = Mode::Decode;
  return j;
}

}  // namespace kvtp::launcher
