// Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/)
// with the project's own writers and encoders, so the seeds are the real
// formats: job specs as ToJson prints them, safetensors files from
// WriteSafetensors, a sharded checkpoint's index and state files from
// WriteCheckpointIndex, and push and pull messages from rpc/wire.h. A few
// near-valid variants of each follow, so the first mutations already reach
// the refusals.
//
//   make_corpus OUT_DIR     (scripts/fuzz.sh never runs it: the corpus is committed)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "common/atomic_file.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/safetensors.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/support/byte_buffer.h"
#include "muonps/v1/job.pb.h"
#include "muonps/v1/shard.pb.h"
#include "muonps/v1/tensor.pb.h"
#include "rpc/wire.h"

namespace muonps {
namespace {

namespace fs = std::filesystem;

void Check(const absl::Status& status) {
  if (status.ok()) return;
  std::fprintf(stderr, "make_corpus: %s\n", status.ToString().c_str());
  std::exit(1);
}

std::string Read(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  Check(text.status());
  return *text;
}

class Corpus {
 public:
  explicit Corpus(std::string root) : root_(std::move(root)) {}

  void Add(const std::string& target, const std::string& name, const std::string& bytes) {
    const std::string dir = absl::StrCat(root_, "/", target);
    fs::create_directories(dir);
    Check(WriteFileAtomically(absl::StrCat(dir, "/", name), bytes));
  }

 private:
  std::string root_;
};

// --- job_spec_fuzz: job files and model configs --------------------------

void JobSpecSeeds(Corpus& corpus) {
  const char* t = "job_spec_fuzz";
  // The example job files, as they are.
  for (const auto& entry : fs::directory_iterator(MUONPS_SOURCE_DIR "/examples")) {
    if (entry.path().extension() != ".json") continue;
    corpus.Add(t, "example_" + entry.path().filename().string(), Read(entry.path().string()));
  }
  corpus.Add(t, "default_full.json", ToJson(DefaultJobSpec()));
  corpus.Add(t, "empty.json", "{}");
  corpus.Add(t, "model_config.json", ToJson(DefaultJobSpec().model()));
  corpus.Add(t, "adamw_small.json",
             R"({"name":"tiny","model":{"vocab_size":64,"hidden_size":16,"num_hidden_layers":2,)"
             R"("num_attention_heads":2,"n_routed_experts":4,"num_experts_per_tok":2,)"
             R"("scoring_func":"softmax","balancing":"aux_loss"},"optimizer":{"name":"adamw",)"
             R"("lr":0.003,"nesterov":false},"data":{"path":"corpus.bin","format":"bin"},)"
             R"("batch":{"slots":1,"micro_batch":1},"seed":"7"})");
  // Near-valid: each is refused for one reason.
  corpus.Add(t, "odd_head_dim.json", R"({"model":{"hidden_size":12,"num_attention_heads":4}})");
  corpus.Add(t, "unknown_field.json", R"({"model":{"hidden":128}})");
  corpus.Add(t, "nan_lr.json", R"({"optimizer":{"lr":"NaN"}})");
  corpus.Add(t, "warmup_past_total.json", R"({"schedule":{"total_steps":10,"warmup_steps":11}})");
}

// --- safetensors_fuzz: files from WriteSafetensors and near misses -------

std::string LayOut(const std::string& header_json, const std::string& data) {
  std::string header = header_json;
  while (header.size() % 8 != 0) header.push_back(' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

void SafetensorsSeeds(Corpus& corpus, const std::string& scratch) {
  const char* t = "safetensors_fuzz";
  const std::vector<float> w = {1, -2, 3.5f, 0.25f, -0.5f, 6};
  const std::vector<float> b = {0.1f, 0.2f, 0.3f};
  const float s = 42;
  auto written = [&](const std::vector<TensorRef>& tensors,
                     const std::map<std::string, std::string>& metadata) {
    const std::string path = scratch + "/seed.safetensors";
    Check(WriteSafetensors(path, tensors, metadata));
    return Read(path);
  };
  const std::string two =
      written({{"w", {2, 3}, w.data()}, {"b", {3}, b.data()}, {"s", {}, &s}}, {{"format", "pt"}});
  corpus.Add(t, "three_tensors.safetensors", two);
  corpus.Add(t, "empty_tensor.safetensors", written({{"e", {0, 4}, nullptr}}, {}));
  corpus.Add(t, "metadata_only.safetensors", written({}, {{"producer", "muonps"}}));
  // Near-valid: a truncated file, a dtype muonps cannot read, offsets that
  // leave a gap, and a header length past the end.
  corpus.Add(t, "truncated.safetensors", two.substr(0, two.size() - 4));
  corpus.Add(t, "bf16.safetensors",
             LayOut(R"({"h":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})", "abcd"));
  corpus.Add(t, "gap.safetensors",
             LayOut(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                    R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                    std::string(12, '\0')));
  std::string long_header = two;
  long_header[1] = '\x7f';
  corpus.Add(t, "header_too_long.safetensors", long_header);
}

// --- checkpoint_fuzz: a sharded checkpoint's JSON files ------------------

void CheckpointSeeds(Corpus& corpus, const std::string& scratch) {
  const char* t = "checkpoint_fuzz";
  v1::JobSpec job = DefaultJobSpec();
  v1::ModelConfig* m = job.mutable_model();
  m->set_vocab_size(8);
  m->set_hidden_size(4);
  m->set_num_hidden_layers(2);
  m->set_num_attention_heads(1);
  m->set_n_routed_experts(2);
  m->set_num_experts_per_tok(1);
  Check(ValidateJobSpec(job));
  const ModelLayout layout(job.model());
  std::map<std::string, int> owner;
  int next = 0;
  for (const TensorInfo& info : layout.tensors()) owner[info.name] = next++ % 2;
  v1::TrainerState trainer;
  trainer.set_step(120);
  trainer.set_tokens_seen(61440);
  trainer.set_last_val_loss(3.25);
  *trainer.mutable_job() = job;
  trainer.mutable_numerics()->set_blas_core("Haswell");
  const std::string dir = scratch + "/step-00000120";
  fs::create_directories(dir);
  Check(WriteCheckpointIndex(dir, 2, layout, "muon", owner, trainer));
  corpus.Add(t, "model.safetensors.index.json", Read(dir + "/model.safetensors.index.json"));
  corpus.Add(t, "optimizer.safetensors.index.json",
             Read(dir + "/optimizer.safetensors.index.json"));
  corpus.Add(t, "trainer_state.json", Read(dir + "/trainer_state.json"));
  corpus.Add(t, "config.json", Read(dir + "/config.json"));
  // Near-valid: an index reaching outside its directory, a non-string file
  // name, a name with a NUL, a state before its first evaluation (NaN loss)
  // with an unknown field, and a negative step.
  corpus.Add(t, "index_parent.json",
             R"({"metadata":{"total_size":16},"weight_map":{"w":"../model.safetensors"}})");
  corpus.Add(t, "index_number.json", R"({"weight_map":{"w":1}})");
  corpus.Add(t, "index_nul.json", R"({"weight_map":{"w":"config.json\u0000.safetensors"}})");
  corpus.Add(t, "state_nan.json", R"({"step":"0","last_val_loss":"NaN","extra":1})");
  corpus.Add(t, "state_negative_step.json", R"({"step":"-1","tokens_seen":"0"})");
}

// --- wire_fuzz: push and pull messages as the senders encode them --------

// The bytes of a message as gRPC would hand them over.
std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) std::exit(1);
  std::string out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// A chunk field of a message: the tensor `name` from float `first` on.
std::string Chunk(int field, const std::string& name, const std::vector<int64_t>* shape,
                  int64_t offset, const std::vector<float>& values) {
  return Flatten(ChunkMessage("", field, EncodeChunkHeader(name, shape, offset),
                              reinterpret_cast<const char*>(values.data()),
                              static_cast<int64_t>(values.size() * sizeof(float))));
}

void WireSeeds(Corpus& corpus) {
  const char* t = "wire_fuzz";
  // Byte 0 of an input: bit 0 push (0) or pull (1), bits 1-7 the block size.
  const std::string push = std::string(1, '\0'), push_sliced = std::string(1, '\x0e');
  const std::string pull = std::string(1, '\x01'), pull_sliced = std::string(1, '\x0f');
  constexpr int kPushChunk = v1::PushGradientsRequest::kChunkFieldNumber;
  constexpr int kPullChunk = v1::PullParametersResponse::kChunkFieldNumber;
  const std::vector<int64_t> w_shape = {2, 3}, b_shape = {5}, s_shape = {}, e_shape = {0, 4};
  const std::vector<float> w = {1, 2, 3, 4, 5, 6}, b = {0.5f, -1, 2, -3, 4};

  const std::string fields = EncodePushFields({"job-000001", 7, 1, 4});
  const std::string push_w = fields + Chunk(kPushChunk, "w", &w_shape, 0, w);
  corpus.Add(t, "push_whole_tensor", push + push_w);
  corpus.Add(t, "push_sliced", push_sliced + push_w);
  // A tensor in two messages' chunks, here back to back in one message.
  corpus.Add(t, "push_two_chunks",
             push + fields + Chunk(kPushChunk, "b", &b_shape, 0, {0.5f, -1}) +
                 Chunk(kPushChunk, "b", nullptr, 8, {2, -3, 4}));
  corpus.Add(t, "push_fields_only", push + fields);
  corpus.Add(t, "push_nonfinite",
             push + fields +
                 Chunk(kPushChunk, "s", &s_shape, 0, {std::numeric_limits<float>::infinity()}));

  const std::string version = EncodePullVersion(12);
  corpus.Add(t, "pull_whole_tensor", pull + version + Chunk(kPullChunk, "w", &w_shape, 0, w));
  corpus.Add(t, "pull_every_tensor",
             pull_sliced + version + Chunk(kPullChunk, "w", &w_shape, 0, w) +
                 Chunk(kPullChunk, "b", &b_shape, 0, b) + Chunk(kPullChunk, "s", &s_shape, 0, {3}) +
                 Chunk(kPullChunk, "e", &e_shape, 0, {}));
  // The same tensor encoded by protobuf's generated classes.
  v1::PullParametersResponse generated;
  generated.set_version(12);
  v1::TensorChunk* chunk = generated.mutable_chunk();
  chunk->set_name("b");
  for (int64_t d : b_shape) chunk->add_shape(d);
  chunk->set_dtype("F32");
  chunk->set_data(reinterpret_cast<const char*>(b.data()), b.size() * sizeof(float));
  corpus.Add(t, "pull_generated", pull + generated.SerializeAsString());
  // Near-valid: a chunk past the end of its tensor.
  corpus.Add(t, "pull_past_end", pull + Chunk(kPullChunk, "b", nullptr, 12, {1, 2}));
}

}  // namespace
}  // namespace muonps

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_corpus OUT_DIR\n");
    return 2;
  }
  muonps::Corpus corpus(argv[1]);
  const std::string scratch = std::string(argv[1]) + "/.scratch";
  std::filesystem::create_directories(scratch);
  muonps::JobSpecSeeds(corpus);
  muonps::SafetensorsSeeds(corpus, scratch);
  muonps::CheckpointSeeds(corpus, scratch);
  muonps::WireSeeds(corpus);
  std::filesystem::remove_all(scratch);
  return 0;
}
