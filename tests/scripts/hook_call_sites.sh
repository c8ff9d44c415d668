#!/usr/bin/env bash
# Every method hook the engine calls at run time is called from exactly one
# file of framework/src/engine (the forward schedule): a backend never calls a
# plugin, and no hook is glued twice. (A hook is called through a Method
# pointer; KvSequence::evict, a cache operation, is called on a reference.)
set -euo pipefail
engine_dir="${1:?usage: hook_call_sites.sh framework/src/engine}"
status=0
for hook in prefill_pattern select_kv page_budget on_attention evict plan_layers exit_after_layer \
            mask_components retention_budget; do
  files=$(grep -rlE -e "->${hook}\(" "$engine_dir" --include='*.cpp' --include='*.h' --include='*.cu' || true)
  count=$(printf '%s' "$files" | grep -c . || true)
  if [[ "$count" -ne 1 ]]; then
    echo "hook ${hook}: called from ${count} files, expected 1:"
    printf '  %s\n' $files
    status=1
  else
    echo "hook ${hook}: ${files#"$engine_dir"/}"
  fi
done
exit "$status"
