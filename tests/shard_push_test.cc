// ShardServiceImpl's push path and the step: bad pushes, oversized chunks, repeats,
// squares and ApplyStep refusals, and prefix-summed pushes against per-slot ones.
#include "tests/shard_service_fixture.h"

namespace muonps {
namespace {

TEST_F(ShardServiceTest, BadPushesAreRefusedAndChangeNothing) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  const std::vector<Grad> good = SlotGradients(*layout_, Owned(), 0, 0);  // {kQ, kNorm}
  ASSERT_EQ(good.size(), 2u);
  ASSERT_EQ(good[0].name, kQ);
  const PushHeader header{"job-a", 0, 0, 1};

  struct Case {
    std::string what;
    std::vector<v1::PushGradientsRequest> messages;
    grpc::StatusCode code;
    std::string names;  // expected in the message
  };
  std::vector<Case> cases;
  {
    std::vector<Grad> g = good;
    g[0].shape = {16, 17};
    g[0].data.resize(16 * 17);
    cases.push_back({"wrong shape", PushMessages(header, g), grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("tensor ", kQ, ": shape")});
  }
  {
    std::vector<v1::PushGradientsRequest> m = PushMessages(header, good);
    m[0].mutable_chunk()->set_dtype("F16");
    cases.push_back({"wrong dtype", m, grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("tensor ", kQ, ": dtype")});
  }
  {
    // kQ in 256-byte chunks; the second and third swapped.
    std::vector<v1::PushGradientsRequest> m = PushMessages(header, good, 256);
    ASSERT_GE(m.size(), 4u);
    std::swap(*m[1].mutable_chunk(), *m[2].mutable_chunk());
    cases.push_back({"out-of-order offset", m, grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("tensor ", kQ, ": offset")});
  }
  {
    std::vector<v1::PushGradientsRequest> m = PushMessages(header, good, 256);
    m.erase(m.begin() + 1);
    cases.push_back(
        {"missing chunk", m, grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("tensor ", kQ)});
  }
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<Grad> g = good;
    g[1].data[5] = bad;
    cases.push_back({absl::StrCat("value ", bad), PushMessages(header, g),
                     grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("tensor ", kNorm, ": non-finite gradient value at element 5")});
  }
  cases.push_back({"missing tensor", PushMessages(header, {good[0]}),
                   grpc::StatusCode::INVALID_ARGUMENT,
                   absl::StrCat("tensor ", kNorm, ": missing")});
  cases.push_back({"tensor twice", PushMessages(header, {good[0], good[1], good[0]}),
                   grpc::StatusCode::INVALID_ARGUMENT,
                   absl::StrCat("tensor ", kQ, " appears twice")});
  {
    std::vector<Grad> g = good;
    g.push_back(SlotGradients(*layout_, {kHead}, 0, 0)[0]);
    cases.push_back(
        {"tensor of another shard", PushMessages(header, g), grpc::StatusCode::NOT_FOUND, kHead});
    g.back().name = "model.no_such.weight";
    cases.push_back({"tensor not in the model", PushMessages(header, g),
                     grpc::StatusCode::NOT_FOUND, "model.no_such.weight"});
  }
  {
    std::vector<Grad> g = good;
    g.push_back({kBias, {4}, {0.5f, 0.5f, 0.5f, 0.5f}});
    cases.push_back(
        {"a buffer", PushMessages(header, g), grpc::StatusCode::FAILED_PRECONDITION, kBias});
  }
  cases.push_back({"unknown job", PushMessages({"job-z", 0, 0, 1}, good),
                   grpc::StatusCode::NOT_FOUND, "job-z"});
  cases.push_back({"wrong step", PushMessages({"job-a", 1, 0, 1}, good),
                   grpc::StatusCode::FAILED_PRECONDITION, "step 1"});
  cases.push_back({"multi-slot range not from slot 0", PushMessages({"job-a", 0, 1, 2}, good),
                   grpc::StatusCode::INVALID_ARGUMENT, "slot_count"});
  cases.push_back({"slot out of range", PushMessages({"job-a", 0, kSlots, 1}, good),
                   grpc::StatusCode::INVALID_ARGUMENT, "slot range"});
  cases.push_back({"range past the last slot", PushMessages({"job-a", 0, 0, kSlots + 1}, good),
                   grpc::StatusCode::INVALID_ARGUMENT, "slot range"});
  cases.push_back({"negative slot", PushMessages({"job-a", 0, -1, 1}, good),
                   grpc::StatusCode::INVALID_ARGUMENT, "slot range"});
  {
    std::vector<v1::PushGradientsRequest> m = PushMessages(header, good, 256);
    m[2].set_step(5);
    cases.push_back({"later message disagrees", m, grpc::StatusCode::INVALID_ARGUMENT, "step"});
  }
  cases.push_back({"empty push", {}, grpc::StatusCode::INVALID_ARGUMENT, "empty"});

  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    grpc::Status status = Push(shard_->stub.get(), c.messages);
    EXPECT_EQ(status.error_code(), c.code) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr(c.names));
    // Nothing was counted: slot 0 is still missing.
    grpc::Status squares = Squares(*shard_, "job-a", 0);
    EXPECT_EQ(squares.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(squares.error_message(), HasSubstr("slot 0"));
  }

  // After all of that, the shard is as loaded: the valid pushes count, and
  // the step is exactly the reference's.
  std::unique_ptr<ShardState> reference = Reference();
  for (int s = 0; s < kSlots; ++s) {
    v1::PushGradientsResponse response;
    ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, s, &response).ok());
    EXPECT_TRUE(response.counted());
    EXPECT_EQ(response.tensors(), 2);
    EXPECT_EQ(response.bytes(), (16 * 16 + 16) * 4);
    AddToReference(*reference, 0, s, 1, SlotGradients(*layout_, Owned(), 0, s));
  }
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  absl::StatusOr<std::vector<std::pair<std::string, double>>> expected =
      reference->GradientSquares();
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(squares, *expected);
  ExpectValues(*shard_, "job-a", 0, InitialValues());
}

TEST_F(ShardServiceTest, OversizedChunksAreResourceExhausted) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  // A 5 MiB chunk fits the server's 16 MiB message limit, so the handler
  // sees it and refuses it by the 4 MiB chunk rule.
  {
    v1::PushGradientsRequest message;
    message.set_job_id("job-a");
    v1::TensorChunk* chunk = message.mutable_chunk();
    chunk->set_name(kQ);
    chunk->set_dtype("F32");
    chunk->add_shape(16);
    chunk->add_shape(16);
    chunk->set_data(std::string(5 << 20, '\0'));
    grpc::Status status = Push(shard_->stub.get(), {message});
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr(kQ));
    EXPECT_THAT(status.error_message(), HasSubstr(absl::StrCat(kMaxChunkBytes)));
  }
  // A message over 16 MiB is refused by gRPC before the handler sees it.
  // (MakeChannel would refuse to send it, so this channel has no send limit.)
  {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(-1);
    std::unique_ptr<v1::ShardService::Stub> unlimited =
        v1::ShardService::NewStub(grpc::CreateCustomChannel(
            shard_->server->address(), grpc::InsecureChannelCredentials(), args));
    v1::PushGradientsRequest message;
    message.set_job_id("job-a");
    message.mutable_chunk()->set_name(kQ);
    message.mutable_chunk()->set_data(std::string(17 << 20, '\0'));
    grpc::Status status = Push(unlimited.get(), {message});
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(status);
  }
  v1::PushGradientsResponse response;
  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, 0, &response).ok());
  EXPECT_TRUE(response.counted());
}

TEST_F(ShardServiceTest, RepeatsAreAcknowledgedAndOverlapsRefused) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  std::unique_ptr<ShardState> reference = Reference();
  const std::vector<Grad> g0 = SlotGradients(*layout_, Owned(), 0, 0);
  const std::vector<Grad> g1 = SlotGradients(*layout_, Owned(), 0, 1);
  const std::vector<Grad> g01 = Sum(g0, g1);

  // [0, 2) as one prefix sum.
  v1::PushGradientsResponse response;
  ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", 0, 0, 2}, g01), &response).ok());
  EXPECT_TRUE(response.counted());
  AddToReference(*reference, 0, 0, 2, g01);

  // The same range again, with different values: acknowledged, not counted.
  std::vector<Grad> other = g01;
  for (Grad& g : other) std::fill(g.data.begin(), g.data.end(), 9.0f);
  grpc::Status repeat =
      Push(shard_->stub.get(), PushMessages({"job-a", 0, 0, 2}, other), &response);
  ASSERT_TRUE(repeat.ok()) << Describe(repeat);
  EXPECT_FALSE(response.counted());

  // Ranges overlapping [0, 2) differently: slot 1 alone, slot 0 alone, [0, 3).
  for (const PushHeader& h :
       {PushHeader{"job-a", 0, 1, 1}, PushHeader{"job-a", 0, 0, 1}, PushHeader{"job-a", 0, 0, 3}}) {
    SCOPED_TRACE(absl::StrCat("slot ", h.slot, " count ", h.slot_count));
    grpc::Status status = Push(shard_->stub.get(), PushMessages(h, g0));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr("overlap"));
    EXPECT_THAT(status.error_message(), HasSubstr("tensor "));
  }

  for (int s = 2; s < kSlots; ++s) {
    const std::vector<Grad> g = SlotGradients(*layout_, Owned(), 0, s);
    ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", 0, s, 1}, g), &response).ok());
    EXPECT_TRUE(response.counted());
    AddToReference(*reference, 0, s, 1, g);
    // A repeat of a single slot with other values is ignored too.
    ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", 0, s, 1}, other), &response).ok());
    EXPECT_FALSE(response.counted());
  }
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  EXPECT_EQ(squares, *reference->GradientSquares());
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 1.0).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 1.0, {}).ok());
  ExpectValues(*shard_, "job-a", 1, ReferenceValues(*reference));
}

// ---------------------------------------------------------------------------
// GetGradientSquares / ApplyStep

TEST_F(ShardServiceTest, SquaresAndApplyStepRefusals) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  v1::ApplyStepResponse applied;
  // Nothing applied yet: no step -1 to repeat.
  grpc::Status none = Apply(*shard_, "job-a", -1, 0.01, 1.0, {}, &applied);
  EXPECT_EQ(none.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(none);
  for (int s = 0; s < kSlots - 1; ++s) ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, s).ok());

  grpc::Status early = Squares(*shard_, "job-a", 0);
  EXPECT_EQ(early.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(early);
  EXPECT_THAT(early.error_message(), HasSubstr(absl::StrCat("slot ", kSlots - 1)));
  grpc::Status missing = Apply(*shard_, "job-a", 0, 0.01, 1.0);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(missing);
  EXPECT_THAT(missing.error_message(), HasSubstr("missing"));

  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, kSlots - 1).ok());
  EXPECT_EQ(Squares(*shard_, "job-a", 1).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Squares(*shard_, "job-z", 0).error_code(), grpc::StatusCode::NOT_FOUND);

  struct Case {
    std::string what;
    int64_t step;
    double lr, clip_coef;
    grpc::StatusCode code;
    std::string names;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<Case> cases = {
      {"wrong step", 1, 0.01, 1.0, grpc::StatusCode::FAILED_PRECONDITION, "step 1"},
      {"NaN lr", 0, nan, 1.0, grpc::StatusCode::INVALID_ARGUMENT, "lr"},
      {"infinite lr", 0, inf, 1.0, grpc::StatusCode::INVALID_ARGUMENT, "lr"},
      {"negative lr", 0, -0.01, 1.0, grpc::StatusCode::INVALID_ARGUMENT, "lr"},
      {"zero clip_coef", 0, 0.01, 0.0, grpc::StatusCode::INVALID_ARGUMENT, "clip_coef"},
      {"negative clip_coef", 0, 0.01, -1.0, grpc::StatusCode::INVALID_ARGUMENT, "clip_coef"},
      {"NaN clip_coef", 0, 0.01, nan, grpc::StatusCode::INVALID_ARGUMENT, "clip_coef"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    grpc::Status status = Apply(*shard_, "job-a", c.step, c.lr, c.clip_coef);
    EXPECT_EQ(status.error_code(), c.code) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr(c.names));
    EXPECT_EQ(shard_->service.version(), 0);
  }
  EXPECT_EQ(Apply(*shard_, "job-z", 0, 0.01, 1.0).error_code(), grpc::StatusCode::NOT_FOUND);
  ExpectValues(*shard_, "job-a", 0, InitialValues());

  // The gradients are still complete and untouched: the step is the reference's.
  std::unique_ptr<ShardState> reference = Reference();
  for (int s = 0; s < kSlots; ++s) {
    AddToReference(*reference, 0, s, 1, SlotGradients(*layout_, Owned(), 0, s));
  }
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  EXPECT_EQ(squares, *reference->GradientSquares());
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 0.75, {{3, 1, 0, 4}}, &applied).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 0.75, {{3, 1, 0, 4}}).ok());
  EXPECT_EQ(applied.version(), 1);
  EXPECT_EQ(shard_->service.version(), 1);
  const std::map<std::string, std::vector<float>> after = ReferenceValues(*reference);
  ExpectValues(*shard_, "job-a", 1, after);
  EXPECT_FALSE(SameBits(after.at(kBias), InitialValues().at(kBias)));  // the bias rule ran

  // The step just applied, again: acknowledged, nothing changes.
  grpc::Status repeat = Apply(*shard_, "job-a", 0, 0.01, 0.75, {{3, 1, 0, 4}}, &applied);
  EXPECT_TRUE(repeat.ok()) << Describe(repeat);
  EXPECT_EQ(applied.version(), 1);
  EXPECT_EQ(shard_->service.version(), 1);
  ExpectValues(*shard_, "job-a", 1, after);
  // The next step needs its own gradients.
  EXPECT_EQ(Apply(*shard_, "job-a", 1, 0.01, 1.0).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Squares(*shard_, "job-a", 1).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

// ---------------------------------------------------------------------------
// Prefix pushes

TEST_F(ShardServiceTest, PrefixPushesMatchPerSlotPushesBitForBit) {
  // Shard A gets every slot alone (in reverse order); shard B gets slots
  // [0, 2) as one float32 sum g0 + g1, then slots 2 and 3 alone.
  std::unique_ptr<ShardServer> other = StartShard();
  ASSERT_NE(other, nullptr);
  const std::vector<std::string> owned = {
      kQ, kNorm, kBias, "model.layers.1.mlp.experts.2.up_proj.weight", "model.embed_tokens.weight"};
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a", owned)).ok());
  ASSERT_TRUE(LoadJob(*other, LoadRequest("job-a", owned)).ok());
  for (int64_t step = 0; step < 3; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    std::vector<std::vector<Grad>> g;
    g.reserve(static_cast<size_t>(kSlots));
    for (int s = 0; s < kSlots; ++s) g.push_back(SlotGradients(*layout_, owned, step, s));
    for (int s = kSlots - 1; s >= 0; --s) {
      ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", step, s, 1}, g[s])).ok());
    }
    ASSERT_TRUE(Push(other->stub.get(), PushMessages({"job-a", step, 0, 2}, Sum(g[0], g[1]))).ok());
    for (int s = 2; s < kSlots; ++s) {
      ASSERT_TRUE(Push(other->stub.get(), PushMessages({"job-a", step, s, 1}, g[s])).ok());
    }
    std::vector<std::pair<std::string, double>> a, b;
    ASSERT_TRUE(Squares(*shard_, "job-a", step, &a).ok());
    ASSERT_TRUE(Squares(*other, "job-a", step, &b).ok());
    EXPECT_EQ(a, b);
    const double clip = step == 0 ? 0.5 : 1.0;
    const std::vector<std::vector<int64_t>> loads = {{static_cast<int64_t>(step), 5, 2, 1}};
    ASSERT_TRUE(Apply(*shard_, "job-a", step, 0.02, clip, loads).ok());
    ASSERT_TRUE(Apply(*other, "job-a", step, 0.02, clip, loads).ok());
    Pulled pa = Pull(shard_->stub.get(), *layout_, "job-a", step + 1);
    Pulled pb = Pull(other->stub.get(), *layout_, "job-a", step + 1);
    ASSERT_TRUE(pa.status.ok() && pb.status.ok());
    ASSERT_EQ(pa.tensors.size(), owned.size());
    for (const std::string& name : owned) {
      EXPECT_TRUE(SameBits(pa.tensors[name], pb.tensors[name])) << name;
    }
  }
}

// A push of every slot at once is reduced as it arrives (its zeros made +0,
// its sum of squares formed chunk by chunk) and kept as the step's sum: the
// squares and the update equal those of the same slots pushed one by one,
// bit for bit, whatever the chunk size and with negative zeros in the push.
TEST_F(ShardServiceTest, AWholePushReducedOnArrivalMatchesPerSlotPushesBitForBit) {
  std::unique_ptr<ShardServer> other = StartShard();
  ASSERT_NE(other, nullptr);
  const std::vector<std::string> owned = {
      kQ, kNorm, kBias, "model.layers.1.mlp.experts.2.up_proj.weight", "model.embed_tokens.weight"};
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a", owned)).ok());
  ASSERT_TRUE(LoadJob(*other, LoadRequest("job-a", owned)).ok());
  for (int64_t step = 0; step < 3; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    std::vector<std::vector<Grad>> g;
    for (int s = 0; s < kSlots; ++s) {
      g.push_back(SlotGradients(*layout_, owned, step, s));
      // Zeros of either sign in every slot: the shard's sum 0 + g0 + ...
      // holds +0 there.
      for (Grad& t : g.back()) {
        for (size_t i = 0; i < t.data.size(); i += 97) t.data[i] = -0.0f;
      }
    }
    std::vector<Grad> whole = g[0];
    for (int s = 1; s < kSlots; ++s) whole = Sum(whole, g[s]);
    for (Grad& t : whole) {
      for (size_t i = 0; i < t.data.size(); i += 97) ASSERT_TRUE(std::signbit(t.data[i]));
    }
    for (int s = 0; s < kSlots; ++s) {
      ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", step, s, 1}, g[s])).ok());
    }
    // Chunks that cut the sums of squares' blocks anywhere.
    const int64_t chunk = step == 0 ? 1000 : (step == 1 ? 32768 + 12 : 1 << 20);
    ASSERT_TRUE(
        Push(other->stub.get(), PushMessages({"job-a", step, 0, kSlots}, whole, chunk)).ok());
    std::vector<std::pair<std::string, double>> a, b;
    ASSERT_TRUE(Squares(*shard_, "job-a", step, &a).ok());
    ASSERT_TRUE(Squares(*other, "job-a", step, &b).ok());
    ASSERT_EQ(a.size(), b.size());
    for (size_t k = 0; k < a.size(); ++k) {
      EXPECT_EQ(a[k].first, b[k].first);
      EXPECT_EQ(std::memcmp(&a[k].second, &b[k].second, sizeof(double)), 0) << a[k].first;
    }
    const std::vector<std::vector<int64_t>> loads = {{static_cast<int64_t>(step), 5, 2, 1}};
    ASSERT_TRUE(Apply(*shard_, "job-a", step, 0.02, step == 0 ? 0.5 : 1.0, loads).ok());
    ASSERT_TRUE(Apply(*other, "job-a", step, 0.02, step == 0 ? 0.5 : 1.0, loads).ok());
    Pulled pa = Pull(shard_->stub.get(), *layout_, "job-a", step + 1);
    Pulled pb = Pull(other->stub.get(), *layout_, "job-a", step + 1);
    ASSERT_TRUE(pa.status.ok() && pb.status.ok());
    for (const std::string& name : owned) {
      EXPECT_TRUE(SameBits(pa.tensors[name], pb.tensors[name])) << name;
    }
  }
}

// ---------------------------------------------------------------------------
// SaveCheckpoint

}  // namespace
}  // namespace muonps
