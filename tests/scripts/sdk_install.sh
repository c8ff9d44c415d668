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
  lib/inferlab/plugins/inferlab-plugin-quest.so; do
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
