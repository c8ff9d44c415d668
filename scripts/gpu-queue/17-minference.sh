# cap: 140
# Issue 17 (MInference): sparse prefill on the GPU against dense flash prefill
# (its kernels and engine tests run in the test steps: CudaBlockScores,
# CudaSparsePlanBuild, CudaAttention sparse cases, CudaMInference). One
# attention layer of the Llama-3-8B-1M shape (32 query heads, 8 kv heads,
# random weights) at 32K-256K tokens, the reference's budgets as written
# (1000 verticals / 6096 slashes, A-shape 128 + 3968, 100 key blocks of 64),
# then the whole 32-layer model at 128K, dense vs vertical-slash and
# block-sparse. The paper's shape to look for: speedup growing with length,
# >= 2x by 128K (its A100 figures: 1.78x at 100K, 9.9x at 1M, whole model).
# Random weights scatter the vertical-slash diagonals (the CPU run at 16K/32K
# computed 93% of the keys): read its row with its "keys computed" column;
# A-shape and block-sparse sparsity is set by their budgets.
set -u
bin=$1
echo "## one layer, llama3-8b-1m shape"
timeout 80 "$bin/bench_sparse_prefill" --backend cuda --preset llama3-8b-1m --layers 1 \
  --contexts 32768,65536,131072,262144 --reference-context 0 --repeats 1
echo "## whole model (32 layers), llama3-8b-1m shape"
timeout 55 "$bin/bench_sparse_prefill" --backend cuda --preset llama3-8b-1m \
  --contexts 131072 --reference-context 0 --repeats 1 --settings vertical_and_slash,block_sparse
