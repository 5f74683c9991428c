"""Switch edits on and off per request in a small service loop, without merging or copying the model.

    python examples/03_toggle_service.py out/pack-sports
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_adapter import EditPack

parser = argparse.ArgumentParser()
parser.add_argument("pack")
parser.add_argument("--base", default="out/base")
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.base).eval()
tok = AutoTokenizer.from_pretrained(args.base)
pack = EditPack.from_pretrained(args.pack)  # checks against the model's weights on first use


def answer(prompt: str, *, edited: bool) -> str:
    batch = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        if edited:
            with pack.applied(model):  # hooks add B (A x) to the edited layers; removed on exit, also on error
                out = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
        else:
            out = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, -1:])


queue = [("the sport played by michael jordan", True), ("the sport played by michael jordan", False),
         ("the sport played by serena williams", True)]
for prompt, edited in queue:
    print(f"[edits {'on ' if edited else 'off'}] {prompt!r} -> {answer(prompt, edited=edited)!r}")
