// ShardState: the same job split over shards, with slot gradients computed
// separately and pushed tensor by tensor, ends bit-identical to the
// single-process trainer; bad pushes are refused without a state change.
#include "services/shard/shard_state.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "data/batch_sampler.h"
#include "data/token_source.h"
#include "model/moe_model.h"
#include "optim/grad_norm.h"
#include "optim/lr_schedule.h"
#include "optim/newton_schulz.h"
#include "optim/orthogonalizer.h"
#include "optim/tensor_update.h"
#include "tests/test_util.h"
#include "trainer/trainer.h"

namespace muonps {
namespace {

using ::testing::HasSubstr;

class ShardStateTest : public testing_util::TempDirTest {
 protected:
  v1::JobSpec Job(const std::string& optimizer, const std::string& balancing) {
    {
      std::ofstream out(Path("corpus.txt"));
      for (int i = 0; i < 400; ++i)
        out << "Shard " << i << " holds " << (i * 31 % 97) << " rows.\n";
    }
    absl::StatusOr<v1::JobSpec> job =
        ParseJobSpecJson(absl::StrCat(R"({
      "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "max_position_embeddings": 32, "intermediate_size": 64, "n_routed_experts": 4,
                "moe_intermediate_size": 16, "balancing": ")",
                                      balancing, R"("},
      "optimizer": {"name": ")",
                                      optimizer, R"(", "lr": 0.01, "max_grad_norm": 0.5},
      "schedule": {"total_steps": 4, "warmup_steps": 1},
      "data": {"path": ")",
                                      Path("corpus.txt"), R"(", "sampling": "random"},
      "batch": {"slots": 3, "micro_batch": 2}, "seed": 11})"));
    EXPECT_TRUE(job.ok()) << job.status();
    return *job;
  }
};

// Drives `shards` through the job the way workers and a coordinator would.
void RunDistributed(const v1::JobSpec& job, std::vector<std::unique_ptr<ShardState>>& shards,
                    int steps) {
  MoeModel model(job.model());
  const ModelLayout& layout = model.layout();
  const int T = job.model().max_position_embeddings(), slots = job.batch().slots(),
            rows = job.batch().micro_batch();
  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(job.data(), job.model().vocab_size(), T);
  ASSERT_TRUE(corpus.ok());
  BatchSampler sampler(&corpus->train, T, slots, rows, job.data().sampling() == "random",
                       job.seed());
  auto owner = [&](const std::string& name) -> ShardState* {
    for (auto& s : shards) {
      if (s->Owns(name)) return s.get();
    }
    return nullptr;
  };
  const double global_tokens = static_cast<double>(slots) * rows * T;
  for (int step = 0; step < steps; ++step) {
    // Pull.
    std::vector<float> params(layout.total_floats(), 0.0f);
    for (const TensorInfo& t : layout.tensors()) {
      absl::StatusOr<std::vector<float>> v = owner(t.name)->Parameter(t.name);
      ASSERT_TRUE(v.ok());
      std::copy(v->begin(), v->end(), params.begin() + t.offset);
    }
    // Slot 1 first (it waits for slot 0), then slot 0 (both are summed),
    // then the rest in order (each summed as it arrives): arrival order
    // must not matter.
    std::vector<std::vector<int64_t>> loads;
    for (int k = 0; k < slots; ++k) {
      const int s = k < 2 && slots > 1 ? 1 - k : k;
      std::vector<int32_t> in(rows * T), tg(rows * T);
      sampler.Fill(step, s, in.data(), tg.data());
      std::vector<float> grads(layout.total_floats(), 0.0f);
      const float aux_scale = job.model().balancing() == "aux_loss"
                                  ? static_cast<float>(job.model().aux_loss_alpha() / slots)
                                  : 0.0f;
      SlotStats stats =
          model.ForwardBackward(params.data(), in.data(), tg.data(), rows,
                                static_cast<float>(1.0 / global_tokens), aux_scale, grads.data());
      if (loads.empty()) loads.assign(stats.expert_load.size(), {});
      for (size_t l = 0; l < loads.size(); ++l) {
        loads[l].resize(stats.expert_load[l].size());
        for (size_t e = 0; e < loads[l].size(); ++e) loads[l][e] += stats.expert_load[l][e];
      }
      for (const TensorInfo& t : layout.tensors()) {
        if (!t.trainable()) continue;
        absl::StatusOr<bool> counted =
            owner(t.name)->AddSlotGradient(step, s, t.name, grads.data() + t.offset, t.numel);
        ASSERT_TRUE(counted.ok()) << counted.status();
        EXPECT_TRUE(*counted);
      }
    }
    // Global norm in layout order, then the update everywhere.
    std::map<std::string, double> squares;
    for (auto& shard : shards) {
      ASSERT_TRUE(shard->GradientsComplete());
      absl::StatusOr<std::vector<std::pair<std::string, double>>> sq = shard->GradientSquares();
      ASSERT_TRUE(sq.ok());
      for (const auto& [name, value] : *sq) squares[name] = value;
    }
    double sum = 0.0;
    for (const TensorInfo& t : layout.tensors()) {
      if (t.trainable()) sum += squares.at(t.name);
    }
    const double max_norm = job.optimizer().max_grad_norm();
    const double coef = max_norm > 0 ? max_norm / (std::sqrt(sum) + 1e-6) : 1.0;
    const double lr = ScheduledLr(job.optimizer().lr(), step, job.schedule().total_steps(),
                                  job.schedule().warmup_steps(), job.schedule().min_lr_ratio());
    for (auto& shard : shards) ASSERT_TRUE(shard->ApplyStep(step, lr, coef, loads).ok());
  }
}

struct Split {
  std::string optimizer, balancing;
  int shards;
};

void PrintTo(const Split& s, std::ostream* os) {
  *os << s.optimizer << "/" << s.balancing << "/" << s.shards << " shards";
}

class ShardEquivalenceTest : public ShardStateTest, public ::testing::WithParamInterface<Split> {};

TEST_P(ShardEquivalenceTest, MatchesTheTrainerBitForBit) {
  const Split split = GetParam();
  const v1::JobSpec job = Job(split.optimizer, split.balancing);
  TrainOptions options;
  options.until_step = 3;
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job, options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());

  const ModelLayout layout(job.model());
  std::vector<std::vector<std::string>> owned(split.shards);
  for (size_t i = 0; i < layout.tensors().size(); ++i) {
    owned[i % split.shards].push_back(layout.tensors()[i].name);
  }
  std::vector<std::unique_ptr<ShardState>> shards;
  for (const auto& names : owned) {
    absl::StatusOr<std::unique_ptr<ShardState>> shard = ShardState::Create(job, names);
    ASSERT_TRUE(shard.ok()) << shard.status();
    shards.push_back(std::move(*shard));
  }
  RunDistributed(job, shards, 3);
  for (const TensorInfo& t : layout.tensors()) {
    for (auto& shard : shards) {
      if (!shard->Owns(t.name)) continue;
      EXPECT_EQ(shard->version(), 3);
      absl::StatusOr<std::vector<float>> v = shard->Parameter(t.name);
      ASSERT_TRUE(v.ok());
      EXPECT_EQ(std::memcmp(v->data(), (*trainer)->state().params.data() + t.offset,
                            t.numel * sizeof(float)),
                0)
          << t.name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ShardEquivalenceTest,
                         ::testing::Values(Split{"muon", "aux_free_bias", 1},
                                           Split{"muon", "aux_free_bias", 3},
                                           Split{"adamw", "aux_loss", 2}),
                         [](const ::testing::TestParamInfo<Split>& info) {
                           return absl::StrCat(info.param.optimizer, "_", info.param.balancing, "_",
                                               info.param.shards, "shards");
                         });

// Newton-Schulz handed to an Orthogonalizer (what `muonps shard --device
// cuda` does with a GPU one): here one that runs the CPU's NewtonSchulz and
// counts its calls. Every Muon matrix must go through it once per step, and
// the bits must stay the trainer's.
class CountingOrthogonalizer : public Orthogonalizer {
 public:
  void Orthogonalize(float* u, int rows, int cols, int steps) override {
    ++calls;
    NewtonSchulz(u, u, rows, cols, steps);
  }
  const char* name() const override { return "counting"; }
  std::atomic<int> calls{0};
};

TEST_F(ShardStateTest, AnOrthogonalizerTakesEveryMuonMatrixAndKeepsTheTrainersBits) {
  const v1::JobSpec job = Job("muon", "aux_free_bias");
  TrainOptions options;
  options.until_step = 2;
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job, options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());
  const ModelLayout layout(job.model());
  std::vector<std::vector<std::string>> owned(2);
  int matrices = 0;
  for (size_t i = 0; i < layout.tensors().size(); ++i) {
    owned[i % 2].push_back(layout.tensors()[i].name);
    if (UsesMuon(layout.tensors()[i], "muon")) ++matrices;
  }
  CountingOrthogonalizer counting;
  std::vector<std::unique_ptr<ShardState>> shards;
  for (const auto& names : owned) {
    absl::StatusOr<std::unique_ptr<ShardState>> shard = ShardState::Create(job, names);
    ASSERT_TRUE(shard.ok()) << shard.status();
    (*shard)->set_orthogonalizer(&counting);
    shards.push_back(std::move(*shard));
  }
  RunDistributed(job, shards, 2);
  EXPECT_GT(matrices, 0);
  EXPECT_EQ(counting.calls.load(), 2 * matrices);
  for (const TensorInfo& t : layout.tensors()) {
    for (auto& shard : shards) {
      if (!shard->Owns(t.name)) continue;
      absl::StatusOr<std::vector<float>> v = shard->Parameter(t.name);
      ASSERT_TRUE(v.ok());
      EXPECT_EQ(std::memcmp(v->data(), (*trainer)->state().params.data() + t.offset,
                            t.numel * sizeof(float)),
                0)
          << t.name;
    }
  }
}

// A pull of the next version is served tensor by tensor while the step
// that makes it is applied: each tensor is published once its update is
// done, with exactly the values the step ends with, and the version before
// is gone for a tensor as soon as it is published.
TEST_F(ShardStateTest, EachTensorIsServedAtTheNextVersionAsSoonAsItIsUpdated) {
  const v1::JobSpec job = Job("muon", "aux_free_bias");
  const ModelLayout layout(job.model());
  std::vector<std::string> names;
  for (const TensorInfo& t : layout.tensors()) names.push_back(t.name);
  absl::StatusOr<std::unique_ptr<ShardState>> created = ShardState::Create(job, names);
  ASSERT_TRUE(created.ok()) << created.status();
  ShardState& shard = **created;
  for (const std::string& name : names) {
    absl::StatusOr<std::optional<ShardState::Snapshot>> now = shard.ServedTensor(name, 0);
    ASSERT_TRUE(now.ok() && now->has_value()) << name;
    absl::StatusOr<std::optional<ShardState::Snapshot>> next = shard.ServedTensor(name, 1);
    ASSERT_TRUE(next.ok()) << name;
    EXPECT_FALSE(next->has_value()) << name << ": version 1 before any step";
  }
  EXPECT_EQ(shard.ServedTensor("no.such.tensor", 0).status().code(), absl::StatusCode::kNotFound);

  // What the publications show, as they happen (on the applying threads).
  absl::Mutex mu;
  std::map<std::string, std::vector<float>> seen;  // at its first sight at version 1
  std::vector<int> ready_counts;                   // tensors at version 1, per publication
  shard.set_on_publish([&] {
    absl::MutexLock lock(&mu);
    int ready = 0;
    for (const std::string& name : names) {
      absl::StatusOr<std::optional<ShardState::Snapshot>> s = shard.ServedTensor(name, 1);
      if (!s.ok() || !s->has_value()) continue;
      ++ready;
      if (seen.count(name) == 0) seen[name] = ***s;
      EXPECT_EQ(shard.ServedTensor(name, 0).status().code(), absl::StatusCode::kFailedPrecondition)
          << name << ": version 0 must be gone once version 1 is served";
    }
    ready_counts.push_back(ready);
  });
  const int slots = job.batch().slots();
  std::vector<std::vector<int64_t>> loads;
  for (int l = job.model().first_k_dense_replace(); l < job.model().num_hidden_layers(); ++l) {
    loads.push_back(std::vector<int64_t>(job.model().n_routed_experts(), 0));
    for (size_t e = 0; e < loads.back().size(); ++e)
      loads.back()[e] = static_cast<int64_t>(e * 3 + l);
  }
  for (int s = 0; s < slots; ++s) {
    std::vector<ShardState::Gradient> grads;
    std::vector<std::vector<float>> data;
    for (const TensorInfo& t : layout.tensors()) {
      if (!t.trainable()) continue;
      data.push_back(std::vector<float>(t.numel));
      for (int64_t i = 0; i < t.numel; ++i) {
        data.back()[i] = static_cast<float>(std::sin(0.37 * i + s + t.offset)) * 1e-2f;
      }
    }
    size_t k = 0;
    for (const TensorInfo& t : layout.tensors()) {
      if (!t.trainable()) continue;
      grads.push_back({t.name, data[k].data(), t.numel});
      ++k;
    }
    ASSERT_TRUE(shard.AddGradients(0, s, 1, grads).ok());
  }
  ASSERT_TRUE(shard.GradientSquares().ok());
  ASSERT_TRUE(shard.ApplyStep(0, 0.01, 1.0, loads).ok());
  EXPECT_EQ(shard.served_version(), 1);
  // One publication per tensor: the first ones (the buffers, first of all)
  // were served while the others were still being updated.
  ASSERT_EQ(ready_counts.size(), names.size());
  EXPECT_LT(ready_counts.front(), static_cast<int>(names.size()));
  for (size_t i = 1; i < ready_counts.size(); ++i) EXPECT_GE(ready_counts[i], ready_counts[i - 1]);
  EXPECT_EQ(ready_counts.back(), static_cast<int>(names.size()));
  ASSERT_EQ(seen.size(), names.size());
  for (const std::string& name : names) {
    absl::StatusOr<std::vector<float>> final_values = shard.Parameter(name);
    ASSERT_TRUE(final_values.ok());
    ASSERT_EQ(seen.at(name).size(), final_values->size()) << name;
    EXPECT_EQ(std::memcmp(seen.at(name).data(), final_values->data(),
                          final_values->size() * sizeof(float)),
              0)
        << name;
  }
  shard.set_on_publish(nullptr);
}

TEST_F(ShardStateTest, BadPushesAreRefusedAndChangeNothing) {
  const v1::JobSpec job = Job("muon", "aux_free_bias");
  const std::string w = "model.layers.0.self_attn.q_proj.weight";
  absl::StatusOr<std::unique_ptr<ShardState>> created =
      ShardState::Create(job, {w, "model.layers.1.mlp.gate.e_score_correction_bias"});
  ASSERT_TRUE(created.ok());
  ShardState& shard = **created;
  std::vector<float> g(32 * 32, 0.25f);

  auto code = [](const absl::StatusOr<bool>& r) { return r.status().code(); };
  EXPECT_EQ(code(shard.AddSlotGradient(0, 0, "lm_head.weight", g.data(), 256 * 32)),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(code(shard.AddSlotGradient(1, 0, w, g.data(), g.size())),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(code(shard.AddSlotGradient(0, 3, w, g.data(), g.size())),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(shard.AddSlotGradient(0, 0, w, g.data(), g.size() - 1)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(shard.AddSlotGradient(0, 0, "model.layers.1.mlp.gate.e_score_correction_bias",
                                       g.data(), 4)),
            absl::StatusCode::kFailedPrecondition);
  g[17] = std::nanf("");
  absl::StatusOr<bool> nan = shard.AddSlotGradient(0, 0, w, g.data(), g.size());
  EXPECT_EQ(code(nan), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(nan.status().message()), HasSubstr("element 17"));
  g[17] = 0.25f;
  EXPECT_FALSE(shard.GradientsComplete());  // nothing was counted

  // Idempotent pushes: the repeat is acknowledged, not counted.
  ASSERT_TRUE(*shard.AddSlotGradient(0, 0, w, g.data(), g.size()));
  std::vector<float> other(g.size(), 9.0f);
  absl::StatusOr<bool> repeat = shard.AddSlotGradient(0, 0, w, other.data(), other.size());
  ASSERT_TRUE(repeat.ok());
  EXPECT_FALSE(*repeat);
  EXPECT_EQ(shard.GradientSquares().status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(*shard.AddSlotGradient(0, 1, w, g.data(), g.size()));
  ASSERT_TRUE(*shard.AddSlotGradient(0, 2, w, g.data(), g.size()));
  absl::StatusOr<std::vector<std::pair<std::string, double>>> sq = shard.GradientSquares();
  ASSERT_TRUE(sq.ok());
  ASSERT_EQ(sq->size(), 1u);
  EXPECT_DOUBLE_EQ((*sq)[0].second, 0.75 * 0.75 * 32 * 32);  // three slots of 0.25, not 9
  EXPECT_EQ(shard.ApplyStep(1, 0.01, 1.0, {}).code(), absl::StatusCode::kFailedPrecondition);
  // Expert loads of any shape but the model's (1 MoE layer x 4 experts) are
  // refused before anything changes: they index the router biases.
  EXPECT_EQ(shard.ApplyStep(0, 0.01, 1.0, {std::vector<int64_t>(3000000, 1)}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(shard.ApplyStep(0, 0.01, 1.0, {{1, 2, 3, 4}, {1, 2, 3, 4}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(shard.ApplyStep(0, 0.01, 1.0, {{1, 2, -3, 4}}).code(),
            absl::StatusCode::kInvalidArgument);
  // So are attention maxima (QK-Clip) of another shape than layers x heads
  // (non-finite ones: QkClipTest).
  google::protobuf::RepeatedField<float> logits;
  logits.Add(1.0f);
  EXPECT_EQ(shard.ApplyStep(0, 0.01, 1.0, {{1, 2, 3, 4}}, nullptr, &logits).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(shard.version(), 0);
  EXPECT_TRUE(shard.ApplyStep(0, 0.01, 1.0, {{1, 2, 3, 4}}).ok());
  EXPECT_EQ(shard.version(), 1);
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// A snapshot keeps its version's values and optimizer state while the next
// steps update the shard (copy on write), and taking one changes no bit of
// what the shard computes.
TEST_F(ShardStateTest, ASnapshotKeepsItsVersionWhileStepsGoOn) {
  const v1::JobSpec job = Job("muon", "aux_free_bias");
  const std::vector<std::string> names = {"model.layers.0.self_attn.q_proj.weight",  // Muon
                                          "model.norm.weight"};                      // AdamW
  auto make = [&] {
    absl::StatusOr<std::unique_ptr<ShardState>> created = ShardState::Create(job, names);
    EXPECT_TRUE(created.ok()) << created.status();
    return std::move(*created);
  };
  auto step = [&](ShardState& shard, int64_t s) {
    for (int slot = 0; slot < 3; ++slot) {
      for (const std::string& name : names) {
        const TensorInfo* info = shard.layout().Find(name);
        std::vector<float> g(info->numel);
        for (size_t i = 0; i < g.size(); ++i) {
          g[i] = 0.01f * static_cast<float>((i * 7 + slot * 3 + s) % 11) - 0.05f;
        }
        ASSERT_TRUE(shard.AddSlotGradient(s, slot, name, g.data(), info->numel).ok());
      }
    }
    ASSERT_TRUE(shard.ApplyStep(s, 0.01, 1.0, {}).ok());
  };
  using State = std::map<std::string, std::vector<std::vector<float>>>;
  auto state_of = [](const ShardState& shard) {
    State out;
    shard.Visit([&](const TensorInfo& info, const std::vector<float>& value,
                    const std::vector<float>& momentum, const std::vector<float>& exp_avg,
                    const std::vector<float>& exp_avg_sq) {
      out[info.name] = {value, momentum, exp_avg, exp_avg_sq};
    });
    return out;
  };
  std::unique_ptr<ShardState> shard = make(), plain = make();
  step(*shard, 0);
  step(*plain, 0);
  const State at1 = state_of(*shard);
  ShardState::StateSnapshot snapshot = shard->TakeSnapshot();
  EXPECT_EQ(snapshot.version, 1);
  ASSERT_EQ(snapshot.tensors.size(), names.size());
  step(*shard, 1);
  step(*plain, 1);
  int64_t bytes = 0;
  for (const ShardState::StateSnapshot::Entry& e : snapshot.tensors) {
    const std::vector<std::vector<float>>& want = at1.at(e.info->name);
    EXPECT_TRUE(SameBits(*e.value, want[0])) << e.info->name;
    EXPECT_TRUE(SameBits(*e.momentum, want[1])) << e.info->name;
    EXPECT_TRUE(SameBits(*e.exp_avg, want[2])) << e.info->name;
    EXPECT_TRUE(SameBits(*e.exp_avg_sq, want[3])) << e.info->name;
    bytes += static_cast<int64_t>(
        (want[0].size() + want[1].size() + want[2].size() + want[3].size()) * sizeof(float));
  }
  EXPECT_EQ(snapshot.bytes(), bytes);
  // The shard went on: step 2's state, the same as a shard never snapshotted.
  const State at2 = state_of(*shard), want2 = state_of(*plain);
  for (const auto& [name, buffers] : want2) {
    for (size_t b = 0; b < buffers.size(); ++b) {
      EXPECT_TRUE(SameBits(at2.at(name)[b], buffers[b])) << name << " buffer " << b;
    }
    EXPECT_FALSE(SameBits(at2.at(name)[0], at1.at(name)[0])) << name;
  }
}

TEST_F(ShardStateTest, SlotRangesAreCountedOnceAndNeverOverlap) {
  const v1::JobSpec job = Job("muon", "aux_free_bias");  // 3 slots
  const std::string w = "model.layers.0.self_attn.q_proj.weight";
  const int64_t n = 32 * 32;
  std::vector<std::vector<float>> g(3, std::vector<float>(n));
  for (int s = 0; s < 3; ++s) {
    for (int64_t i = 0; i < n; ++i) g[s][i] = static_cast<float>(std::sin(0.1 * i + s) / (1 + s));
  }
  std::vector<float> g01(n);
  for (int64_t i = 0; i < n; ++i) g01[i] = g[0][i] + g[1][i];  // the worker's float32 prefix
  auto make = [&]() {
    absl::StatusOr<std::unique_ptr<ShardState>> created = ShardState::Create(job, {w});
    EXPECT_TRUE(created.ok());
    return std::move(*created);
  };
  auto add = [&](ShardState& shard, int first, int count, const std::vector<float>& grad) {
    return shard.AddGradients(0, first, count, {{w, grad.data(), n}});
  };
  auto code = [](const absl::StatusOr<bool>& r) { return r.status().code(); };

  std::unique_ptr<ShardState> prefix = make();
  // Ranges that are not ranges of this job's slots.
  EXPECT_EQ(code(add(*prefix, 0, 0, g[0])), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(add(*prefix, -1, 1, g[0])), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(add(*prefix, 2, 2, g[0])), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(add(*prefix, 0, 4, g[0])), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<bool> not_from_zero = add(*prefix, 1, 2, g[0]);
  EXPECT_EQ(code(not_from_zero), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(not_from_zero.status().message()), HasSubstr("slot_count"));
  absl::StatusOr<bool> twice =
      prefix->AddGradients(0, 0, 1, {{w, g[0].data(), n}, {w, g[0].data(), n}});
  EXPECT_EQ(code(twice), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(twice.status().message()), HasSubstr("twice"));

  // [0, 2) as one prefix sum; its repeat (other values) is ignored; ranges
  // overlapping it differently are refused.
  ASSERT_TRUE(*add(*prefix, 0, 2, g01));
  absl::StatusOr<bool> repeat = add(*prefix, 0, 2, g[2]);
  ASSERT_TRUE(repeat.ok());
  EXPECT_FALSE(*repeat);
  for (const auto& [first, count] : {std::pair(0, 1), std::pair(1, 1), std::pair(0, 3)}) {
    absl::StatusOr<bool> overlap = add(*prefix, first, count, g[0]);
    EXPECT_EQ(code(overlap), absl::StatusCode::kFailedPrecondition) << first << "+" << count;
    EXPECT_THAT(std::string(overlap.status().message()), HasSubstr("overlap"));
  }
  EXPECT_FALSE(prefix->GradientsComplete());
  ASSERT_TRUE(*add(*prefix, 2, 1, g[2]));
  EXPECT_TRUE(prefix->GradientsComplete());

  // A single slot first, then a prefix covering it: refused as well.
  std::unique_ptr<ShardState> single = make();
  ASSERT_TRUE(*add(*single, 1, 1, g[1]));
  EXPECT_EQ(code(add(*single, 0, 2, g01)), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(*add(*single, 2, 1, g[2]));
  ASSERT_TRUE(*add(*single, 0, 1, g[0]));

  // ((g0 + g1) + g2) either way: the same squares and the same update, bit for bit.
  absl::StatusOr<std::vector<std::pair<std::string, double>>> a = prefix->GradientSquares();
  absl::StatusOr<std::vector<std::pair<std::string, double>>> b = single->GradientSquares();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  ASSERT_TRUE(prefix->ApplyStep(0, 0.01, 0.5, {}).ok());
  ASSERT_TRUE(single->ApplyStep(0, 0.01, 0.5, {}).ok());
  absl::StatusOr<std::vector<float>> pa = prefix->Parameter(w), pb = single->Parameter(w);
  ASSERT_TRUE(pa.ok() && pb.ok());
  // NOLINTNEXTLINE(bugprone-suspicious-memory-comparison): the test wants bit-identical floats.
  EXPECT_EQ(std::memcmp(pa->data(), pb->data(), n * sizeof(float)), 0);
}

// Pushes are summed as they arrive, each as soon as the slots before it are
// in, so that the squares are ready when the last push is: the shard's sum
// is ((0 + g0) + g1) + g2 whatever the arrival order.
TEST_F(ShardStateTest, EachPushIsSummedOnArrivalOnceTheSlotsBeforeItAreIn) {
  const v1::JobSpec job = Job("muon", "aux_free_bias");  // 3 slots
  const std::string w = "model.layers.0.self_attn.q_proj.weight";
  const int64_t n = 32 * 32;
  std::vector<std::vector<float>> g(3, std::vector<float>(n));
  for (int s = 0; s < 3; ++s) {
    for (int64_t i = 0; i < n; ++i) g[s][i] = static_cast<float>(std::cos(0.37 * i - s) * (s + 1));
  }
  g[0][5] = -0.0f;  // 0 + -0 is +0 in the sum
  std::vector<float> sum(n, 0.0f);
  for (int s = 0; s < 3; ++s) {
    for (int64_t i = 0; i < n; ++i) sum[i] += g[s][i];
  }
  const double expected_sq = SumOfSquares(sum.data(), n);  // of the test's own sum

  for (const std::vector<int>& order :
       std::vector<std::vector<int>>{{0, 1, 2}, {2, 1, 0}, {1, 0, 2}, {2, 0, 1}}) {
    SCOPED_TRACE(absl::StrCat("arrival order ", order[0], order[1], order[2]));
    absl::StatusOr<std::unique_ptr<ShardState>> shard = ShardState::Create(job, {w});
    ASSERT_TRUE(shard.ok());
    std::vector<bool> in(3, false);
    for (int s : order) {
      ASSERT_TRUE(*(*shard)->AddGradients(0, s, 1, {{w, g[s].data(), n}}));
      in[s] = true;
      int prefix = 0;
      while (prefix < 3 && in[prefix]) ++prefix;
      EXPECT_EQ((*shard)->SummedSlots(w), prefix) << "after slot " << s;
    }
    absl::StatusOr<std::vector<std::pair<std::string, double>>> sq = (*shard)->GradientSquares();
    ASSERT_TRUE(sq.ok()) << sq.status();
    ASSERT_EQ(sq->size(), 1u);
    EXPECT_EQ(sq->front().second, expected_sq);
    // The update with this sum, bit for bit: a shard given the sum as the
    // gradient of every slot takes it as is.
    absl::StatusOr<std::unique_ptr<ShardState>> whole = ShardState::Create(job, {w});
    ASSERT_TRUE(whole.ok());
    ASSERT_TRUE(*(*whole)->AddGradients(0, 0, 3, {{w, sum.data(), n}}));
    ASSERT_TRUE((*shard)->ApplyStep(0, 0.01, 1.0, {}).ok());
    ASSERT_TRUE((*whole)->ApplyStep(0, 0.01, 1.0, {}).ok());
    absl::StatusOr<std::vector<float>> pa = (*shard)->Parameter(w), pb = (*whole)->Parameter(w);
    ASSERT_TRUE(pa.ok() && pb.ok());
    // NOLINTNEXTLINE(bugprone-suspicious-memory-comparison): the test wants bit-identical floats.
    EXPECT_EQ(std::memcmp(pa->data(), pb->data(), n * sizeof(float)), 0);
    EXPECT_EQ((*shard)->SummedSlots(w), 0);  // a new step
  }
  absl::StatusOr<std::unique_ptr<ShardState>> shard = ShardState::Create(job, {w});
  ASSERT_TRUE(shard.ok());
  EXPECT_EQ((*shard)->SummedSlots("model.embed_tokens.weight"), 0);  // not its tensor
}

}  // namespace
}  // namespace muonps
