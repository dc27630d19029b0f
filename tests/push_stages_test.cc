// Pushes during the backward pass. PushStages: a stage is sent only once
// every lane has finished it, its reduction runs once, and an abort releases
// every waiter. MoeModel's StageDone: each stage is reported in backward
// order once its gradients are final (compared with the finished gradient
// bit for bit) and before any earlier stage has been touched. A streamed
// push to a real shard: counted exactly like a whole one, and an abandoned
// one counts nothing.
#include "workers/worker/push_stages.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "model/moe_model.h"
#include "rpc/shard_client.h"
#include "tests/model_test_util.h"
#include "tests/shard_service_fixture.h"
#include "workers/worker/pull_stages.h"

namespace muonps {
namespace {

TEST(PushStagesTest, AStageIsReadyOnceEveryLaneHasFinishedItAndReducedOnce) {
  PushStages stages(/*stages=*/3, /*lanes=*/2);
  std::atomic<int> reduced{0};
  std::atomic<bool> sent{false};
  const auto reduce = [&](int stage) {
    EXPECT_EQ(stage, 2);
    ++reduced;
  };
  std::thread sender([&] {
    EXPECT_TRUE(stages.Wait(2));
    EXPECT_EQ(reduced.load(), 1) << "sent before its reduction";
    sent = true;
  });
  stages.Done(2, reduce);  // lane 0
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(sent.load()) << "stage 2 went with one lane of two";
  EXPECT_EQ(reduced.load(), 0);
  stages.Done(2, reduce);  // lane 1 completes it
  sender.join();
  EXPECT_TRUE(sent.load());
  EXPECT_EQ(reduced.load(), 1);
}

TEST(PushStagesTest, AbortReleasesEveryWaiterWithoutItsStage) {
  PushStages stages(3, 1);
  stages.Done(2, nullptr);
  std::atomic<int> released{0};
  std::thread a([&] {
    EXPECT_FALSE(stages.Wait(1));
    ++released;
  });
  std::thread b([&] {
    EXPECT_FALSE(stages.Wait(0));
    ++released;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_EQ(released.load(), 0);
  stages.Abort();
  a.join();
  b.join();
  EXPECT_EQ(released.load(), 2);
  EXPECT_TRUE(stages.Wait(2)) << "a stage ready before the abort stays ready";
}

// Runs one slot's forward and backward, copying each stage's gradients at
// the moment it is reported; every reported stage must equal the finished
// gradient bit for bit, and the stages below it must still be untouched.
void ExpectStagesFinalWhenReported(const v1::ModelConfig& m) {
  MoeModel model(m);
  const ModelLayout& layout = model.layout();
  const int L = m.num_hidden_layers(), T = model.seq_len(), B = 2;
  const std::vector<float> params = testing_util::RandomParams(layout, 11);
  std::vector<int32_t> inputs, targets;
  testing_util::RandomTokens(&inputs, &targets, B * T, m.vocab_size(), 5);
  std::vector<float> grads(layout.total_floats(), 0.0f);
  std::vector<int> order;
  std::map<std::string, std::vector<float>> at_report;
  std::vector<std::string> touched_early;
  const MoeModel::StageDone done = [&](int stage) {
    order.push_back(stage);
    for (const TensorInfo& t : layout.tensors()) {
      if (!t.trainable()) continue;
      const int s = PullStages::StageOf(t, L);
      const float* g = grads.data() + t.offset;
      if (s == stage) at_report[t.name].assign(g, g + t.numel);
      if (s < stage) {
        for (int64_t i = 0; i < t.numel; ++i) {
          if (g[i] != 0.0f) {
            touched_early.push_back(t.name);
            break;
          }
        }
      }
    }
  };
  model.ForwardBackward(params.data(), inputs.data(), targets.data(), B, 1.0f / (B * T), 0.01f,
                        grads.data(), nullptr, &done);
  std::vector<int> expected;
  for (int s = L + 1; s >= 0; --s) expected.push_back(s);
  EXPECT_EQ(order, expected);
  EXPECT_TRUE(touched_early.empty()) << touched_early.front() << " written before its stage";
  int checked = 0;
  for (const TensorInfo& t : layout.tensors()) {
    if (!t.trainable()) continue;
    ASSERT_EQ(at_report.count(t.name), 1u) << t.name;
    EXPECT_TRUE(SameBits(at_report[t.name], std::vector<float>(grads.data() + t.offset,
                                                               grads.data() + t.offset + t.numel)))
        << t.name << " changed after its stage was reported";
    ++checked;
  }
  EXPECT_GT(checked, 10);
}

TEST(PushStagesTest, BackwardReportsEachStageOnceItsGradientsAreFinal) {
  // A dense first layer, then MoE layers with shared experts.
  testing_util::TinyModelShape shape;
  shape.first_k_dense_replace = 1;
  ExpectStagesFinalWhenReported(
      testing_util::TinyModelConfig("sigmoid", "aux_loss", true, 1.0, shape));
}

TEST(PushStagesTest, BackwardReportsEachStageOnceItsGradientsAreFinalUnderMla) {
  const v1::ModelConfig m = testing_util::TinyModelConfig("softmax", "aux_free_bias");
  ExpectStagesFinalWhenReported(testing_util::WithTinyMla(m, 0));
  ExpectStagesFinalWhenReported(testing_util::WithTinyMla(m, 6));
}

// A push streamed tensor by tensor to a real shard, each tensor released
// late from another thread, lands exactly as a whole push; one abandoned
// halfway is refused as a whole and counts nothing.
class StreamedPushTest : public ShardServiceTest {
 protected:
  // The owned gradients of `slot` laid out in a flat buffer of the layout.
  std::vector<float> Flat(int64_t step, int slot) const {
    std::vector<float> flat(layout_->total_floats(), 0.0f);
    for (const Grad& g : SlotGradients(*layout_, Owned(), step, slot)) {
      std::copy(g.data.begin(), g.data.end(), flat.data() + layout_->Find(g.name)->offset);
    }
    return flat;
  }
  absl::Status Stream(int slot, const std::vector<float>& flat,
                      const std::function<bool(const TensorInfo&)>& ready,
                      v1::PushGradientsResponse* response) {
    std::shared_ptr<grpc::Channel> channel = MakeChannel(shard_->server->address());
    PushTarget target;
    target.job_id = "job-a";
    target.step = 0;
    target.first_slot = slot;
    target.slot_count = 1;
    // Backward order: the last layout entries first.
    std::vector<std::string> names = Owned();
    std::reverse(names.begin(), names.end());
    return PushGradients(channel.get(), *layout_, names, target, flat.data(), TransferDtype::kF32,
                         1 << 20, "shard", response, ready);
  }
};

TEST_F(StreamedPushTest, AStreamedPushCountsAsAWholeOneAndAnAbandonedOneCountsNothing) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  std::unique_ptr<ShardState> reference = Reference();
  ASSERT_NE(reference, nullptr);
  // Slot 0: every tensor released 5 ms apart by a "backward pass".
  {
    const std::vector<float> flat = Flat(0, 0);
    PushStages stages(static_cast<int>(Owned().size()), 1);
    std::map<std::string, int> index;
    std::vector<std::string> names = Owned();
    std::reverse(names.begin(), names.end());
    for (size_t k = 0; k < names.size(); ++k) index[names[k]] = static_cast<int>(k);
    std::thread backward([&] {
      for (size_t k = 0; k < names.size(); ++k) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        stages.Done(static_cast<int>(k), nullptr);
      }
    });
    v1::PushGradientsResponse response;
    const absl::Status st = Stream(
        0, flat, [&](const TensorInfo& t) { return stages.Wait(index[t.name]); }, &response);
    backward.join();
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_TRUE(response.counted());
    AddToReference(*reference, 0, 0, 1, SlotGradients(*layout_, Owned(), 0, 0));
  }
  // Slot 1: abandoned before its second tensor. CANCELLED, and the shard
  // still lacks slot 1 entirely.
  {
    const std::vector<float> flat = Flat(0, 1);
    int asked = 0;
    v1::PushGradientsResponse response;
    const absl::Status st = Stream(
        1, flat, [&](const TensorInfo&) { return ++asked < 2; }, &response);
    EXPECT_EQ(st.code(), absl::StatusCode::kCancelled) << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr("abandoned"));
  }
  v1::PushGradientsResponse again;
  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, 1, &again).ok());
  EXPECT_TRUE(again.counted()) << "the abandoned push was counted";
  AddToReference(*reference, 0, 1, 1, SlotGradients(*layout_, Owned(), 0, 1));
  for (int slot = 2; slot < 4; ++slot) {
    ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, slot).ok());
    AddToReference(*reference, 0, slot, 1, SlotGradients(*layout_, Owned(), 0, slot));
  }
  // The sums of squares and the update agree with the in-process reference.
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  absl::StatusOr<std::vector<std::pair<std::string, double>>> want = reference->GradientSquares();
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(squares.size(), want->size());
  for (size_t k = 0; k < squares.size(); ++k) {
    EXPECT_EQ(squares[k].first, (*want)[k].first);
    EXPECT_EQ(std::memcmp(&squares[k].second, &(*want)[k].second, sizeof(double)), 0)
        << squares[k].first;
  }
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 1.0).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 1.0, {}).ok());
  ExpectValues(*shard_, "job-a", 1, ReferenceValues(*reference));
}

}  // namespace
}  // namespace muonps
