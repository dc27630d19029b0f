// The model's tensors: names and shapes in the HF DeepSeek-V3 layout, one
// contiguous float buffer carved up by a size table, and their initial values.
//
// Shapes: C hidden, V vocab, E routed experts, F expert width, I dense width.
#ifndef MUONPS_COMMON_MODEL_LAYOUT_H_
#define MUONPS_COMMON_MODEL_LAYOUT_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

enum class TensorRole {
  kEmbedding,  // model.embed_tokens.weight (V, C)
  kHead,       // lm_head.weight (V, C)
  kMatrix,     // every other 2-D weight: attention, FFN, experts, router
  kNorm,       // RMSNorm gains (C)
  kBuffer,     // e_score_correction_bias (E): not trained by gradients
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;  // into the flat parameter buffer (floats)
  int64_t numel = 0;
  TensorRole role = TensorRole::kMatrix;
  int layer = -1;  // transformer layer, -1 for embedding / final norm / head

  bool trainable() const { return role != TensorRole::kBuffer; }
  int rows() const { return static_cast<int>(shape[0]); }
  int cols() const { return shape.size() > 1 ? static_cast<int>(shape[1]) : 1; }
};

class ModelLayout {
 public:
  // `model` must have its defaults filled and be valid.
  explicit ModelLayout(const v1::ModelConfig& model);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  int64_t total_floats() const { return total_; }
  // nullptr when absent.
  const TensorInfo* Find(const std::string& name) const;
  int Index(const std::string& name) const;  // -1 when absent

 private:
  void Add(std::string name, std::vector<int64_t> shape, TensorRole role, int layer);

  std::vector<TensorInfo> tensors_;
  std::map<std::string, int> index_;
  int64_t total_ = 0;
};

// Fills `out` (tensor.numel floats) with the tensor's initial value:
// normal(0, initializer_range) for matrices and embeddings, ones for norms,
// zeros for buffers, drawn from Philox keyed by (seed, tensor name).
void InitTensor(const TensorInfo& tensor, uint64_t seed, double initializer_range, float* out);

// Initialises the whole flat buffer.
void InitParameters(const ModelLayout& layout, uint64_t seed, double initializer_range,
                    float* params);

// Whether `tensor` is updated by Muon under optimizer `optimizer_name`.
bool UsesMuon(const TensorInfo& tensor, const std::string& optimizer_name);

}  // namespace muonps

#endif  // MUONPS_COMMON_MODEL_LAYOUT_H_
