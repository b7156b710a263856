// Sharding as a pure function (name, shape, rank, tp) -> slice, and shard-only weight reads.
#include <gtest/gtest.h>

#include <filesystem>

#include "runtime/config.h"
#include "runtime/error.h"
#include "runtime/partition.h"
#include "runtime/presets.h"
#include "runtime/weights.h"
#include "test_util.h"

namespace kvtp {
namespace {

TEST(Sharding, SlicesFollowTheLayerKinds) {
  const ModelConfig c = syntheticConfig("llama-2-70b");  // 64 q heads, 8 kv heads, hd 128, ffn 28672
  const Partition p = Partition::make(c, 1, 4);
  const std::vector<int64_t> any;
  auto s = [&](const std::string& n) { return shardSlice(n, any, c, p); };
  EXPECT_EQ(s("model.layers.0.self_attn.q_proj.weight").dim, 0);
  EXPECT_EQ(s("model.layers.0.self_attn.q_proj.weight").begin, 16 * 128);
  EXPECT_EQ(s("model.layers.0.self_attn.q_proj.weight").end, 32 * 128);
  EXPECT_EQ(s("model.layers.0.self_attn.k_proj.weight").begin, 2 * 128);
  EXPECT_EQ(s("model.layers.0.self_attn.o_proj.weight").dim, 1);  // row-parallel: input columns
  EXPECT_EQ(s("model.layers.0.self_attn.o_proj.weight").begin, 16 * 128);
  EXPECT_EQ(s("model.layers.0.mlp.up_proj.weight").begin, 28672 / 4);
  EXPECT_EQ(s("model.layers.0.mlp.down_proj.weight").dim, 1);
  EXPECT_EQ(s("model.layers.0.mlp.down_proj.bias").dim, -1);  // added once, after the all-reduce
  EXPECT_EQ(s("model.embed_tokens.weight").begin, 8000);
  EXPECT_EQ(s("lm_head.weight").end, 16000);
  EXPECT_EQ(s("model.layers.0.input_layernorm.weight").dim, -1);
  EXPECT_EQ(s("model.norm.weight").dim, -1);
}

TEST(Sharding, FewKvHeadsAreReplicated) {
  // llama3-gqa fixture: 8 query heads, 2 KV heads. At tp 4 each rank holds 2 query heads and
  // the one KV head they read.
  const ModelConfig c = loadConfig(test::fixture("models/llama3-gqa"));
  for (int r = 0; r < 4; ++r) {
    const Partition p = Partition::make(c, r, 4);
    EXPECT_EQ(p.kv_heads, 1);
    EXPECT_EQ(p.kv_head_begin, r / 2) << "rank " << r;
    EXPECT_EQ(p.kvHeadOf(0, c), 0);
    EXPECT_EQ(p.kvHeadOf(1, c), 0);
  }
}

TEST(Sharding, UnevenFfnAndVocabCoverEverythingOnce) {
  ModelConfig c = loadConfig(test::fixture("models/llama-sharded-bf16"));  // ffn 96, vocab 1000
  c.ffn = 97;
  c.vocab_size = 1001;
  int64_t f = 0, v = 0;
  for (int r = 0; r < 4; ++r) {
    const Partition p = Partition::make(c, r, 4);
    EXPECT_EQ(p.ffn_begin, f);
    EXPECT_EQ(p.vocab_begin, v);
    f = p.ffn_end;
    v = p.vocab_end;
  }
  EXPECT_EQ(f, 97);
  EXPECT_EQ(v, 1001);
}

TEST(Sharding, IndivisibleHeadsFailBeforeLoading) {
  const ModelConfig c = loadConfig(test::fixture("models/opt-preln"));  // 4 heads
  EXPECT_THROW(Partition::make(c, 0, 3), Error);
  const ModelConfig g = loadConfig(test::fixture("models/llama3-gqa"));  // 2 kv heads
  EXPECT_NO_THROW(Partition::make(g, 0, 8));
  EXPECT_THROW(Partition::make(syntheticConfig("llama-2-70b"), 0, 3), Error);
}

// 4 bf16 shards, 4 q heads, 2 KV heads: at tp 4 each rank reads a quarter of every split tensor,
// all of the replicated ones, and one of the two KV heads (the GQA replication rule) — from the
// safetensors shards and from their PyTorch copy alike.
class ShardedReads : public ::testing::TestWithParam<std::string> {};

TEST_P(ShardedReads, EachRankReadsAboutTotalOverTp) {
  const std::string dir = test::fixture(GetParam() + "/llama-sharded-bf16");
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << dir << " not made (scripts/make_fixtures.py --torch-copies)";
  const ModelConfig c = loadConfig(dir);
  const int tp = 4;
  Checkpoint whole(dir);
  const uint64_t total = whole.bytesStored();
  uint64_t replicated = 0, kv = 0;
  const Partition p0 = Partition::make(c, 0, tp);
  for (auto& n : whole.names()) {
    const auto& t = whole.info(n);
    const uint64_t bytes = t.numel() * dtypeSize(t.dtype);
    if (shardSlice(n, t.shape, c, p0).dim < 0) replicated += bytes;
    if (n.find("k_proj") != std::string::npos || n.find("v_proj") != std::string::npos) kv += bytes;
  }
  ASSERT_LT(replicated, total / 10);
  const uint64_t expected = (total - replicated - kv) / tp + replicated + kv / c.kv_heads;
  EXPECT_LT(expected, total / tp + total / 10);  // about total / tp
  for (int r = 0; r < tp; ++r) {
    Checkpoint ck(dir);
    loadWeights(c, ck, Partition::make(c, r, tp));
    EXPECT_EQ(ck.bytesRead(), expected) << "rank " << r;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, ShardedReads, ::testing::Values("models", "torch"));

TEST(Sharding, SyntheticSlicesAreSlicesOfTheWholeModel) {
  ModelConfig c = syntheticConfig("opt-125m");
  c.layers = 1;
  const ModelWeights whole = syntheticWeights(c, 7, Partition::make(c, 0, 1));
  const ModelWeights part = syntheticWeights(c, 7, Partition::make(c, 1, 2));
  const int64_t H = c.hidden, half = c.ffn / 2;
  // fc1 rows [half, ffn) and fc2 columns [half, ffn) of rank 1 equal those of the whole model.
  EXPECT_EQ(part.layers[0].w_up[0], whole.layers[0].w_up[half * H]);
  EXPECT_EQ(part.layers[0].w_down[5 * half + 3], whole.layers[0].w_down[5 * c.ffn + half + 3]);
  EXPECT_NE(whole.layers[0].w_up[0], whole.layers[0].w_up[1]);
}

// The GPU engine takes weights a layer at a time: a layer built alone (read from a sharded
// checkpoint, or synthetic) equals that layer of the whole model, model-level tensors come only
// with `top`, and weightElements counts what a rank holds.
TEST(Sharding, OneLayerAtATimeEqualsTheWholeModel) {
  const std::string dir = test::fixture("models/llama-sharded-bf16");
  const ModelConfig c = loadConfig(dir);
  const Partition p = Partition::make(c, 1, 2);
  Checkpoint ck(dir);
  const ModelWeights whole = loadWeights(c, ck, p);
  const ModelWeights top = loadWeights(c, ck, p, {0, 0, true});
  EXPECT_EQ(top.embed, whole.embed);
  EXPECT_TRUE(top.layers[0].wq.empty());
  int64_t elements = int64_t(whole.embed.size() + whole.final_norm_w.size() + whole.lm_head.size());
  for (int l = 0; l < c.layers; ++l) {
    const ModelWeights one = loadWeights(c, ck, p, {l, l + 1, false});
    EXPECT_TRUE(one.embed.empty());
    const auto& a = one.layers[l];
    const auto& b = whole.layers[l];
    EXPECT_EQ(a.wq, b.wq);
    EXPECT_EQ(a.wk, b.wk);
    EXPECT_EQ(a.w_down, b.w_down);
    EXPECT_EQ(a.ffn_norm_w, b.ffn_norm_w);
    for (const Tensor* t : {&b.attn_norm_w, &b.wq, &b.bq, &b.wk, &b.bk, &b.wv, &b.bv, &b.wo, &b.bo, &b.ffn_norm_w,
                            &b.w_gate, &b.w_up, &b.w_down})
      elements += int64_t(t->size());
  }
  EXPECT_EQ(weightElements(c, p), elements);

  ModelConfig s = syntheticConfig("llama-2-7b");
  s.layers = 3;
  s.hidden = 256, s.heads = 4, s.kv_heads = 4, s.head_dim = 64, s.ffn = 512, s.vocab_size = 1000;
  const ModelWeights synthetic_whole = syntheticWeights(s, 3, p);
  EXPECT_EQ(syntheticWeights(s, 3, p, {2, 3, false}).layers[2].w_up, synthetic_whole.layers[2].w_up);
}

}  // namespace
}  // namespace kvtp
