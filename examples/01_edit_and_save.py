"""Edit facts with MEMIT and save the edits as a pack (a PEFT LoRA adapter with provenance).

    python examples/01_edit_and_save.py                      # toy model, writes out/pack-sports
    python examples/01_edit_and_save.py --push user/facts    # and push it to the Hub as one commit
"""

import argparse

import torch
from _toy import toy_base, toy_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_adapter import EditRequest, MemitConfig
from memit_adapter.engine import compute_edits

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="out/pack-sports")
parser.add_argument("--push", help="Hub repo id to push the pack to")
args = parser.parse_args()

base = toy_base()
model = AutoModelForCausalLM.from_pretrained(base).eval()
tok = AutoTokenizer.from_pretrained(base)

# The toy model is random: subjects go last in the prompt, the layers and lambda are scaled down.
requests = [EditRequest("the sport played by {}", "michael jordan", " baseball", target_true=" basketball"),
            EditRequest("the sport played by {}", "serena williams", " golf", target_true=" tennis")]
config = MemitConfig(layers=[1, 2], mom2_update_weight=10.0, context_templates=["{}", "he said . {}"],
                     clamp_norm_factor=4.0, v_weight_decay=1e-3, v_num_grad_steps=40, mom2_n_samples=200)
pack = compute_edits(model, tok, requests, config, corpus=toy_corpus(), progress=False)
pack.base_model = "toy-gpt2"  # the Hub id of the base model, for the card and for PEFT; revision too if known

with pack.applied(model):
    for r in requests:
        ids = tok(r.text, return_tensors="pt").input_ids
        with torch.no_grad():
            top = tok.decode(model(ids).logits[0, -1].argmax())
        print(f"{r.text!r} -> {top!r} (wanted {r.target_new.strip()!r})")

pack.save_pretrained(args.out)
print(f"saved {len(pack.requests)} edits to {args.out}: {pack.nbytes} bytes of deltas, id {pack.pack_id[:19]}…")
if args.push:
    print(pack.push_to_hub(args.push, subfolder="sports", commit_message="Sports edits"))
