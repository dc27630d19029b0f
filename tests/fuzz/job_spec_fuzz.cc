// Fuzz target: a job spec as `muonps submit` and the coordinator take it.
// The input is JSON text: parsed into a JobSpec (unknown fields refused),
// defaults filled and validated as SubmitJob does, and also read as a
// checkpoint's config.json (the ModelConfig alone). Any input must give a
// status, never a crash; a spec that is accepted must survive the JSON the
// coordinator and the checkpoints write it back as (ToJson) unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/job_spec.h"
#include "google/protobuf/util/message_differencer.h"
#include "muonps/v1/job.pb.h"

namespace {

using google::protobuf::util::MessageDifferencer;

// An accepted message that does not read back as itself is a bug: the
// coordinator would store, and checkpoints record, something else.
template <typename Message>
void ExpectRoundTrip(const Message& accepted, const absl::StatusOr<Message>& again) {
  if (!again.ok()) {
    std::fprintf(stderr, "accepted spec refused after ToJson: %s\n",
                 std::string(again.status().message()).c_str());
    std::abort();
  }
  if (!MessageDifferencer::Equals(accepted, *again)) {
    std::fprintf(stderr, "spec changed through ToJson:\n%s\n", muonps::ToJson(accepted).c_str());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view text(reinterpret_cast<const char*>(data), size);

  const absl::StatusOr<muonps::v1::JobSpec> job = muonps::ParseJobSpecJson(text);
  if (job.ok()) {
    // SubmitJob's path for a spec that arrives as a proto.
    muonps::v1::JobSpec submitted = *job;
    muonps::FillJobDefaults(&submitted);
    if (!muonps::ValidateJobSpec(submitted).ok()) std::abort();
    ExpectRoundTrip(*job, muonps::ParseJobSpecJson(muonps::ToJson(*job)));
  }

  const absl::StatusOr<muonps::v1::ModelConfig> model = muonps::ParseModelConfigJson(text);
  if (model.ok()) {
    ExpectRoundTrip(*model, muonps::ParseModelConfigJson(muonps::ToJson(*model)));
  }
  return 0;
}
