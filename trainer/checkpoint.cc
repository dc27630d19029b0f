#include "trainer/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/atomic_file.h"
#include "common/job_spec.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"

namespace muonps {
namespace fs = std::filesystem;
namespace {

constexpr char kModelFile[] = "model.safetensors";
constexpr char kOptimizerFile[] = "optimizer.safetensors";
constexpr char kConfigFile[] = "config.json";
constexpr char kStateFile[] = "trainer_state.json";

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

}  // namespace

std::string CheckpointName(int64_t step) { return absl::StrFormat("step-%08d", step); }

absl::Status WriteCheckpoint(const std::string& dir, const ModelLayout& layout,
                             const TrainingState& state) {
  const std::string optimizer = state.trainer.job().optimizer().name();
  const std::string tmp = absl::StrCat(dir, ".tmp");
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return FsError("cannot create checkpoint directory", tmp, ec);

  std::vector<TensorRef> model, opt;
  for (const TensorInfo& t : layout.tensors()) {
    model.push_back({t.name, t.shape, state.params.data() + t.offset});
    if (!t.trainable()) continue;
    if (UsesMuon(t, optimizer)) {
      opt.push_back({t.name + ".momentum_buffer", t.shape, state.momentum.data() + t.offset});
    } else {
      opt.push_back({t.name + ".exp_avg", t.shape, state.exp_avg.data() + t.offset});
      opt.push_back({t.name + ".exp_avg_sq", t.shape, state.exp_avg_sq.data() + t.offset});
    }
  }
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"step", absl::StrCat(state.trainer.step())}, {"producer", "muonps"}};
  MUONPS_RETURN_IF_ERROR(WriteSafetensors(absl::StrCat(tmp, "/", kModelFile), model, meta));
  MUONPS_RETURN_IF_ERROR(WriteSafetensors(absl::StrCat(tmp, "/", kOptimizerFile), opt, meta));
  MUONPS_RETURN_IF_ERROR(WriteFileAtomically(absl::StrCat(tmp, "/", kConfigFile),
                                             ToJson(state.trainer.job().model())));
  MUONPS_RETURN_IF_ERROR(
      WriteFileAtomically(absl::StrCat(tmp, "/", kStateFile), ToJson(state.trainer)));

  // Swap the finished directory into place.
  if (fs::exists(dir, ec)) {
    const std::string old = absl::StrCat(dir, ".old");
    fs::remove_all(old, ec);
    fs::rename(dir, old, ec);
    if (ec) return FsError("cannot move aside", dir, ec);
    fs::rename(tmp, dir, ec);
    if (ec) return FsError("cannot rename checkpoint into", dir, ec);
    fs::remove_all(old, ec);
  } else {
    fs::rename(tmp, dir, ec);
    if (ec) return FsError("cannot rename checkpoint into", dir, ec);
  }
  return SyncDirectory(fs::path(dir).parent_path().string());
}

absl::StatusOr<std::string> ResolveCheckpointDir(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    return absl::NotFoundError(absl::StrCat("checkpoint directory not found: ", path));
  }
  if (fs::exists(fs::path(path) / kStateFile, ec)) return path;
  std::string newest;
  for (const auto& entry : fs::directory_iterator(path, ec)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_directory() && name.rfind("step-", 0) == 0 && name.find('.') == std::string::npos &&
        fs::exists(entry.path() / kStateFile) && name > fs::path(newest).filename().string()) {
      newest = entry.path().string();
    }
  }
  if (newest.empty()) {
    return absl::NotFoundError(
        absl::StrCat(path, " holds no checkpoint (no trainer_state.json, no step-* directory)"));
  }
  return newest;
}

absl::Status ReadCheckpoint(const std::string& dir, const ModelLayout& layout,
                            const v1::ModelConfig& model, const std::string& optimizer_name,
                            TrainingState* state) {
  MUONPS_ASSIGN_OR_RETURN(std::string config_json,
                          ReadFileToString(absl::StrCat(dir, "/", kConfigFile)));
  absl::StatusOr<v1::ModelConfig> config = ParseModelConfigJson(config_json);
  if (!config.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, "/", kConfigFile, ": ", config.status().message()));
  }
  if (!google::protobuf::util::MessageDifferencer::Equals(*config, model)) {
    return absl::FailedPreconditionError(absl::StrCat(
        dir, "/", kConfigFile, ": the checkpoint's model config differs from the job's model"));
  }
  MUONPS_ASSIGN_OR_RETURN(std::string state_json,
                          ReadFileToString(absl::StrCat(dir, "/", kStateFile)));
  google::protobuf::util::JsonParseOptions options;
  const auto parsed = google::protobuf::util::JsonStringToMessage(state_json, &state->trainer, options);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, "/", kStateFile, ": ", std::string(parsed.message())));
  }

  MUONPS_ASSIGN_OR_RETURN(SafetensorsFile params,
                          SafetensorsFile::Open(absl::StrCat(dir, "/", kModelFile)));
  MUONPS_ASSIGN_OR_RETURN(SafetensorsFile opt,
                          SafetensorsFile::Open(absl::StrCat(dir, "/", kOptimizerFile)));
  for (const TensorInfo& t : layout.tensors()) {
    MUONPS_RETURN_IF_ERROR(params.ReadInto(t.name, t.shape, state->params.data() + t.offset));
    if (!t.trainable()) continue;
    if (UsesMuon(t, optimizer_name)) {
      MUONPS_RETURN_IF_ERROR(
          opt.ReadInto(t.name + ".momentum_buffer", t.shape, state->momentum.data() + t.offset));
    } else {
      MUONPS_RETURN_IF_ERROR(
          opt.ReadInto(t.name + ".exp_avg", t.shape, state->exp_avg.data() + t.offset));
      MUONPS_RETURN_IF_ERROR(
          opt.ReadInto(t.name + ".exp_avg_sq", t.shape, state->exp_avg_sq.data() + t.offset));
    }
  }
  return absl::OkStatus();
}

}  // namespace muonps
