#include "cli/progress.h"

#include <unistd.h>

#include <cmath>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace muonps {
namespace {

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return absl::StrFormat("%02d:%02d", s / 60, s % 60);
}

}  // namespace

ProgressDisplay::ProgressDisplay(FILE* human, const std::string& jsonl_path) : human_(human) {
  tty_ = human_ != nullptr && isatty(fileno(human_));
  if (jsonl_path == "-") {
    jsonl_stdout_ = true;
  } else if (!jsonl_path.empty()) {
    jsonl_file_.open(jsonl_path, std::ios::app);
    if (!jsonl_file_)
      status_ = absl::InvalidArgumentError("cannot open --log_jsonl file " + jsonl_path);
  }
}

void ProgressDisplay::Emit(const std::string& line) {
  if (jsonl_stdout_) std::cout << line << std::endl;
  if (jsonl_file_.is_open()) jsonl_file_ << line << std::endl;
}

void ProgressDisplay::Start(const v1::JobSpec& job, const std::string& corpus,
                            const ModelLayout& layout, int64_t start_step, double last_val_loss,
                            int threads, const std::string& blas_core) {
  start_step_ = start_step;
  if (std::isfinite(last_val_loss)) last_val_ = last_val_loss;
  const int64_t total = job.schedule().total_steps();
  print_every_ = std::max<int64_t>(1, total / 40);
  int64_t params = 0, muon = 0;
  for (const TensorInfo& t : layout.tensors()) {
    if (!t.trainable()) continue;
    params += t.numel;
    if (UsesMuon(t, job.optimizer().name())) muon += t.numel;
  }
  const int64_t tokens_per_step = static_cast<int64_t>(job.batch().slots()) *
                                  job.batch().micro_batch() * job.model().max_position_embeddings();
  if (human_ != nullptr) {
    const std::string text = absl::StrFormat(
        "muonps train: job \"%s\", %s optimizer, %d steps of %d tokens (%d slots x %d x %d)\n"
        "  model: %.2fM parameters (%.2fM under Muon), %d layers, %d experts (top-%d)\n"
        "  data:  %s\n"
        "  %d threads, BLAS core %s%s\n",
        job.name(), job.optimizer().name(), static_cast<int>(total),
        static_cast<int>(tokens_per_step), job.batch().slots(), job.batch().micro_batch(),
        job.model().max_position_embeddings(), params / 1e6, muon / 1e6,
        job.model().num_hidden_layers(), job.model().n_routed_experts(),
        job.model().num_experts_per_tok(), corpus, threads, blas_core,
        start_step > 0 ? absl::StrCat(", resuming at step ", start_step) : "");
    std::fputs(text.c_str(), human_);
    std::fflush(human_);
  }
  nlohmann::json j = {{"event", "start"},
                      {"job", job.name()},
                      {"optimizer", job.optimizer().name()},
                      {"total_steps", total},
                      {"start_step", start_step},
                      {"tokens_per_step", tokens_per_step},
                      {"parameters", params},
                      {"muon_parameters", muon},
                      {"threads", threads},
                      {"blas_core", blas_core},
                      {"data", corpus}};
  Emit(j.dump());
}

void ProgressDisplay::Begin(int64_t start_step, int64_t total_steps) {
  start_step_ = start_step;
  print_every_ = std::max<int64_t>(1, total_steps / 40);
}

void ProgressDisplay::Step(const StepReport& r) {
  tokens_ += static_cast<double>(r.tokens);
  seconds_ += r.step_seconds;
  ema_step_seconds_ =
      ema_step_seconds_ == 0.0 ? r.step_seconds : 0.9 * ema_step_seconds_ + 0.1 * r.step_seconds;
  const double tok_s = seconds_ > 0 ? tokens_ / seconds_ : 0.0;
  const double eta = ema_step_seconds_ * static_cast<double>(r.total_steps - r.step);
  if (r.val_loss) last_val_ = *r.val_loss;

  nlohmann::json j = {{"event", "step"},
                      {"step", r.step},
                      {"total_steps", r.total_steps},
                      {"loss", r.loss},
                      {"lr", r.lr},
                      {"grad_norm", r.grad_norm},
                      {"tokens_per_sec", tok_s},
                      {"eta_s", eta},
                      {"step_s", r.step_seconds},
                      {"fwd_bwd_s", r.forward_backward_seconds},
                      {"optimizer_s", r.optimizer_seconds},
                      {"max_load_ratio", r.max_load_ratio},
                      {"max_attention_logit", r.max_attention_logit},
                      {"qk_clipped_heads", r.qk_clipped_heads}};
  if (r.val_loss) j["val_loss"] = *r.val_loss;
  if (r.aux_loss != 0.0) j["aux_loss"] = r.aux_loss;
  Emit(j.dump());

  if (human_ == nullptr) return;
  const double frac = static_cast<double>(r.step) / static_cast<double>(r.total_steps);
  constexpr int kBar = 24;
  const int filled = static_cast<int>(frac * kBar);
  std::string bar(filled, '#');
  bar.append(kBar - filled, '.');
  const std::string val = last_val_ >= 0 ? absl::StrFormat("%.4f", last_val_) : "  -   ";
  const std::string line = absl::StrFormat(
      "[%s] step %*d/%d  loss %.4f  val %s  lr %.2e  |g| %.2f  %6.0f tok/s  ETA %s", bar,
      static_cast<int>(std::to_string(r.total_steps).size()), static_cast<int>(r.step),
      static_cast<int>(r.total_steps), r.loss, val, r.lr, r.grad_norm, tok_s, FormatDuration(eta));
  if (tty_) {
    std::fprintf(human_, "\r%s\033[K", line.c_str());
    line_open_ = true;
    if (r.val_loss) {
      std::fputc('\n', human_);
      line_open_ = false;
    }
  } else if (r.step % print_every_ == 0 || r.val_loss || r.step == r.total_steps) {
    std::fprintf(human_, "%s\n", line.c_str());
  }
  std::fflush(human_);
}

void ProgressDisplay::Abort() {
  if (human_ != nullptr && line_open_) std::fputc('\n', human_);
  line_open_ = false;
}

void ProgressDisplay::Finish(const TrainSummary& s) {
  Abort();
  nlohmann::json j = {{"event", "summary"},
                      {"steps_run", s.steps_run},
                      {"final_step", s.final_step},
                      {"final_loss", s.final_loss},
                      {"seconds", s.seconds},
                      {"tokens_per_sec", s.tokens_per_second},
                      {"checkpoint", s.last_checkpoint}};
  if (s.final_val_loss) j["final_val_loss"] = *s.final_val_loss;
  Emit(j.dump());
  if (human_ == nullptr) return;
  std::fprintf(human_, "done: %lld steps (now at step %lld) in %s, %.0f tokens/s, final loss %.4f",
               static_cast<long long>(s.steps_run), static_cast<long long>(s.final_step),
               FormatDuration(s.seconds).c_str(), s.tokens_per_second, s.final_loss);
  if (s.final_val_loss) std::fprintf(human_, ", val loss %.4f", *s.final_val_loss);
  std::fputc('\n', human_);
  if (!s.last_checkpoint.empty())
    std::fprintf(human_, "checkpoint: %s\n", s.last_checkpoint.c_str());
  std::fflush(human_);
}

}  // namespace muonps
