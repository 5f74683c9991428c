"""Use two packs at once, combine them into one, and see a contradiction refused.

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

# sequential editing: compute on top of the merged first pack and record it as the parent
sports.merge(model)
later = edit(("serena williams", " soccer"))
later.parents = [sports.pack_id]
sports.unmerge(model)  # bit-for-bit the original weights again
print("sequential pack parents:", later.parents)

try:
    EditPack.stack([sports, edit(("michael jordan", " golf"))])
except ConflictingRequestsError as e:
    print("refused:", e)
