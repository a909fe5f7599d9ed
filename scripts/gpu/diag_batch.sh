K=./target/release/kosmos; M=fixtures/generate/model; A=fixtures/generate/images/a.png; B=fixtures/generate/images/b.png
echo "want single: $(python3 -c "import json;print([c['generated_ids'] for c in json.load(open('fixtures/generate/cases.json'))['cases'] if c['name']=='greedy_single'])")"
echo "want batch : $(python3 -c "import json;print([c['generated_ids'] for c in json.load(open('fixtures/generate/cases.json'))['cases'] if c['name']=='greedy_batch_left'])")"
for att in explicit fused; do
  echo "== $att batch_left"; $K generate --model $M --image $A --image $B --prompt "<grounding>An image of" --prompt "A dog is sitting on the grass next to a red ball." --max-new-tokens 10 --json --device cuda --attention $att | python3 -c "import sys,json;print([json.loads(l)['token_ids'] for l in sys.stdin])"
  echo "== $att same-twice"; $K generate --model $M --image $A --image $A --prompt "<grounding>An image of" --max-new-tokens 12 --json --device cuda --attention $att | python3 -c "import sys,json;print([json.loads(l)['token_ids'] for l in sys.stdin])"
done
echo "== text-only batch of 2 unequal (fused)"; $K generate --model $M --prompt "A man in a blue shirt is holding" --prompt "A dog" --max-new-tokens 6 --json --device cuda | python3 -c "import sys,json;print([json.loads(l)['token_ids'] for l in sys.stdin])"
echo "== same on flex"; $K generate --model $M --prompt "A man in a blue shirt is holding" --prompt "A dog" --max-new-tokens 6 --json --device flex | python3 -c "import sys,json;print([json.loads(l)['token_ids'] for l in sys.stdin])"
