#!/usr/bin/env python3
"""Every #include of a project header points down a layer.

The layers, lowest first (docs/design.md draws them):

  common                                   tensors, gemm, parallel, philox, formats
  model  data  optim  checkpoint  rpc       libraries: nothing but common
  step                                     the step algebra (uses optim's lr schedule)
  trainer  services/shard  services/coordinator  workers/worker  workers/cuda
                                           the drivers and roles
  cli  bench  tests                        programs

A file may include headers of its own directory and of the directories its
directory lists below. A C++ file in a directory the table does not list
fails too, so the table cannot fall behind the tree.

  tests/layering_test.py SOURCE_DIR
"""
import os
import re
import sys

ALLOWED = {
    "common": set(),
    "model": {"common"},
    "data": {"common"},
    "optim": {"common"},
    "checkpoint": {"common"},
    "rpc": {"common"},
    "step": {"common", "optim"},
    "trainer": {"common", "model", "data", "optim", "checkpoint", "step"},
    "services/shard": {"common", "optim", "checkpoint", "step", "rpc"},
    "services/coordinator": {"common", "checkpoint", "step", "rpc"},
    "workers/worker": {"common", "model", "data", "step", "rpc"},
    "workers/cuda": {"common", "model", "optim"},
    "cli": {"common", "model", "data", "optim", "checkpoint", "step", "rpc", "trainer",
            "services/shard", "services/coordinator", "workers/worker", "workers/cuda"},
    "bench": {"common", "model", "data", "optim", "checkpoint", "step", "rpc", "trainer",
              "services/shard", "services/coordinator", "workers/worker", "workers/cuda"},
}
# tests/ may include anything of the project's.
ALL = set(ALLOWED) | {"tests"}
ALLOWED["tests"] = ALL
SOURCE_SUFFIXES = (".cc", ".h", ".cu", ".cuh")
SKIP_DIRS = {"build", ".git", "node_modules", "proto", "deploy", "docs", "scripts", "examples"}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def layer_of(path):
    """The table entry a project path (dir/.../file) belongs to, or None."""
    parts = path.split("/")
    for n in (2, 1):
        key = "/".join(parts[:n])
        if key in ALLOWED and len(parts) > n:
            return key
    return None


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
    problems, files = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames
                       if not (rel_dir == "." and (d in SKIP_DIRS or d.startswith("build")))]
        for name in filenames:
            if not name.endswith(SOURCE_SUFFIXES):
                continue
            rel = os.path.normpath(os.path.join(rel_dir, name))
            layer = layer_of(rel)
            if layer is None:
                problems.append(f"{rel}: in no layer of tests/layering_test.py")
                continue
            files += 1
            with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    m = INCLUDE.match(line)
                    if not m:
                        continue
                    target = layer_of(m.group(1))
                    if target is None or target == layer:
                        continue  # a system, generated or third-party header, or its own layer
                    if target not in ALLOWED[layer]:
                        problems.append(f"{rel}:{number}: includes {m.group(1)}, but {layer} "
                                        f"may include only {sorted(ALLOWED[layer]) or 'itself'}")
    for p in problems:
        print(p)
    print(f"{files} files checked, {len(problems)} includes or files out of layer")
    return 1 if problems or files == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
