#!/usr/bin/env python3
"""Check that a model directory exported by this project (`Kosmos2::save_pretrained`, the
trainer's `output_dir/final/`) loads in transformers and computes what the Rust side computes.

1. `Kosmos2ForConditionalGeneration.from_pretrained(DIR, output_loading_info=True)` must report no
   missing, unexpected or mismatched keys.
2. Greedy decoding on an image and prompt: `kosmos generate --model DIR --image IMG --prompt P
   --json` must give the token ids transformers' `generate()` gives (eager attention). The
   smallest top-two logit gap over the steps is printed, so a near-tie cannot decide it.

Usage (from the repository root, with the reference venv of REFERENCE_SETUP.md):

    .venv-ref/bin/python scripts/check/hf_export.py DIR IMAGE "PROMPT" KOSMOS_BINARY [MAX_NEW_TOKENS]
"""

import json
import subprocess
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

model_dir, image_path, prompt, binary = sys.argv[1:5]
max_new = int(sys.argv[5]) if len(sys.argv) > 5 else 8

model, info = Kosmos2ForConditionalGeneration.from_pretrained(
    model_dir, output_loading_info=True, attn_implementation="eager"
)
problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
    {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
)
print("loading info:", {k: len(v) for k, v in info.items()})
if problems:
    print("FAIL: loading problems", problems)
    sys.exit(1)
model.eval()
processor = AutoProcessor.from_pretrained(model_dir)
# transformers' processor always writes 64 image slots (processor_config.json's num_image_tokens
# is not read); tiny models have fewer latent queries.
processor.num_image_tokens = model.config.latent_query_num
image = Image.open(image_path).convert("RGB")
inputs = processor(text=prompt, images=image, return_tensors="pt")
with torch.no_grad():
    out = model.generate(
        pixel_values=inputs["pixel_values"],
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        image_embeds_position_mask=inputs["image_embeds_position_mask"],
        max_new_tokens=max_new,
        do_sample=False,
        num_beams=1,
        output_scores=True,
        return_dict_in_generate=True,
    )
ref_tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
gaps = []
for s in out.scores:
    top = torch.topk(s[0], 2).values
    gaps.append(float(top[0] - top[1]))
rust = subprocess.run(
    [binary, "generate", "--model", model_dir, "--image", image_path, "--prompt", prompt,
     "--max-new-tokens", str(max_new), "--json", "--attention", "explicit"],
    capture_output=True, text=True,
)
if rust.returncode != 0:
    print("FAIL: kosmos:", rust.stderr.strip())
    sys.exit(1)
ours = json.loads(rust.stdout.splitlines()[0])["token_ids"]
print("transformers:", ref_tokens)
print("kosmos:      ", ours)
print("smallest top-two gap: %.4g" % min(gaps))
if ours != ref_tokens:
    print("FAIL: tokens differ")
    sys.exit(1)
print("OK")
