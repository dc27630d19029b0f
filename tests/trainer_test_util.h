// What trainer-level tests share: a small text corpus, a tiny job on it, and
// a run of that job with the single-process Trainer.
#ifndef MUONPS_TESTS_TRAINER_TEST_UTIL_H_
#define MUONPS_TESTS_TRAINER_TEST_UTIL_H_

#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "gtest/gtest.h"
#include "trainer/trainer.h"

namespace muonps::testing_util {

// A small but non-trivial text corpus of numbered sentences; returns its path.
inline std::string WriteCorpus(const std::string& dir) {
  const std::string path = dir + "/corpus.txt";
  std::ofstream out(path);
  for (int i = 0; i < 600; ++i) {
    out << "Line " << i << ": the quick brown fox " << (i % 7 == 0 ? "jumps" : "naps") << " over "
        << (i * 37 % 101) << " lazy dogs.\n";
  }
  return path;
}

// A 6-step job of a tiny model on `corpus` (3 slots, validation every 3 steps).
inline v1::JobSpec TinyJob(const std::string& corpus, const std::string& optimizer) {
  absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson(
      absl::StrCat(R"({
    "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "max_position_embeddings": 32, "intermediate_size": 64,
              "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
    "optimizer": {"name": ")",
                   optimizer, R"(", "lr": 0.01},
    "schedule": {"total_steps": 6, "warmup_steps": 2},
    "data": {"path": ")",
                   corpus, R"(", "eval_every": 3, "eval_windows": 4, "sampling": "random"},
    "batch": {"slots": 3, "micro_batch": 2},
    "seed": 7})"));
  EXPECT_TRUE(job.ok()) << job.status();
  return *job;
}

// Runs `job` with the Trainer; its final state.
inline TrainingState RunJob(const v1::JobSpec& job, const TrainOptions& options = {}) {
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job, options);
  EXPECT_TRUE(trainer.ok()) << trainer.status();
  if (!trainer.ok()) return {};
  absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
  EXPECT_TRUE(summary.ok()) << summary.status();
  return (*trainer)->state();
}

}  // namespace muonps::testing_util

#endif  // MUONPS_TESTS_TRAINER_TEST_UTIL_H_
