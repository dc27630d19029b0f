// Reading, defaulting and validating job specifications (proto/muonps/v1/job.proto).
//
// A job file is JSON parsed by protobuf's JSON parser: unknown fields are
// rejected, absent fields take the defaults documented in job.proto, and every
// value is range-checked with an error that names the field.
#ifndef MUONPS_COMMON_JOB_SPEC_H_
#define MUONPS_COMMON_JOB_SPEC_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/bf16.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

// The most copies of a tensor's state recovery.replicas may ask for.
inline constexpr int kMaxReplicas = 3;

// The default job: the default model on the default corpus.
v1::JobSpec DefaultJobSpec();

// A named starting point for a job, defaults filled: "default" (the default
// job), "small" (57 M parameters with 32 routed experts, still trainable on a
// CPU at a few seconds per step), "moonlight-16b-a3b" (the published
// Moonlight-16B-A3B configuration, MLA; for validate and plan) or
// "moonlight-tiny" (its shapes scaled down to train here). NotFound naming
// the presets for any other name.
absl::StatusOr<v1::JobSpec> PresetJobSpec(absl::string_view name);

// Fills every absent field of `job` with its default (explicit values are kept).
void FillJobDefaults(v1::JobSpec* job);

// Checks ranges and cross-field constraints of a job whose defaults are filled.
// InvalidArgument naming the field ("model.hidden_size: ...") on failure.
absl::Status ValidateJobSpec(const v1::JobSpec& job);
// The job's transfer.dtype (f32 when unset).
TransferDtype TransferDtypeOf(const v1::JobSpec& job);
absl::Status ValidateModelConfig(const v1::ModelConfig& model, absl::string_view prefix = "model.");

// Parses JSON, fills defaults and validates.
absl::StatusOr<v1::JobSpec> ParseJobSpecJson(absl::string_view json);
// Reads `path` and parses it as above; errors name the file.
absl::StatusOr<v1::JobSpec> LoadJobSpecFile(const std::string& path);

// Model config with defaults filled, validated.
absl::StatusOr<v1::ModelConfig> ParseModelConfigJson(absl::string_view json);

// Pretty JSON with the proto field names (snake_case), every field present.
std::string ToJson(const google::protobuf::Message& message);

}  // namespace muonps

#endif  // MUONPS_COMMON_JOB_SPEC_H_
