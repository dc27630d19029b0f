// Where Muon's Newton-Schulz iteration runs. By default on the CPU
// (optim/newton_schulz.h); an optimizer shard may hand Muon another one,
// e.g. on a GPU (`muonps shard --device cuda`, workers/cuda).
#ifndef MUONPS_OPTIM_ORTHOGONALIZER_H_
#define MUONPS_OPTIM_ORTHOGONALIZER_H_

namespace muonps {

class Orthogonalizer {
 public:
  virtual ~Orthogonalizer() = default;
  // u (rows, cols), row-major float32, becomes NewtonSchulz(u, steps), in
  // place. Called from several threads at once.
  virtual void Orthogonalize(float* u, int rows, int cols, int steps) = 0;
  // "cpu", "cuda:0", ...: for logs.
  virtual const char* name() const = 0;
};

}  // namespace muonps

#endif  // MUONPS_OPTIM_ORTHOGONALIZER_H_
