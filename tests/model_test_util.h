// Shared helpers for the whole-model tests: a tiny model configuration,
// random parameters and random tokens.
#ifndef MUONPS_TESTS_MODEL_TEST_UTIL_H_
#define MUONPS_TESTS_MODEL_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/philox.h"

namespace muonps::testing_util {

// The sizes of a tiny model that differ between tests. Everything else
// (hidden size 16, 3 layers, 2 heads, 4 routed experts of width 8,
// initializer_range 0.3) is fixed by TinyModelConfig.
struct TinyModelShape {
  int vocab_size = 24;
  int max_position_embeddings = 6;
  int intermediate_size = 16;
  int first_k_dense_replace = 1;
  int num_experts_per_tok = 2;
  int n_shared_experts = 1;
};

// A model small enough for finite differences and a float64 reference.
inline v1::ModelConfig TinyModelConfig(const std::string& scoring, const std::string& balancing,
                                       bool norm_topk_prob = true,
                                       double routed_scaling_factor = 1.0,
                                       const TinyModelShape& shape = TinyModelShape()) {
  v1::ModelConfig m = DefaultJobSpec().model();
  m.set_vocab_size(shape.vocab_size);
  m.set_hidden_size(16);
  m.set_num_hidden_layers(3);
  m.set_num_attention_heads(2);
  m.set_max_position_embeddings(shape.max_position_embeddings);
  m.set_first_k_dense_replace(shape.first_k_dense_replace);
  m.set_intermediate_size(shape.intermediate_size);
  m.set_n_routed_experts(4);
  m.set_num_experts_per_tok(shape.num_experts_per_tok);
  m.set_n_shared_experts(shape.n_shared_experts);
  m.set_moe_intermediate_size(8);
  m.set_scoring_func(scoring);
  m.set_balancing(balancing);
  m.set_norm_topk_prob(norm_topk_prob);
  m.set_routed_scaling_factor(routed_scaling_factor);
  m.set_initializer_range(0.3);
  return m;
}

// The tiny model (hidden 16, 2 heads of 8) with Multi-head Latent
// Attention of distinct widths: r 6, nope 4, rope 4, value 6, and query
// compression of rank q_lora_rank when > 0.
inline v1::ModelConfig WithTinyMla(v1::ModelConfig m, int q_lora_rank) {
  m.set_attention("mla");
  m.set_q_lora_rank(q_lora_rank);
  m.set_kv_lora_rank(6);
  m.set_qk_nope_head_dim(4);
  m.set_qk_rope_head_dim(4);
  m.set_v_head_dim(6);
  return m;
}

// Random parameters (initializer_range 0.3) with non-trivial norm gains
// (1 + 0.2 N(0,1)) and router biases (0.15 N(0,1)).
inline std::vector<float> RandomParams(const ModelLayout& layout, uint64_t seed) {
  std::vector<float> params(layout.total_floats());
  InitParameters(layout, seed, 0.3, params.data());
  for (const TensorInfo& t : layout.tensors()) {
    float* p = params.data() + t.offset;
    if (t.role == TensorRole::kNorm) {
      std::vector<float> noise(t.numel);
      FillNormal(noise.data(), t.numel, seed, t.name + "#gain", 0.2);
      for (int64_t i = 0; i < t.numel; ++i) p[i] += noise[i];
    } else if (t.role == TensorRole::kBuffer) {
      FillNormal(p, t.numel, seed, t.name + "#bias", 0.15);
    }
  }
  return params;
}

// `n` uniform random input tokens and targets in [0, vocab).
inline void RandomTokens(std::vector<int32_t>* inputs, std::vector<int32_t>* targets, int n,
                         int vocab, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  inputs->resize(n);
  targets->resize(n);
  for (int i = 0; i < n; ++i) {
    (*inputs)[i] = dist(gen);
    (*targets)[i] = dist(gen);
  }
}

}  // namespace muonps::testing_util

#endif  // MUONPS_TESTS_MODEL_TEST_UTIL_H_
