// PullStages: a forward stage waits for its own tensors only, and never
// past the end of the pulls.
#include "workers/worker/pull_stages.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "common/job_spec.h"
#include "common/model_layout.h"

namespace muonps {
namespace {

TEST(PullStagesTest, StagesFollowTheForwardPass) {
  const v1::ModelConfig m = DefaultJobSpec().model();  // 4 layers
  const ModelLayout layout(m);
  EXPECT_EQ(PullStages::StageOf(*layout.Find("model.embed_tokens.weight"), 4), 0);
  EXPECT_EQ(PullStages::StageOf(*layout.Find("model.layers.0.self_attn.q_proj.weight"), 4), 1);
  EXPECT_EQ(PullStages::StageOf(*layout.Find("model.layers.3.mlp.gate.e_score_correction_bias"), 4),
            4);
  EXPECT_EQ(PullStages::StageOf(*layout.Find("model.norm.weight"), 4), 5);
  EXPECT_EQ(PullStages::StageOf(*layout.Find("lm_head.weight"), 4), 5);
  EXPECT_EQ(PullStages(layout, 4).stages(), 6);
}

TEST(PullStagesTest, AStageWaitsForItsTensorsAndNoOthers) {
  const v1::ModelConfig m = DefaultJobSpec().model();
  const ModelLayout layout(m);
  PullStages stages(layout, m.num_hidden_layers());
  // The embedding arrives: stage 0 is free, stage 1 is not.
  stages.Arrived(*layout.Find("model.embed_tokens.weight"));
  EXPECT_LT(stages.Wait(0), 1.0);
  std::atomic<bool> passed{false};
  std::thread waiter([&] {
    stages.Wait(1);
    passed = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  int layer0 = 0;
  for (const TensorInfo& t : layout.tensors()) layer0 += t.layer == 0 ? 1 : 0;
  int arrived = 0;
  for (const TensorInfo& t : layout.tensors()) {
    if (t.layer != 0) continue;
    EXPECT_FALSE(passed.load()) << "stage 1 went ahead with " << arrived << " of " << layer0;
    stages.Arrived(t);
    ++arrived;
  }
  waiter.join();
  EXPECT_TRUE(passed.load());
}

TEST(PullStagesTest, TheEndOfThePullsReleasesEveryWaiter) {
  const v1::ModelConfig m = DefaultJobSpec().model();
  const ModelLayout layout(m);
  PullStages stages(layout, m.num_hidden_layers());
  std::thread waiter([&] { stages.Wait(5); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  stages.Finished();  // e.g. a shard's stream failed: nothing more comes
  waiter.join();
  stages.Reset();
  stages.MarkAll();  // the parameters were already at the version
  for (int s = 0; s < stages.stages(); ++s) EXPECT_LT(stages.Wait(s), 1.0);
}

}  // namespace
}  // namespace muonps
