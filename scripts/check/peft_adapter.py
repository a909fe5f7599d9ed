#!/usr/bin/env python3
"""Check that a LoRA adapter written by this project (`Kosmos2::save_peft_adapter`, the trainer's
`output_dir/final/adapter/` of a `[lora]` run) loads in PEFT and computes what the merged export
(`output_dir/final/`) computes.

1. `PeftModel.from_pretrained(base, ADAPTER)` on `Kosmos2ForConditionalGeneration` must load every
   adapter tensor (no missing or unexpected adapter keys).
2. PEFT's own `merge_and_unload()` gives exactly the weights of the merged directory written by
   Rust (`output_dir/final/`).
3. The logits of base + adapter (PEFT, unmerged) on a fixed prompt equal those of the merged
   directory, loaded by transformers, within 1e-4 (merging rounds once per weight; PEFT's own
   merge moves them as much).

Usage (from the repository root, with the reference venv and PEFT, see make_lora_fixtures.py):

    .venv-ref/bin/python scripts/check/peft_adapter.py BASE_DIR ADAPTER_DIR MERGED_DIR
"""

import sys

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import Kosmos2ForConditionalGeneration

base_dir, adapter_dir, merged_dir = sys.argv[1:4]
torch.set_grad_enabled(False)
base = Kosmos2ForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager").eval()
model = PeftModel.from_pretrained(base, adapter_dir).eval()

with safe_open(f"{adapter_dir}/adapter_model.safetensors", "pt") as f:
    saved = {k: f.get_tensor(k) for k in f.keys()}
state = model.state_dict()
missing = []
for key, value in saved.items():
    live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
    if live not in state or not torch.equal(state[live], value):
        missing.append(key)
print(f"{len(saved)} adapter tensors in the file; {len(saved) - len(missing)} loaded exactly")
if missing:
    print("FAIL: not loaded", missing[:5])
    sys.exit(1)

merged = Kosmos2ForConditionalGeneration.from_pretrained(merged_dir, attn_implementation="eager").eval()
ids = torch.tensor([[0, 7, 11, 4, 9, 13, 21, 2]])
# The text model alone (the full model requires an image); the adapters of a text-tower run sit there.
a = model.base_model.model.text_model(input_ids=ids).logits
b = merged.text_model(input_ids=ids).logits
diff = (a - b).abs().max().item()
print(f"max |PEFT(base + adapter) - merged export| = {diff:.3e} (max |logit| {a.abs().max().item():.3f})")
peft_merged = PeftModel.from_pretrained(
    Kosmos2ForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager").eval(), adapter_dir
).merge_and_unload().state_dict()
ours = merged.state_dict()
weight_diff = max((peft_merged[k] - ours[k]).abs().max().item() for k in ours)
print(f"max |PEFT merge_and_unload - merged export| over the weights = {weight_diff:.3e}")
if diff > 1e-4 or weight_diff != 0.0:
    print("FAIL")
    sys.exit(1)
print("OK")
