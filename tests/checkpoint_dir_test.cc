// Checkpoint directories on disk: staging, publishing and pruning touch only
// directories muonps wrote for the same owner (their marker file), never a
// directory it did not write nor another user's.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "checkpoint/checkpoint.h"
#include "tests/test_util.h"

namespace muonps {
namespace {

namespace fs = std::filesystem;

using CheckpointDirTest = testing_util::TempDirTest;

void Touch(const std::string& path) { std::ofstream(path) << "x"; }

std::set<std::string> FilesIn(const std::string& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

const CheckpointWriter kAlice{"alice", "job-1"};
const CheckpointWriter kBob{"bob", "job-2"};

TEST_F(CheckpointDirTest, PublishingReplacesADirectoryOfTheSameOwner) {
  const std::string final_dir = Path("root/step-00000005");
  absl::StatusOr<std::string> staging = CreateStagingDir(final_dir, kAlice);
  ASSERT_TRUE(staging.ok()) << staging.status();
  EXPECT_EQ(*staging, final_dir + ".tmp");
  EXPECT_TRUE(WrittenBy(*staging, "alice"));
  EXPECT_FALSE(WrittenBy(*staging, "bob"));
  Touch(*staging + "/leftover");
  // A leftover staging directory of the same owner is emptied.
  staging = CreateStagingDir(final_dir, kAlice);
  ASSERT_TRUE(staging.ok()) << staging.status();
  EXPECT_EQ(FilesIn(*staging), std::set<std::string>{kCheckpointMarker});
  Touch(*staging + "/first");
  ASSERT_TRUE(PublishStagingDir(*staging, final_dir, kAlice).ok());
  EXPECT_EQ(FilesIn(final_dir), (std::set<std::string>{kCheckpointMarker, "first"}));

  staging = CreateStagingDir(final_dir, kAlice);
  ASSERT_TRUE(staging.ok()) << staging.status();
  Touch(*staging + "/second");
  const absl::Status published = PublishStagingDir(*staging, final_dir, kAlice);
  ASSERT_TRUE(published.ok()) << published;
  EXPECT_EQ(FilesIn(final_dir), (std::set<std::string>{kCheckpointMarker, "second"}));
  EXPECT_EQ(FilesIn(Path("root")), std::set<std::string>{"step-00000005"});
}

TEST_F(CheckpointDirTest, DirectoriesMuonpsDidNotWriteAreNeverReplaced) {
  // A directory of the same name that muonps did not write, and one another
  // user's job wrote: publishing over either is refused and both stay.
  const std::string foreign = Path("root/step-00000001");
  fs::create_directories(foreign);
  Touch(foreign + "/precious");
  absl::StatusOr<std::string> staging = CreateStagingDir(foreign, kAlice);
  ASSERT_TRUE(staging.ok()) << staging.status();
  absl::Status st = PublishStagingDir(*staging, foreign, kAlice);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_EQ(FilesIn(foreign), std::set<std::string>{"precious"});

  const std::string bobs = Path("root/step-00000002");
  staging = CreateStagingDir(bobs, kBob);
  ASSERT_TRUE(staging.ok());
  ASSERT_TRUE(PublishStagingDir(*staging, bobs, kBob).ok());
  staging = CreateStagingDir(bobs, kAlice);
  ASSERT_TRUE(staging.ok());
  st = PublishStagingDir(*staging, bobs, kAlice);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_TRUE(WrittenBy(bobs, "bob"));

  // A staging name taken by something muonps did not write is left alone.
  const std::string taken = Path("root/step-00000003");
  fs::create_directories(taken + ".tmp");
  Touch(taken + ".tmp/precious");
  staging = CreateStagingDir(taken, kAlice);
  EXPECT_EQ(staging.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(FilesIn(taken + ".tmp"), std::set<std::string>{"precious"});
}

TEST_F(CheckpointDirTest, PruningCountsAndRemovesOnlyTheOwnersDirectories) {
  const std::string root = Path("ckpt");
  for (int step : {1, 2, 3, 4, 5}) {
    const std::string dir = root + "/" + CheckpointName(step);
    absl::StatusOr<std::string> staging = CreateStagingDir(dir, kAlice);
    ASSERT_TRUE(staging.ok());
    ASSERT_TRUE(PublishStagingDir(*staging, dir, kAlice).ok());
  }
  // Not alice's: a directory without a marker, bob's, and other entries.
  for (const char* name :
       {"step-00000000", "step-00000006.tmp", "step-00000002.old", "step-x", "other"}) {
    fs::create_directories(root + "/" + name);
  }
  {
    absl::StatusOr<std::string> staging = CreateStagingDir(root + "/step-00000007", kBob);
    ASSERT_TRUE(staging.ok());
    ASSERT_TRUE(PublishStagingDir(*staging, root + "/step-00000007", kBob).ok());
  }
  Touch(root + "/notes.txt");
  const std::set<std::string> others = {
      "step-00000000", "step-00000006.tmp", "step-00000002.old", "step-x",
      "other",         "notes.txt",         "step-00000007"};
  auto with = [&](std::set<std::string> names) {
    names.insert(others.begin(), others.end());
    return names;
  };
  const std::set<std::string> before = FilesIn(root);
  PruneCheckpoints(root, 0, "alice");
  EXPECT_EQ(FilesIn(root), before);
  PruneCheckpoints(root, 2, "alice");
  EXPECT_EQ(FilesIn(root), with({"step-00000004", "step-00000005"}));
  PruneCheckpoints(root, 1, "alice");
  EXPECT_EQ(FilesIn(root), with({"step-00000005"}));
  // An unmarked directory is nobody's: no owner prunes it.
  PruneCheckpoints(root, 1, "");
  EXPECT_EQ(FilesIn(root), with({"step-00000005"}));
}

TEST_F(CheckpointDirTest, ResumeTakesTheNewestCompleteCheckpointNeverAStagingOne) {
  const std::string root = Path("ckpt");
  for (const char* name : {"step-00000004", "step-00000005", "step-00000006.tmp"}) {
    fs::create_directories(root + "/" + name);
  }
  Touch(root + "/step-00000004/trainer_state.json");
  Touch(root + "/step-00000005/trainer_state.json");
  Touch(root + "/step-00000006.tmp/trainer_state.json");
  absl::StatusOr<std::string> resolved = ResolveCheckpointDir(root);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_EQ(*resolved, root + "/step-00000005");
}

}  // namespace
}  // namespace muonps
