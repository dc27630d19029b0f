// A checkpoint's config.json in the Hugging Face DeepSeek-V3 form: the keys
// of DeepseekV3Config (the published checkpoints' config.json), so that a
// checkpoint of an MLA model loads into the Hugging Face implementation
// without renaming. What Hugging Face has no key for (balancing,
// bias_update_rate, the attention kind) is in trainer_state.json's job.
//
// An MHA model has no Hugging Face DeepSeek-V3 counterpart: its config.json
// carries the same keys without "architectures", "auto_map" and the MLA
// widths, and names its q/k/v/o projections in "muonps_attention".
#ifndef MUONPS_COMMON_HF_CONFIG_H_
#define MUONPS_COMMON_HF_CONFIG_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "muonps/v1/job.pb.h"
#include "nlohmann/json.hpp"

namespace muonps {

// The config.json object of `model` (defaults filled).
nlohmann::json HfConfig(const v1::ModelConfig& model);
// HfConfig as text, keys sorted, two-space indent, a final newline.
std::string HfConfigJson(const v1::ModelConfig& model);

// Whether `json`, a checkpoint's config.json, describes `model`: OK when it
// is HfConfig(model) key for key and value for value, or (checkpoints written
// before config.json took this form) the ModelConfig message itself, equal to
// `model`. InvalidArgument when it is not a JSON object; FailedPrecondition
// naming the first key that differs.
absl::Status CheckHfConfig(absl::string_view json, const v1::ModelConfig& model);

}  // namespace muonps

#endif  // MUONPS_COMMON_HF_CONFIG_H_
