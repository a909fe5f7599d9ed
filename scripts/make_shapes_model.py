#!/usr/bin/env python3
"""The starting point of the shapes-world model (issue 7): a tiny KOSMOS-2 *architecture* with a
vocabulary made for the shapes world, written as a Hugging Face directory `assets/shapes/init/`.

`kosmos train` with `init = "scratch"` reads the architecture from `config.json` (MAGNETO
initialisation happens in Rust) and the tokenizer/processor files; no weights are stored here.

* Tokenizer: an XLM-R-style sentencepiece Unigram tokenizer (`<s> <pad> </s> <unk>`, pieces,
  `<mask>`) built with the `tokenizers` library, plus the KOSMOS-2 tag tokens and the 1,024
  location tokens that `Kosmos2Processor` adds. The pieces are every word of the shapes world's
  sentences (with the metaspace prefix `▁`) and every single character, so each word is one token
  and anything else still tokenizes (characters).
* Image processor: CLIP normalisation, images squashed to 64x64 (no crop).
* Architecture: vision 64x64 pixels, patch 8 (64 patches), width 96, 2 layers, 4 heads; text
  width 128, 4 layers, 4 heads, FFN 512, 256 positions; 16 latent queries. Patch 16 trained 30%
  faster per step but its 16 patches could not place the shapes (3.5% refexp accuracy after 1,000
  steps against 37.5% with patch 8); 64 latent queries (the real model's count) doubled the step.
  Two vision layers trained better in a 700-step run than 1, 3 or 4, or 3 layers of width 128 (and
  faster than 3): within 30 minutes the number of steps counts more than the tower's size.
  transformers' `Kosmos2Processor` writes 64 image slots whatever the model: set
  `processor.num_image_tokens = 16` to use this model there.

Run from the repository root with the reference venv (see ../shared/reference/REFERENCE_SETUP.md):

    .venv-ref/bin/python scripts/make_shapes_model.py
"""

import hashlib
import json
import os
import shutil

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, Kosmos2Config, Kosmos2Processor
from transformers.tokenization_utils_tokenizers import TokenizersBackend

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "assets", "shapes", "init")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

# Every word the generator (kosmos-train/src/shapes.rs) writes, and a few common ones.
WORDS = """An an A a image of small the The and left right top bottom above below Left means closer
to edge than sits Count shapes: one is painted circle square triangle diamond cross red green
blue yellow purple orange Question: Answer: What where which shape colour color it It""".split()
CHARS = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-()"))


def pieces():
    # Whole words first (higher score: one token per word), then punctuation attached to nothing,
    # then single characters (with and without the word-start marker) as the fallback.
    out = [("▁" + w, -2.0) for w in dict.fromkeys(WORDS)]
    out += [(c, -5.0) for c in ".,:;?!"]
    out += [("▁", -6.0)]
    out += [("▁" + c, -8.0) for c in CHARS] + [(c, -9.0) for c in CHARS if c not in ".,:;?!"]
    seen, unique = set(), []
    for p, s in out:
        if p not in seen:
            seen.add(p)
            unique.append((p, s))
    return unique


def tokenizer():
    vocab = [(s, 0.0) for s in SPECIALS] + pieces() + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS]
                           + [AddedToken("<mask>", lstrip=True, normalized=False, special=True)])
    return TokenizersBackend(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                             pad_token="<pad>", mask_token="<mask>", sep_token="</s>", cls_token="<s>")


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    images = CLIPImageProcessorPil(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64},
                                   do_center_crop=False)
    proc = Kosmos2Processor(images, tokenizer())
    proc.save_pretrained(OUT)
    proc.image_processor.save_pretrained(OUT)
    vocab = len(proc.tokenizer)
    config = Kosmos2Config(
        text_config=dict(vocab_size=vocab, max_position_embeddings=256, embed_dim=128, layers=4, ffn_dim=512,
                         attention_heads=4, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                         layerdrop=0.0, scale_embedding=True, use_cache=True, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=8, num_channels=3, dropout=0.0, attention_dropout=0.0),
        latent_query_num=16,
    )
    config.save_pretrained(OUT)
    # Checks: every word is one piece, location tokens are where the processor puts them.
    tok = proc.tokenizer
    for w in ["An image of a small red circle left of the blue square.", " the left green circle"]:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert 3 not in ids, (w, ids)
    assert tok.convert_tokens_to_ids("<patch_index_1023>") == vocab - 1
    with open(os.path.abspath(__file__), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    meta = {"script": "scripts/make_shapes_model.py", "script_sha256": sha, "vocab_size": vocab,
            "versions": {"transformers": transformers.__version__}}
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print("wrote", OUT, "vocab", vocab, sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
