#!/usr/bin/env bash
# Nothing includes upward. The layers, lowest first: the SDK
# (framework/include), model, engine, then plugins, datasets and results (side
# by side), experiment, finetune (training, which reads experiment configs),
# cli. A file may include its own layer and those below.
set -euo pipefail
root="${1:?usage: layering.sh REPO_ROOT}"
status=0
check() {  # check DIR FORBIDDEN-PREFIX...
  local dir="$1"
  shift
  for prefix in "$@"; do
    hits=$(grep -rnE "#include \"${prefix}/" "$root/$dir" --include='*.h' --include='*.cpp' --include='*.cu' \
             --include='*.cuh' || true)
    if [[ -n "$hits" ]]; then
      echo "$dir includes ${prefix}/, a layer above it:"
      printf '%s\n' "$hits" | sed "s|$root/||; s/^/  /"
      status=1
    fi
  done
}
check framework/include model engine plugins datasets results experiment finetune cli
check framework/src/model engine plugins datasets results experiment finetune cli
check framework/src/engine plugins datasets results experiment finetune cli
check framework/src/plugins datasets results experiment finetune cli
check datasets results experiment finetune cli
check framework/src/results experiment finetune cli
check framework/src/experiment finetune cli
check framework/src/finetune cli
[[ "$status" -eq 0 ]] && echo "no file includes a layer above its own"
exit "$status"
