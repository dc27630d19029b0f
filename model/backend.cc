#include "model/backend.h"

#include "model/cpu_backend.h"

namespace muonps {

ComputeBackend* CpuBackend() {
  static CpuComputeBackend* cpu = new CpuComputeBackend();
  return cpu;
}

}  // namespace muonps
