"""Use two packs at once, combine them into one, chain a pack onto another, and see a contradiction refused.

    python examples/04_stack_packs.py
"""

from _toy import toy_base, toy_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from memit_adapter import ConflictingRequestsError, EditPack, EditRequest, MemitConfig
from memit_adapter.engine import compute_edits

base = toy_base()
model = AutoModelForCausalLM.from_pretrained(base).eval()
tok = AutoTokenizer.from_pretrained(base)
config = MemitConfig(layers=[1, 2], mom2_update_weight=10.0, context_templates=["{}", "he said . {}"],
                     clamp_norm_factor=4.0, v_weight_decay=1e-3, v_num_grad_steps=40, mom2_n_samples=200)
corpus = toy_corpus()


def edit(*facts):
    reqs = [EditRequest("the sport played by {}", s, t) for s, t in facts]
    return compute_edits(model, tok, reqs, config, corpus=corpus, progress=False)


sports = edit(("michael jordan", " baseball"))
more = edit(("lebron james", " hockey"))

with sports.applied(model), more.applied(model):  # several packs active together
    print("both packs active")
both = EditPack.stack([sports, more])  # one pack; its factors are the two packs' factors side by side
print(f"stacked: {len(both.requests)} edits, ranks {[d.rank for d in both.deltas.values()]}")
both.save_pretrained("out/pack-stacked")

# edits over time: a pack computed on top of the first one. joint=True re-solves the first pack's edits with the new
# one on the base model and keeps the difference: both packs applied are one batch of all their edits
later = compute_edits(model, tok, [EditRequest("the sport played by {}", "serena williams", " soccer")], config,
                      corpus=corpus, on_top_of=[sports], joint=True, progress=False)
print("chained pack parents:", later.parents)
with sports.applied(model), later.applied(model):
    ids = tok(["the sport played by michael jordan", "the sport played by serena williams"], return_tensors="pt")
    print("chain applied:", [tok.decode(t) for t in model(**ids).logits[:, -1].argmax(-1)])
later.save_pretrained("out/pack-day-2")  # with its parents' ids and the chain's target vectors for the next day

try:
    EditPack.stack([sports, edit(("michael jordan", " golf"))])
except ConflictingRequestsError as e:
    print("refused:", e)
