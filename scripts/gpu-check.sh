#!/usr/bin/env bash
# On the GPU machine, after scripts/bundle-gpu.sh here: every GPU test, the CUDA benchmarks, the
# perplexity job at tp 1 and (with two GPUs) tp 2 on a Llama-2-7B shape, and transformers on the
# same shapes — the runs behind docs/BENCHMARKS.md. Results as JSON files under $OUT (or /tmp).
#   device tool: carry [".bundle.tar.xz"], command: bash scripts/gpu-check.sh [tests] [bench] [tp] [scale] [kv] [kivi] [kivievict] [catalogue] [lowrank] [kv8k] [profile] [attention] [hf] [refs] [passkey] [ab]
# (no section named: all but profile, attention and ab); KVTP_PARITY_CASES=text|text...: CudaEngine.CompressionMatchesTheCpu runs
# only the cases whose name holds one of them (a short session's focus); MPIRUN_ARGS: mpirun options, default --bind-to none
# (Open MPI binds each rank to one core by default; a GPU rank then shares that core with
# NCCL's proxy thread, which halved tp 2 throughput in our runs)
set -u
want() { [ -z "$sections" ] || [[ " $sections " == *" $1 "* ]]; }
sections="$*"
out=${OUT:-/tmp}
tar xJf .bundle.tar.xz
export LD_LIBRARY_PATH=$PWD/.bundle KVTP_BINARY=$PWD/.bundle/kvtp NCCL_NVLS_ENABLE=0
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | tee /dev/stderr | wc -l)
if want tests; then
  timeout 90 .bundle/kvtp_cuda_tests --gtest_brief=1 2>&1 | tail -3
  timeout 480 .bundle/kvtp_cuda_engine_tests > "$out/cuda_engine_tests.txt" 2>&1
  grep -E "max \||FAILED|Failure|exception|PASSED|SKIPPED \]|error while" "$out/cuda_engine_tests.txt" | head -50
  [ "$gpus" -ge 2 ] && timeout 60 mpirun --allow-run-as-root -np 2 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE=0 .bundle/kvtp_nccl_tests 2>&1 | grep -E "PASSED|FAILED" | head -4
fi
want bench && timeout 200 .bundle/kvtp bench --device cuda --synthetic llama-2-7b 2>&1 | tail -16
# Random token ids: 8 windows of 2048 for prefill, one of 2600 (2048 prompt + 552 decoded tokens).
python3 - <<'PY'
import random
random.seed(1)
line = lambda n: " ".join(str(random.randrange(32000)) for _ in range(n)) + "\n"
open("/tmp/ids2048.txt", "w").write("".join(line(2048) for _ in range(8)))
open("/tmp/ids2600.txt", "w").write(line(2600))
open("/tmp/ids8448.txt", "w").write(line(8448))
PY
[ "$gpus" -ge 2 ] && want tp && timeout 60 mpirun --allow-run-as-root -np "$gpus" -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE=0 .bundle/kvtp_nccl_bench
for tp in 1 2 4 8; do
  want tp || continue
  [ "$tp" -le "$gpus" ] || continue
  run="timeout 150 mpirun --allow-run-as-root ${MPIRUN_ARGS:---bind-to none} -np $tp -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE=0 .bundle/kvtp ppl --synthetic llama-2-7b --device cuda --tp $tp --quiet --json"
  $run --input-ids /tmp/ids2048.txt > "$out/ppl_prefill_tp$tp.json"
  $run --input-ids /tmp/ids2600.txt --seq-len 2600 --mode decode --prefill 2048 > "$out/ppl_decode_tp$tp.json"
  for f in "$out/ppl_prefill_tp$tp.json" "$out/ppl_decode_tp$tp.json"; do
    python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: j[k] for k in ('ppl','tokens','seconds','tokens_per_second','tp','collective_share')})" "$f"
  done
done
# 66B scale (all GPUs of the machine): OPT-66B and Llama-2-70B shapes, fp16, all layers, tp = GPUs, weights made a
# layer at a time (the host never holds the model). The OPT-66B perplexity job goes through the
# control plane: coordinator + `mpirun -np 2 kvtp worker`, submitted over gRPC. One GPU runs it
# too where the weights fit (an H200's 141 GB: OPT-66B's 123 GiB, Llama-2-70B's 128 GiB) — the
# tp 1 that tp 2's scaling is measured against.
gpu_gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{print int($1 / 1024)}')
if { [ "$gpus" -ge 2 ] || [ "$gpu_gib" -ge 135 ]; } && want scale; then
  mkdir -p scale && cp /tmp/ids2048.txt /tmp/ids2600.txt scale/
  KVTP=.bundle/kvtp WORKERS=$gpus timeout 300 bash scripts/run-local.sh --synthetic opt-66b --input-ids scale/ids2048.txt \
    --max-windows 4 --device cuda --json > "$out/grpc_opt66b_prefill.json"
  run="timeout 300 mpirun --allow-run-as-root --bind-to none -np $gpus -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE=0 .bundle/kvtp ppl --device cuda --tp $gpus --json"
  $run --synthetic opt-66b --input-ids scale/ids2048.txt --mode decode --prefill 1536 --max-windows 1 > "$out/opt66b_decode.json"
  $run --synthetic llama-2-70b --input-ids scale/ids2048.txt --max-windows 4 > "$out/llama70b_prefill.json"
  $run --synthetic llama-2-70b --input-ids scale/ids2600.txt --seq-len 2600 --mode decode --prefill 2048 > "$out/llama70b_decode.json"
  for f in grpc_opt66b_prefill opt66b_decode llama70b_prefill llama70b_decode; do
    python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(sys.argv[2], {k: j.get(k) for k in ('model','ppl','tokens','seconds','tokens_per_second','tp','collective_share','device_bytes_peak_per_rank')})" "$out/$f.json" "$f"
  done
fi
# One decode job at tp = GPUs three ways: snapkv over the control plane (coordinator + mpirun
# workers), pyramidkv and the full cache through mpirun. usage: compressedRuns NAME ppl-options...
mpi_ppl="timeout 200 mpirun --allow-run-as-root --bind-to none -np $gpus -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE=0 .bundle/kvtp ppl --tp $gpus"
summary() {
  python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: j.get(k) for k in ('kv','tokens','seconds','tp','collective_share','kv_bytes_steady','kv_bytes_full','device_bytes_peak_per_rank')})" "$1"
}
compressedRuns() {  # inputs under scale/: the coordinator reads files below its --data-root only
  local name=$1
  shift
  mkdir -p scale && cp /tmp/ids2048.txt /tmp/ids8448.txt scale/
  KVTP=.bundle/kvtp WORKERS=$gpus timeout 200 bash scripts/run-local.sh "$@" --device cuda --json --kv snapkv:budget=0.2 \
    > "$out/grpc_${name}_snapkv.json"
  $mpi_ppl "$@" --device cuda --json --kv pyramidkv:budget=0.2 > "$out/${name}_pyramidkv.json"
  $mpi_ppl "$@" --device cuda --json > "$out/${name}_full.json"
  for f in "grpc_${name}_snapkv" "${name}_pyramidkv" "${name}_full"; do summary "$out/$f.json"; done
}
decodeTable() {  # bench JSON files: one line per decode entry
  python3 -c "
import json,sys
for f in sys.argv[1:]:
  for d in json.load(open(f))['models'][0]['decode']: print(f.split('/')[-1], d['context'], 'batch', d['batch'], d['kv'], round(d['kv_bytes']/2**20), 'MiB', round(d['ms_per_token'],3), 'ms', round(100*d['ratio_to_floor'],1), '% of floor, deciding', round(d.get('decide_ms', 0),3), 'ms', d.get('head_rows', ''))
" "$@"
}
# KV compression on the GPU: Llama-2-7B decode at 2k/8k/32k full, int8, SnapKV at a 20 % budget
# (the prompt compressed at its end) with and without int8, the per-step methods at 2k/8k; with 2+ GPUs, OPT-66B at tp = GPUs (2048 positions
# at most): a 1536-token prompt then 511 decoded tokens, through the control plane (snapkv) and
# mpirun (pyramidkv, full).
if want kv; then
  bench7b="timeout 200 .bundle/kvtp bench --device cuda --synthetic llama-2-7b --json"
  $bench7b --contexts 2048,8192,32768 --kv snapkv:budget=0.2 > "$out/bench_snapkv.json"
  $bench7b --contexts 2048,8192,32768 > "$out/bench_full.json"
  $bench7b --contexts 2048,8192,32768 --kv-quant int8 > "$out/bench_int8.json"
  $bench7b --contexts 2048,8192,32768 --kv snapkv:budget=0.2 --kv-quant int8 > "$out/bench_snapkv_int8.json"
  for kv in h2o streamingllm scissorhands; do  # decided on the device every step
    $bench7b --contexts 2048,8192,32768 --kv $kv:budget=0.2 > "$out/bench_$kv.json"
  done
  decodeTable "$out"/bench_full.json "$out"/bench_int8.json "$out"/bench_snapkv*.json "$out"/bench_h2o.json \
    "$out"/bench_streamingllm.json "$out"/bench_scissorhands.json
  [ "$gpus" -ge 2 ] && compressedRuns opt66b --synthetic opt-66b --input-ids scale/ids2048.txt --max-windows 1 \
    --mode decode --prefill 1536
fi
# KIVI on the GPU: Llama-2-7B decode at 2k/8k/32k, batch 1 and 8, full fp16 beside 4 and 2 bits
# (runs of 32 tokens, a residual window of 128 at full precision).
if want kivi; then
  bench7b="timeout 200 .bundle/kvtp bench --device cuda --synthetic llama-2-7b --json --contexts 2048,8192,32768"
  $bench7b > "$out/bench_kivi_none.json"
  $bench7b --kv-quant kivi:bits=4 > "$out/bench_kivi4.json"
  $bench7b --kv-quant kivi:bits=2 > "$out/bench_kivi2.json"
  decodeTable "$out"/bench_kivi_none.json "$out"/bench_kivi4.json "$out"/bench_kivi2.json
fi
# Eviction and KIVI together on the GPU (the Scissorhands paper's 5x eviction x 4 bits): Llama-2-7B
# decode at 2k and 32k, batch 1 and 8, beside the full cache and each alone.
if want kivievict; then
  bench7b="timeout 200 .bundle/kvtp bench --device cuda --synthetic llama-2-7b --json --contexts 2048,32768 --batch 1 8"
  $bench7b > "$out/bench_ke_full.json"
  $bench7b --kv scissorhands:budget=0.2 > "$out/bench_ke_scissorhands.json"
  $bench7b --kv-quant kivi:bits=4 > "$out/bench_ke_kivi4.json"
  $bench7b --kv scissorhands:budget=0.2 --kv-quant kivi:bits=4 > "$out/bench_ke_scissorhands_kivi4.json"
  $bench7b --kv h2o:budget=0.2 --kv-quant kivi:bits=2 > "$out/bench_ke_h2o_kivi2.json"
  decodeTable "$out"/bench_ke_*.json
fi
# The row-scored methods decided on the device, alone and over KIVI 4 bits: what the decision
# (scores read where the rows lie, the select, the compaction) costs a step at 2k and 32k.
if want catalogue; then
  bench7b="timeout 200 .bundle/kvtp bench --device cuda --synthetic llama-2-7b --json --contexts 2048,32768"
  for m in knorm keydiff lagkv cur; do
    $bench7b --kv $m:budget=0.2 > "$out/bench_cat_$m.json"
    $bench7b --kv $m:budget=0.2 --kv-quant kivi:bits=4 > "$out/bench_cat_${m}_kivi4.json"
  done
  decodeTable "$out"/bench_cat_*.json
fi
# Low-rank channels on the GPU: the same contexts, rank 32 of 128 behind the default window of 64,
# alone and over int8 (the window's rows as codes).
if want lowrank; then
  bench7b="timeout 300 .bundle/kvtp bench --device cuda --synthetic llama-2-7b --json --contexts 2048,8192,32768"
  $bench7b --kv-lowrank cskv:rank=32 > "$out/bench_lowrank32.json"
  $bench7b --kv-lowrank cskv:rank=32 --kv-quant int8 > "$out/bench_lowrank32_int8.json"
  decodeTable "$out"/bench_lowrank32.json "$out"/bench_lowrank32_int8.json
fi
# Llama-2-70B at tp = GPUs, 8k context: an 8192-token prompt (compressed at its end) then 255
# decoded tokens, and the prompt alone scored at once (decode ms/token = (job - that) / 255).
if [ "$gpus" -ge 2 ] && want kv8k; then
  compressedRuns llama70b_8k --synthetic llama-2-70b --input-ids scale/ids8448.txt --seq-len 8448 --max-windows 1 \
    --mode decode --prefill 8192
  $mpi_ppl --synthetic llama-2-70b --input-ids /tmp/ids8448.txt --seq-len 8192 --max-windows 1 --device cuda --json \
    > "$out/llama70b_8k_prefill.json"
  summary "$out/llama70b_8k_prefill.json"
fi
# A/B (named only): the bundle's kvtp against .bundle/kvtp_old (bundled with KVTP_BASELINE), old
# and new alternating, twice, on this one machine (lent GPUs of a kind differ by a few per cent):
# Llama-2-7B decode at AB_CONTEXTS (default 32768), batch 1, for each of AB_CONFIGS (bench options
# per configuration, ';' between them; default Scissorhands 0.2 + KIVI 4, and H2O 0.2).
if [[ " $sections " == *" ab "* ]] && [ ! -x .bundle/kvtp_old ]; then
  echo "ab: no .bundle/kvtp_old to time against (bundle with KVTP_BASELINE=path/to/kvtp)" >&2
elif [[ " $sections " == *" ab "* ]]; then
  IFS=';' read -ra configs <<< "${AB_CONFIGS:---kv scissorhands:budget=0.2 --kv-quant kivi:bits=4;--kv h2o:budget=0.2}"
  for i in "${!configs[@]}"; do
    for round in 1 2; do
      for side in old new; do
        binary=.bundle/kvtp
        [ "$side" = old ] && binary=.bundle/kvtp_old
        timeout 120 $binary bench --device cuda --synthetic llama-2-7b --seq-len 256 --repeats 1 --decode-steps 32 \
          --json --contexts "${AB_CONTEXTS:-32768}" --batch 1 ${configs[$i]} > "$out/ab_${i}_${round}_$side.json"
      done
    done
  done
  decodeTable "$out"/ab_*.json
fi
# The decode attention alone (kvtp_cuda_bench attention: fp16 caches of 64-8k rows a head, KIVI 4 of
# 256-32k and thinned as eviction leaves them), then ncu's warp states of two of its launches: fp16
# at 2k rows a head and the thinned KIVI walk, found by their cases' places in the bench's order
# (fp16 64, 512, 2048, 8192, then KIVI 32768, 6553, 1638, 256, thinned: from 0) and the launches a
# case makes (cuda_bench.cpp's graphMs: 10 a sample, 2 warm-ups and 20 timed). Not in the default run.
if [[ " $sections " == *" attention "* ]]; then
  .bundle/kvtp_cuda_bench attention | tee "$out/attention.txt"
  launches_a_case=$((10 * (2 + 20)))
  for launch in "fp16_2048 2" "kivi_thinned 8"; do
    read -r name place <<< "$launch"
    timeout 120 ncu --clock-control none --cache-control none --kernel-name regex:attentionSplit \
      --launch-skip $((place * launches_a_case)) \
      --launch-count 1 --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
      --section SchedulerStats --section SourceCounters .bundle/kvtp_cuda_bench attention > "$out/ncu_$name.txt" 2>&1
    grep -E "Duration|SM Active Cycles|Elapsed Cycles|Warp Cycles Per Issued|Issued Warp|Achieved Active" "$out/ncu_$name.txt"
  done
fi
# Where one decode step's time goes, kernel by kernel (ncu, not in the default run): a Llama-2-7B
# shape cut to 8 layers at 32k, 4 decode steps; the kernels from the first step's decision to the
# second step's last attention (a decision, then a forward). PROFILE_KV: the bench's compression
# options (default Scissorhands 0.2 + KIVI 4). Clocks at base (ncu's --clock-control none leaves
# them idling low between its replays), no cache flushes.
if [[ " $sections " == *" profile "* ]]; then
  profiled="--device cuda --synthetic llama-2-7b --layers 8 --contexts 32768 --batch 1 --repeats 1"
  # the same step without the profiler: its decide_ms beside the decision's kernels tells host time
  kv=${PROFILE_KV:---kv scissorhands:budget=0.2 --kv-quant kivi:bits=4}
  timeout 120 .bundle/kvtp bench $profiled --json $kv > "$out/profile_bench.json"
  decodeTable "$out/profile_bench.json"
  timeout 300 ncu --metrics gpu__time_duration.sum --cache-control none --clock-control base -o /tmp/step -f \
    .bundle/kvtp bench $profiled --decode-steps 4 $kv > /dev/null 2>&1
  ncu -i /tmp/step.ncu-rep --page raw --csv --metrics gpu__time_duration.sum > "$out/profile_step.csv"
  python3 - "$out/profile_step.csv" <<'PY'
import collections, csv, re, sys
rows = list(csv.reader(open(sys.argv[1])))
name, time = rows[0].index('Kernel Name'), rows[0].index('gpu__time_duration.sum')
scale = {'ns': 1e-3, 'nsecond': 1e-3, 'us': 1.0, 'usecond': 1.0, 'ms': 1e3, 'msecond': 1e3}[rows[1][time]]  # to us
launches = []
for r in rows[2:]:
    k = re.sub(r'\(anonymous namespace\)|<unnamed>', '', r[name])
    while re.search(r'<[^<>]*>', k): k = re.sub(r'<[^<>]*>', '', k)
    launches.append((k.split('(')[0].split('::')[-1], float(r[time].replace(',', '')) * scale))
attention = [i for i, (k, _) in enumerate(launches) if k == 'attentionSplit']
total, count = collections.Counter(), collections.Counter()
for k, t in launches[attention[7] + 1:attention[15] + 1]: total[k] += t; count[k] += 1
print(f'one step (8 layers): {sum(total.values()):.1f} us')
for k, t in total.most_common(): print(f'{t:9.1f} us {count[k]:4d} x {k}')
PY
fi
# kvtp beside transformers on the same shapes in one run (kvtp bench --compare-hf runs scripts/hf_bench.py)
want hf && timeout 400 .bundle/kvtp bench --device cuda --synthetic llama-2-7b --contexts 2048,8192,32768 --batch 1 \
  --compare-hf 2>&1 | tee "$out/bench_compare_hf.txt" | grep -E "prefill|batch 1|transformers"
# Ground truth from transformers (installed here): greedy generate() references for the fixture
# and bundled models (tests/hf_parity_test.cpp, GenerationParity), as $OUT/refs.tar (paths in the tree) to unpack here.
if want refs; then
  python3 scripts/make_fixtures.py --generation-references tests/fixtures models/kvtp-llama-2m models/kvtp-opt-3m \
    models/kvtp-llama-2m-passkey
  # one file: the device tool brings back a few files and shallow folders only
  tar cf "$out/refs.tar" tests/fixtures/models/*/generate_reference.json models/*/generate_reference.json
fi
# The bundled model that retrieves (scripts/train_default.py --passkey, a few minutes), its
# folder under $OUT to copy back, and its full-cache passkey table.
if want passkey; then
  timeout 500 python3 scripts/train_default.py --passkey --out models 2>&1 | tail -12
  cp -r models/kvtp-llama-2m-passkey "$out/" && .bundle/kvtp passkey --model models/kvtp-llama-2m-passkey \
    --lengths 256,512,768,1000 --trials 4 --out "$out/passkey-full" --quiet
fi
