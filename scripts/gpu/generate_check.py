#!/usr/bin/env python3
"""GPU check of generation (run on a lent GPU machine; stdlib only, no Rust toolchain needed).

Runs a prebuilt `kosmos` binary (built here with `--features kosmos-infer/cuda`) on the fixture
model with `--device cuda` for the greedy, left-padded batch and beam-search cases of
fixtures/generate/cases.json, and requires transformers' tokens. Also runs `--device flex` on the
same machine for a timing comparison. Usage:

    python3 scripts/gpu/generate_check.py target/release/kosmos [cuda|flex ...]
"""

import json
import subprocess
import sys
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/kosmos"
DEVICES = sys.argv[2:] or ["cuda", "flex"]
FX = "fixtures/generate"
cases = {c["name"]: c for c in json.load(open(f"{FX}/cases.json"))["cases"]}

RUNS = [
    ("greedy_single", ["--image", f"{FX}/images/a.png", "--prompt", "<grounding>An image of", "--max-new-tokens", "12"]),
    (
        "greedy_batch_left",
        [
            "--image", f"{FX}/images/a.png", "--image", f"{FX}/images/b.png",
            "--prompt", "<grounding>An image of", "--prompt", "A dog is sitting on the grass next to a red ball.",
            "--max-new-tokens", "10",
        ],
    ),
    ("beam3", ["--image", f"{FX}/images/a.png", "--prompt", "<grounding>An image of", "--max-new-tokens", "10", "--num-beams", "3"]),
]

failures = 0
for device in DEVICES:
    for name, args in RUNS:
        cmd = [BIN, "generate", "--model", f"{FX}/model", "--json", "--device", device] + args
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if p.returncode != 0:
            print(f"FAIL {device} {name}: {p.stderr.strip()}")
            failures += 1
            continue
        got = [json.loads(line)["token_ids"] for line in p.stdout.splitlines()]
        want = cases[name]["generated_ids"]
        timings = [json.loads(line)["timings"] for line in p.stdout.splitlines()]
        ok = got == want
        failures += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {device:5s} {name:18s} tokens={'equal' if ok else got} wall={wall:.2f}s "
              f"prefill={timings[0]['prefill_ms']:.1f}ms decode={timings[0]['decode_ms']:.1f}ms")
print("generate_check:", "passed" if failures == 0 else f"{failures} failed")
sys.exit(1 if failures else 0)
