"""What merging real MEMIT edits into bf16 does to them, against the hooked path (slow: runs the engine)."""

import warnings

import pytest
import torch
from engine_setup import config, corpus, model_and_tokenizer, requests

from memit_adapter.engine import compute_edits
from memit_adapter.pack import EditPack, LayerDelta


def _target_logprob(model, tok, reqs) -> torch.Tensor:
    out = []
    for r in reqs:
        ids = tok(r.text, return_tensors="pt").input_ids
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
        out.append(lp[tok.convert_tokens_to_ids(r.target_new.strip())])
    return torch.stack(out)


def _scaled(pack: EditPack, s: float) -> EditPack:
    return EditPack(deltas={n: LayerDelta(B=d.B * s, A=d.A) for n, d in pack.deltas.items()}, requests=pack.requests,
                    config=pack.config, model_type=pack.model_type, fan_in_fan_out=pack.fan_in_fan_out)


@pytest.mark.slow
def test_bf16_merge_of_real_edits():
    torch.set_num_threads(1)
    model, tok = model_and_tokenizer("llama")
    reqs = requests()
    pack = compute_edits(model, tok, reqs, config(), corpus=corpus(), progress=False)
    targets = [tok.convert_tokens_to_ids(r.target_new.strip()) for r in reqs]
    bf16, _ = model_and_tokenizer("llama", dtype=torch.bfloat16)

    def top1(m):
        return [int(m(input_ids=tok(r.text, return_tensors="pt").input_ids).logits[0, -1].argmax()) for r in reqs]

    with torch.no_grad(), pack.applied(bf16, force=True):
        assert top1(bf16) == targets
    with torch.no_grad():
        report = pack.merge(bf16, force=True)  # the tiny model's edits are large (‖Δ‖/‖W‖ ≈ 2): no loss
        assert top1(bf16) == targets and report.delta_rel_error < 0.01
        pack.unmerge(bf16)

    # scaled to the regime of large models, ‖Δ‖/‖W‖ = 1e-2 .. 1e-3: the norm lost grows, the warning fires
    rel = max(float(d.weight_delta().norm() / model.get_submodule(n).weight.detach().float().norm())
              for n, d in pack.deltas.items())
    base = _target_logprob(bf16, tok, reqs)
    rows = {}
    for target in (1e-2, 3e-3):
        small = _scaled(pack, target / rel)
        with small.applied(bf16):
            hooked = float((_target_logprob(bf16, tok, reqs) - base).mean())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = small.merge(bf16)
        merged = float((_target_logprob(bf16, tok, reqs) - base).mean())
        small.unmerge(bf16)
        rows[target] = (report.delta_rel_error, hooked, merged, bool(caught))
    assert rows[1e-2][0] > 0.1 and rows[1e-2][3]  # >10% of the delta's norm rounded away: warned
    assert rows[3e-3][0] > rows[1e-2][0]
    assert rows[1e-2][1] > 0 and rows[1e-2][2] > 0  # the edit still pushes its target up
