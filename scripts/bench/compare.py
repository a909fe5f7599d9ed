#!/usr/bin/env python3
"""KOSMOS-2 on this project against transformers, same random weights, same inputs, same machine.

Run from the repository root, after building the Rust half:

    cargo build --release -p kosmos-benches --bins
    .venv-ref/bin/python scripts/bench/compare.py [--config medium|full] [--repeats 5] [--devices flex,ndarray]

What it does:

1. Builds the model configuration with transformers' own `Kosmos2Config` (medium: text 512 wide, 6 layers, 8 heads,
   FFN 2048, vocabulary 65,037, 2,048 positions; vision 256 wide, 4 layers, 8 heads, intermediate 1,024, 224 pixels,
   patch 14; 64 latent queries. full: the released KOSMOS-2 sizes, the class defaults), random-initialises
   `Kosmos2ForConditionalGeneration` with a fixed seed and saves it once with `save_pretrained(safe_serialization=True)`
   under `target/bench-compare/<config>/model` (outside git; reused while its `meta.json` matches), plus the inputs
   (`inputs.safetensors`: `<s> <image>` 64 image slots `</image>` and 30 random text ids = 97 tokens, batch 1, and a
   random 224x224 image in pixel space) that both sides read.
2. Loads the weights in transformers (PyTorch, 2 intra-op threads, `torch.inference_mode`) and starts
   `kosmos-compare --serve` once per `--devices` entry (each loads the same files and warms up once).
3. Alternates, repeat by repeat: transformers eager, transformers sdpa (the same model, switched with
   `set_attn_implementation`), then ours on each device; one warm-up repeat of the reference first.
   Each repeat times:
   - vision forward: vision tower + projection (`get_image_features`, our `image_embeds`);
   - forward: `model(...)` with logits at every position;
   - time to first token: `generate()` from its call to the first logits (vision + prefill);
   - decode per token: greedy with the KV cache, `max_new_tokens = min_new_tokens = 32` (EOS blocked, so both sides
     decode every step), (time of the last logits - time of the first) / 31, stamped by a logits processor on the
     reference side and by our `generate()` timings on ours;
   - with `--breakdown`: the text decoder alone on the prompt, the LM head over every position and over the last one,
     and one cached decode step split into decoder and head.
   With `--weights f32,bf16,q8` each of our processes also times models whose decoder projections and head have
   reduced-precision copies for decode steps (`Kosmos2::pack_weights`; they share the f32 weights), and reports each
   mode's accuracy against our f32 (teacher-forced logits over the greedy steps, argmax agreement, own greedy tokens).
   With `--torch-dtypes float32,bfloat16` a second copy of the reference model in bfloat16 is timed too (its columns
   end in "bf16"; its last-position logits and greedy tokens are reported against float32 eager, not required to
   match): on a GPU, the reduced-precision mode users run there.
4. Measures the machine's memory read rate with `kosmos-bandwidth` (2 GiB summed by `--threads` threads, best of 5)
   before loading the models and after the timings, and prints it with the floor it puts under a decode step
   (the decoder's projections and the head read once per token, in f32, bf16 and Q8): the VM's read rate drifts by
   a factor of up to 2 over hours, so a table is only comparable with the rate it was measured at. It is measured
   on 4 KiB pages and on 2 MiB pages (`--huge-pages`), and each implementation's floor uses the page size its
   weights sit on: ours moves its weights to 2 MiB pages at load (`kosmos_core::memory`; `--no-huge-pages` keeps
   4 KiB pages); transformers maps the safetensors file and reads its weights from the page cache, which the kernel
   holds in folios of whatever size it chose when the file was read (`FilePmdMapped` counts the 2 MiB ones: 0.65 of
   6.7 GB on 2026-11-29, 4.97 GB the night before; PyTorch's `THP_MEM_ALLOC_ENABLE=1` does not apply to a file
   mapping). The report states how many bytes of each process are mapped by huge pages (the reference's after its
   warm-up, when the mapping has been read), and an implementation counts as on 2 MiB pages when more than half of
   the f32 weights' bytes are.
5. Checks that every f32 implementation and repeat produced the same greedy tokens (f32 parity), prints a markdown
   table of medians with the ratio reference / ours (> 1: ours is faster), the date, CPU model, thread count and
   versions (also the minimum of each column: under load some repeats are much slower), and writes every timing,
   with the 1-minute load average at each repeat, to `target/bench-compare/<config>/results.json`. Exits 1 when
   tokens or logits differ.

Steadiness: the VM has bursts of slowness, hence the alternation and medians; glibc's `MALLOC_MMAP_THRESHOLD_` and
`MALLOC_TRIM_THRESHOLD_` (set here by re-executing the script, so PyTorch and our binary both run under them)
steadied PyTorch's numbers. Our binary runs with `RAYON_NUM_THREADS` equal to `--threads`.

The full configuration holds about 6.6 GB of f32 weights per copy (one in PyTorch, one per `--devices` entry) and
takes minutes per repeat on two cores.
"""

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    # glibc reads these at start-up: run the script again under them.
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import transformers  # noqa: E402
from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration, LogitsProcessor, LogitsProcessorList  # noqa: E402

transformers.logging.set_verbosity_error()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT_VERSION = 1  # bump when the model or inputs below change

CONFIGS = {
    "medium": dict(
        text=dict(vocab_size=65037, embed_dim=512, layers=6, attention_heads=8, ffn_dim=2048,
                  max_position_embeddings=2048),
        vision=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024,
                    image_size=224, patch_size=14),
    ),
    # The released microsoft/kosmos-2-patch14-224 sizes (transformers' defaults).
    "full": dict(text=dict(), vision=dict()),
}
LATENTS = 64
TEXT_TOKENS = 30  # plus <s>, <image>, </image>: 33 text tokens, 97 in all
BOS, BOI, EOI = 0, 64003, 64004
LOGITS_CHECKED = 16  # first logits of the last position compared between implementations
LOGITS_TOLERANCE = 1e-3


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (at least 5)")
    p.add_argument("--devices", default="flex", help="our backends, comma-separated (flex, ndarray)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-device", default="cpu", help="where transformers runs: cpu or cuda (then compare "
                   "with `--devices cuda`; timings synchronise the GPU)")
    p.add_argument("--torch-dtypes", default="float32", help="transformers' weight types, comma-separated: "
                   "float32, bfloat16 (bfloat16: a second copy of the model, reported against float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", choices=["fused", "explicit"], default="fused", help="our attention kernel")
    p.add_argument("--breakdown", action="store_true", help="also time decoder and head apart")
    p.add_argument("--weights", default="f32", help="our weight modes, comma-separated: f32, bf16, q8 (bf16/q8: "
                   "packed copies of the decoder's projections and the head for decode steps)")
    p.add_argument("--no-huge-pages", action="store_true", help="run ours with KOSMOS_HUGE_PAGES=0 (weights on "
                   "4 KiB pages; by default they are moved to 2 MiB pages at load, `kosmos_core::memory`)")
    p.add_argument("--binary", default=None,
                   help="kosmos-compare binary (default: $CARGO_TARGET_DIR or target, release/kosmos-compare)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "target", "bench-compare"))
    a = p.parse_args()
    if a.repeats < 1 or a.new_tokens < 2:
        p.error("--repeats must be >= 1 and --new-tokens >= 2")
    a.torch_dtypes = [d.strip() for d in a.torch_dtypes.split(",") if d.strip()]
    if "float32" not in a.torch_dtypes or any(d not in TORCH_DTYPES for d in a.torch_dtypes):
        p.error(f"--torch-dtypes takes float32 and optionally bfloat16, got {a.torch_dtypes}")
    if a.torch_device != "cpu" and a.breakdown:
        p.error("--breakdown times transformers on the CPU only")
    return a


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------------------------
# model and inputs, written once
# ------------------------------------------------------------------------------------------------------------------
def model_config(name):
    c = CONFIGS[name]
    text = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **c["text"])
    return Kosmos2Config(text_config=text, vision_config=dict(c["vision"]), latent_query_num=LATENTS)


def prepare(args):
    base = os.path.join(args.out, args.config)
    model_dir = os.path.join(base, "model")
    inputs_path = os.path.join(base, "inputs.safetensors")
    meta_path = os.path.join(base, "meta.json")
    meta = dict(version=SCRIPT_VERSION, config=args.config, seed=args.seed, sizes=CONFIGS[args.config],
                transformers=importlib.metadata.version("transformers"))
    if os.path.isfile(meta_path) and os.path.isfile(inputs_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                return model_dir, inputs_path
    os.makedirs(base, exist_ok=True)
    print(f"writing random weights to {model_dir} ...", file=sys.stderr)
    torch.manual_seed(args.seed)
    model = Kosmos2ForConditionalGeneration(model_config(args.config)).eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    g = torch.Generator().manual_seed(args.seed + 1)
    image = model_config(args.config).vision_config.image_size
    slots = torch.arange(4, 4 + LATENTS)  # any non-pad ids: their embeddings are replaced by the image's
    text = torch.randint(5, 64000, (TEXT_TOKENS,), generator=g)
    ids = torch.cat([torch.tensor([BOS, BOI]), slots, torch.tensor([EOI]), text]).unsqueeze(0).to(torch.int64)
    mask = torch.zeros_like(ids)
    mask[0, 2:2 + LATENTS] = 1
    save_file({
        "input_ids": ids.contiguous(),
        "attention_mask": torch.ones_like(ids),
        "image_embeds_position_mask": mask,
        # CLIP-normalised pixels are roughly N(0, 1)
        "pixel_values": torch.randn((1, 3, image, image), generator=g).contiguous(),
    }, inputs_path)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return model_dir, inputs_path


# ------------------------------------------------------------------------------------------------------------------
# the reference
# ------------------------------------------------------------------------------------------------------------------
def now_synced():
    """`time.perf_counter()` after the GPU (if any) finished its queued work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


HUGE_KEYS = ("AnonHugePages:", "ShmemPmdMapped:", "FilePmdMapped:")


def huge_page_bytes():
    """Bytes of this process mapped by 2 MiB pages, or None off Linux: anonymous memory (`AnonHugePages`) and files
    (`FilePmdMapped`: transformers maps the safetensors file, whose page cache the kernel may hold in 2 MiB folios)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(HUGE_KEYS))
    except OSError:
        return None


class Stamp(LogitsProcessor):
    """Records when each step's logits reach the logits processors (and changes nothing)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(now_synced())
        return scores


# transformers' weight types (`--torch-dtypes`) and the suffix of their columns.
TORCH_DTYPES = {"float32": (torch.float32, ""), "bfloat16": (torch.bfloat16, " bf16")}


class Reference:
    def __init__(self, model_dir, inputs, new_tokens, breakdown, device="cpu", dtype="float32"):
        self.model = Kosmos2ForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager")
        self.model = self.model.to(device=device, dtype=TORCH_DTYPES[dtype][0]).eval()
        self.inputs = {k: v.to(device=device, dtype=TORCH_DTYPES[dtype][0]) if v.is_floating_point() else v.to(device)
                       for k, v in inputs.items()}
        self.new_tokens = new_tokens
        self.breakdown = breakdown

    def repeat(self, attn):
        m, x, n = self.model, self.inputs, self.new_tokens
        m.set_attn_implementation(attn)
        rec = {}
        with torch.inference_mode():
            t = now_synced()
            embeds = m.get_image_features(x["pixel_values"]).pooler_output
            rec["vision_s"] = now_synced() - t

            t = now_synced()
            out = m(**x)
            rec["forward_s"] = now_synced() - t
            assert out.logits.shape[1] == x["input_ids"].shape[1]
            rec["last_logits_head"] = out.logits[0, -1, :LOGITS_CHECKED].tolist()
            del out

            stamp = Stamp()
            t = now_synced()
            seq = m.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                             logits_processor=LogitsProcessorList([stamp]))
            if len(stamp.times) != n:
                fail(f"transformers ran {len(stamp.times)} decode steps, expected {n}")
            rec["ttft_s"] = stamp.times[0] - t
            rec["decode_per_token_s"] = (stamp.times[-1] - stamp.times[0]) / (n - 1)
            rec["decode_steps"] = n - 1
            rec["tokens"] = seq[0, x["input_ids"].shape[1]:].tolist()

            if self.breakdown:
                rec.update(self.parts(embeds))
        return rec

    def parts(self, embeds):
        m, x, n = self.model, self.inputs, self.new_tokens
        text, head = m.text_model.model, m.text_model.lm_head
        args = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], image_embeds=embeds,
                    image_embeds_position_mask=x["image_embeds_position_mask"])
        rec = {}
        t = time.perf_counter()
        hidden = text(**args, use_cache=False).last_hidden_state
        rec["decoder_prompt_s"] = time.perf_counter() - t
        t = time.perf_counter()
        head(hidden)
        rec["head_all_s"] = time.perf_counter() - t
        t = time.perf_counter()
        head(hidden[:, -1:])
        rec["head_last_s"] = time.perf_counter() - t
        out = text(**args, use_cache=True)
        cache = out.past_key_values
        length = x["input_ids"].shape[1]
        dec = hd = 0.0
        steps = n - 1
        for step in range(steps):
            ids = torch.tensor([[4]])
            mask = torch.ones((1, length + step + 1), dtype=torch.int64)
            t = time.perf_counter()
            h = text(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
            dec += time.perf_counter() - t
            t = time.perf_counter()
            head(h[:, -1:]).tolist()
            hd += time.perf_counter() - t
        rec["step_decoder_s"] = dec / steps
        rec["step_head_s"] = hd / steps
        return rec


# ------------------------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, binary, device, model_dir, inputs_path, args):
        cmd = [binary, "--model", model_dir, "--inputs", inputs_path, "--device", device, "--new-tokens",
               str(args.new_tokens), "--attention", args.attention, "--serve", "--weights", args.weights]
        if args.breakdown:
            cmd.append("--breakdown")
        env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads)}
        if args.no_huge_pages:
            env["KOSMOS_HUGE_PAGES"] = "0"
        self.device = device
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.header = self.read()
        if not self.header.get("ready"):
            fail(f"kosmos-compare ({device}) did not start: {self.header}")

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            fail(f"kosmos-compare ({self.device}) exited with status {code} (its error is above)")
        return json.loads(line)

    def repeat(self, mode="f32"):
        self.proc.stdin.write(f"run {mode}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------
ROWS = [("vision_s", "vision forward"), ("forward_s", "forward (logits at every position)"),
        ("ttft_s", "time to first token"), ("decode_per_token_s", "decode per token")]
PART_ROWS = [("decoder_prompt_s", "text decoder alone, 97-token prompt"),
             ("head_all_s", "LM head, every position (97 x 65,037)"), ("head_last_s", "LM head, last position"),
             ("head_all_transposed_s", "LM head, every position, weight stored [embed, vocab]"),
             ("head_last_transposed_s", "LM head, last position, weight stored [embed, vocab]"),
             ("step_decoder_s", "decode step: decoder (1 cached token)"),
             ("step_head_s", "decode step: head + logits to host")]


def fmt(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def medians(runs, key, stat=statistics.median):
    values = [r[key] for r in runs if key in r]
    return stat(values) if values else None


def table(results, names, rows, stat=statistics.median):
    refs = [n for n in names if n.startswith("transformers")]
    ours = [n for n in names if not n.startswith("transformers")]
    short = lambda n: n.removeprefix("transformers ").removeprefix("ours ")  # noqa: E731
    head = names + [f"{short(r)} / {short(o)}" for o in ours for r in refs]
    lines = ["| | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
    for key, label in rows:
        med = {n: medians(results[n], key, stat) for n in names}
        cells = [fmt(med[n]) if med[n] is not None else "-" for n in names]
        cells += [f"{med[r] / med[o]:.2f}x" if med[r] and med[o] else "-" for o in ours for r in refs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAGES = {"4k": [], "2m": ["--huge-pages"]}  # kosmos-bandwidth's arguments for each page size


def read_rate(binary, threads):
    """The machine's memory read rate in GB/s (best of 5 passes over 2 GiB) on 4 KiB and on 2 MiB pages, as
    {"4k": rate, "2m": rate} (a page size that could not be measured is left out), or None without the binary (or
    with `binary` None)."""
    if binary is None:
        return None
    if not os.access(binary, os.X_OK):
        print(f"note: `{binary}` not found, no read rate measured (cargo build --release -p kosmos-benches --bins)",
              file=sys.stderr)
        return None
    rates = {}
    for pages, extra in PAGES.items():
        out = subprocess.run([binary, "--threads", str(threads)] + extra, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"note: kosmos-bandwidth {' '.join(extra)} failed: {out.stderr.strip()}", file=sys.stderr)
            continue
        rates[pages] = json.loads(out.stdout)["best_gb_s"]
    return rates or None


# Bytes per weight read by a decode step in each mode (Q8: one byte plus an f32 scale per 32 weights).
BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "q8": 1.125}


def decode_weights(config):
    """Weights a decode step reads once: every decoder layer's four attention projections and two FFN matrices,
    and the head (tied to the token embeddings); biases and norms are left out (below 0.1 %)."""
    t = model_config(config).text_config
    return t.layers * (4 * t.embed_dim ** 2 + 2 * t.embed_dim * t.ffn_dim) + t.vocab_size * t.embed_dim


PAGE_NAMES = {"4k": "4 KiB", "2m": "2 MiB"}


def roofline(config, before, after, results, names, pages):
    """Lines stating the read rate on each page size and the decode floor it implies, against each implementation's
    median; `pages[name]` is the page size that implementation's weights sit on ("4k" or "2m")."""
    if before is None and after is None:
        return "\n(memory read rate not measured: no kosmos-bandwidth binary, or a GPU run)"
    rates = {}
    for side in (before, after):
        for p, r in (side or {}).items():
            rates[p] = max(rates.get(p, 0.0), r)
    fmt_rate = lambda side, p: "n/a" if not side or p not in side else f"{side[p]:.1f}"  # noqa: E731
    weights = decode_weights(config)
    measured_pages = ", ".join(f"{PAGE_NAMES[p]} pages {fmt_rate(before, p)} GB/s before, {fmt_rate(after, p)} GB/s "
                               f"after" for p in PAGES)
    lines = [f"\nMemory read rate (kosmos-bandwidth, best of 5 passes over 2 GiB): {measured_pages}. A decode step "
             f"reads {weights / 1e6:.0f} M weights once; at the best rate of the page size an implementation's weights "
             f"sit on, no implementation decodes a token faster than:\n",
             "| decode floor | pages | per token | median measured | share of the floor |",
             "| --- | --- | --- | --- | --- |"]
    for n in names:
        mode = n.split()[-1] if n.split()[-1] in BYTES_PER_WEIGHT else "f32"
        p = pages.get(n, "4k")
        if p not in rates:
            p = next(iter(rates))
        floor = weights * BYTES_PER_WEIGHT[mode] / (rates[p] * 1e9)
        measured = statistics.median(r["decode_per_token_s"] for r in results[n])
        lines.append(f"| {n} | {PAGE_NAMES[p]} | {fmt(floor)} | {fmt(measured)} | {100 * floor / measured:.0f} % |")
    return "\n".join(lines)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_commit():
    try:
        return subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main():
    args = parse_args()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO_ROOT, "target"))
    binary = args.binary or os.path.join(target, "release", "kosmos-compare")
    if not os.access(binary, os.X_OK):
        fail(f"`{binary}` not found: build it with `cargo build --release -p kosmos-benches --bins`")
    # The host's read rate bounds a CPU decode step only; on a GPU it is not measured.
    bandwidth_binary = os.path.join(os.path.dirname(binary), "kosmos-bandwidth") if args.torch_device == "cpu" else None
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model_dir, inputs_path = prepare(args)
    rate_before = read_rate(bandwidth_binary, args.threads)
    from safetensors.torch import load_file
    inputs = load_file(inputs_path)
    refs = {dtype: Reference(model_dir, inputs, args.new_tokens, args.breakdown, args.torch_device, dtype)
            for dtype in args.torch_dtypes}
    ref_names = {(attn, dtype): f"transformers {attn}{TORCH_DTYPES[dtype][1]}" for dtype in args.torch_dtypes
                 for attn in ("eager", "sdpa")}
    ours = {}
    for d in devices:
        print(f"loading ours on {d} ...", file=sys.stderr)
        ours[d] = Ours(binary, d, model_dir, inputs_path, args)
    for (attn, dtype) in ref_names:
        refs[dtype].repeat(attn)  # warm-up
    # The reference's weights are this process's memory; measured after the warm-up, as a file
    # mapping's pages are mapped as they are first read.
    ref_huge = huge_page_bytes()

    load_before = os.getloadavg()[0]
    modes = [m.strip() for m in args.weights.split(",") if m.strip()]
    ours_names = {(d, m): f"ours {d}" if m == "f32" else f"ours {d} {m}" for d in devices for m in modes}
    names = list(ref_names.values()) + list(ours_names.values())
    results = {n: [] for n in names}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
        load = os.getloadavg()[0]
        for (attn, dtype), n in ref_names.items():
            results[n].append(refs[dtype].repeat(attn))
        for (d, m), n in ours_names.items():
            results[n].append(ours[d].repeat(m))
        for n in names:
            results[n][-1]["load_average"] = load
    for o in ours.values():
        o.close()
    rate_after = read_rate(bandwidth_binary, args.threads)

    # f32 parity: only the f32 implementations must give transformers' tokens and logits; the packed
    # modes (bf16, q8) are reported against f32 below.
    packed = {n for (d, m), n in ours_names.items() if m != "f32"}
    packed |= {n for (attn, dtype), n in ref_names.items() if dtype != "float32"}
    exact = [n for n in names if n not in packed]
    reference_tokens = results["transformers eager"][0]["tokens"]
    mismatches = [(n, i) for n in exact for i, r in enumerate(results[n]) if r["tokens"] != reference_tokens]
    reference_logits = results["transformers eager"][0]["last_logits_head"]
    logits_diff = max(abs(a - b) for n in exact for r in results[n]
                      for a, b in zip(r["last_logits_head"], reference_logits))

    load_after = os.getloadavg()[0]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = (f"torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}, "
                f"python {platform.python_version()}")
    if args.torch_device != "cpu":
        versions += f"; transformers on {torch.cuda.get_device_name()}"
    print(f"\n## KOSMOS-2 {args.config} against transformers, {now}\n")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {args.threads} threads on each side "
          f"(torch.set_num_threads, RAYON_NUM_THREADS); 1-minute load average {load_before:.1f} before, "
          f"{load_after:.1f} after")
    print(f"- versions: {versions}; kosmos-burn {git_commit()}, attention `{args.attention}`")
    print(f"- batch 1, 97-token prompt (64 image slots + 33 text tokens), {args.new_tokens} greedy tokens, f32; "
          f"medians of {args.repeats} alternating repeats; ratio > 1: ours is faster\n")
    print(table(results, names, ROWS))
    # Which page size each implementation's weights sit on: most of its bytes on huge pages, or not.
    weight_bytes = decode_weights(args.config) * 4
    huge = {n: ref_huge for n in ref_names.values()}
    huge.update({n: ours[d].header.get("huge_page_bytes") for (d, m), n in ours_names.items()})
    pages = {n: "2m" if (b or 0) > weight_bytes / 2 else "4k" for n, b in huge.items()}
    print(roofline(args.config, rate_before, rate_after, results, names, pages))
    print("\nMemory on 2 MiB pages after loading: " + "; ".join(
        f"{n} {'n/a' if b is None else f'{b / 1e9:.2f} GB'}" for n, b in huge.items()) +
        f" (the f32 weights a decode step reads: {weight_bytes / 1e9:.2f} GB)")
    print(f"\nBest of {args.repeats} (minimum; other processes on the machine slow some repeats, PyTorch's OpenMP "
          f"threads most):\n")
    print(table(results, names, ROWS, min))
    if args.breakdown:
        print("\nWhere the time goes (medians):\n")
        print(table(results, names, PART_ROWS))
    print(f"\nlast-position logits (first {LOGITS_CHECKED}): max |difference| to transformers eager "
          f"{logits_diff:.2e} (tolerance {LOGITS_TOLERANCE:g})")
    if logits_diff > LOGITS_TOLERANCE:
        mismatches.append(("logits", 0))
    if mismatches and mismatches[0][0] != "logits":
        n, i = mismatches[0]
        print(f"greedy tokens DIFFER: {n} repeat {i + 1} gave {results[n][i]['tokens']}, "
              f"transformers eager gave {reference_tokens}")
    elif not mismatches:
        print(f"greedy tokens: identical for every f32 implementation and repeat ({len(reference_tokens)} tokens: "
              f"{reference_tokens[:8]}...)")
    for d in devices:
        for m, acc in ours[d].header.get("accuracy", {}).items():
            tokens = results[ours_names[(d, m)]][0]["tokens"]
            same = sum(a == b for a, b in zip(tokens, reference_tokens))
            print(f"{m} weights ({d}) against our f32, teacher-forced over {acc['steps']} steps: logits max |diff| "
                  f"{acc['max_abs_logit_diff']:.3g} (largest |logit| {acc['max_abs_logit']:.3g}, relative RMS "
                  f"{acc['relative_rms_logit_diff']:.2e}), argmax agrees at {acc['forced_argmax_agree']}/{acc['steps']} "
                  f"steps; free-running greedy tokens: {acc['greedy_same_prefix']} identical before the first "
                  f"difference, {same}/{len(tokens)} equal to transformers' f32 tokens")
    for (attn, dtype), n in ref_names.items():
        if dtype == "float32":
            continue
        tokens = results[n][0]["tokens"]
        same = sum(a == b for a, b in zip(tokens, reference_tokens))
        diff = max(abs(a - b) for r in results[n] for a, b in zip(r["last_logits_head"], reference_logits))
        print(f"{n} against transformers eager (float32): last-position logits (first {LOGITS_CHECKED}) max |diff| "
              f"{diff:.3g}; greedy tokens {same}/{len(tokens)} equal")

    out_path = os.path.join(args.out, args.config, "results.json")
    with open(out_path, "w") as f:
        json.dump(dict(date=now, cpu=cpu_model(), load=[load_before, load_after],
                       read_rate_gb_s=[rate_before, rate_after], huge_page_bytes=huge, threads=args.threads, versions=versions, commit=git_commit(),
                       args=vars(args), ours=[o.header for o in ours.values()], results=results), f, indent=1)
    print(f"\n(all timings: {os.path.relpath(out_path, REPO_ROOT)})")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
