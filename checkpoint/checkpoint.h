// Checkpoint directories, in one of two layouts that hold the same tensors
// under the same names.
//
// Single-file (written by the trainer, `muonps train`):
//   model.safetensors      parameters and buffers under their HF names
//   optimizer.safetensors  <name>.momentum_buffer (Muon), <name>.exp_avg and
//                          <name>.exp_avg_sq (AdamW)
//   config.json            the model config (HF-style keys)
//   trainer_state.json     step, tokens seen, the full job spec
//
// Sharded, the Hugging Face layout (written by optimizer shards that each own
// whole tensors; shard i of n, 1-based, 5 digits):
//   model-0000i-of-0000n.safetensors      the parameters and buffers shard i owns
//   model.safetensors.index.json          {"metadata": {"total_size": <bytes of
//                                          all tensor data>}, "weight_map":
//                                          {"<name>": "model-0000i-of-0000n.safetensors"}}
//   optimizer-0000i-of-0000n.safetensors  their optimizer state, keys as above
//   optimizer.safetensors.index.json      likewise, for the optimizer keys
//   config.json, trainer_state.json       as in the single-file layout
// Readers tell the layouts apart by model.safetensors.index.json and accept
// both.
//
// A directory is assembled under a staging name (`<dir>.tmp`) and renamed into
// place, and every file in it is fsynced, so a crash never leaves a half
// checkpoint under the final name. Directory listings (resume, pruning) only
// consider `step-<digits>` names, never a `.tmp` or `.old` one.
#ifndef MUONPS_CHECKPOINT_CHECKPOINT_H_
#define MUONPS_CHECKPOINT_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoint/training_state.h"
#include "common/model_layout.h"

namespace muonps {

// Writes `state` to `dir` in the single-file layout (created; an existing
// checkpoint there is replaced).
absl::Status WriteCheckpoint(const std::string& dir, const ModelLayout& layout,
                             const TrainingState& state);

// Resolves what `--resume PATH` names: PATH itself when it holds
// trainer_state.json, else its newest `step-NNNNNNNN` subdirectory that does.
// Either layout.
absl::StatusOr<std::string> ResolveCheckpointDir(const std::string& path);

// Reads the checkpoint in `dir` (either layout) into `state`, whose buffers
// must already be sized for `layout`; optimizer state a tensor does not have
// under `optimizer_name` is left as it is. Refuses (naming the tensor and the
// file) a missing tensor or a wrong shape or dtype, and a config.json
// different from `model`; in the sharded layout also an index that misses a
// tensor or names a missing file, and a tensor absent from the file its index
// names.
absl::Status ReadCheckpoint(const std::string& dir, const ModelLayout& layout,
                            const v1::ModelConfig& model, const std::string& optimizer_name,
                            TrainingState* state);

// Name of the checkpoint directory for `step` ("step-00000120").
std::string CheckpointName(int64_t step);

// --- Pieces for writers and readers that handle part of the model --------

// One tensor's values and optimizer state, numel floats each; a vector the
// optimizer does not keep for this tensor is empty.
struct TensorState {
  std::vector<float> value, momentum, exp_avg, exp_avg_sq;
};

// The same, borrowed: what a writer reads without copying (every pointer
// set; a vector the optimizer does not keep may be empty).
struct TensorStateView {
  const std::vector<float>* value = nullptr;
  const std::vector<float>* momentum = nullptr;
  const std::vector<float>* exp_avg = nullptr;
  const std::vector<float>* exp_avg_sq = nullptr;
};

// Writes shard `index` (0-based) of `count` into the existing directory `dir`:
// model-{index+1:05}-of-{count:05}.safetensors and
// optimizer-{index+1:05}-of-{count:05}.safetensors, each fsynced.
// `tensors` are the shard's tensors, from `layout` (any order; written in
// layout order), with the state `optimizer_name` keeps for them (their other
// vectors are ignored).
// InvalidArgument for an index out of range, a tensor not in `layout` or given
// twice, or a vector of the wrong size. The pointers are borrowed for the call.
absl::Status WriteCheckpointShard(
    const std::string& dir, int index, int count, const ModelLayout& layout,
    const std::string& optimizer_name,
    const std::vector<std::pair<const TensorInfo*, const TensorState*>>& tensors);
absl::Status WriteCheckpointShard(
    const std::string& dir, int index, int count, const ModelLayout& layout,
    const std::string& optimizer_name,
    const std::vector<std::pair<const TensorInfo*, TensorStateView>>& tensors);

// Writes model.safetensors.index.json and optimizer.safetensors.index.json
// (owner[name] = 0-based index of the shard holding tensor `name`, for every
// tensor of `layout`), config.json (`trainer.job().model()`) and
// trainer_state.json into `dir`, each fsynced. InvalidArgument naming a tensor
// without an owner, an owner out of [0, count), or a name not in `layout`.
absl::Status WriteCheckpointIndex(const std::string& dir, int count, const ModelLayout& layout,
                                  const std::string& optimizer_name,
                                  const std::map<std::string, int>& owner,
                                  const v1::TrainerState& trainer);

// Reads the tensors `names` of `layout` with the optimizer state they have
// under `optimizer_name`, from a checkpoint of either layout. Only the files
// holding them are read. The same refusals as ReadCheckpoint, and NotFound
// for a name the layout does not have.
absl::StatusOr<std::map<std::string, TensorState>> ReadCheckpointTensors(
    const std::string& dir, const ModelLayout& layout, const v1::ModelConfig& model,
    const std::string& optimizer_name, const std::vector<std::string>& names);

// trainer_state.json of the checkpoint in `dir` (either layout).
absl::StatusOr<v1::TrainerState> ReadTrainerState(const std::string& dir);

// --- The metadata parsers the readers above use, over bytes in memory ----
// `path` only names the file in error messages.

// The weight_map of a <kind>.safetensors.index.json: tensor key -> shard
// file name. InvalidArgument for text that is not a JSON object with a
// "weight_map" object of strings, or a file name that is not a plain name
// in the checkpoint directory (empty, ".", "..", or with a '/' or a NUL).
absl::StatusOr<std::map<std::string, std::string>> ParseCheckpointIndex(absl::string_view json,
                                                                        const std::string& path);

// A trainer_state.json. InvalidArgument for invalid JSON, an unknown field,
// or a negative step or tokens_seen.
absl::StatusOr<v1::TrainerState> ParseTrainerState(absl::string_view json, const std::string& path);

// Who writes a checkpoint directory. Every directory muonps writes holds a
// marker file (kCheckpointMarker) naming its writer; replacing and pruning
// touch only directories whose marker names the same owner, never a
// directory muonps did not write or another user's.
struct CheckpointWriter {
  std::string owner;   // the user the job runs for ("" when unauthenticated)
  std::string job_id;  // informational
};
inline constexpr char kCheckpointMarker[] = ".muonps-checkpoint";

// True when `dir` holds a marker written for `owner`.
bool WrittenBy(const std::string& dir, const std::string& owner);

// For writers that assemble a directory from several processes: the staging
// path for `final_dir` (`final_dir` + ".tmp"), created empty with its marker,
// with its parents. A leftover staging directory of the same owner (an
// interrupted write) is removed first; anything else there is
// FAILED_PRECONDITION and left alone.
absl::StatusOr<std::string> CreateStagingDir(const std::string& final_dir,
                                             const CheckpointWriter& writer);

// Publishes a finished staging directory: fsyncs it, replaces an existing
// `final_dir` of the same owner (moved aside to `final_dir` + ".old", then
// removed; FAILED_PRECONDITION for any other existing entry), renames
// `staging` to `final_dir` and fsyncs the parent.
absl::Status PublishStagingDir(const std::string& staging, const std::string& final_dir,
                               const CheckpointWriter& writer);

// Removes all but the newest `keep` `step-<digits>` directories under `root`
// that muonps wrote for `owner` (by step number; keep <= 0 keeps all).
// Directories without that marker, staging (`.tmp`), set-aside (`.old`) and
// other entries are neither counted nor removed. Best effort: I/O errors are
// ignored.
void PruneCheckpoints(const std::string& root, int keep, const std::string& owner);

}  // namespace muonps

#endif  // MUONPS_CHECKPOINT_CHECKPOINT_H_
