#!/usr/bin/env python3
"""Two (or more) builds of `kosmos-compare` side by side on the same model, alternated repeat by repeat.

For A/B tests of a change on this noisy VM: every variant loads the model once (`--serve --breakdown`) and the
driver asks each for one repeat in turn, so slow phases of the machine fall on all of them alike. Needs a model
written by `compare.py` (`target/bench-compare/<config>`). Usage, from the repository root:

    python3 scripts/bench/ab_builds.py CONFIG REPEATS NAME[=ENV=VALUE] ...

A variant `name=BIN=path` runs that binary (default `target/release/kosmos-compare`); `name=VAR=value` sets an
environment variable for it. Prints each repeat's decode per token, then medians and minimums of every phase.
Memory: one model per variant (6.7 GB each at full size).
"""
import json
import os
import statistics
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="17179869184",
           RAYON_NUM_THREADS=os.environ.get("RAYON_NUM_THREADS", "2"))
KEYS = ["vision_s", "forward_s", "ttft_s", "decode_per_token_s", "step_decoder_s", "step_head_s"]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    config, repeats, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    base = os.path.join(REPO_ROOT, "target", "bench-compare", config)
    procs = {}
    for v in variants:
        name, *setting = v.split("=", 1)
        env = dict(ENV)
        if setting:
            key, value = setting[0].split("=", 1)
            env[key] = value
        binary = env.pop("BIN", os.path.join(REPO_ROOT, "target", "release", "kosmos-compare"))
        cmd = [binary, "--model", os.path.join(base, "model"), "--inputs", os.path.join(base, "inputs.safetensors"),
               "--serve", "--breakdown"]
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if not json.loads(procs[name].stdout.readline()).get("ready"):
            sys.exit(f"{name} did not start")
    results = {n: [] for n in procs}
    for r in range(repeats):
        for n, p in procs.items():
            p.stdin.write("run\n")
            p.stdin.flush()
            results[n].append(json.loads(p.stdout.readline()))
        print(r + 1, {n: round(v[-1]["decode_per_token_s"] * 1e3, 1) for n, v in results.items()}, flush=True)
    for p in procs.values():
        p.stdin.write("quit\n")
        p.stdin.flush()
        p.wait()
    for k in KEYS:
        print(k, "  ".join(f"{n}: median {statistics.median(x[k] for x in v) * 1e3:.1f} ms, "
                           f"min {min(x[k] for x in v) * 1e3:.1f} ms" for n, v in results.items()))


if __name__ == "__main__":
    main()
