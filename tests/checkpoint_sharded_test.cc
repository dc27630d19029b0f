// The sharded (Hugging Face) checkpoint layout next to the single-file one:
// 1, 2 and 3 shards read back bit for bit, the index format, refusals with
// clear messages, `muonps train --resume` from a sharded checkpoint, and the
// staging, publishing and pruning of checkpoint directories.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "common/atomic_file.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/philox.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "google/protobuf/util/message_differencer.h"
#include "nlohmann/json.hpp"
#include "tests/model_test_util.h"
#include "tests/test_util.h"
#include "tests/trainer_test_util.h"
#include "trainer/trainer.h"

namespace muonps {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAreArray;

// The vectors `optimizer` keeps for `t`, as TensorState documents them.
bool KeepsMomentum(const TensorInfo& t, const std::string& optimizer) {
  return t.trainable() && UsesMuon(t, optimizer);
}
bool KeepsMoments(const TensorInfo& t, const std::string& optimizer) {
  return t.trainable() && !UsesMuon(t, optimizer);
}

// A state for `model` under `optimizer`: random parameters, and distinct
// nonzero values in the optimizer state each tensor has (zeros elsewhere, as
// in the trainer), at step 17.
TrainingState MakeState(const ModelLayout& layout, const v1::ModelConfig& model,
                        const std::string& optimizer) {
  TrainingState s;
  s.params = testing_util::RandomParams(layout, 11);
  const size_t n = static_cast<size_t>(layout.total_floats());
  s.momentum.assign(n, 0.0f);
  s.exp_avg.assign(n, 0.0f);
  s.exp_avg_sq.assign(n, 0.0f);
  for (const TensorInfo& t : layout.tensors()) {
    if (KeepsMomentum(t, optimizer)) {
      FillNormal(s.momentum.data() + t.offset, t.numel, 3, t.name + "#momentum", 0.1);
    }
    if (KeepsMoments(t, optimizer)) {
      FillNormal(s.exp_avg.data() + t.offset, t.numel, 3, t.name + "#exp_avg", 0.01);
      FillNormal(s.exp_avg_sq.data() + t.offset, t.numel, 3, t.name + "#exp_avg_sq", 1.0);
      for (int64_t i = 0; i < t.numel; ++i) {
        float& v = s.exp_avg_sq[t.offset + i];
        v = 1e-4f * v * v + 1e-8f;
      }
    }
  }
  v1::JobSpec job = DefaultJobSpec();
  *job.mutable_model() = model;
  job.mutable_optimizer()->set_name(optimizer);
  *s.trainer.mutable_job() = job;
  s.trainer.set_step(17);
  s.trainer.set_tokens_seen(123456);
  s.trainer.set_last_val_loss(2.75);
  return s;
}

// Zeroed buffers sized for `layout`, for ReadCheckpoint.
TrainingState EmptyState(const ModelLayout& layout) {
  TrainingState s;
  const size_t n = static_cast<size_t>(layout.total_floats());
  s.params.assign(n, 0.0f);
  s.momentum.assign(n, 0.0f);
  s.exp_avg.assign(n, 0.0f);
  s.exp_avg_sq.assign(n, 0.0f);
  return s;
}

// Every tensor of `state` as a shard holds it.
std::map<std::string, TensorState> Slices(const ModelLayout& layout, const TrainingState& state) {
  const std::string& optimizer = state.trainer.job().optimizer().name();
  auto slice = [](const std::vector<float>& v, const TensorInfo& t) {
    return std::vector<float>(v.begin() + t.offset, v.begin() + t.offset + t.numel);
  };
  std::map<std::string, TensorState> tensors;
  for (const TensorInfo& t : layout.tensors()) {
    TensorState& s = tensors[t.name];
    s.value = slice(state.params, t);
    if (KeepsMomentum(t, optimizer)) s.momentum = slice(state.momentum, t);
    if (KeepsMoments(t, optimizer)) {
      s.exp_avg = slice(state.exp_avg, t);
      s.exp_avg_sq = slice(state.exp_avg_sq, t);
    }
  }
  return tensors;
}

// The shard that owns tensor `i` of the layout: round-robin.
int Owner(size_t i, int count) { return static_cast<int>(i % static_cast<size_t>(count)); }

// Writes `tensors` as `count` shards and an index to `dir` (staged and
// published), the way a cluster of `count` optimizer shards would.
absl::Status WriteSharded(const std::string& dir, const ModelLayout& layout,
                          const std::string& optimizer,
                          const std::map<std::string, TensorState>& tensors,
                          const v1::TrainerState& trainer, int count) {
  std::map<std::string, int> owner;
  std::vector<std::vector<std::pair<const TensorInfo*, const TensorState*>>> shards(count);
  for (size_t i = 0; i < layout.tensors().size(); ++i) {
    const TensorInfo& t = layout.tensors()[i];
    owner[t.name] = Owner(i, count);
    // Newest first: the writer puts them in layout order.
    auto& shard = shards[Owner(i, count)];
    shard.insert(shard.begin(), {&t, &tensors.at(t.name)});
  }
  const CheckpointWriter writer{"", "test"};
  MUONPS_ASSIGN_OR_RETURN(const std::string staging, CreateStagingDir(dir, writer));
  for (int k = 0; k < count; ++k) {
    MUONPS_RETURN_IF_ERROR(WriteCheckpointShard(staging, k, count, layout, optimizer, shards[k]));
  }
  MUONPS_RETURN_IF_ERROR(WriteCheckpointIndex(staging, count, layout, optimizer, owner, trainer));
  return PublishStagingDir(staging, dir, writer);
}

void ExpectBitIdentical(const std::vector<float>& a, const std::vector<float>& b,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  if (a.empty()) return;  // no data: memcmp must not see null
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what << " differ";
}

void ExpectSameState(const TrainingState& a, const TrainingState& b, const std::string& what) {
  ExpectBitIdentical(a.params, b.params, what + ": parameters");
  ExpectBitIdentical(a.momentum, b.momentum, what + ": momentum");
  ExpectBitIdentical(a.exp_avg, b.exp_avg, what + ": exp_avg");
  ExpectBitIdentical(a.exp_avg_sq, b.exp_avg_sq, what + ": exp_avg_sq");
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(a.trainer, b.trainer))
      << what << ": trainer state\n"
      << a.trainer.DebugString() << "\nvs\n"
      << b.trainer.DebugString();
}

void ExpectSameTensor(const TensorState& a, const TensorState& b, const std::string& name) {
  ExpectBitIdentical(a.value, b.value, name + " value");
  ExpectBitIdentical(a.momentum, b.momentum, name + " momentum");
  ExpectBitIdentical(a.exp_avg, b.exp_avg, name + " exp_avg");
  ExpectBitIdentical(a.exp_avg_sq, b.exp_avg_sq, name + " exp_avg_sq");
}

std::string ReadText(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? *text : "";
}

std::set<std::string> FilesIn(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

class ShardedCheckpointTest : public testing_util::TempDirTest,
                              public ::testing::WithParamInterface<std::string> {
 protected:
  ShardedCheckpointTest()
      : model_(testing_util::TinyModelConfig("sigmoid", "aux_free_bias")),
        layout_(model_),
        state_(MakeState(layout_, model_, GetParam())) {}

  const std::string& optimizer() const { return GetParam(); }

  // Writes state_ as `count` shards to Path(name); returns the path.
  std::string WriteShards(const std::string& name, int count) {
    std::string dir = Path(name);
    const absl::Status written =
        WriteSharded(dir, layout_, optimizer(), Slices(layout_, state_), state_.trainer, count);
    EXPECT_TRUE(written.ok()) << written;
    return dir;
  }

  absl::Status Read(const std::string& dir, TrainingState* out) {
    *out = EmptyState(layout_);
    return ReadCheckpoint(dir, layout_, model_, optimizer(), out);
  }

  v1::ModelConfig model_;
  ModelLayout layout_;
  TrainingState state_;
};

TEST_P(ShardedCheckpointTest, OneTwoAndThreeShardsReadBackLikeTheSingleFile) {
  const std::string single = Path("single");
  ASSERT_TRUE(WriteCheckpoint(single, layout_, state_).ok());
  TrainingState from_single;
  ASSERT_TRUE(Read(single, &from_single).ok());
  ExpectSameState(state_, from_single, "single file");

  for (int count : {1, 2, 3}) {
    const std::string dir = WriteShards(absl::StrCat("sharded", count), count);
    TrainingState from_shards;
    const absl::Status read = Read(dir, &from_shards);
    ASSERT_TRUE(read.ok()) << read;
    ExpectSameState(state_, from_shards, absl::StrCat(count, " shards"));
    ExpectSameState(from_single, from_shards, absl::StrCat(count, " shards vs single file"));

    absl::StatusOr<v1::TrainerState> trainer = ReadTrainerState(dir);
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*trainer, state_.trainer));
    absl::StatusOr<std::string> resolved = ResolveCheckpointDir(dir);
    ASSERT_TRUE(resolved.ok()) << resolved.status();
    EXPECT_EQ(*resolved, dir);
  }
}

TEST_P(ShardedCheckpointTest, ASubsetOfTensorsReadsBackFromEitherLayout) {
  const std::string single = Path("single");
  ASSERT_TRUE(WriteCheckpoint(single, layout_, state_).ok());
  const std::string sharded = WriteShards("sharded", 3);
  const std::map<std::string, TensorState> expected = Slices(layout_, state_);

  // Every third tensor: parameters, norms and router biases among them.
  std::vector<std::string> names;
  for (size_t i = 1; i < layout_.tensors().size(); i += 3)
    names.push_back(layout_.tensors()[i].name);
  ASSERT_GE(names.size(), 3u);
  for (const std::string& dir : {single, sharded}) {
    absl::StatusOr<std::map<std::string, TensorState>> tensors =
        ReadCheckpointTensors(dir, layout_, model_, optimizer(), names);
    ASSERT_TRUE(tensors.ok()) << tensors.status();
    std::vector<std::string> got;
    for (const auto& [name, tensor] : *tensors) {
      got.push_back(name);
      ExpectSameTensor(tensor, expected.at(name), absl::StrCat(dir, ": ", name));
    }
    EXPECT_THAT(got, UnorderedElementsAreArray(names)) << dir;
  }
}

TEST_P(ShardedCheckpointTest, IndexIsTheHuggingFaceFormat) {
  constexpr int kCount = 3;
  const std::string dir = WriteShards("sharded", kCount);
  const std::string single = Path("single");
  ASSERT_TRUE(WriteCheckpoint(single, layout_, state_).ok());

  // Exactly the files of the layout, no leftovers.
  std::set<std::string> files = {"config.json", "trainer_state.json",
                                 "model.safetensors.index.json", "optimizer.safetensors.index.json",
                                 kCheckpointMarker};
  for (int k = 1; k <= kCount; ++k) {
    files.insert(absl::StrFormat("model-%05d-of-%05d.safetensors", k, kCount));
    files.insert(absl::StrFormat("optimizer-%05d-of-%05d.safetensors", k, kCount));
  }
  EXPECT_EQ(FilesIn(dir), files);
  EXPECT_FALSE(fs::exists(dir + ".tmp"));
  // config.json and trainer_state.json as in the single-file layout.
  EXPECT_EQ(ReadText(dir + "/config.json"), ReadText(single + "/config.json"));
  EXPECT_EQ(ReadText(dir + "/trainer_state.json"), ReadText(single + "/trainer_state.json"));

  for (const std::string kind : {"model", "optimizer"}) {
    SCOPED_TRACE(kind);
    // What the index must say: every key, the shard holding it, the bytes.
    std::map<std::string, std::string> expected_map;
    std::map<std::string, std::vector<std::string>> keys_by_file;  // in layout order
    uint64_t expected_bytes = 0;
    for (size_t i = 0; i < layout_.tensors().size(); ++i) {
      const TensorInfo& t = layout_.tensors()[i];
      std::vector<std::string> keys;
      if (kind == "model") {
        keys = {t.name};
      } else if (KeepsMomentum(t, optimizer())) {
        keys = {t.name + ".momentum_buffer"};
      } else if (KeepsMoments(t, optimizer())) {
        keys = {t.name + ".exp_avg", t.name + ".exp_avg_sq"};
      }
      const std::string file =
          absl::StrFormat("%s-%05d-of-%05d.safetensors", kind, Owner(i, kCount) + 1, kCount);
      for (const std::string& key : keys) {
        expected_map[key] = file;
        keys_by_file[file].push_back(key);
        expected_bytes += static_cast<uint64_t>(t.numel) * sizeof(float);
      }
    }

    const nlohmann::json index = nlohmann::json::parse(
        ReadText(absl::StrCat(dir, "/", kind, ".safetensors.index.json")), nullptr, false);
    ASSERT_TRUE(index.is_object());
    ASSERT_EQ(index.size(), 2u) << index.dump();
    ASSERT_TRUE(index.contains("metadata") && index["metadata"].is_object());
    ASSERT_TRUE(index["metadata"].contains("total_size"));
    ASSERT_TRUE(index["metadata"]["total_size"].is_number_unsigned());
    EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), expected_bytes);
    ASSERT_TRUE(index.contains("weight_map") && index["weight_map"].is_object());
    std::map<std::string, std::string> weight_map;
    for (const auto& [key, file] : index["weight_map"].items()) {
      ASSERT_TRUE(file.is_string()) << key;
      weight_map[key] = file.get<std::string>();
    }
    EXPECT_EQ(weight_map, expected_map);

    // Each shard file holds exactly what the index maps to it, in layout
    // order, and the files' data adds up to total_size.
    uint64_t file_bytes = 0;
    for (int k = 1; k <= kCount; ++k) {
      const std::string file = absl::StrFormat("%s-%05d-of-%05d.safetensors", kind, k, kCount);
      absl::StatusOr<SafetensorsFile> opened = SafetensorsFile::Open(absl::StrCat(dir, "/", file));
      ASSERT_TRUE(opened.ok()) << opened.status();
      EXPECT_EQ(opened->names(), keys_by_file[file]) << file;
      EXPECT_EQ(opened->metadata().at("format"), "pt");
      for (const std::string& key : opened->names()) {
        absl::StatusOr<std::vector<int64_t>> shape = opened->shape(key);
        ASSERT_TRUE(shape.ok());
        uint64_t n = 1;
        for (int64_t d : *shape) n *= static_cast<uint64_t>(d);
        file_bytes += n * sizeof(float);
      }
    }
    EXPECT_EQ(file_bytes, expected_bytes);
  }
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ShardedCheckpointTest, ::testing::Values("muon", "adamw"));

// Refusals, on a 2-shard Muon checkpoint damaged in one way per case.
class ShardedCheckpointRefusalTest : public ShardedCheckpointTest {
 protected:
  void SetUp() override {
    ShardedCheckpointTest::SetUp();
    good_ = WriteShards("good", 2);
  }

  // A copy of the good checkpoint to damage.
  std::string Copy(const std::string& name) {
    std::string dir = Path(name);
    fs::copy(good_, dir, fs::copy_options::recursive);
    return dir;
  }

  // The index of `kind` in `dir`, and writing it back.
  nlohmann::json LoadIndex(const std::string& dir, const std::string& kind) {
    return nlohmann::json::parse(ReadText(absl::StrCat(dir, "/", kind, ".safetensors.index.json")));
  }
  void StoreIndex(const std::string& dir, const std::string& kind, const nlohmann::json& index) {
    ASSERT_TRUE(
        WriteFileAtomically(absl::StrCat(dir, "/", kind, ".safetensors.index.json"), index.dump(2))
            .ok());
  }

  // ReadCheckpoint's error on `dir`, which must fail.
  std::string ReadError(const std::string& dir) {
    TrainingState out;
    const absl::Status read = Read(dir, &out);
    EXPECT_FALSE(read.ok()) << dir;
    return std::string(read.message());
  }

  std::string good_;
};

TEST_P(ShardedCheckpointRefusalTest, MissingShardFileIsNamed) {
  const std::string dir = Copy("missing");
  fs::remove(dir + "/model-00002-of-00002.safetensors");
  const std::string error = ReadError(dir);
  EXPECT_THAT(error, HasSubstr("model.safetensors.index.json"));
  EXPECT_THAT(error, HasSubstr("model-00002-of-00002.safetensors"));

  // A reader of only the tensors in the remaining shard does not need it.
  const std::vector<std::string> first = {layout_.tensors()[0].name, layout_.tensors()[2].name};
  EXPECT_TRUE(ReadCheckpointTensors(dir, layout_, model_, optimizer(), first).ok());
  absl::StatusOr<std::map<std::string, TensorState>> second =
      ReadCheckpointTensors(dir, layout_, model_, optimizer(), {layout_.tensors()[1].name});
  ASSERT_FALSE(second.ok());
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr("model-00002-of-00002.safetensors"));
}

TEST_P(ShardedCheckpointRefusalTest, MissingOptimizerIndexIsNamed) {
  const std::string dir = Copy("no_optimizer_index");
  fs::remove(dir + "/optimizer.safetensors.index.json");
  EXPECT_THAT(ReadError(dir), HasSubstr("optimizer.safetensors.index.json"));
}

TEST_P(ShardedCheckpointRefusalTest, TensorMissingFromTheWeightMapIsNamed) {
  const std::string dir = Copy("unmapped");
  nlohmann::json index = LoadIndex(dir, "model");
  ASSERT_EQ(index["weight_map"].erase("lm_head.weight"), 1u);
  StoreIndex(dir, "model", index);
  const std::string error = ReadError(dir);
  EXPECT_THAT(error, HasSubstr("'lm_head.weight'"));
  EXPECT_THAT(error, HasSubstr("weight_map"));
}

TEST_P(ShardedCheckpointRefusalTest, TensorAbsentFromTheFileItsIndexNamesIsNamed) {
  const std::string dir = Copy("misplaced");
  nlohmann::json index = LoadIndex(dir, "optimizer");
  // Point the first optimizer key at the other shard.
  auto entry = index["weight_map"].begin();
  const std::string& key = entry.key();
  const std::string other = entry.value() == "optimizer-00001-of-00002.safetensors"
                                ? "optimizer-00002-of-00002.safetensors"
                                : "optimizer-00001-of-00002.safetensors";
  *entry = other;
  StoreIndex(dir, "optimizer", index);
  const std::string error = ReadError(dir);
  EXPECT_THAT(error, HasSubstr(absl::StrCat("'", key, "'")));
  EXPECT_THAT(error, HasSubstr(other));
  EXPECT_THAT(error, HasSubstr("optimizer.safetensors.index.json"));
}

TEST_P(ShardedCheckpointRefusalTest, TruncatedShardFileIsNamed) {
  const std::string dir = Copy("truncated");
  const std::string shard = dir + "/optimizer-00001-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) / 2);
  const std::string error = ReadError(dir);
  EXPECT_THAT(error, HasSubstr("optimizer-00001-of-00002.safetensors"));
  EXPECT_THAT(error, HasSubstr("truncated"));
}

TEST_P(ShardedCheckpointRefusalTest, IndexReachingOutsideTheDirectoryIsRefused) {
  const std::string dir = Copy("escape");
  nlohmann::json index = LoadIndex(dir, "model");
  index["weight_map"]["lm_head.weight"] = "../good/model-00001-of-00002.safetensors";
  StoreIndex(dir, "model", index);
  EXPECT_THAT(ReadError(dir), HasSubstr("not a file name in the checkpoint directory"));
}

// Found by tests/fuzz/checkpoint_fuzz: a NUL in a file name passed the
// check, and the file opened was the name cut at the NUL.
TEST_P(ShardedCheckpointRefusalTest, IndexFileNameWithANulIsRefused) {
  const std::string dir = Copy("nul");
  nlohmann::json index = LoadIndex(dir, "model");
  index["weight_map"]["lm_head.weight"] = std::string("config.json\0.safetensors", 24);
  StoreIndex(dir, "model", index);
  EXPECT_THAT(ReadError(dir), HasSubstr("not a file name in the checkpoint directory"));
}

// Found by tests/fuzz/checkpoint_fuzz: a negative step was taken as it was
// (a shard made it its version).
TEST_P(ShardedCheckpointRefusalTest, NegativeStepIsRefused) {
  const std::string dir = Copy("negative_step");
  v1::TrainerState trainer = state_.trainer;
  trainer.set_step(-3);
  ASSERT_TRUE(WriteFileAtomically(dir + "/trainer_state.json", ToJson(trainer)).ok());
  const absl::StatusOr<v1::TrainerState> read = ReadTrainerState(dir);
  EXPECT_TRUE(absl::IsInvalidArgument(read.status())) << read.status();
  EXPECT_THAT(std::string(read.status().message()), HasSubstr("must not be negative"));
  EXPECT_THAT(ReadError(dir), HasSubstr("trainer_state.json"));
}

TEST(CheckpointMetadataTest, ParsersReadBytesInMemory) {
  const absl::StatusOr<std::map<std::string, std::string>> index = ParseCheckpointIndex(
      R"({"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00001.safetensors"}})",
      "mem/model.safetensors.index.json");
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ(*index,
            (std::map<std::string, std::string>{{"a", "model-00001-of-00001.safetensors"}}));
  const absl::StatusOr<std::map<std::string, std::string>> bad =
      ParseCheckpointIndex(R"({"weight_map":[]})", "mem/model.safetensors.index.json");
  EXPECT_TRUE(absl::IsInvalidArgument(bad.status()));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("mem/model.safetensors.index.json"));

  const absl::StatusOr<v1::TrainerState> state =
      ParseTrainerState(R"({"step":"5","last_val_loss":"NaN"})", "mem/trainer_state.json");
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->step(), 5);
  EXPECT_TRUE(std::isnan(state->last_val_loss()));
  const absl::StatusOr<v1::TrainerState> unknown =
      ParseTrainerState(R"({"steps":5})", "mem/trainer_state.json");
  EXPECT_TRUE(absl::IsInvalidArgument(unknown.status()));
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("mem/trainer_state.json"));
}

TEST_P(ShardedCheckpointRefusalTest, OtherModelConfigIsRefused) {
  v1::ModelConfig other = model_;
  other.set_intermediate_size(24);
  const ModelLayout other_layout(other);
  TrainingState out = EmptyState(other_layout);
  const absl::Status read = ReadCheckpoint(good_, other_layout, other, optimizer(), &out);
  ASSERT_FALSE(read.ok());
  EXPECT_THAT(std::string(read.message()), HasSubstr("config.json"));
  const absl::StatusOr<std::map<std::string, TensorState>> tensors =
      ReadCheckpointTensors(good_, other_layout, other, optimizer(), {"lm_head.weight"});
  ASSERT_FALSE(tensors.ok());
  EXPECT_THAT(std::string(tensors.status().message()), HasSubstr("config.json"));
}

TEST_P(ShardedCheckpointRefusalTest, UnknownTensorNameIsRefused) {
  const absl::StatusOr<std::map<std::string, TensorState>> tensors =
      ReadCheckpointTensors(good_, layout_, model_, optimizer(), {"model.no_such.weight"});
  ASSERT_FALSE(tensors.ok());
  EXPECT_THAT(std::string(tensors.status().message()), HasSubstr("model.no_such.weight"));
}

TEST_P(ShardedCheckpointRefusalTest, WritersRefuseIncompleteInput) {
  const std::string dir = Path("incomplete");
  fs::create_directories(dir);
  std::map<std::string, int> owner;
  for (const TensorInfo& t : layout_.tensors()) owner[t.name] = 0;
  owner.erase("model.norm.weight");
  absl::Status written = WriteCheckpointIndex(dir, 1, layout_, optimizer(), owner, state_.trainer);
  EXPECT_TRUE(absl::IsInvalidArgument(written)) << written;
  EXPECT_THAT(std::string(written.message()), HasSubstr("'model.norm.weight' has no owning shard"));

  owner["model.norm.weight"] = 1;  // only shard 0 exists
  written = WriteCheckpointIndex(dir, 1, layout_, optimizer(), owner, state_.trainer);
  EXPECT_THAT(std::string(written.message()), HasSubstr("model.norm.weight"));

  const std::map<std::string, TensorState> tensors = Slices(layout_, state_);
  const TensorInfo& head = *layout_.Find("lm_head.weight");
  TensorState short_state = tensors.at(head.name);
  short_state.value.pop_back();
  written = WriteCheckpointShard(dir, 0, 1, layout_, optimizer(), {{&head, &short_state}});
  EXPECT_TRUE(absl::IsInvalidArgument(written)) << written;
  EXPECT_THAT(std::string(written.message()), HasSubstr("lm_head.weight"));
  TensorState no_moments = tensors.at(head.name);  // the head is an AdamW tensor
  no_moments.exp_avg_sq.clear();
  written = WriteCheckpointShard(dir, 0, 1, layout_, optimizer(), {{&head, &no_moments}});
  EXPECT_THAT(std::string(written.message()), HasSubstr("lm_head.weight.exp_avg_sq"));
  written =
      WriteCheckpointShard(dir, 0, 1, layout_, optimizer(),
                           {{&head, &tensors.at(head.name)}, {&head, &tensors.at(head.name)}});
  EXPECT_THAT(std::string(written.message()), HasSubstr("given twice"));
  written = WriteCheckpointShard(dir, 1, 1, layout_, optimizer(),
                                 std::vector<std::pair<const TensorInfo*, TensorStateView>>{});
  EXPECT_TRUE(absl::IsInvalidArgument(written)) << written;
  // A borrowed state with a vector missing.
  TensorStateView partial{&tensors.at(head.name).value, nullptr, &tensors.at(head.name).exp_avg,
                          &tensors.at(head.name).exp_avg_sq};
  written = WriteCheckpointShard(dir, 0, 1, layout_, optimizer(), {{&head, partial}});
  EXPECT_TRUE(absl::IsInvalidArgument(written)) << written;
  EXPECT_THAT(std::string(written.message()), HasSubstr("has no state"));
}

INSTANTIATE_TEST_SUITE_P(Muon, ShardedCheckpointRefusalTest, ::testing::Values("muon"));

// --- Resuming `muonps train` from a sharded checkpoint ---------------------

using testing_util::RunJob;
using testing_util::TinyJob;
using testing_util::WriteCorpus;

class ShardedResumeTest : public testing_util::TempDirTest,
                          public ::testing::WithParamInterface<std::string> {};

TEST_P(ShardedResumeTest, ResumingFromShardsEqualsResumingFromTheSingleFile) {
  v1::JobSpec job = TinyJob(WriteCorpus(dir()), GetParam());
  job.mutable_checkpoint()->set_dir(Path("ckpt"));
  job.mutable_checkpoint()->set_every_steps(1);
  job.mutable_checkpoint()->set_keep_last(2);
  TrainOptions first;
  first.until_step = 3;
  ASSERT_EQ(RunJob(job, first).trainer.step(), 3);
  // keep_last pruned step 1.
  EXPECT_EQ(FilesIn(Path("ckpt")), (std::set<std::string>{"step-00000002", "step-00000003"}));

  // Convert step 3 into two shards, as two optimizer shards would write it.
  const std::string single = Path("ckpt/step-00000003");
  const ModelLayout layout(job.model());
  std::vector<std::string> names;
  for (const TensorInfo& t : layout.tensors()) names.push_back(t.name);
  absl::StatusOr<std::map<std::string, TensorState>> tensors =
      ReadCheckpointTensors(single, layout, job.model(), GetParam(), names);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  absl::StatusOr<v1::TrainerState> trainer = ReadTrainerState(single);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const std::string sharded = Path("sharded/step-00000003");
  const absl::Status written = WriteSharded(sharded, layout, GetParam(), *tensors, *trainer, 2);
  ASSERT_TRUE(written.ok()) << written;
  ASSERT_FALSE(fs::exists(sharded + "/model.safetensors"));

  job.mutable_checkpoint()->clear_dir();
  TrainOptions from_single, from_shards;
  from_single.resume = Path("ckpt");
  from_shards.resume = Path("sharded");  // resolves to the step-* inside
  const TrainingState a = RunJob(job, from_single);
  const TrainingState b = RunJob(job, from_shards);
  ASSERT_EQ(a.trainer.step(), 6);
  ASSERT_EQ(b.trainer.step(), 6);
  ExpectBitIdentical(a.params, b.params, "parameters");
  ExpectBitIdentical(a.momentum, b.momentum, "momentum buffers");
  ExpectBitIdentical(a.exp_avg, b.exp_avg, "exp_avg");
  ExpectBitIdentical(a.exp_avg_sq, b.exp_avg_sq, "exp_avg_sq");
}

INSTANTIATE_TEST_SUITE_P(Optimizers, ShardedResumeTest, ::testing::Values("muon", "adamw"));

}  // namespace
}  // namespace muonps
