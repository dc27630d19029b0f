// Tests for data/: loading text and llm.c shards, the train/val split,
// and the sequential and random window samplers.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "common/philox.h"
#include "data/batch_sampler.h"
#include "data/token_source.h"
#include "gtest/gtest.h"
#include "muonps/v1/job.pb.h"
#include "tests/test_util.h"

namespace muonps {
namespace {

namespace fs = std::filesystem;

constexpr char kFortunes[] = "/usr/share/games/fortunes";

class DataTest : public testing_util::TempDirTest {
 protected:
  std::string Write(const std::string& name, const std::string& bytes) {
    std::string path = Path(name);
    fs::create_directories(fs::path(path).parent_path());
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  // An llm.c shard: 256 int32 header words, then uint16 tokens.
  std::string WriteShard(const std::string& name, const std::vector<int>& tokens,
                         int32_t magic = kLlmcShardMagic, int32_t version = kLlmcShardVersion,
                         int32_t count = -1) {
    std::string bytes(4 * kLlmcShardHeaderInts, '\0');
    auto put32 = [&bytes](int word, int32_t v) {
      for (int b = 0; b < 4; ++b) {
        bytes[4 * word + b] = static_cast<char>((static_cast<uint32_t>(v) >> (8 * b)) & 0xff);
      }
    };
    put32(0, magic);
    put32(1, version);
    put32(2, count >= 0 ? count : static_cast<int32_t>(tokens.size()));
    for (int t : tokens) {
      bytes.push_back(static_cast<char>(t & 0xff));
      bytes.push_back(static_cast<char>((t >> 8) & 0xff));
    }
    return Write(name, bytes);
  }
};

v1::DataConfig Config(const std::string& path, const std::string& format = "auto",
                      double val_fraction = 0.0) {
  v1::DataConfig data;
  data.set_path(path);
  data.set_format(format);
  data.set_val_fraction(val_fraction);
  return data;
}

std::string AsText(const std::vector<int32_t>& tokens) {
  return std::string(tokens.begin(), tokens.end());
}

std::vector<int32_t> Iota(int n) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
  return v;
}

TEST_F(DataTest, TokenSourceReadsTextDirectoryInSortedOrder) {
  Write("corpus/b.txt", "BBB");
  Write("corpus/a.txt", "AA");
  Write("corpus/sub/c.txt", "C");
  Write("corpus/a.dat", std::string("x\0y", 3));     // binary index: skipped
  fs::create_symlink("a.txt", Path("corpus/a.u8"));  // would duplicate a.txt
  fs::create_directory_symlink(Path("corpus/sub"), Path("corpus/sub2"));

  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(Config(Path("corpus")), 256, 2);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  EXPECT_EQ(AsText(corpus->train), "AABBBC");
  EXPECT_TRUE(corpus->val.empty());
  EXPECT_NE(corpus->description.find("text: 3 files, 6 bytes from " + Path("corpus")),
            std::string::npos)
      << corpus->description;

  // A single file; "auto" reads it as text, and so does "text".
  corpus = LoadTokenCorpus(Config(Path("corpus/b.txt"), "text"), 256, 2);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  EXPECT_EQ(AsText(corpus->train), "BBB");
}

TEST_F(DataTest, TokenSourceBytesAreUnsigned) {
  Write("bytes.txt", "\xff\x80\x01z");
  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(Config(Path("bytes.txt")), 256, 1);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  EXPECT_EQ(corpus->train, (std::vector<int32_t>{255, 128, 1, 'z'}));
}

TEST_F(DataTest, TokenSourceSplitsValidationTail) {
  std::string text(1001, 'a');
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<char>('a' + i % 26);
  const std::string path = Write("text.txt", text);

  for (double fraction : {0.0, 0.05, 0.1, 0.5}) {
    SCOPED_TRACE(fraction);
    absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(Config(path, "text", fraction), 256, 8);
    ASSERT_TRUE(corpus.ok()) << corpus.status();
    const size_t n_val = static_cast<size_t>(1001 * fraction);  // floor
    EXPECT_EQ(corpus->val.size(), n_val);
    EXPECT_EQ(corpus->train.size(), 1001 - n_val);
    EXPECT_EQ(AsText(corpus->train) + AsText(corpus->val), text);
  }

  // An absent val_fraction takes the documented default, 0.05.
  v1::DataConfig data;
  data.set_path(path);
  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(data, 256, 8);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  EXPECT_EQ(corpus->val.size(), 50u);

  EXPECT_EQ(LoadTokenCorpus(Config(path, "text", 1.0), 256, 8).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadTokenCorpus(Config(path, "text", -0.1), 256, 8).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(DataTest, TokenSourceRefusesShortCorpora) {
  const std::string path = Write("short.txt", std::string(100, 'x'));
  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(Config(path), 256, 100);
  ASSERT_FALSE(corpus.ok());
  EXPECT_EQ(corpus.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(corpus.status().message().find(
                "corpus too short: 100 training tokens, need at least T+1 = 101"),
            std::string::npos)
      << corpus.status();
  EXPECT_TRUE(LoadTokenCorpus(Config(path), 256, 99).ok());

  // 100 tokens, 10% held out: 10 validation tokens cannot make a T = 16 window.
  corpus = LoadTokenCorpus(Config(path, "auto", 0.1), 256, 16);
  ASSERT_FALSE(corpus.ok());
  EXPECT_NE(corpus.status().message().find("validation split too short: 10 tokens"),
            std::string::npos)
      << corpus.status();
  EXPECT_TRUE(LoadTokenCorpus(Config(path, "auto", 0.1), 256, 9).ok());
}

TEST_F(DataTest, TokenSourceRefusesMissingOrUnreadableInput) {
  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(Config(Path("absent")), 256, 4);
  EXPECT_EQ(corpus.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(corpus.status().message().find(Path("absent")), std::string::npos);

  Write("bin_only/x.dat", std::string("\0\1\2", 3));
  corpus = LoadTokenCorpus(Config(Path("bin_only")), 256, 1);
  EXPECT_EQ(corpus.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(corpus.status().message().find("no readable text"), std::string::npos)
      << corpus.status();

  fs::create_directory(Path("empty"));
  EXPECT_FALSE(LoadTokenCorpus(Config(Path("empty")), 256, 1).ok());

  const std::string text = Write("t.txt", "hello world");
  EXPECT_EQ(LoadTokenCorpus(Config(text, "csv"), 256, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadTokenCorpus(Config(text), 100, 1).status().code(),
            absl::StatusCode::kInvalidArgument);  // bytes need 256 tokens
}

TEST_F(DataTest, TokenSourceReadsLlmcShards) {
  const std::vector<int> tokens = {0, 1, 255, 256, 50256, 7, 7, 3};
  const std::string shard = WriteShard("tok.bin", tokens);
  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(Config(shard), 50257, 4);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  EXPECT_EQ(corpus->train, std::vector<int32_t>(tokens.begin(), tokens.end()));
  EXPECT_NE(corpus->description.find("bin: 1 shards, 8 tokens"), std::string::npos)
      << corpus->description;

  // A directory of shards with format "bin": concatenated in sorted order,
  // other files ignored.
  WriteShard("shards/s_001.bin", {4, 5, 6});
  WriteShard("shards/s_000.bin", {1, 2, 3});
  Write("shards/README", "not a shard");
  corpus = LoadTokenCorpus(Config(Path("shards"), "bin"), 10, 2);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  EXPECT_EQ(corpus->train, (std::vector<int32_t>{1, 2, 3, 4, 5, 6}));
}

TEST_F(DataTest, TokenSourceRefusesBadShards) {
  struct Case {
    std::string path;
    int vocab_size;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {WriteShard("magic.bin", {1, 2, 3}, 12345), 100, "bad magic 12345"},
      {WriteShard("version.bin", {1, 2, 3}, kLlmcShardMagic, 2), 100, "version 2"},
      {WriteShard("truncated.bin", {1, 2, 3}, kLlmcShardMagic, 1, 50), 100, "truncated"},
      {WriteShard("long.bin", {1, 2, 3}, kLlmcShardMagic, 1, 2), 100, "header says 2 tokens"},
      {WriteShard("vocab.bin", {1, 150, 3}, kLlmcShardMagic, 1), 100, "token 150 at index 1"},
      {Write("tiny.bin", "abc"), 100, "shorter than the 1024-byte"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.path);
    absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(Config(c.path), c.vocab_size, 1);
    ASSERT_FALSE(corpus.ok());
    EXPECT_EQ(corpus.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(corpus.status().message().find(c.path), std::string::npos) << corpus.status();
    EXPECT_NE(corpus.status().message().find(c.needle), std::string::npos) << corpus.status();
  }
}

TEST_F(DataTest, TokenSourceLoadsDebianFortunes) {
  if (!fs::is_directory(kFortunes)) GTEST_SKIP() << kFortunes << " is not installed";
  v1::DataConfig data;  // every field absent: the defaults name the fortunes
  absl::StatusOr<TokenCorpus> corpus = LoadTokenCorpus(data, 256, 64);
  ASSERT_TRUE(corpus.ok()) << corpus.status();
  const size_t n = corpus->train.size() + corpus->val.size();
  EXPECT_GT(n, 1000000u) << corpus->description;
  EXPECT_EQ(corpus->val.size(), static_cast<size_t>(static_cast<double>(n) * 0.05));
  for (int32_t t : corpus->train) ASSERT_TRUE(t > 0 && t < 256);
  EXPECT_NE(corpus->description.find("text: "), std::string::npos);
}

// Window w of the stream, written out directly: the T + 1 tokens from w * T.
void ExpectRow(const std::vector<int32_t>& tokens, int64_t start, int T, const int32_t* inputs,
               const int32_t* targets) {
  for (int j = 0; j < T; ++j) {
    ASSERT_EQ(inputs[j], tokens[static_cast<size_t>(start + j)]) << "j=" << j;
    ASSERT_EQ(targets[j], tokens[static_cast<size_t>(start + j + 1)]) << "j=" << j;
  }
}

TEST(BatchSamplerTest, SequentialWindowsWalkTheStreamAndWrap) {
  const int T = 4, slots = 2, micro_batch = 3;
  // 23 tokens: (23 - 1) / 4 = 5 windows, the last 2 tokens never start one.
  std::vector<int32_t> tokens(23);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(1000 + 7 * i);
  const BatchSampler sampler(&tokens, T, slots, micro_batch, /*random=*/false, /*seed=*/1);
  EXPECT_EQ(sampler.num_windows(), 5);

  // The global row number counts rows across slots and steps; enumerate it
  // by walking the loops instead of by formula.
  int64_t row_number = 0;
  for (int64_t step = 0; step < 4; ++step) {
    for (int slot = 0; slot < slots; ++slot) {
      std::vector<int32_t> inputs(micro_batch * T), targets(micro_batch * T);
      sampler.Fill(step, slot, inputs.data(), targets.data());
      for (int row = 0; row < micro_batch; ++row, ++row_number) {
        SCOPED_TRACE(testing::Message() << "step " << step << " slot " << slot << " row " << row);
        int64_t window = row_number;
        while (window >= 5) window -= 5;
        ExpectRow(tokens, window * T, T, inputs.data() + row * T, targets.data() + row * T);
      }
    }
  }

  // A step far beyond 2^32 rows: the index needs 64-bit arithmetic.
  const int64_t step = 3000000000LL;
  std::vector<int32_t> inputs(micro_batch * T), targets(micro_batch * T);
  sampler.Fill(step, 1, inputs.data(), targets.data());
  // (3e9 * 2 + 1) * 3 + r = 18000000003 + r; 18000000003 mod 5 = 3.
  for (int row = 0; row < micro_batch; ++row) {
    ExpectRow(tokens, ((3 + row) % 5) * T, T, inputs.data() + row * T, targets.data() + row * T);
  }
}

TEST(BatchSamplerTest, RandomWindowsAreDeterministicAndInRange) {
  const int T = 8, slots = 3, micro_batch = 4;
  const std::vector<int32_t> tokens = Iota(100);
  const BatchSampler a(&tokens, T, slots, micro_batch, /*random=*/true, /*seed=*/42);
  const BatchSampler same(&tokens, T, slots, micro_batch, /*random=*/true, /*seed=*/42);
  const BatchSampler other(&tokens, T, slots, micro_batch, /*random=*/true, /*seed=*/43);

  std::set<int32_t> starts;
  int differing = 0;
  for (int64_t step = 0; step < 20; ++step) {
    for (int slot = 0; slot < slots; ++slot) {
      std::vector<int32_t> in_a(micro_batch * T), tg_a(micro_batch * T);
      std::vector<int32_t> in_s(micro_batch * T), tg_s(micro_batch * T);
      std::vector<int32_t> in_o(micro_batch * T), tg_o(micro_batch * T);
      a.Fill(step, slot, in_a.data(), tg_a.data());
      same.Fill(step, slot, in_s.data(), tg_s.data());
      other.Fill(step, slot, in_o.data(), tg_o.data());
      EXPECT_EQ(in_a, in_s);
      EXPECT_EQ(tg_a, tg_s);
      if (in_a != in_o) ++differing;
      for (int row = 0; row < micro_batch; ++row) {
        const int32_t start = in_a[static_cast<size_t>(row) * T];
        // Offsets lie in [0, n - T): the window's last target is in range.
        ASSERT_GE(start, 0);
        ASSERT_LE(start + T, 99);
        const uint64_t expected =
            RandomU64(42, kRandomWindowTag, static_cast<uint32_t>(step),
                      static_cast<uint32_t>(slot), static_cast<uint32_t>(row)) %
            (100 - T);
        EXPECT_EQ(static_cast<uint64_t>(start), expected);
        ExpectRow(tokens, start, T, in_a.data() + row * T, tg_a.data() + row * T);
        starts.insert(start);
      }
    }
  }
  EXPECT_GT(differing, 50);       // of 60 batches
  EXPECT_GT(starts.size(), 50u);  // 240 draws over 92 offsets
}

TEST(BatchSamplerTest, ValidationWindowsAreTheFirstSequentialWindows) {
  const std::vector<int32_t> val = Iota(50);
  std::vector<int32_t> inputs, targets;
  EXPECT_EQ(ValidationWindows(val, 8, 4, &inputs, &targets), 4);
  ASSERT_EQ(inputs.size(), 32u);
  ASSERT_EQ(targets.size(), 32u);
  for (int w = 0; w < 4; ++w) ExpectRow(val, w * 8, 8, &inputs[w * 8], &targets[w * 8]);

  EXPECT_EQ(ValidationWindows(val, 8, 100, &inputs, &targets), 6);  // (50 - 1) / 8
  EXPECT_EQ(inputs.size(), 48u);
  EXPECT_EQ(targets.back(), 48);
  EXPECT_EQ(ValidationWindows(val, 49, 10, &inputs, &targets), 1);
  EXPECT_EQ(ValidationWindows(val, 50, 10, &inputs, &targets), 0);
  EXPECT_TRUE(inputs.empty());
  EXPECT_EQ(ValidationWindows({}, 8, 10, &inputs, &targets), 0);
  EXPECT_EQ(ValidationWindows(val, 8, 0, &inputs, &targets), 0);
}

}  // namespace
}  // namespace muonps
