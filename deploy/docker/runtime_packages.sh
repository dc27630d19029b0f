#!/usr/bin/env bash
# Prints, one a line, the Debian/Ubuntu packages owning the shared libraries
# that BINARY loads. The images build with scripts/install_deps.sh (the one
# list of dependencies, shared with CI) and then install only these packages
# in the runtime stage: what the binary links, without the toolchain, and
# nothing a second hand-written list could let drift.
#
#   deploy/docker/runtime_packages.sh BINARY > runtime-packages.txt
#
# Fails when a library is not found, or is found but no package owns it;
# libraries of the GPU driver (libcuda, libnvidia-*) are skipped, since the
# NVIDIA container runtime mounts them from the host.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 BINARY" >&2
  exit 2
fi

driver_library='^lib(cuda|nvidia-[a-z-]+)\.so'

# Prints the package owning PATH. dpkg records a library under the path its
# package shipped, which on a merged-/usr system may be /lib/... or
# /usr/lib/..., while ldd may print either, or a link to it.
owner() {
  local path=$1 real candidate
  real=$(readlink -f "$path")
  for candidate in "$path" "$real" "${path#/usr}" "/usr$path" "${real#/usr}" "/usr$real"; do
    if out=$(dpkg-query -S "$candidate" 2> /dev/null); then
      # "libfoo1:amd64: /path" (or "a, b: /path" when shared): the first name.
      out=${out%%: *}
      out=${out%%,*}
      echo "${out%%:*}"
      return 0
    fi
  done
  echo "runtime_packages.sh: no package owns $path" >&2
  return 1
}

ldd "$1" | while read -r line; do
  case $line in
    *"=> not found"*)
      name=${line%% *}
      if [[ $name =~ $driver_library ]]; then continue; fi
      echo "runtime_packages.sh: $name not found" >&2
      exit 1
      ;;
    *"=> "/*) path=${line#*=> } ;;
    /*) path=$line ;;  # the dynamic loader
    *) continue ;;     # linux-vdso and other virtual objects
  esac
  owner "${path%% (*}"
done | sort -u
