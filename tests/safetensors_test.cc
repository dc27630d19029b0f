// Tests for common/safetensors and common/atomic_file: round trips, a file
// laid out by hand as the Python `safetensors` package writes it, and every
// kind of malformed file.
#include "common/safetensors.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "common/atomic_file.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace muonps {
namespace {

namespace fs = std::filesystem;

class SafetensorsTest : public testing_util::TempDirTest {
 protected:
  // Writes `bytes` to `name` in the test directory and returns the path.
  std::string WriteRaw(const std::string& name, const std::string& bytes) {
    std::string path = Path(name);
    EXPECT_TRUE(WriteFileAtomically(path, bytes).ok());
    return path;
  }
};

// A safetensors file built without the writer: u64 little-endian header
// length, the JSON padded with spaces to a multiple of 8, then the data.
std::string LayOut(const std::string& header_json, const std::string& data) {
  std::string header = header_json;
  while (header.size() % 8 != 0) header.push_back(' ');
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

std::string FloatBytes(const std::vector<float>& values) {
  std::string out(values.size() * 4, '\0');
  for (size_t i = 0; i < values.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &values[i], 4);
    for (int b = 0; b < 4; ++b) out[4 * i + b] = static_cast<char>((bits >> (8 * b)) & 0xff);
  }
  return out;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// Expects Open to refuse `path` with InvalidArgument mentioning `needle`
// and the file.
void ExpectRefused(const std::string& path, const std::string& needle) {
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok()) << "accepted " << path;
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
  EXPECT_NE(file.status().message().find(path), std::string::npos) << file.status();
  EXPECT_NE(file.status().message().find(needle), std::string::npos)
      << "expected '" << needle << "' in: " << file.status();
}

TEST_F(SafetensorsTest, RoundTripIsBitExact) {
  const std::vector<float> w = {1.5f,
                                -0.0f,
                                std::numeric_limits<float>::infinity(),
                                std::numeric_limits<float>::denorm_min(),
                                std::numeric_limits<float>::quiet_NaN(),
                                3.25e-7f};
  const std::vector<float> b = {0.1f, 0.2f, 0.3f, 0.4f};
  const std::vector<float> scalar = {42.0f};
  const std::vector<float> big = [] {
    std::vector<float> v(3 * 5 * 7);
    for (size_t i = 0; i < v.size(); ++i) v[i] = std::sin(static_cast<float>(i));
    return v;
  }();
  const std::vector<TensorRef> tensors = {{"model.layers.0.w", {2, 3}, w.data()},
                                          {"bias", {4}, b.data()},
                                          {"empty", {0, 5}, nullptr},
                                          {"scale", {}, scalar.data()},
                                          {"a.big", {3, 5, 7}, big.data()}};
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"step", "17"}};
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());

  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata(), metadata);
  // File order is the order given; "empty" has zero bytes at the same offset
  // as "scale" and sorts before it.
  EXPECT_EQ(file->names(),
            (std::vector<std::string>{"model.layers.0.w", "bias", "empty", "scale", "a.big"}));
  EXPECT_TRUE(file->contains("bias"));
  EXPECT_FALSE(file->contains("missing"));
  EXPECT_EQ(*file->shape("a.big"), (std::vector<int64_t>{3, 5, 7}));
  EXPECT_EQ(*file->shape("scale"), (std::vector<int64_t>{}));
  EXPECT_EQ(file->shape("missing").status().code(), absl::StatusCode::kNotFound);

  for (const TensorRef& t : tensors) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    std::vector<float> out(static_cast<size_t>(n), -1.0f);
    ASSERT_TRUE(file->ReadInto(t.name, t.shape, out.data()).ok()) << t.name;
    EXPECT_TRUE(BitEqual(out, std::vector<float>(t.data, t.data + n))) << t.name;
  }
}

TEST_F(SafetensorsTest, WriterLayoutMatchesTheFormat) {
  const std::vector<float> x = {1, 2, 3};
  const std::vector<float> y = {4, 5};
  const std::string path = Path("layout.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"x", {3}, x.data()}, {"y", {1, 2}, y.data()}}, {}).ok());
  absl::StatusOr<std::string> bytes = ReadFileToString(path);
  ASSERT_TRUE(bytes.ok());
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>((*bytes)[i]);
  EXPECT_EQ(n % 8, 0u);
  ASSERT_EQ(bytes->size(), 8 + n + 20);
  const nlohmann::json header = nlohmann::json::parse(bytes->substr(8, n));
  EXPECT_FALSE(header.contains("__metadata__"));
  EXPECT_EQ(header["x"]["dtype"], "F32");
  EXPECT_EQ(header["x"]["data_offsets"], nlohmann::json({0, 12}));
  EXPECT_EQ(header["y"]["shape"], nlohmann::json({1, 2}));
  EXPECT_EQ(header["y"]["data_offsets"], nlohmann::json({12, 20}));
  EXPECT_EQ(bytes->substr(8 + n), FloatBytes({1, 2, 3, 4, 5}));
}

TEST_F(SafetensorsTest, ReadsAHandWrittenFile) {
  // As written by Python: metadata first, tensors in an order unrelated to
  // their offsets, a BF16 tensor alongside the F32 ones.
  const std::string header = R"({"__metadata__":{"format":"pt"},)"
                             R"("a":{"dtype":"F32","shape":[1,2],"data_offsets":[8,16]},)"
                             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("h":{"dtype":"BF16","shape":[2,2],"data_offsets":[16,24]}})";
  const std::string data = FloatBytes({-1.0f, 2.5f, 7.0f, 0.125f}) + std::string(8, '\x3f');
  const std::string path = WriteRaw("python.safetensors", LayOut(header, data));

  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->names(), (std::vector<std::string>{"b", "a", "h"}));
  EXPECT_EQ(file->metadata().at("format"), "pt");
  EXPECT_EQ(*file->dtype("h"), "BF16");
  std::vector<float> a(2), b(2);
  ASSERT_TRUE(file->ReadInto("a", {1, 2}, a.data()).ok());
  ASSERT_TRUE(file->ReadInto("b", {2}, b.data()).ok());
  EXPECT_EQ(a, (std::vector<float>{7.0f, 0.125f}));
  EXPECT_EQ(b, (std::vector<float>{-1.0f, 2.5f}));

  std::vector<float> h(4);
  absl::Status s = file->ReadInto("h", {2, 2}, h.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("BF16"), std::string::npos) << s;
  EXPECT_NE(s.message().find("'h'"), std::string::npos) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
}

TEST_F(SafetensorsTest, ReadIntoRefusesWrongShapeAndMissingTensor) {
  const std::vector<float> w(6, 1.0f);
  const std::string path = Path("w.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"w", {2, 3}, w.data()}}, {}).ok());
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  std::vector<float> out(6);

  absl::Status s = file->ReadInto("w", {3, 2}, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'w'"), std::string::npos) << s;
  EXPECT_NE(s.message().find("[2, 3]"), std::string::npos) << s;
  EXPECT_NE(s.message().find("[3, 2]"), std::string::npos) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;

  s = file->ReadInto("v", {2, 3}, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find("'v'"), std::string::npos) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
}

TEST_F(SafetensorsTest, RefusesTruncatedFiles) {
  const std::vector<float> a(10, 1.0f), b(6, 2.0f);
  const std::string good = Path("good.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(good, {{"a", {10}, a.data()}, {"b", {2, 3}, b.data()}}, {{"k", "v"}}).ok());
  const std::string bytes = *ReadFileToString(good);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);

  struct Case {
    size_t length;
    std::string needle;
  };
  const std::vector<Case> cases = {{0, "shorter than the 8-byte"},
                                   {5, "shorter than the 8-byte"},
                                   {8, "header length"},
                                   {8 + n / 2, "header length"},
                                   {8 + n - 1, "header length"},
                                   {8 + n, "tensor '"},  // header intact, no data
                                   {8 + n + 39, "tensor 'a'"},
                                   {8 + n + 40, "tensor 'b'"},
                                   {bytes.size() - 1, "tensor 'b'"}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.length);
    const std::string path = WriteRaw("cut.safetensors", bytes.substr(0, c.length));
    ExpectRefused(path, c.needle);
  }
}

TEST_F(SafetensorsTest, RefusesMalformedHeaders) {
  const std::string f8 = FloatBytes({1, 2});
  struct Case {
    std::string header;
    std::string data;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", f8, "not valid JSON"},
      {R"([1,2,3])", "", "not a JSON object"},
      {R"({"a":{"shape":[2],"data_offsets":[0,8]}})", f8, "tensor 'a': missing string 'dtype'"},
      {R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", f8, "tensor 'a': missing array 'shape'"},
      {R"({"a":{"dtype":"F32","shape":[2]}})", f8, "tensor 'a': missing 'data_offsets'"},
      {R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", f8, "unknown dtype 'F33'"},
      {R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", f8, "tensor 'a': shape"},
      {R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", f8, "tensor 'a': shape"},
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", f8, "tensor 'a': data_offsets"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", f8,
       "tensor 'a': data_offsets"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", f8, "tensor 'a': data_offsets"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", f8, "tensor 'a'"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
       R"("b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
       f8, "tensor 'b': data_offsets [2, 6] overlap"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", f8, "leave a gap"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", f8, "after the last tensor"},
      {R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}})", f8, "tensor 'a': data_offsets"},
      {R"({"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", f8,
       "__metadata__"},
      {R"({"a":[1]})", f8, "tensor 'a': entry is not an object"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    const std::string path = WriteRaw("bad.safetensors", LayOut(c.header, c.data));
    ExpectRefused(path, c.needle);
  }
}

// Found by tests/fuzz/safetensors_fuzz: the error for a bad dimension
// printed the shape with nlohmann's recursive dump(), so a dimension nested
// some 10^4 levels deep (a 20 KB header) overflowed the stack.
TEST_F(SafetensorsTest, RefusesADeeplyNestedDimensionWithoutRecursing) {
  const int depth = 300000;
  const std::string header = R"({"a":{"dtype":"F32","shape":[)" + std::string(depth, '[') +
                             std::string(depth, ']') + R"(],"data_offsets":[0,4]}})";
  const absl::StatusOr<SafetensorsFile> file =
      SafetensorsFile::Parse(LayOut(header, FloatBytes({1})), "deep.safetensors");
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
  EXPECT_NE(file.status().message().find("shape dimension 0"), std::string::npos) << file.status();
}

TEST_F(SafetensorsTest, ParseReadsBytesInMemoryLikeOpen) {
  const std::vector<float> a = {1, 2, 3, 4, 5, 6};
  const std::string path = Path("m.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"a", {2, 3}, a.data()}}, {{"k", "v"}}).ok());
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(*ReadFileToString(path), "mem");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->names(), std::vector<std::string>{"a"});
  EXPECT_EQ(file->metadata().at("k"), "v");
  std::vector<float> out(6);
  ASSERT_TRUE(file->ReadInto("a", {2, 3}, out.data()).ok());
  EXPECT_TRUE(BitEqual(out, a));
  // Errors name the file as the caller called it.
  EXPECT_NE(file->ReadInto("b", {1}, out.data()).message().find("mem: "), std::string::npos);
  const absl::StatusOr<SafetensorsFile> bad = SafetensorsFile::Parse("short", "mem");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("mem: "), std::string::npos) << bad.status();
}

TEST_F(SafetensorsTest, RefusesCorruptedHeaderBytes) {
  const std::vector<float> a(4, 1.0f);
  const std::string good = Path("good.safetensors");
  ASSERT_TRUE(WriteSafetensors(good, {{"a", {4}, a.data()}}, {}).ok());
  std::string bytes = *ReadFileToString(good);
  bytes[8] = '[';  // the opening brace
  ExpectRefused(WriteRaw("corrupt1.safetensors", bytes), "JSON");
  bytes = *ReadFileToString(good);
  bytes[0] = static_cast<char>(0xff);  // absurd header length
  bytes[7] = static_cast<char>(0x7f);
  ExpectRefused(WriteRaw("corrupt2.safetensors", bytes), "header length");
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(Path("nope.safetensors"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(file.status().message().find("nope.safetensors"), std::string::npos);
}

TEST_F(SafetensorsTest, WriterRefusesBadInput) {
  const std::vector<float> a(4, 1.0f);
  const std::string path = Path("w.safetensors");
  EXPECT_FALSE(WriteSafetensors(path, {{"a", {4}, a.data()}, {"a", {4}, a.data()}}, {}).ok());
  EXPECT_FALSE(WriteSafetensors(path, {{"__metadata__", {4}, a.data()}}, {}).ok());
  EXPECT_FALSE(WriteSafetensors(path, {{"a", {-4}, a.data()}}, {}).ok());
  EXPECT_FALSE(WriteSafetensors(path, {{"a", {4}, nullptr}}, {}).ok());
  EXPECT_FALSE(fs::exists(path));
}

TEST_F(SafetensorsTest, AtomicWriteReplacesAndLeavesNoTempFile) {
  const std::string path = Path("file.txt");
  ASSERT_TRUE(WriteFileAtomically(path, "first version, longer").ok());
  ASSERT_TRUE(WriteFileAtomically(path, "second").ok());
  EXPECT_EQ(*ReadFileToString(path), "second");

  const std::vector<float> a(1000, 3.0f);
  const std::string st = Path("m.safetensors");
  ASSERT_TRUE(WriteSafetensors(st, {{"a", {1000}, a.data()}}, {}).ok());
  ASSERT_TRUE(WriteSafetensors(st, {{"b", {10}, a.data()}}, {}).ok());
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(st);
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(file->names(), std::vector<std::string>{"b"});

  std::vector<std::string> entries;
  for (const auto& entry : fs::directory_iterator(dir())) {
    entries.push_back(entry.path().filename().string());
  }
  std::sort(entries.begin(), entries.end());
  EXPECT_EQ(entries, (std::vector<std::string>{"file.txt", "m.safetensors"}));
}

TEST_F(SafetensorsTest, AtomicWriteFailsCleanly) {
  const absl::Status s = WriteFileAtomically(Path("no/such/dir/file"), "x");
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("no/such/dir/file"), std::string::npos) << s;
  absl::StatusOr<std::string> missing = ReadFileToString(Path("absent"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("absent"), std::string::npos);
}

}  // namespace
}  // namespace muonps
