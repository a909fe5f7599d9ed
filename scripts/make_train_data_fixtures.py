#!/usr/bin/env python3
"""Generate the GRIT-to-markup parity fixtures of the training data layer (kosmos-train).

Run from the repository root:

    .venv-ref/bin/python scripts/make_train_data_fixtures.py

Writes fixtures/train_data/:
  grit.jsonl     the raw GRIT-style records (caption, noun_chunks, ref_exps as
                 [start, end, x1, y1, x2, y2, score]), one per line, image "a.png"
  a.png          byte copy of fixtures/generate/images/a.png (40x32 RGB)
  cases.json     per record: the conversion settings (score_threshold, use_ref_exps), the phrases this script
                 kept, the tagged text and bboxes passed to transformers' Kosmos2Processor, the processor's prompt
                 string (preprocess_examples), and its input_ids / attention_mask / image_embeds_position_mask with
                 add_eos_token False and True
  meta.json      script path + SHA-256, versions, settings

The GRIT conversion below (convert()) is the documented rule of kosmos-train/src/data/grit.rs, written out simply:
threshold (score >= t), span grouping (several boxes per phrase, exact duplicate boxes dropped, group score = max),
overlap resolution (visit by score desc, start asc, end desc; drop a span overlapping an accepted one), clamping of
box coordinates to [0, 1], and `<phrase>` placed before the spaces preceding the span. Everything after it (image
block, <object>/<patch_index_*> tokens, tokenization, image-token replacement) is transformers' own
Kosmos2Processor.__call__ on the tiny tokenizer of fixtures/kosmos2/tokenizer (num_image_tokens=8 passed explicitly:
transformers ignores the key in processor_config.json).
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys

from PIL import Image

import transformers
from transformers import Kosmos2Processor

transformers.logging.set_verbosity_error()

_HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT_REL = "scripts/make_train_data_fixtures.py"
REPO_ROOT = os.path.dirname(_HERE)
OUT = os.path.join(REPO_ROOT, "fixtures", "train_data")
TOKENIZER_DIR = os.path.join(REPO_ROOT, "fixtures", "kosmos2", "tokenizer")
IMAGE_SRC = os.path.join(REPO_ROOT, "fixtures", "generate", "images", "a.png")
SIZE_LIMIT = 200 * 1024

with open(os.path.abspath(__file__), "rb") as _f:
    SCRIPT_SHA256 = hashlib.sha256(_f.read()).hexdigest()

VERSIONS = {
    "transformers": importlib.metadata.version("transformers"),
    "tokenizers": importlib.metadata.version("tokenizers"),
    "pillow": importlib.metadata.version("pillow"),
    "python": sys.version.split()[0],
}

NUM_IMAGE_TOKENS = 8

# Raw GRIT-style records. Spans are Python string indices (end exclusive); boxes normalised xyxy.
CAP1 = "A dog is sitting on the grass next to a red ball."
CAP2 = "Two people are riding horses on a beach."
CAP3 = "A man in a blue shirt is holding a small white dog."
CAP4 = "Un café près de la tour Eiffel, à Paris."
CAP5 = "The  cat sleeps on the sofa."
CAP6 = "A plain sentence without confident boxes."
CASES = [
    dict(name="basic", threshold=0.65, use_ref_exps=False, record=dict(
        caption=CAP1,
        noun_chunks=[[0, 5, 0.10, 0.20, 0.55, 0.80, 0.91],
                     [20, 29, 0.0, 0.6, 1.0, 1.0, 0.70],
                     [38, 48, 0.62, 0.55, 0.80, 0.75, 0.88],
                     [9, 16, 0.3, 0.3, 0.4, 0.4, 0.20]],          # below the threshold: dropped
        ref_exps=[[0, 48, 0.0, 0.0, 1.0, 1.0, 0.95]])),          # ignored (use_ref_exps off)
    dict(name="several_boxes_per_phrase", threshold=0.5, use_ref_exps=False, record=dict(
        caption=CAP2,
        noun_chunks=[[0, 10, 0.05, 0.10, 0.40, 0.90, 0.80],
                     [0, 10, 0.50, 0.12, 0.95, 0.88, 0.75],        # same span: second box of "Two people"
                     [22, 28, 0.0, 0.4, 0.5, 1.0, 0.66],
                     [22, 28, 0.5, 0.4, 1.0, 1.0, 0.40],           # same span but below the threshold
                     [22, 28, 0.0, 0.4, 0.5, 1.0, 0.90],           # exact duplicate box: kept once, score 0.90
                     [32, 39, 0.0, 0.7, 1.0, 1.0, 0.55]],
        ref_exps=[])),
    dict(name="overlaps_with_ref_exps", threshold=0.5, use_ref_exps=True, record=dict(
        caption=CAP3,
        noun_chunks=[[0, 5, 0.2, 0.1, 0.6, 0.9, 0.85],             # "A man"
                     [9, 21, 0.25, 0.3, 0.55, 0.6, 0.60],          # "a blue shirt"
                     [33, 50, 0.6, 0.5, 0.9, 0.9, 0.70],           # "a small white dog"
                     [41, 50, 0.62, 0.5, 0.9, 0.88, 0.90]],        # "white dog" nested, more confident: wins
        ref_exps=[[0, 21, 0.2, 0.1, 0.6, 0.9, 0.80],               # "A man in a blue shirt": loses to "A man"
                  [9, 21, 0.25, 0.3, 0.55, 0.6, 0.60],            # equal to the noun chunk: box deduplicated
                  [14, 33, 0.1, 0.1, 0.2, 0.2, 0.60]])),           # partial overlap with "a blue shirt": tie 0.60,
                                                                  # earlier start wins ("a blue shirt")
    dict(name="unicode_and_clamp", threshold=0.65, use_ref_exps=False, record=dict(
        caption=CAP4,
        noun_chunks=[[0, 7, -0.02, 0.1, 0.5, 0.6, 0.8],           # "Un café" at the start; x1 clamped to 0
                     [16, 30, 0.4, 0.0, 1.03, 0.95, 0.77],        # "la tour Eiffel" (after "près de "); x2 -> 1
                     [34, 39, 0.0, 0.0, 1.0, 1.0, 0.66]],         # "Paris" after "à "
        ref_exps=[])),
    dict(name="double_space_and_ties", threshold=0.3, use_ref_exps=False, record=dict(
        caption=CAP5,
        noun_chunks=[[5, 8, 0.1, 0.1, 0.9, 0.6, 0.5],             # "cat" after two spaces
                     [0, 8, 0.0, 0.0, 1.0, 1.0, 0.5],             # "The  cat": same score, same... start 0 wins
                     [19, 27, 0.0, 0.5, 1.0, 1.0, 0.3]],          # "the sofa", score == threshold: kept
        ref_exps=[])),
    dict(name="nothing_kept", threshold=0.65, use_ref_exps=False, record=dict(
        caption=CAP6,
        noun_chunks=[[0, 7, 0.1, 0.1, 0.5, 0.5, 0.4]],
        ref_exps=[])),
]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")


def convert(record, threshold, use_ref_exps):
    """GRIT record -> (tagged text, bboxes per phrase, kept phrases); the rule of kosmos-train's grit.rs."""
    cap = record["caption"]
    entries = list(record["noun_chunks"]) + (list(record["ref_exps"]) if use_ref_exps else [])
    groups = []
    for start, end, x1, y1, x2, y2, score in entries:
        if score < threshold:
            continue
        start, end = int(start), int(end)
        assert 0 <= start < end <= len(cap)
        box = tuple(min(max(float(v), 0.0), 1.0) for v in (x1, y1, x2, y2))
        assert box[2] > box[0] and box[3] > box[1]
        group = next((g for g in groups if g["span"] == (start, end)), None)
        if group is None:
            groups.append({"span": (start, end), "boxes": [box], "score": score})
        else:
            if box not in group["boxes"]:
                group["boxes"].append(box)
            group["score"] = max(group["score"], score)
    kept = []
    for g in sorted(groups, key=lambda g: (-g["score"], g["span"][0], -g["span"][1])):
        if all(not (g["span"][0] < k["span"][1] and k["span"][0] < g["span"][1]) for k in kept):
            kept.append(g)
    kept.sort(key=lambda g: g["span"][0])
    text, pos = "<grounding>", 0
    for g in kept:
        start, end = g["span"]
        while start > pos and cap[start - 1] == " ":
            start -= 1
        text += cap[pos:start] + "<phrase>" + cap[start:end] + "</phrase>"
        pos = end
    text += cap[pos:]
    return text, [g["boxes"] for g in kept], kept


def main():
    os.makedirs(OUT, exist_ok=True)
    shutil.copyfile(IMAGE_SRC, os.path.join(OUT, "a.png"))
    image = Image.open(os.path.join(OUT, "a.png")).convert("RGB")
    proc = Kosmos2Processor.from_pretrained(TOKENIZER_DIR)
    tok = proc.tokenizer

    with open(os.path.join(OUT, "grit.jsonl"), "w", encoding="utf-8") as f:
        for case in CASES:
            f.write(json.dumps(dict(image="a.png", **case["record"]), ensure_ascii=False) + "\n")

    out_cases = []
    for case in CASES:
        text, bboxes, kept = convert(case["record"], case["threshold"], case["use_ref_exps"])
        hf_bboxes = bboxes if bboxes else None
        prompt_string = proc.preprocess_examples(text, image, hf_bboxes, num_image_tokens=NUM_IMAGE_TOKENS)
        results = {}
        for add_eos in (False, True):
            enc = proc(images=image, text=text, bboxes=hf_bboxes, num_image_tokens=NUM_IMAGE_TOKENS,
                       add_eos_token=add_eos)
            results["eos" if add_eos else "no_eos"] = {
                "input_ids": [int(x) for x in enc["input_ids"]],
                "attention_mask": [int(x) for x in enc["attention_mask"]],
                "image_embeds_position_mask": [int(x) for x in enc["image_embeds_position_mask"]],
            }
        ids = results["eos"]["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert results["no_eos"]["input_ids"] == ids[:-1]
        out_cases.append({
            "name": case["name"],
            "line": len(out_cases) + 1,
            "score_threshold": case["threshold"],
            "use_ref_exps": case["use_ref_exps"],
            "record": case["record"],
            "kept_phrases": [{"span": list(g["span"]), "text": case["record"]["caption"][g["span"][0]:g["span"][1]],
                              "boxes": [list(b) for b in g["boxes"]], "score": g["score"]} for g in kept],
            "text": text,
            "bboxes": [[list(b) for b in bs] for bs in bboxes],
            "prompt_string": prompt_string,
            "tokens": tok.convert_ids_to_tokens(ids),
            **results,
        })
        print(f"[{case['name']}] {len(kept)} phrases, {len(ids)} ids: {text}")

    write_json(os.path.join(OUT, "cases.json"), {"num_image_tokens": NUM_IMAGE_TOKENS, "image": "a.png",
                                                  "cases": out_cases})
    write_json(os.path.join(OUT, "meta.json"), {
        "script": SCRIPT_REL,
        "script_sha256": SCRIPT_SHA256,
        "versions": VERSIONS,
        "config": {"num_image_tokens": NUM_IMAGE_TOKENS, "tokenizer": "fixtures/kosmos2/tokenizer"},
        "notes": "GRIT records -> tagged text + bboxes by this script's convert() (the documented rule of "
                 "kosmos-train/src/data/grit.rs); then transformers' Kosmos2Processor.from_pretrained("
                 "fixtures/kosmos2/tokenizer)(images=a.png, text, bboxes, num_image_tokens=8, "
                 "add_eos_token=False|True). Lists, not tensors (no return_tensors).",
        "files": {f: os.path.getsize(os.path.join(OUT, f)) for f in sorted(os.listdir(OUT)) if f != "meta.json"},
    })
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    assert total < SIZE_LIMIT, total
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
