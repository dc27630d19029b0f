#!/usr/bin/env bash
# Every C++ file of the project follows .clang-format (Google style, 100
# columns): fails listing the files that do not, with the command that fixes
# them. Skipped (exit 77) where clang-format is absent.
#
#   tests/format_check.sh SOURCE_DIR
set -euo pipefail
cd "$1"
formatter=$(command -v clang-format-14 || command -v clang-format || true)
if [[ -z "$formatter" ]]; then
  echo "clang-format not installed (scripts/install_deps.sh installs it)"
  exit 77
fi
mapfile -t files < <(find common model data optim checkpoint step rpc trainer services workers cli \
  bench tests -type f \( -name '*.cc' -o -name '*.h' -o -name '*.cu' \) | sort)
bad=()
for f in "${files[@]}"; do
  if ! "$formatter" --dry-run -Werror "$f" > /dev/null 2>&1; then bad+=("$f"); fi
done
echo "${#files[@]} files checked with $("$formatter" --version | head -1), ${#bad[@]} not formatted"
if (( ${#bad[@]} > 0 )); then
  printf '  %s\n' "${bad[@]}"
  echo "fix: $formatter -i ${bad[*]}"
  exit 1
fi
