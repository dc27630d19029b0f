// Fail points: named places where a process kills itself on purpose, so a
// test reaches states that timing alone reaches only by chance (a shard dying
// with half of an ApplyStep done, or between the files of a checkpoint).
//
//   MUONPS_FAILPOINTS="shard.apply_tensor@37,checkpoint.shard_file@2"
//
// makes the process SIGKILL itself the 37th time it passes
// FailPoint("shard.apply_tensor"), and so on. The variable is read once;
// unset (always, in production) a pass costs one atomic load.
#ifndef MUONPS_COMMON_FAILPOINT_H_
#define MUONPS_COMMON_FAILPOINT_H_

namespace muonps {

// Counts a pass of the point `name`; kills the process (SIGKILL, no cleanup,
// as a lost machine) on the pass MUONPS_FAILPOINTS names for it.
void FailPoint(const char* name);

}  // namespace muonps

#endif  // MUONPS_COMMON_FAILPOINT_H_
