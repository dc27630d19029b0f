// Fuzz target: the JSON files of a checkpoint directory (checkpoint/
// checkpoint.h), as a resume reads them. The input is read as each of
// model.safetensors.index.json, trainer_state.json and config.json. Any
// input must give a status, never a crash. An accepted index names only
// plain files of the checkpoint directory; an accepted trainer state reads
// back unchanged from the JSON a checkpoint writes it as (ToJson).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "checkpoint/checkpoint.h"
#include "common/hf_config.h"
#include "common/job_spec.h"
#include "google/protobuf/util/field_comparator.h"
#include "google/protobuf/util/message_differencer.h"
#include "muonps/v1/job.pb.h"

namespace {

constexpr char kIndexPath[] = "ckpt/model.safetensors.index.json";
constexpr char kStatePath[] = "ckpt/trainer_state.json";

// What a shard file name in an index must be: one path component, opened as
// named (a NUL would cut the name short at open()).
bool PlainFileName(const std::string& name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of(std::string("/\0", 2)) == std::string::npos;
}

void Fail(const std::string& what) {
  std::fprintf(stderr, "%s\n", what.c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);

  const absl::StatusOr<std::map<std::string, std::string>> index =
      muonps::ParseCheckpointIndex(text, kIndexPath);
  if (index.ok()) {
    for (const auto& [key, file] : *index) {
      if (!PlainFileName(file)) Fail("index maps '" + key + "' outside the directory");
    }
  }

  const absl::StatusOr<muonps::v1::TrainerState> state =
      muonps::ParseTrainerState(text, kStatePath);
  if (state.ok()) {
    if (state->step() < 0 || state->tokens_seen() < 0) Fail("negative step or tokens_seen");
    const absl::StatusOr<muonps::v1::TrainerState> again =
        muonps::ParseTrainerState(muonps::ToJson(*state), kStatePath);
    if (!again.ok()) Fail("trainer state refused after ToJson: " + again.status().ToString());
    // last_val_loss is NaN until the first evaluation.
    google::protobuf::util::DefaultFieldComparator comparator;
    comparator.set_treat_nan_as_equal(true);
    google::protobuf::util::MessageDifferencer differencer;
    differencer.set_field_comparator(&comparator);
    if (!differencer.Compare(*state, *again)) Fail("trainer state changed through ToJson");
  }

  // config.json: Hugging Face keys (or an earlier checkpoint's ModelConfig),
  // compared with the job's model before any tensor is read.
  (void)muonps::ParseModelConfigJson(text);
  (void)muonps::CheckHfConfig(text, muonps::DefaultJobSpec().model());
  return 0;
}
