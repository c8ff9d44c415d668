#!/usr/bin/env bash
# The SDK as a user outside this tree gets it: `cmake --install` of this build
# into a temporary prefix, then examples/plugin-template configured against it
# with find_package(inferlab), built, and its own test run through the
# installed host.
# usage: sdk_install.sh REPO BUILD_DIR
set -euo pipefail
repo=$1 build=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >"$work/install.log" || { cat "$work/install.log"; exit 1; }
for f in bin/inferlab include/inferlab/plugin_export.h lib/cmake/inferlab/inferlabConfig.cmake \
  lib/inferlab/plugins/inferlab-plugin-quest.so share/inferlab/plot_figures.py; do
  [[ -e $work/prefix/$f ]] || { echo "sdk_install: $f not installed"; exit 1; }
done
# The installed host finds its own plugins without INFERLAB_PLUGIN_PATH.
env -u INFERLAB_PLUGIN_PATH "$work/prefix/bin/inferlab" plugins >"$work/plugins.txt" 2>&1
if grep -q 'warning' "$work/plugins.txt"; then echo "sdk_install: the installed host warns:"; cat "$work/plugins.txt"; exit 1; fi
grep -q '^quest' "$work/plugins.txt" || { echo "sdk_install: the installed host lists no quest plugin:"; cat "$work/plugins.txt"; exit 1; }
cmake -S "$repo/examples/plugin-template" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" >"$work/configure.log" ||
  { cat "$work/configure.log"; exit 1; }
cmake --build "$work/build" >"$work/build.log" || { cat "$work/build.log"; exit 1; }
ctest --test-dir "$work/build" --output-on-failure
# The trainer (inferlab/train.h) links from the installed prefix: a head's
# forward pass, built and run outside this tree.
mkdir -p "$work/train"
cat >"$work/train/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.20)
project(train_user CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(inferlab REQUIRED)
add_executable(train_user main.cpp)
target_link_libraries(train_user PRIVATE inferlab::train)
CMAKE
cat >"$work/train/main.cpp" <<'CPP'
#include <cstdio>
#include <vector>
#include "inferlab/train.h"
int main() {
  using namespace inferlab::train;
  auto head = LowRankHead::create(HeadOptions{4, 2, 3}, 1);
  if (!head) return std::printf("%s\n", head.message().c_str()), 1;
  std::vector<float> x(4 * 8, 0.5f), logits(8 * 3, -1e9f);
  if (auto s = head->forward(x, logits, nullptr); !s) return std::printf("%s\n", s.message().c_str()), 1;
  for (const float v : logits)
    if (!(v > -1e9f)) return std::printf("logits not written\n"), 1;
  return 0;
}
CPP
cmake -S "$work/train" -B "$work/train/build" -DCMAKE_PREFIX_PATH="$work/prefix" >"$work/train.log" 2>&1 &&
  cmake --build "$work/train/build" >>"$work/train.log" 2>&1 && "$work/train/build/train_user" ||
  { echo "sdk_install: a program linking inferlab::train from the prefix failed"; cat "$work/train.log"; exit 1; }
