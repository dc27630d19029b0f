#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <string_view>
#include <system_error>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/atomic_file.h"
#include "common/failpoint.h"
#include "common/hf_config.h"
#include "common/job_spec.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "nlohmann/json.hpp"

namespace muonps {
namespace fs = std::filesystem;
namespace {

// The two kinds of tensor files.
constexpr char kModel[] = "model";
constexpr char kOptimizer[] = "optimizer";
constexpr char kConfigFile[] = "config.json";
constexpr char kStateFile[] = "trainer_state.json";
constexpr int kMaxShards = 99999;  // five digits in the shard file names

std::string PathIn(const std::string& dir, const std::string& name) {
  return absl::StrCat(dir, "/", name);
}
std::string SingleFileName(const std::string& kind) { return kind + ".safetensors"; }
std::string IndexFileName(const std::string& kind) { return kind + ".safetensors.index.json"; }
// Shard `index` (0-based) of `count`, named 1-based as Hugging Face does.
std::string ShardFileName(const std::string& kind, int index, int count) {
  return absl::StrFormat("%s-%05d-of-%05d.safetensors", kind, index + 1, count);
}

absl::Status FsError(const std::string& what, const std::string& path, const std::error_code& ec) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", ec.message()));
}

// Makes a rename inside `dir` durable.
absl::Status SyncDirectory(const std::string& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot open directory ", dir));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return absl::InternalError(absl::StrCat("cannot fsync directory ", dir));
  return absl::OkStatus();
}

// The optimizer-state vectors of a TrainingState or a TensorState, indexed by
// StateBuffer.
enum StateBuffer { kMomentum = 0, kExpAvg = 1, kExpAvgSq = 2 };
template <typename State>
auto StateVectors(State& s) {
  return std::array{&s.momentum, &s.exp_avg, &s.exp_avg_sq};
}

// One optimizer-state tensor: its key in the optimizer files and its buffer.
struct StateEntry {
  std::string key;
  StateBuffer buffer;
};

// The optimizer state `optimizer_name` keeps for `t`: none for buffers, the
// momentum for Muon tensors, both moments for AdamW tensors.
std::vector<StateEntry> OptimizerState(const TensorInfo& t, const std::string& optimizer_name) {
  if (!t.trainable()) return {};
  if (UsesMuon(t, optimizer_name)) return {{t.name + ".momentum_buffer", kMomentum}};
  return {{t.name + ".exp_avg", kExpAvg}, {t.name + ".exp_avg_sq", kExpAvgSq}};
}

// config.json and trainer_state.json, the same in both layouts.
absl::Status WriteRunFiles(const std::string& dir, const v1::TrainerState& trainer) {
  MUONPS_RETURN_IF_ERROR(
      WriteFileAtomically(PathIn(dir, kConfigFile), HfConfigJson(trainer.job().model())));
  return WriteFileAtomically(PathIn(dir, kStateFile), ToJson(trainer));
}

// A Hugging Face index file: metadata.total_size (bytes) and the weight map.
// nlohmann::json keeps keys sorted, as transformers' json.dumps(sort_keys=True).
std::string IndexJson(uint64_t total_size, nlohmann::json weight_map) {
  nlohmann::json index;
  index["metadata"] = {{"total_size", total_size}};
  index["weight_map"] = std::move(weight_map);
  return index.dump(2) + "\n";
}

// The tensors of one kind ("model" or "optimizer") in a checkpoint: the file
// <kind>.safetensors, or the shard files that <kind>.safetensors.index.json
// names, each opened when a tensor in it is first read.
class TensorFiles {
 public:
  static absl::StatusOr<TensorFiles> Open(const std::string& dir, const std::string& kind,
                                          bool sharded) {
    TensorFiles files;
    files.dir_ = dir;
    if (!sharded) {
      const std::string name = SingleFileName(kind);
      MUONPS_ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::Open(PathIn(dir, name)));
      files.files_.emplace(name, std::move(file));
      return files;
    }
    files.index_path_ = PathIn(dir, IndexFileName(kind));
    MUONPS_ASSIGN_OR_RETURN(std::string text, ReadFileToString(files.index_path_));
    MUONPS_ASSIGN_OR_RETURN(files.weight_map_, ParseCheckpointIndex(text, files.index_path_));
    return files;
  }

  // Copies tensor `key` (F32, `shape`) to out[0..product(shape)). NotFound
  // naming the tensor when it is in no file, or in the index but not in the
  // file it names; errors of the file it is in name that file.
  absl::Status ReadInto(const std::string& key, const std::vector<int64_t>& shape, float* out) {
    if (index_path_.empty()) return files_.begin()->second.ReadInto(key, shape, out);
    const auto entry = weight_map_.find(key);
    if (entry == weight_map_.end()) {
      return absl::NotFoundError(
          absl::StrFormat("%s: tensor '%s' is missing from the weight_map", index_path_, key));
    }
    auto file = files_.find(entry->second);
    if (file == files_.end()) {
      absl::StatusOr<SafetensorsFile> opened = SafetensorsFile::Open(PathIn(dir_, entry->second));
      if (!opened.ok()) {
        return absl::Status(opened.status().code(),
                            absl::StrFormat("%s maps tensor '%s' to %s: %s", index_path_, key,
                                            entry->second, opened.status().message()));
      }
      file = files_.emplace(entry->second, std::move(*opened)).first;
    }
    absl::Status read = file->second.ReadInto(key, shape, out);
    if (absl::IsNotFound(read)) {
      return absl::NotFoundError(
          absl::StrFormat("%s, although %s maps it there", read.message(), index_path_));
    }
    return read;
  }

 private:
  std::string dir_;
  std::string index_path_;                         // empty in the single-file layout
  std::map<std::string, std::string> weight_map_;  // tensor key -> shard file name
  std::map<std::string, SafetensorsFile> files_;   // by file name, as opened
};

// A checkpoint's model and optimizer tensors, in either layout, and its
// trainer_state.json.
struct CheckpointFiles {
  TensorFiles model;
  TensorFiles optimizer;
  v1::TrainerState trainer;
};

// Opens the checkpoint in `dir` once its config.json and the job in its
// trainer_state.json match `model`.
absl::StatusOr<CheckpointFiles> OpenCheckpoint(const std::string& dir,
                                               const v1::ModelConfig& model) {
  const std::string config_path = PathIn(dir, kConfigFile);
  MUONPS_ASSIGN_OR_RETURN(std::string config_json, ReadFileToString(config_path));
  if (absl::Status st = CheckHfConfig(config_json, model); !st.ok()) {
    if (st.code() == absl::StatusCode::kFailedPrecondition) {
      return absl::FailedPreconditionError(absl::StrCat(
          config_path, ": the checkpoint's model config differs from the job's model (",
          st.message(), ")"));
    }
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": ", st.message()));
  }
  // The keys Hugging Face has no name for are in the job the checkpoint
  // was written by.
  MUONPS_ASSIGN_OR_RETURN(v1::TrainerState trainer, ReadTrainerState(dir));
  absl::StatusOr<v1::ModelConfig> saved = ParseModelConfigJson(ToJson(trainer.job().model()));
  if (!saved.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(PathIn(dir, kStateFile), ": job.model: ", saved.status().message()));
  }
  if (!google::protobuf::util::MessageDifferencer::Equals(*saved, model)) {
    return absl::FailedPreconditionError(absl::StrCat(
        PathIn(dir, kStateFile), ": the checkpoint's model config differs from the job's model"));
  }
  std::error_code ec;
  const bool sharded = fs::exists(PathIn(dir, IndexFileName(kModel)), ec);
  MUONPS_ASSIGN_OR_RETURN(TensorFiles params, TensorFiles::Open(dir, kModel, sharded));
  MUONPS_ASSIGN_OR_RETURN(TensorFiles optimizer, TensorFiles::Open(dir, kOptimizer, sharded));
  return CheckpointFiles{std::move(params), std::move(optimizer), std::move(trainer)};
}

// The step of a checkpoint directory named "step-<digits>"; -1 for any other
// name (a staging `.tmp`, a set-aside `.old`, ...).
int64_t CheckpointStep(const std::string& name) {
  absl::string_view digits = name;
  if (!absl::ConsumePrefix(&digits, "step-") || digits.empty() ||
      !std::all_of(digits.begin(), digits.end(),
                   [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); })) {
    return -1;
  }
  int64_t step = 0;
  return absl::SimpleAtoi(digits, &step) ? step : -1;
}

// The checkpoint directories under `root`, oldest (lowest step) first.
std::vector<fs::path> ListCheckpointDirs(const std::string& root) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code ec;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    const int64_t step = CheckpointStep(it->path().filename().string());
    std::error_code type_ec;
    if (step >= 0 && it->is_directory(type_ec)) found.emplace_back(step, it->path());
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> dirs;
  dirs.reserve(found.size());
  for (auto& [step, path] : found) dirs.push_back(std::move(path));
  return dirs;
}

}  // namespace

std::string CheckpointName(int64_t step) { return absl::StrFormat("step-%08d", step); }

absl::Status WriteCheckpoint(const std::string& dir, const ModelLayout& layout,
                             const TrainingState& state) {
  const std::string& optimizer = state.trainer.job().optimizer().name();
  std::vector<TensorRef> params, opt;
  for (const TensorInfo& t : layout.tensors()) {
    params.push_back({t.name, t.shape, state.params.data() + t.offset});
    for (const StateEntry& e : OptimizerState(t, optimizer)) {
      opt.push_back({e.key, t.shape, StateVectors(state)[e.buffer]->data() + t.offset});
    }
  }
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"step", absl::StrCat(state.trainer.step())}, {"producer", "muonps"}};
  const CheckpointWriter writer{"", state.trainer.job().name()};
  MUONPS_ASSIGN_OR_RETURN(const std::string staging, CreateStagingDir(dir, writer));
  MUONPS_RETURN_IF_ERROR(WriteSafetensors(PathIn(staging, SingleFileName(kModel)), params, meta));
  MUONPS_RETURN_IF_ERROR(WriteSafetensors(PathIn(staging, SingleFileName(kOptimizer)), opt, meta));
  MUONPS_RETURN_IF_ERROR(WriteRunFiles(staging, state.trainer));
  return PublishStagingDir(staging, dir, writer);
}

absl::Status WriteCheckpointShard(
    const std::string& dir, int index, int count, const ModelLayout& layout,
    const std::string& optimizer_name,
    const std::vector<std::pair<const TensorInfo*, const TensorState*>>& tensors) {
  std::vector<std::pair<const TensorInfo*, TensorStateView>> views;
  views.reserve(tensors.size());
  for (const auto& [info, tensor] : tensors) {
    TensorStateView v;
    if (tensor != nullptr) {
      v = TensorStateView{&tensor->value, &tensor->momentum, &tensor->exp_avg, &tensor->exp_avg_sq};
    }
    views.emplace_back(info, v);
  }
  return WriteCheckpointShard(dir, index, count, layout, optimizer_name, views);
}

absl::Status WriteCheckpointShard(
    const std::string& dir, int index, int count, const ModelLayout& layout,
    const std::string& optimizer_name,
    const std::vector<std::pair<const TensorInfo*, TensorStateView>>& tensors) {
  if (count < 1 || count > kMaxShards || index < 0 || index >= count) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "checkpoint shard %d of %d: need 0 <= index < count <= %d", index, count, kMaxShards));
  }
  // The shard's tensors in layout order, as layout indices.
  std::vector<std::pair<int, const TensorStateView*>> owned;
  for (const auto& [info, tensor] : tensors) {
    const int i = info == nullptr ? -1 : layout.Index(info->name);
    if (i < 0 || tensor.value == nullptr || tensor.momentum == nullptr ||
        tensor.exp_avg == nullptr || tensor.exp_avg_sq == nullptr) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "checkpoint shard %d: tensor '%s' is not in the model layout or has no state", index,
          info == nullptr ? "(null)" : info->name));
    }
    owned.emplace_back(i, &tensor);
  }
  std::sort(owned.begin(), owned.end());

  std::vector<TensorRef> params, opt;
  for (size_t k = 0; k < owned.size(); ++k) {
    const TensorInfo& t = layout.tensors()[owned[k].first];
    const TensorStateView& s = *owned[k].second;
    if (k > 0 && owned[k - 1].first == owned[k].first) {
      return absl::InvalidArgumentError(
          absl::StrFormat("checkpoint shard %d: tensor '%s' given twice", index, t.name));
    }
    auto check_size = [&](const std::string& key, const std::vector<float>& v) {
      if (static_cast<int64_t>(v.size()) == t.numel) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrFormat(
          "checkpoint shard %d: '%s' has %d floats, expected %d", index, key, v.size(), t.numel));
    };
    MUONPS_RETURN_IF_ERROR(check_size(t.name, *s.value));
    params.push_back({t.name, t.shape, s.value->data()});
    for (const StateEntry& e : OptimizerState(t, optimizer_name)) {
      const std::vector<float>& v =
          *std::array{s.momentum, s.exp_avg, s.exp_avg_sq}[static_cast<size_t>(e.buffer)];
      MUONPS_RETURN_IF_ERROR(check_size(e.key, v));
      opt.push_back({e.key, t.shape, v.data()});
    }
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"producer", "muonps"}};
  MUONPS_RETURN_IF_ERROR(
      WriteSafetensors(PathIn(dir, ShardFileName(kModel, index, count)), params, meta));
  FailPoint("checkpoint.shard_file");
  return WriteSafetensors(PathIn(dir, ShardFileName(kOptimizer, index, count)), opt, meta);
}

absl::Status WriteCheckpointIndex(const std::string& dir, int count, const ModelLayout& layout,
                                  const std::string& optimizer_name,
                                  const std::map<std::string, int>& owner,
                                  const v1::TrainerState& trainer) {
  if (count < 1 || count > kMaxShards) {
    return absl::InvalidArgumentError(
        absl::StrFormat("checkpoint index: %d shards, need 1 to %d", count, kMaxShards));
  }
  for (const auto& [name, shard] : owner) {
    if (layout.Find(name) == nullptr) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "checkpoint index: an owner is given for '%s', which is not in the model layout", name));
    }
  }
  nlohmann::json params = nlohmann::json::object(), opt = nlohmann::json::object();
  uint64_t params_bytes = 0, opt_bytes = 0;
  for (const TensorInfo& t : layout.tensors()) {
    const auto it = owner.find(t.name);
    if (it == owner.end()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("checkpoint index: tensor '%s' has no owning shard", t.name));
    }
    const int shard = it->second;
    if (shard < 0 || shard >= count) {
      return absl::InvalidArgumentError(
          absl::StrFormat("checkpoint index: tensor '%s' is owned by shard %d, outside [0, %d)",
                          t.name, shard, count));
    }
    const uint64_t bytes = static_cast<uint64_t>(t.numel) * sizeof(float);
    params[t.name] = ShardFileName(kModel, shard, count);
    params_bytes += bytes;
    for (const StateEntry& e : OptimizerState(t, optimizer_name)) {
      opt[e.key] = ShardFileName(kOptimizer, shard, count);
      opt_bytes += bytes;
    }
  }
  MUONPS_RETURN_IF_ERROR(WriteFileAtomically(PathIn(dir, IndexFileName(kModel)),
                                             IndexJson(params_bytes, std::move(params))));
  MUONPS_RETURN_IF_ERROR(WriteFileAtomically(PathIn(dir, IndexFileName(kOptimizer)),
                                             IndexJson(opt_bytes, std::move(opt))));
  return WriteRunFiles(dir, trainer);
}

absl::StatusOr<std::string> ResolveCheckpointDir(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    return absl::NotFoundError(absl::StrCat("checkpoint directory not found: ", path));
  }
  if (fs::exists(fs::path(path) / kStateFile, ec)) return path;
  const std::vector<fs::path> dirs = ListCheckpointDirs(path);
  for (auto it = dirs.rbegin(); it != dirs.rend(); ++it) {
    if (fs::exists(*it / kStateFile, ec)) return it->string();
  }
  return absl::NotFoundError(
      absl::StrCat(path, " holds no checkpoint (no trainer_state.json, no step-* directory)"));
}

absl::StatusOr<v1::TrainerState> ReadTrainerState(const std::string& dir) {
  const std::string path = PathIn(dir, kStateFile);
  MUONPS_ASSIGN_OR_RETURN(std::string json, ReadFileToString(path));
  return ParseTrainerState(json, path);
}

absl::StatusOr<std::map<std::string, std::string>> ParseCheckpointIndex(absl::string_view json,
                                                                        const std::string& path) {
  auto invalid = [&path](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
  };
  const nlohmann::json index = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object()) return invalid("not a JSON object");
  const auto weight_map = index.find("weight_map");
  if (weight_map == index.end() || !weight_map->is_object()) {
    return invalid("no \"weight_map\" object");
  }
  std::map<std::string, std::string> files;
  for (const auto& [key, value] : weight_map->items()) {
    if (!value.is_string()) {
      return invalid(absl::StrFormat("weight_map entry for '%s' is not a string", key));
    }
    std::string file = value.get<std::string>();
    // Only files of this directory: an index must not reach outside it. A
    // NUL would end the name early when the file is opened.
    if (file.empty() || file == "." || file == ".." ||
        file.find_first_of(std::string_view("/\0", 2)) != std::string::npos) {
      return invalid(absl::StrFormat(
          "weight_map entry for '%s' is '%s', not a file name in the checkpoint directory", key,
          file));
    }
    files[key] = std::move(file);
  }
  return files;
}

absl::StatusOr<v1::TrainerState> ParseTrainerState(absl::string_view json,
                                                   const std::string& path) {
  v1::TrainerState trainer;
  google::protobuf::util::JsonParseOptions options;
  const auto parsed = google::protobuf::util::JsonStringToMessage(
      google::protobuf::StringPiece(json.data(), json.size()), &trainer, options);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", std::string(parsed.message())));
  }
  // Readers resume from these counts (a shard takes the step as its version).
  if (trainer.step() < 0 || trainer.tokens_seen() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": step (", trainer.step(),
                                                   ") and tokens_seen (", trainer.tokens_seen(),
                                                   ") must not be negative"));
  }
  return trainer;
}

absl::Status ReadCheckpoint(const std::string& dir, const ModelLayout& layout,
                            const v1::ModelConfig& model, const std::string& optimizer_name,
                            TrainingState* state) {
  MUONPS_ASSIGN_OR_RETURN(CheckpointFiles files, OpenCheckpoint(dir, model));
  state->trainer = std::move(files.trainer);
  for (const TensorInfo& t : layout.tensors()) {
    MUONPS_RETURN_IF_ERROR(files.model.ReadInto(t.name, t.shape, state->params.data() + t.offset));
    for (const StateEntry& e : OptimizerState(t, optimizer_name)) {
      MUONPS_RETURN_IF_ERROR(files.optimizer.ReadInto(
          e.key, t.shape, StateVectors(*state)[e.buffer]->data() + t.offset));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::map<std::string, TensorState>> ReadCheckpointTensors(
    const std::string& dir, const ModelLayout& layout, const v1::ModelConfig& model,
    const std::string& optimizer_name, const std::vector<std::string>& names) {
  MUONPS_ASSIGN_OR_RETURN(CheckpointFiles files, OpenCheckpoint(dir, model));
  std::map<std::string, TensorState> tensors;
  for (const std::string& name : names) {
    const TensorInfo* t = layout.Find(name);
    if (t == nullptr) {
      return absl::NotFoundError(
          absl::StrFormat("%s: tensor '%s' is not in the model layout", dir, name));
    }
    TensorState& s = tensors[name];
    s.value.resize(t->numel);
    MUONPS_RETURN_IF_ERROR(files.model.ReadInto(name, t->shape, s.value.data()));
    for (const StateEntry& e : OptimizerState(*t, optimizer_name)) {
      std::vector<float>& v = *StateVectors(s)[e.buffer];
      v.resize(t->numel);
      MUONPS_RETURN_IF_ERROR(files.optimizer.ReadInto(e.key, t->shape, v.data()));
    }
  }
  return tensors;
}

namespace {

constexpr char kMarkerHeader[] = "muonps checkpoint";

std::string MarkerText(const CheckpointWriter& writer) {
  return absl::StrCat(kMarkerHeader, "\nowner ", writer.owner, "\njob ", writer.job_id, "\n");
}

}  // namespace

bool WrittenBy(const std::string& dir, const std::string& owner) {
  std::ifstream in(PathIn(dir, kCheckpointMarker));
  if (!in) return false;
  std::string header, owner_line;
  if (!std::getline(in, header) || header != kMarkerHeader) return false;
  if (!std::getline(in, owner_line)) return false;
  return owner_line == absl::StrCat("owner ", owner);
}

absl::StatusOr<std::string> CreateStagingDir(const std::string& final_dir,
                                             const CheckpointWriter& writer) {
  const std::string staging = absl::StrCat(final_dir, ".tmp");
  std::error_code ec;
  if (fs::exists(fs::symlink_status(staging, ec))) {
    if (!WrittenBy(staging, writer.owner)) {
      return absl::FailedPreconditionError(
          absl::StrCat(staging, " exists and was not written by muonps for this owner; ",
                       "it is left alone: remove it or choose another checkpoint.dir"));
    }
    fs::remove_all(staging, ec);
    if (ec) return FsError("cannot remove the leftover", staging, ec);
  }
  fs::create_directories(staging, ec);
  if (ec) return FsError("cannot create checkpoint directory", staging, ec);
  std::ofstream marker(PathIn(staging, kCheckpointMarker), std::ios::trunc);
  marker << MarkerText(writer);
  marker.close();
  if (!marker) {
    return absl::InternalError(absl::StrCat("cannot write ", PathIn(staging, kCheckpointMarker)));
  }
  return staging;
}

absl::Status PublishStagingDir(const std::string& staging, const std::string& final_dir,
                               const CheckpointWriter& writer) {
  MUONPS_RETURN_IF_ERROR(SyncDirectory(staging));
  const std::string old = absl::StrCat(final_dir, ".old");
  std::error_code ec;
  const bool replacing = fs::exists(fs::symlink_status(final_dir, ec));
  if (replacing) {
    if (!WrittenBy(final_dir, writer.owner)) {
      return absl::FailedPreconditionError(
          absl::StrCat(final_dir, " exists and was not written by muonps for this owner; ",
                       "it is left alone: remove it or choose another checkpoint.dir"));
    }
    if (fs::exists(fs::symlink_status(old, ec))) {
      if (!WrittenBy(old, writer.owner)) {
        return absl::FailedPreconditionError(
            absl::StrCat(old, " exists and was not written by muonps for this owner"));
      }
      fs::remove_all(old, ec);
    }
    fs::rename(final_dir, old, ec);
    if (ec) return FsError("cannot move aside", final_dir, ec);
  }
  fs::rename(staging, final_dir, ec);
  if (ec) {
    absl::Status error = FsError("cannot rename checkpoint into", final_dir, ec);
    if (replacing) fs::rename(old, final_dir, ec);  // put the previous one back
    return error;
  }
  if (replacing) fs::remove_all(old, ec);
  return SyncDirectory(fs::path(final_dir).parent_path().string());
}

void PruneCheckpoints(const std::string& root, int keep, const std::string& owner) {
  if (keep <= 0) return;
  std::vector<fs::path> dirs;
  for (fs::path& dir : ListCheckpointDirs(root)) {
    if (WrittenBy(dir.string(), owner)) dirs.push_back(std::move(dir));
  }
  std::error_code ec;
  for (size_t i = 0; i + static_cast<size_t>(keep) < dirs.size(); ++i) fs::remove_all(dirs[i], ec);
}

}  // namespace muonps
