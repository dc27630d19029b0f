// Training progress for people (one updating line on a terminal, periodic
// lines otherwise) and for machines (JSON Lines: start, step, summary records).
#ifndef MUONPS_CLI_PROGRESS_H_
#define MUONPS_CLI_PROGRESS_H_

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "common/model_layout.h"
#include "muonps/v1/job.pb.h"
#include "trainer/trainer.h"

namespace muonps {

class ProgressDisplay {
 public:
  // `human` may be nullptr (quiet). `jsonl_path`: "" = none, "-" = stdout.
  ProgressDisplay(FILE* human, const std::string& jsonl_path);
  const absl::Status& status() const { return status_; }

  void Start(const v1::JobSpec& job, const std::string& corpus, const ModelLayout& layout,
             int64_t start_step, double last_val_loss, int threads, const std::string& blas_core);
  // Prepares for Step() without printing a header (e.g. watching a job).
  void Begin(int64_t start_step, int64_t total_steps);
  void Step(const StepReport& report);
  void Finish(const TrainSummary& summary);
  // Ends an updating line before an error message is printed.
  void Abort();

 private:
  void Emit(const std::string& json_line);

  FILE* human_;
  bool tty_ = false;
  bool line_open_ = false;
  std::ofstream jsonl_file_;
  bool jsonl_stdout_ = false;
  absl::Status status_;
  int64_t start_step_ = 0;
  int64_t print_every_ = 1;
  double ema_step_seconds_ = 0.0;
  double tokens_ = 0.0, seconds_ = 0.0;
  double last_val_ = -1.0;
};

}  // namespace muonps

#endif  // MUONPS_CLI_PROGRESS_H_
