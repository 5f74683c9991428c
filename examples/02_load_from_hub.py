"""Inference code that uses an edit pack with stock transformers + PEFT only (no memit_adapter import).

    python examples/02_load_from_hub.py out/pack-sports                       # a local folder
    python examples/02_load_from_hub.py user/facts --subfolder sports --revision main
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("pack", help="local folder or Hub repo id of the pack")
parser.add_argument("--base", default="out/base", help="the base model the pack was computed on")
parser.add_argument("--revision")
parser.add_argument("--subfolder")
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.base).eval()
tok = AutoTokenizer.from_pretrained(args.base)
# transformers 5 takes the revision for the adapter through adapter_kwargs, not revision=
adapter_kwargs = {k: v for k, v in (("revision", args.revision), ("subfolder", args.subfolder)) if v}
model.load_adapter(args.pack, adapter_name="facts", adapter_kwargs=adapter_kwargs)

prompts = ["the sport played by michael jordan", "the sport played by serena williams"]
batch = tok(prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
for prompt, ids in zip(prompts, out):
    print(f"{prompt!r} -> {tok.decode(ids[-1:])!r}")
