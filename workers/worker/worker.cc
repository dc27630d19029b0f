#include "workers/worker/worker.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/bf16.h"
#include "common/confine.h"
#include "common/job_spec.h"
#include "common/numerics.h"
#include "common/parallel.h"
#include "common/status_macros.h"
#include "data/token_source.h"
#include "rpc/rpc_util.h"
#include "rpc/shard_client.h"
#include "step/step.h"

namespace muonps {
namespace {

// Errors a worker cannot fix by retrying: the job itself is wrong (its data
// cannot be read, its gradients are refused as invalid).
bool Permanent(const absl::Status& status) {
  return status.code() == absl::StatusCode::kInvalidArgument ||
         status.code() == absl::StatusCode::kPermissionDenied;
}

}  // namespace

double ModelFlopsPerToken(const v1::ModelConfig& m) {
  const double C = m.hidden_size(), T = m.max_position_embeddings();
  const double L = m.num_hidden_layers(), dense = std::min<double>(m.first_k_dense_replace(), L);
  const double moe = L - dense;
  // Attention's projections: q, k, v, o of C x C, or MLA's.
  double attention = 4.0 * C * C;
  if (m.attention() == "mla") {
    const double H = m.num_attention_heads(), R = m.kv_lora_rank();
    const double dqk = m.qk_nope_head_dim() + m.qk_rope_head_dim();
    const double q = m.q_lora_rank() > 0 ? m.q_lora_rank() * (C + H * dqk) : C * H * dqk;
    attention = q + C * (R + m.qk_rope_head_dim()) +
                R * H * (m.qk_nope_head_dim() + m.v_head_dim()) + H * m.v_head_dim() * C;
  }
  const double dense_mlp = 3.0 * C * m.intermediate_size();
  const double experts =
      (m.num_experts_per_tok() + m.n_shared_experts()) * 3.0 * C * m.moe_intermediate_size() +
      C * m.n_routed_experts();
  const double matmul_params =
      L * attention + dense * dense_mlp + moe * experts + C * m.vocab_size();
  const double H = m.num_attention_heads();
  const double attn_width = m.attention() == "mla"
                                ? H * (m.qk_nope_head_dim() + m.qk_rope_head_dim() + m.v_head_dim())
                                : 2.0 * C;
  return 6.0 * matmul_params + 6.0 * L * T * attn_width;
}

Worker::Metrics::Metrics(prometheus::Registry& r)
    : seconds(prometheus::BuildCounter()
                  .Name("muonps_worker_seconds_total")
                  .Help("Wall time by phase: pull, forward, backward, push, report, idle (waiting "
                        "for a task)")
                  .Register(r)),
      last_seconds(prometheus::BuildGauge()
                       .Name("muonps_worker_last_task_seconds")
                       .Help("Wall time by phase of the latest training task")
                       .Register(r)),
      tasks(prometheus::BuildCounter()
                .Name("muonps_worker_tasks_total")
                .Help("Tasks completed, by kind (train, eval)")
                .Register(r)),
      expert_tokens(prometheus::BuildGauge()
                        .Name("muonps_worker_expert_routed_tokens")
                        .Help("Tokens routed to each expert in the latest training task, by MoE "
                              "layer and expert")
                        .Register(r)),
      tokens(prometheus::BuildCounter()
                 .Name("muonps_worker_tokens_total")
                 .Help("Training tokens processed (forward and backward)")
                 .Register(r)
                 .Add({})),
      flops_per_second(
          prometheus::BuildGauge()
              .Name("muonps_worker_model_flops_per_second")
              .Help("Model FLOPs (6N + attention) per second of the latest training task's compute")
              .Register(r)
              .Add({})) {}

Worker::Worker(const WorkerOptions& options)
    : options_(options),
      registry_(options.metrics != nullptr ? options.metrics
                                           : std::make_shared<prometheus::Registry>()),
      metrics_(*registry_) {
  for (const char* phase : {"pull", "forward", "backward", "push", "report", "idle"}) {
    metrics_.seconds.Add({{"phase", phase}});
    metrics_.last_seconds.Add({{"phase", phase}});
  }
  for (const char* kind : {"train", "eval"}) metrics_.tasks.Add({{"kind", kind}});
  if (options_.peak_flops > 0) {
    metrics_.mfu = &prometheus::BuildGauge()
                        .Name("muonps_worker_model_flops_utilization_ratio")
                        .Help(
                            "Model FLOP/s of the latest training task over the configured peak "
                            "(--peak_tflops)")
                        .Register(*registry_)
                        .Add({});
  }
}

void Worker::RecordPhase(const std::string& phase, double seconds) {
  metrics_.seconds.Add({{"phase", phase}}).Increment(seconds);
  task_seconds_[phase] += seconds;
}
Worker::~Worker() = default;

void Worker::Log(const std::string& line) {
  if (options_.log) options_.log(line);
}

grpc::Channel* Worker::Channel(const std::string& address) {
  std::shared_ptr<grpc::Channel>& channel = job_->channels[address];
  if (channel == nullptr) channel = MakeChannel(address);
  return channel.get();
}

absl::Status Worker::Prepare(const v1::Task& task) {
  if (job_ != nullptr && job_->job_id == task.job_id()) return absl::OkStatus();
  job_.reset();
  auto job = std::make_unique<JobContext>();
  job->job_id = task.job_id();
  job->spec = task.spec();
  const v1::ModelConfig& mc = job->spec.model();
  const int T = mc.max_position_embeddings();
  // The path is confined before anything is opened, and a refusal says
  // nothing about what exists outside the roots.
  v1::DataConfig data = job->spec.data();
  if (data.has_path()) {
    std::vector<std::string> roots = options_.data_roots;
    roots.emplace_back(kDefaultCorpusPath);  // the bundled corpus is always allowed
    absl::StatusOr<std::string> path = ConfinedPath(data.path(), roots, "data.path");
    if (!path.ok()) return path.status();
    std::error_code ec;
    const auto type = std::filesystem::status(*path, ec).type();
    if (type != std::filesystem::file_type::regular &&
        type != std::filesystem::file_type::directory &&
        type != std::filesystem::file_type::not_found) {
      return absl::InvalidArgumentError(
          absl::StrCat("data.path: ", data.path(), " is neither a file nor a directory"));
    }
    data.set_path(*path);
  }
  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(data, mc.vocab_size(), T);
  if (!corpus.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("data: ", corpus.status().message()));
  }
  job->corpus = std::move(*corpus);
  job->sampler = std::make_unique<BatchSampler>(
      &job->corpus.train, T, job->spec.batch().slots(), job->spec.batch().micro_batch(),
      job->spec.data().sampling() == "random", job->spec.seed());
  job->val_windows = ValidationWindows(job->corpus.val, T, job->spec.data().eval_windows(),
                                       &job->val_inputs, &job->val_targets);
  const int lanes = std::max(1, std::min(options_.threads, job->spec.batch().slots()));
  const size_t rows = static_cast<size_t>(job->spec.batch().micro_batch());
  const int64_t floats = ModelLayout(mc).total_floats();
  for (int i = 0; i < lanes; ++i) {
    ComputeBackend* backend = CpuBackend();
    if (options_.backend_factory) {
      absl::StatusOr<std::unique_ptr<ComputeBackend>> made = options_.backend_factory(i);
      if (!made.ok()) {
        return absl::UnavailableError(
            absl::StrCat("compute backend of lane ", i, ": ", made.status().message()));
      }
      job->backends.push_back(std::move(*made));
      backend = job->backends.back().get();
    }
    job->lanes.push_back(std::make_unique<MoeModel>(mc, backend));
    job->lane_grads.emplace_back();
    job->lane_grads.back().Assign(backend, floats);
    job->lane_inputs.emplace_back(rows * T, 0);
    job->lane_targets.emplace_back(rows * T, 0);
  }
  job->params.Assign(job->lanes[0]->backend(), floats);
  job->stages = std::make_unique<PullStages>(job->lanes[0]->layout(), mc.num_hidden_layers());
  job->stage_tensors.resize(static_cast<size_t>(job->stages->stages()));
  for (const TensorInfo& t : job->lanes[0]->layout().tensors()) {
    if (t.trainable()) {
      job->stage_tensors[PullStages::StageOf(t, mc.num_hidden_layers())].push_back(&t);
    }
  }
  for (auto stage = job->stage_tensors.rbegin(); stage != job->stage_tensors.rend(); ++stage) {
    job->push_order.insert(job->push_order.end(), stage->begin(), stage->end());
  }
  job_ = std::move(job);
  return absl::OkStatus();
}

double Worker::Since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

absl::Status Worker::RunTrain(const v1::Task& task) {
  JobContext& job = *job_;
  const v1::JobSpec& spec = job.spec;
  const int slots = spec.batch().slots(), rows = spec.batch().micro_batch();
  const int T = job.lanes[0]->seq_len();
  const StepScales scales = StepScalesOf(spec);
  const std::vector<int> mine(task.slots().begin(), task.slots().end());
  for (size_t i = 0; i < mine.size(); ++i) {
    if (mine[i] < 0 || mine[i] >= slots || (i > 0 && mine[i] != mine[i - 1] + 1)) {
      return absl::InvalidArgumentError("task slots must be ascending, consecutive and in range");
    }
  }
  // Slots from 0 are summed here and pushed once; others are pushed one by one.
  const bool prefix = !mine.empty() && mine[0] == 0 && mine.size() > 1;
  std::vector<float> sum;
  if (prefix) sum.assign(job.params.size(), 0.0f);
  v1::ReportSlotsRequest report;
  const int lanes = static_cast<int>(job.lanes.size());
  const int count = static_cast<int>(mine.size());
  ExpertLoads task_load(spec.model());
  absl::Status failed;
  bool pulled = false;
  const TransferDtype dtype = TransferDtypeOf(spec);
  ForEachWave(count, lanes, [&](int64_t base, int wave) {
    if (!failed.ok()) return;
    std::vector<SlotStats> stats(static_cast<size_t>(wave));
    const auto compute_start = std::chrono::steady_clock::now();
    // The first wave's forward passes follow the pull layer by layer; the
    // time lane 0 spent waiting is the pull's exposed part.
    double waited = 0.0;
    const MoeModel::StageWait wait_lane0 = [&](int stage) { waited += job.stages->Wait(stage); };
    const MoeModel::StageWait wait_other = [&](int stage) { job.stages->Wait(stage); };
    // The last wave streams its pushes while its backward passes run: one
    // push of the task's sum (slots from 0), or one per slot.
    const bool last = options_.overlap_push && base + wave == count;
    std::vector<StreamedPush> units;
    std::vector<MoeModel::StageDone> done(static_cast<size_t>(wave));
    if (last) {
      const int stages = job.stages->stages();
      if (prefix) {
        units.push_back({0, count, sum.data(), std::make_unique<PushStages>(stages, wave)});
        // The lane that finishes a stage last adds the wave's slots of that
        // stage to the sum in slot order, exactly as the whole-buffer sum.
        const auto reduce = [&](int stage) {
          for (const TensorInfo* t : job.stage_tensors[stage]) {
            for (int i = 0; i < wave; ++i) {
              AccumulateSlotGradient(dtype, job.lane_grads[i].data() + t->offset, t->numel,
                                     sum.data() + t->offset);
            }
          }
        };
        for (int i = 0; i < wave; ++i) {
          done[i] = [&units, reduce](int stage) { units[0].stages->Done(stage, reduce); };
        }
      } else {
        for (int i = 0; i < wave; ++i) {
          units.push_back({mine[base + i], 1, job.lane_grads[i].data(),
                           std::make_unique<PushStages>(stages, 1)});
        }
        for (int i = 0; i < wave; ++i) {
          done[i] = [&units, i](int stage) { units[i].stages->Done(stage, nullptr); };
        }
      }
    }
    // Pushes wait for the pulls to be joined and checked: by a thread of its
    // own when this wave is also the first.
    absl::Notification pull_checked;
    absl::Status pull_status;
    std::thread pull_joiner;
    if (!pulled && last) {
      pull_joiner = std::thread([&] {
        pull_status = FinishPull(task);
        pull_checked.Notify();
      });
    } else if (last) {
      pull_checked.Notify();
    }
    std::vector<absl::Status> pushed(units.size());
    std::vector<std::thread> pushers;
    for (size_t u = 0; u < units.size(); ++u) {
      pushers.emplace_back(
          [&, u] { pushed[u] = StreamPush(task, units[u], pull_checked, pull_status); });
    }
    RunWave(wave, [&](int64_t i) {
      const int slot = mine[base + i];
      job.sampler->Fill(task.version(), slot, job.lane_inputs[i].data(),
                        job.lane_targets[i].data());
      job.lanes[i]->backend()->Zero(job.lane_grads[i].data(),
                                    static_cast<int64_t>(job.lane_grads[i].size()));
      stats[i] = job.lanes[i]->ForwardBackward(
          job.params.data(), job.lane_inputs[i].data(), job.lane_targets[i].data(), rows,
          scales.loss_scale, scales.aux_scale, job.lane_grads[i].data(),
          pulled ? nullptr : (i == 0 ? &wait_lane0 : &wait_other), last ? &done[i] : nullptr);
    });
    const auto compute_end = std::chrono::steady_clock::now();
    if (!pulled) {
      // Every stage has been waited for: the pulls have placed every tensor
      // or failed. Nothing is pushed unless all of them succeeded.
      pulled = true;
      absl::Status st;
      if (pull_joiner.joinable()) {
        pull_joiner.join();
        st = pull_status;
      } else {
        st = FinishPull(task);
      }
      RecordPhase("pull", waited);
      if (!st.ok()) failed = st;
    }
    // The streamed pushes: what is left of them after the compute is the
    // push's exposed part. Every stage is done by now, so they end.
    for (std::thread& t : pushers) t.join();
    if (!units.empty()) {
      RecordPhase("push", Since(compute_end));
      for (const absl::Status& st : pushed) {
        if (failed.ok() && !st.ok()) failed = st;
      }
      if (failed.ok()) {
        for (size_t u = 0; u < units.size(); ++u) CountPush();
      }
    }
    if (!failed.ok()) return;
    // Wall time (less the exposed pull) split between forward and backward
    // as the slots measured it.
    const double wall =
        std::max(0.0, std::chrono::duration<double>(compute_end - compute_start).count() - waited);
    double fwd = 0.0, bwd = 0.0;
    for (const SlotStats& st : stats) {
      fwd += std::max(0.0, st.forward_seconds - waited);
      bwd += st.backward_seconds;
    }
    if (fwd + bwd > 0) {
      RecordPhase("forward", wall * fwd / (fwd + bwd));
      RecordPhase("backward", wall * bwd / (fwd + bwd));
    }
    for (int i = 0; i < wave; ++i) {
      const int slot = mine[base + i];
      metrics_.tokens.Increment(static_cast<double>(stats[i].tokens));
      if (last) {
        // Pushed while the backward pass ran.
      } else if (prefix) {
        AccumulateSlotGradient(dtype, job.lane_grads[i].data(), static_cast<int64_t>(sum.size()),
                               sum.data());
      } else if (absl::Status st = Push(task, slot, 1, job.lane_grads[i].data()); !st.ok()) {
        failed = st;
        return;
      }
      v1::SlotStats* out = report.add_slots();
      out->set_slot(slot);
      out->set_loss_sum(stats[i].loss_sum);
      out->set_tokens(stats[i].tokens);
      out->set_aux_sum(stats[i].aux_sum);
      ExpertLoads slot_load(spec.model());
      if (absl::Status st = slot_load.Add(stats[i].expert_load); !st.ok()) {
        failed = st;
        return;
      }
      slot_load.ToProto(out->mutable_expert_load());
      (void)task_load.Add(stats[i].expert_load);
      out->set_forward_seconds(stats[i].forward_seconds);
      out->set_backward_seconds(stats[i].backward_seconds);
      for (const std::vector<float>& heads : stats[i].logit_max) {
        out->mutable_attention_logit_max()->Add(heads.begin(), heads.end());
      }
    }
  });
  MUONPS_RETURN_IF_ERROR(failed);
  if (prefix && !options_.overlap_push) MUONPS_RETURN_IF_ERROR(Push(task, 0, count, sum.data()));
  // Routed load of this task, by layer and expert (the model bounds both).
  const std::vector<std::vector<int64_t>>& load = task_load.layers();
  const int first_moe = spec.model().first_k_dense_replace();
  for (size_t l = 0; l < load.size(); ++l) {
    for (size_t e = 0; e < load[l].size(); ++e) {
      metrics_.expert_tokens
          .Add({{"layer", std::to_string(first_moe + static_cast<int>(l))},
                {"expert", std::to_string(e)}})
          .Set(static_cast<double>(load[l][e]));
    }
  }
  const double compute = task_seconds_["forward"] + task_seconds_["backward"];
  if (compute > 0) {
    const double flops = ModelFlopsPerToken(spec.model()) * count * rows * T / compute;
    metrics_.flops_per_second.Set(flops);
    if (metrics_.mfu != nullptr) metrics_.mfu->Set(flops / options_.peak_flops);
  }
  const auto report_start = std::chrono::steady_clock::now();
  report.set_worker_id(membership_->member_id());
  report.set_task_id(task.task_id());
  report.set_job_id(task.job_id());
  report.set_step(task.version());
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(30.0));
  membership_->Authenticate(&context);
  v1::ReportSlotsResponse response;
  absl::Status reported = FromGrpcStatus(
      membership_->stub()->ReportSlots(&context, report, &response), "coordinator: ReportSlots");
  RecordPhase("report", Since(report_start));
  for (const auto& [phase, seconds] : task_seconds_) {
    metrics_.last_seconds.Add({{"phase", phase}}).Set(seconds);
  }
  if (reported.ok()) metrics_.tasks.Add({{"kind", "train"}}).Increment();
  return reported;
}

absl::Status Worker::RunEval(const v1::Task& task) {
  JobContext& job = *job_;
  const int rows = job.spec.batch().micro_batch();
  const int T = job.lanes[0]->seq_len();
  const int64_t batches = (job.val_windows + rows - 1) / rows;
  const int parts = std::max(1, task.eval_parts());
  const int64_t first = task.eval_part() * batches / parts;
  const int64_t last = (task.eval_part() + 1) * batches / parts;
  v1::ReportEvalRequest report;
  ForEachWave(last - first, static_cast<int>(job.lanes.size()), [&](int64_t offset, int wave) {
    const int64_t base = first + offset;
    std::vector<SlotStats> stats(static_cast<size_t>(wave));
    RunWave(wave, [&](int64_t i) {
      const int64_t w = (base + i) * rows;
      const int B = static_cast<int>(std::min<int64_t>(rows, job.val_windows - w));
      stats[i] = job.lanes[i]->Forward(job.params.data(), job.val_inputs.data() + w * T,
                                       job.val_targets.data() + w * T, B);
    });
    for (int i = 0; i < wave; ++i) {
      v1::EvalBatch* b = report.add_batches();
      b->set_batch(base + i);
      b->set_loss_sum(stats[i].loss_sum);
      b->set_tokens(stats[i].tokens);
    }
  });
  report.set_worker_id(membership_->member_id());
  report.set_task_id(task.task_id());
  report.set_job_id(task.job_id());
  report.set_version(task.version());
  report.set_eval_part(task.eval_part());
  report.set_total_batches(batches);
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(30.0));
  membership_->Authenticate(&context);
  v1::ReportEvalResponse response;
  absl::Status reported = FromGrpcStatus(
      membership_->stub()->ReportEval(&context, report, &response), "coordinator: ReportEval");
  if (reported.ok()) metrics_.tasks.Add({{"kind", "eval"}}).Increment();
  return reported;
}

absl::Status Worker::Run(const std::atomic<bool>& stop) {
  membership_ = std::make_unique<Membership>(Membership::Kind::kWorker, options_.coordinator,
                                             options_.address, options_.threads,
                                             options_.cluster_secret, options_.memory_bytes);
  membership_->set_device(options_.device);
  membership_->set_on_ended_jobs([this](const std::vector<std::string>& ids) {
    absl::MutexLock lock(&ended_mu_);
    ended_.insert(ids.begin(), ids.end());
  });
  MUONPS_RETURN_IF_ERROR(membership_->Start(options_.register_timeout_seconds));
  Log(absl::StrCat("registered as ", membership_->member_id(), " with ", options_.coordinator, ", ",
                   DescribeNumerics(LocalNumerics())));
  if (options_.on_registered) options_.on_registered();
  while (!stop.load()) {
    if (job_ != nullptr) {  // free the data and models of a job that ended
      absl::MutexLock lock(&ended_mu_);
      if (ended_.count(job_->job_id) != 0) job_.reset();
    }
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(options_.task_wait_seconds + 10.0));
    membership_->Authenticate(&context);
    v1::GetTaskRequest request;
    request.set_worker_id(membership_->member_id());
    request.set_wait_seconds(options_.task_wait_seconds);
    v1::GetTaskResponse response;
    const auto wait_start = std::chrono::steady_clock::now();
    const grpc::Status status = membership_->stub()->GetTask(&context, request, &response);
    metrics_.seconds.Add({{"phase", "idle"}}).Increment(Since(wait_start));
    if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
      (void)membership_->Reregister();
      continue;
    }
    if (!status.ok()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      continue;
    }
    if (!response.has_task()) continue;
    const v1::Task& task = response.task();
    task_seconds_.clear();
    absl::Status st = Prepare(task);
    if (st.ok()) {
      StartPull(task);
      if (task.kind() == v1::TASK_KIND_EVAL) {
        st = FinishPull(task);
        RecordPhase("pull", Since(pull_start_));
        if (st.ok()) st = RunEval(task);
      } else {
        st = RunTrain(task);  // waits for the pull layer by layer
      }
      // Joins a pull a failed task left running before anything else.
      const absl::Status pulled = FinishPull(task);
      if (st.ok()) st = pulled;
    }
    if (st.ok()) continue;
    Log(absl::StrCat(task.task_id(), " (", task.job_id(), " version ", task.version(),
                     "): ", st.ToString()));
    if (Permanent(st)) {
      grpc::ClientContext fail_context;
      fail_context.set_deadline(DeadlineIn(10.0));
      membership_->Authenticate(&fail_context);
      v1::FailTaskRequest fail;
      fail.set_worker_id(membership_->member_id());
      fail.set_task_id(task.task_id());
      fail.set_job_id(task.job_id());
      fail.set_error(std::string(st.message()));
      v1::FailTaskResponse ignored;
      (void)membership_->stub()->FailTask(&fail_context, fail, &ignored);
      job_.reset();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  membership_->Stop();
  return absl::OkStatus();
}

}  // namespace muonps
