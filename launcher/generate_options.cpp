#include "launcher/generate_options.h"

namespace kvtp::launcher {

void addGenerateOptions(CLI::App* cmd, GenerateOptions& o) {
  GenerateJob& j = o.job;
  cmd->add_option("--model", j.model_dir, "Hugging Face model folder (config.json + safetensors + tokenizer)");
  cmd->add_option("--synthetic", j.synthetic, "random weights of a preset shape (e.g. opt-125m); prompts as --input-ids");
  cmd->add_option("--weights-seed", j.seed, "seed of --synthetic weights");
  cmd->add_option("--layers", j.layers, "with --synthetic: use only the first K layers");
  cmd->add_option("--prompt", j.prompts, "a prompt (text); repeat for several");
  cmd->add_option("--prompts", j.prompts_file, "prompts as documents: .json.gz / .jsonl / .json, a \"text\" field each");
  cmd->add_option("--input-ids", j.input_ids, "prompts as lines of token ids");
  cmd->add_option("--max-new-tokens", j.max_new_tokens, "new tokens per prompt at most (default 64)");
  cmd->add_option("--temperature", j.sampling.temperature, "0 (default): greedy; otherwise sample at this temperature");
  cmd->add_option("--top-k", j.sampling.top_k, "sample among the k most likely tokens (0: all)");
  cmd->add_option("--top-p", j.sampling.top_p, "sample among the fewest most likely tokens whose probability reaches p");
  cmd->add_option("--seed", j.sampling.seed, "sampling seed: the same seed draws the same tokens at any tp and batch");
  cmd->add_option("--stop", j.stop, "a string that ends a sequence (left out of its text); repeat for several");
  cmd->add_flag("--ignore-eos", j.ignore_eos, "generate --max-new-tokens even past the model's end-of-sequence token");
  cmd->add_option("--kv", j.kv, "KV eviction during generation, e.g. h2o:budget=0.2 (docs/KV.md)");
  cmd->add_option("--kv-quant", j.kv_quant, "KV quantization: int8 | kivi:bits=2,group=32,residual=128");
  cmd->add_option("--kv-lowrank", j.kv_lowrank, "low-rank KV channels: cskv:rank=R,window=W");
  cmd->add_option("--batch", j.batch, "cuda: prompts generated together, a token of each per step");
  cmd->add_option("--device", j.device, "cpu, or cuda (one GPU per rank)")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dtype", j.dtype, "fp32, fp16, bf16 (default: fp32 on cpu, fp16 on cuda)")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}));
  cmd->add_option("--tp", o.tp, "tensor-parallel degree (default: the world size under mpirun; submit: any)");
}

}  // namespace kvtp::launcher
