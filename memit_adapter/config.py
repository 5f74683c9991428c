"""``MemitConfig``: the algorithm's hyperparameters, checked on construction, JSON round-trip.

Usage::

    cfg = MemitConfig.for_model(model)                # published preset or scaled default
    cfg = MemitConfig(layers=[0, 1, 2], mom2_update_weight=300.0)
    MemitConfig.from_json(cfg.to_json()) == cfg       # True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from torch import nn

from .errors import ConfigError

CONTEXT_TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You")
_DTYPES = ("float32", "float64")
_NULLSPACE_REFERENCES = ("absolute", "max_eigenvalue", "mean_eigenvalue")  # as memit_adapter.solve's
EDIT_TOKENS = ("last", "reach")  # MemitConfig.edit_token


# λ of the scaled defaults, per unit of MLP width (see MemitConfig.for_model)
LAMBDA_PER_D_FF = 0.1

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


@dataclass(frozen=True)
class PublishedPreset:
    """Published MEMIT settings for one model shape: the model types it applies to, its depth and width, and
    the ``MemitConfig`` fields it sets (the rest are the published defaults); ``source`` says where from."""

    model_types: tuple[str, ...]
    n_layers: int
    d_model: int
    values: dict[str, Any]
    source: str


PUBLISHED_PRESETS: tuple[PublishedPreset, ...] = (
    PublishedPreset(("gpt2",), 48, 1600, dict(layers=range(13, 18), mom2_update_weight=20000.0, v_num_grad_steps=20),
                    "GPT-2 XL, MEMIT paper and code"),
    PublishedPreset(("gptj",), 28, 4096, dict(layers=range(3, 9), mom2_update_weight=15000.0, v_num_grad_steps=25),
                    "GPT-J, MEMIT paper and code"),
    PublishedPreset(("gpt_neox",), 44, 6144, dict(layers=range(6, 11), mom2_update_weight=20000.0,
                                                  v_num_grad_steps=20, clamp_norm_factor=0.3),
                    "GPT-NeoX-20B, MEMIT paper"),
    PublishedPreset(LLAMA_LIKE, 32, 4096, dict(layers=range(4, 9), mom2_update_weight=15000.0, v_num_grad_steps=25,
                                               clamp_norm_factor=4.0, v_weight_decay=1e-3),
                    "LLaMA-7B-class (32 layers of width 4096), EasyEdit's hyperparameters"),
)


@dataclass
class MemitConfig:
    """Hyperparameters of MEMIT (names as in the published code; see MEMIT_SPEC.md).

    Figures on world-gpt2-bpe and world-llama-sp below were measured with the one-sentence statistics corpus
    those worlds shipped until they added running texts to it, unless a table says otherwise (see
    :meth:`for_model`); with the present corpus the same settings differ by a few points.

    Attributes:
        layers: edited layers R, ascending; the last one, L, carries the target vectors.
        mom2_update_weight: lambda, weight of the key second moment C against the new keys.
        mom2_update_weight_per_edit: when > 0, lambda grows with the batch: ``max(mom2_update_weight,
            mom2_update_weight_per_edit * n)`` for n edits (:meth:`update_weight`), so that C keeps its weight
            against ``K Kᵀ``, a sum over the n edits (0 = the published fixed lambda).
        v_lr, v_num_grad_steps: Adam learning rate and steps of the target-vector (delta) optimisation.
        v_lr_relative: when True, ``v_lr`` is in units of each request's per-element RMS of ``h``
            (Adam moves every element by about ``v_lr * ||h|| / sqrt(d_model)`` a step), so the step
            fits models whose residual stream is large; the published presets use absolute steps.
        v_lr_decay_to: where the learning rate of the target vectors ends, as a fraction of ``v_lr``: a half cosine
            from ``v_lr`` at the first Adam step to ``v_lr_decay_to * v_lr`` at step ``v_num_grad_steps - 1``
            (:func:`~memit_adapter.targets.lr_factor`; the last step of ``v_num_grad_steps`` only measures, so the
            last update runs just above it), kept by steps past it (``v_max_grad_steps``). 1 = constant (published).
            Off by default: a larger rate that decays buys Score at a small step budget but costs retention, and
            does not reach the constant rate's Score on world-llama-sp (100 edits, for_model's other settings, all
            requests at once, 2 threads; ES / PS / NS / retention, Score, seconds of statistics + edit):

            ===============================  ===================================  ===================================
            v_lr (-> end), z steps           world-gpt2-bpe                       world-llama-sp
            ===============================  ===================================  ===================================
            0.1 constant, 60 (for_model)     100 / 87 / 98.4 / 96.7, 94.8, 41 s   83 / 77.8 / 97.4 / 86.8, 85.3, 36 s
            0.2 to 0.02, 40                  98 / 90.2 / 97.8 / 94.5, 95.2, 28 s  79 / 72 / 96.1 / 86.4, 81.2, 25 s
            0.3 to 0.03, 30                  94 / 90.5 / 96.7 / 91.6, 93.7, 24 s  75 / 71.8 / 93.9 / 81.0, 79.1, 21 s
            0.3 to 0.03, 20                  91 / 82.8 / 97.7 / 94.5, 90.1, 18 s  63 / 58.5 / 96.5 / 89.8, 69.2, 16 s
            0.1 constant, 20                 82 / 70.2 / 98.5 / 97.0, 82.0, 17 s  43 / 39.5 / 99.0 / 96.9, 51.1, 16 s
            ===============================  ===================================  ===================================
        v_loss_threshold: a request stops once its loss is below this.
        v_max_grad_steps: when set (>= ``v_num_grad_steps``), the δ rows whose target is still below even odds
            after ``v_num_grad_steps`` (NLL above ln 2: edits that would not take) go on alone, up to this many
            steps in all; None = every row stops at ``v_num_grad_steps`` (published).
        v_stop_when_top: a δ row also stops once each target token is the most probable token at its position in
            every rewrite prompt of the row (the context templates): Most-Probable Early Stopping (MPES, Gupta et
            al. 2025, ENCORE), against over-optimised target vectors. Not in the published method; off by default:
            a target that is only just the top answer does not survive the solve's partial realisation.
            world-gpt2-bpe, 100 edits, for_model: ES / PS / NS / retention 100 / 87 / 98.4 / 96.7 in 65 s without,
            70 / 57.5 / 98.7 / 98.0 in 18.5 s with it (2 threads; times taken before a step ran its rows in parts of
            similar suffix length, which took the 65 s to 50 s).
        v_target_nll_threshold: a δ row also stops once its target NLL (averaged over the context templates and the
            row's requests; without the KL, preservation and weight-decay terms of the loss) is below this; 0 = off.
            Not in the published method, whose threshold (``v_loss_threshold``) is on the whole loss. Off by default:
            the steps it saves cost Score on two of three world models (100 edits, for_model's other settings,
            ES / PS / NS / retention, Score, seconds of the edit; 2 threads, nothing else running):

            ==================  =================================  ===================================
            world               off (every row runs 60 steps)      0.003
            ==================  =================================  ===================================
            world-gpt2-bpe      100 / 87 / 98.4 / 96.7, 94.8, 50 s  98 / 86.2 / 98.5 / 96.9, 93.9, 44 s
            world-llama-sp      83 / 77.8 / 97.4 / 86.8, 85.3, 51 s  83 / 77.2 / 97.4 / 87.0, 85.1, 53 s
            8-layer GPT-2       92 / 74.5 / 98.7 / 97.9, 87.1, 103 s  89 / 71.2 / 98.7 / 97.9, 84.7, 88 s
            ==================  =================================  ===================================

            0.01 saves more and costs more (Score 89.9, 85.0, 80.5; 36, 47, 70 s). With it a larger step reaches the
            threshold sooner but keeps fewer unedited facts: ``v_lr`` 0.2 with 0.003 gives Score 95.1, 83.5, 91.3
            at retention 93.6, 68.9, 94.5 (0.3: 94.8, 82.7, 92.0 at 89.3, 52.5, 88.5): rows that never reach the
            target run every step at twice the step and end with larger δ.
        clamp_norm_factor: ||delta_i|| <= factor * ||h_i|| after every step.
        kl_factor: weight of the KL term on "{subject} is a" that keeps the subject's essence.
        v_weight_decay: weight of ||delta|| / ||h||^2.
        preserve_factor: weight of a KL term that keeps the subject's answers to the other relations of the
            batch (not part of the published method; 0 = off). For a subject edited on some relations, one
            prompt of every other relation in the batch (by ``EditRequest.relation_id``; requests without
            one take no part) is scored at its last token against the unedited model; a prompt whose
            unedited top token is the first token of one of the subject's ``target_true`` is left out.
        preserve_max_relations: at most this many of those other relations per subject (a seeded draw per
            subject), None = all of them. Each is one more row of every target-vector step: a batch of
            CounterFact's 34 relations gives every subject up to 33 kept prompts, about five times the rows of
            its rewrite prompts. Fewer cost retention: world-gpt2-bpe (7 relations), 100 edits, for_model: all 6
            ES / PS / NS / retention 100 / 87 / 98.4 / 96.7 in 65 s, at most 3 98 / 90.2 / 97.1 / 94.3 in 50 s,
            at most 1 97 / 92.2 / 96.7 / 90.7 in 40 s (2 threads, nothing else running; before the parts by
            suffix length).
        preserve_every: the kept prompts take part in one target-vector step of every this many (steps 0, k,
            2k, ...), at ``k`` times their weight, so that their mean pull on δ stays the same ("lazy
            regularization", Karras et al., 2020); 1 = every step. They are most of a step's rows where a batch
            holds many relations (see ``preserve_max_relations``), so this cuts their cost by ``k`` without
            dropping any of them. A δ row that has kept prompts is tested against ``v_loss_threshold`` on their
            steps only (the loss of the others lacks their term), with their KL at its own weight. Off by default:
            where it saves most it costs a little Score (100 edits, for_model, ES / PS / NS / retention, seconds of
            the edit; 2 threads, nothing else running):

            ==================  ===================================  ===================================
            world               1 (every step)                       2
            ==================  ===================================  ===================================
            world-gpt2-bpe      100 / 87 / 98.4 / 96.7, 41.8 s       99 / 86.5 / 98.1 / 96.8, 34.7 s
            world-llama-sp      83 / 77.8 / 97.4 / 86.8, 44.2 s      84 / 77.5 / 97.4 / 87.1, 42.3 s
            8-layer GPT-2       92 / 74.5 / 98.7 / 97.9, 72.6 s      91 / 72 / 98.8 / 98.0, 62.3 s
            ==================  ===================================  ===================================

            3 on world-gpt2-bpe: 98 / 86.5 / 98.3 / 96.7, 32.6 s. 1,000 edits on world-gpt2-bpe: 1 65.3 / 61 / 83.9 /
            62.4, 404 s; 2 64.3 / 59.6 / 84.8 / 65.1, 306 s.
        share_subject_delta: requests about the same subject share one δ, optimised on the mean of their
            losses (their keys coincide in a causal model, so separate δs would ask one key for several
            values and the solve would average them away). Without shared subjects it changes nothing.
        subject_keys: each layer's key ``k`` (the mean, with the bare prompt's key weighing half, of the keys read
            after each context template) also reads the subject alone, after each context and bare, with nothing of
            the prompt before it (not part of the published method). The published key sees the subject only
            where the request's prompt puts it ("the home of X"), and on a small model the words before the subject
            move the key, so a paraphrase that puts it elsewhere ("X resides in") reads a key the edit barely
            reaches. It doubles the rows of each layer's key pass, less one (about 4% more time on a 1,000-edit
            batch, and twice that pass's memory; packs kept under the new one, ``on_top_of``, are read the same
            way). Measured with for_model's other settings, ES / PS / NS / Score / retention, 100
            edits as the mean over the samples of seeds 0, 1, 2, 1,000 edits on seed 0's:

            ===============  ======  =================================  =================================
            world            edits   off (the published key)            on
            ===============  ======  =================================  =================================
            world-gpt2-bpe   100     97.0 / 87.3 / 98.0 / 93.9 / 95.4   97.0 / 90.3 / 97.7 / 94.9 / 95.2
            world-gpt2-bpe   1,000   65.3 / 61.0 / 83.9 / 68.8 / 62.4   67.5 / 62.9 / 83.7 / 70.3 / 61.9
            world-llama-sp   100     82.7 / 77.4 / 96.1 / 84.7 / 85.5   83.3 / 77.9 / 95.9 / 85.1 / 85.8
            world-llama-sp   1,000   67.3 / 65.3 / 74.0 / 68.7 / 41.4   67.8 / 65.3 / 74.1 / 68.9 / 41.3
            8-layer GPT-2    100     93.3 / 75.2 / 98.7 / 87.8 / 97.9   95.3 / 80.9 / 98.5 / 90.9 / 97.8
            8-layer GPT-2    1,000   54.2 / 50.1 / 87.4 / 60.2 / 69.4   57.2 / 52.3 / 86.8 / 62.3 / 68.9
            ===============  ======  =================================  =================================

            It helps on both GPT-2s and changes nothing beyond the spread of seeds on world-llama-sp (whose PS is
            held back by facts its last subject token cannot reach; see ``memit_adapter.reach``), so
            :meth:`for_model`'s scaled defaults turn it on; the published presets keep the published key.
            Where it helps, on world-gpt2-bpe (100 edits, seeds 0 and 1): paraphrases that put the subject first
            when the request's prompt does not succeed 91.9% of the time against 83.2% with the published key;
            those that put it later when the request's prompt has it first stay at 82.7% against 82.2% (for such a
            request the new rows repeat its own).
        edit_token: which subject token carries each edit. ``"last"``: the subject's last token, as published.
            ``"reach"`` (not part of the published method): the last token unless a vector added there after block
            L cannot make the target of one of the subject's requests more likely than not in a short optimisation
            (:func:`~memit_adapter.reach.choose_subject_tokens`), then the latest subject token from which the
            targets are reached (the best where none is); the key is read, and δ optimised, at that token. Large
            models read a subject at its last token (the paper's causal traces); a small one may read it from earlier
            tokens, and then no edit at the last token takes (:mod:`memit_adapter.reach`). A request's own
            ``subject_token`` overrides both, and a pack's requests record the token used. Costs one 30-step
            optimisation of one vector per request (full forwards), plus one per other subject token of the subjects
            that fail: 100 edits took 5-8 s more on world-gpt2-bpe and 13-24 s more on world-llama-sp (2 threads).
            Measured with for_model's other settings and each world's memit_config.json, 100 edits, the samples of
            seeds 0, 1, 2 (ES / PS / NS / Score / retention; subjects moved off their last token):

            ==============  ==================================  ==================================  ==========
            world           last (published)                    reach                               moved
            ==============  ==================================  ==================================  ==========
            world-llama-sp  80.7 / 77.2 / 96.0 / 83.8 / 86.9    91.0 / 86.8 / 96.2 / 91.1 / 89.0    30, 26, 22
            world-gpt2-bpe  97.7 / 92.8 / 97.3 / 95.9 / 92.7    97.7 / 93.2 / 97.2 / 96.0 / 92.7    0, 0, 1
            ==============  ==================================  ==================================  ==========

            1,000 edits on world-llama-sp (seed 0): 68.1 / 65.0 / 75.2 / 69.2 / 40.2 with the last token, 74.2 /
            70.0 / 75.2 / 73.1 / 43.2 with reach (352 requests moved), 576 s. Moving a failing subject to the token
            that reaches best rather than the latest that reaches: 90.7 / 86.1 / 94.8 / 90.3 / 84.6 at 100 edits,
            71.8 / 69.3 / 73.8 / 71.6 / 42.2 at 1,000. Moving every subject to its best token, whether or not the
            last reaches: seed 1 93.0 / 92.3 / 95.8 / 93.7 / 85.9, seed 2 91.0 / 86.3 / 92.8 / 89.9 / 78.9 (84-90
            subjects moved): it costs retention where the last token would do.
        repair_rounds: after the batch, the requests whose new target is not yet more probable than the true one
            after their own prompt are edited again, on top, up to this many rounds (not part of the published
            method; 0 = off; :mod:`memit_adapter.repair`). A target vector that works at the lookup can fail once
            written into the weights: on a wider world (GPT-2, 6 layers, d_ff 2,048) the z of 98 of 100 edits
            work hooked in at block L, realised there at a median 0.99 of δ, but 10 edits fail after the solve.
            100 edits, for_model (ES / PS / NS / retention, seconds of the edit; rounds: failing before each):
            d_ff 2,048 world 90 / 71 / 99.4 / 99.4, 63 s -> 2 rounds (10, 3, 1 failing) 99 / 77 / 99.4 / 99.0,
            81 s; the 8-layer GPT-2 92 / 74.5 / 98.7 / 97.9, 84 s -> 2 rounds (8, 3, 0) 100 / 78 / 98.4 / 97.2, 101 s;
            world-llama-sp 83 / 77.8 / 97.4 / 86.8, 54 s -> 2 rounds (17, 11, 2) 98 / 87 / 92.2 / 79.6, 76 s;
            world-gpt2-bpe: none fails, nothing changes. Off by default because the rounds trade retention for
            efficacy where many fail: world-gpt2-bpe, 1,000 edits, 65.3 / 61 / 83.9 / 62.4 in 404 s -> 2 rounds
            (347, 226, 159 failing) 84.1 / 72.5 / 77.8 / 45.9 in 701 s.
        v_batch_size: requests optimised together, and whose keys are read together (the result does not
            depend on it: each request's δ is independent); bounds memory, which grows with it. None = all at
            once on CPU; on an accelerator that reports its free memory, as many as fit (measured on a first
            chunk of 8, then 80% of free memory; a chunk that runs out of memory is halved).
        context_templates: given templates (each with one "{}"); None = sample from the model.
        context_template_length, context_template_starts, context_template_top_k: how to sample them.
        mom2_n_samples: corpus texts used for the statistics; mom2_dtype: accumulation dtype.
        mom2_max_length: truncation of corpus texts in tokens; None = the model's context length (max 1024).
        mom2_max_tokens: stop the statistics pass once this many key vectors are seen; None = no limit.
        stats_batch_size: texts per forward pass of the statistics pass.
        seed: seeds template sampling and anything else random, so a run is reproducible.
        nullspace_threshold: when > 0, each layer's update is solved the AlphaEdit way (Fang et al., ICLR 2025)
            instead of MEMIT's ``R Kᵀ (λC + KKᵀ)⁻¹``: confined to the null space of the preserved keys, the
            eigenvectors ``U`` of C whose eigenvalue is below ``nullspace_threshold`` x the reference
            ``nullspace_threshold_of``, ``P = U Uᵀ``: ``ΔWᵀ = (P(KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ``
            (:func:`~memit_adapter.solve.projected_update`; ``K_p``: the keys of the packs of ``on_top_of``, which
            then do not join C; λ is not used). 0 = off (the default). Published: 2e-2, absolute. Off by default
            because it did worse than the λC solve on every world model measured (100 edits, for_model's other
            settings, ES / PS / NS / retention): world-gpt2-bpe λC 100 / 87 / 98.4 / 96.7, null space 2e-2 with
            α 1 93 / 81 / 94.6 / 84.2, 0.1 x mean eigenvalue with α 1 85 / 72 / 97.4 / 89.5 (α 10: ES 22 and 6;
            α 0.1: retention 68 and 74); world-llama-sp λC 83 / 78 / 97.4 / 86.8, 2e-2 with α 1
            41 / 38 / 87.6 / 56.6, 0.1 x mean with α 1 74 / 74 / 88.4 / 60.6; world-gpt2-bpe, 1,000 edits:
            λC (grown to 1,024) 65 / 61 / 83.9 / 62.3, 2e-2 with α 1 53 / 53 / 62.0 / 12.7, 0.1 x mean with α 1
            49 / 50 / 64.1 / 16.7, with α 10 22 / 19 / 93.9 / 80.1. C's spectrum decays without a gap,
            so a "null space" either still carries 1-8% of the corpus keys' energy (world-gpt2-bpe) or is too
            small to write the edits in (world-llama-sp at 2e-2: 25-113 directions); λC weighs every direction
            by how much the preserved keys use it instead of all or nothing.
        nullspace_threshold_of: what ``nullspace_threshold`` is a fraction of: ``"absolute"`` (the published
            rule, eigenvalues below the threshold itself), ``"max_eigenvalue"`` (C's largest eigenvalue) or
            ``"mean_eigenvalue"`` (C's mean eigenvalue = mean diagonal). C's scale depends on the model and the
            layer, so an absolute threshold does not transfer: on the world models (for_model's statistics,
            layers 0-2) the largest / mean eigenvalue is 82.7 / 0.37, 4.8 / 0.048, 5.3 / 0.061 (world-gpt2-bpe,
            d_in 1,024) and 1,969 / 5.0, 340 / 1.4, 78 / 0.69 (world-llama-sp, d_in 688), and the published 2e-2
            takes 303, 729, 656 of 1,024 directions but 29, 113, 25 of 688. The largest eigenvalue is the mean
            key's direction (C is uncentered), tens to hundreds of times the next, which makes it a poor
            reference (1e-3 of it: 671, 415, 321 and 560, 550, 233 directions); 0.1 x the mean eigenvalue takes
            475, 416, 353 and 457, 436, 211, the evenest across layers and models. Within that null space the
            edit keys keep 1-20% of their squared norm (median ``‖Pk‖²`` 10, 0.8, 0.7 and 107, 25, 12).
        nullspace_l2: α, the ridge of the null-space solve (AlphaEdit's ``L2``; published 10). Used only when
            ``nullspace_threshold`` > 0. It weighs against ``‖Pk‖²``, the edit keys' squared norm inside the null
            space: one key's edit is written to the fraction ``‖Pk‖² / (‖Pk‖² + α)``, so α must sit below the
            ``‖Pk‖²`` of the model (see ``nullspace_threshold_of``). The projector is computed once per layer and
            set of statistics (a ``d_in x d_in`` eigendecomposition) and kept, as the null-space basis ``U``, in
            host memory (``d_in·m`` float64 for an m-dimensional null space) while the statistics are alive.
        keep_weight: β, the weight of the facts to keep (``keep`` in :func:`~memit_adapter.engine.compute_edits`;
            not part of the published method; without them it does nothing): their keys' second moment, over
            every token of their prompts, joins the solve's as ``C + β·C_keep``, so it weighs β times the whole
            statistics corpus, however many prompts there are. Measured with a set of the facts of half the
            subjects a batch leaves alone (about 1,775 prompts; ``scripts/sweep_world_edits.py --keep-fraction 0.5``),
            100 edits, for_model's other settings at λ 100, the samples of seeds 0, 1, 2 (ES / PS / NS / Score, then
            retention of the facts in the set, of the other unedited subjects' facts, of the edited subjects' other
            facts; 1-2 s more for the set):

            ==============  ====  ==================================  ==================
            world           β     ES / PS / NS / Score                kept / held out /
                                                                      edited subjects
            ==============  ====  ==================================  ==================
            world-gpt2-bpe  none  98.0 / 94.5 / 97.2 / 96.5           92.8 / 94.2 / 88.8
            world-gpt2-bpe  0.3   97.3 / 93.7 / 97.7 / 96.2           95.2 / 94.7 / 90.2
            world-gpt2-bpe  1     97.0 / 91.2 / 97.9 / 95.3           97.4 / 94.8 / 91.4
            world-llama-sp  none  92.3 / 88.4 / 96.3 / 92.2           90.1 / 89.7 / 81.2
            world-llama-sp  0.3   91.7 / 88.4 / 96.9 / 92.1           93.2 / 90.4 / 82.1
            world-llama-sp  1     92.3 / 87.8 / 97.1 / 92.2           95.8 / 90.5 / 83.3
            ==============  ====  ==================================  ==================

            The set is kept; facts outside it gain little (held out +0.6 / +0.8, the edited subjects' other facts
            +2.6 / +2.1), and PS pays up to 3 points on world-gpt2-bpe. At 1,000 edits (seed 0, λ grown to 1,024 / 688;
            the set: 322 prompts of 46 subjects) β 1 keeps 96.0 / 87.9% of the set against 63.4 / 43.2% without it,
            and lifts the held-out facts 58.4 -> 68.9 / 47.3 -> 54.3 and the edited subjects' others 66.6 -> 74.5 /
            42.8 -> 49.9, for ES 69.5 -> 61.5 / 74.2 -> 68.2 (world-gpt2-bpe / world-llama-sp).
    """

    method: ClassVar[str] = "memit"  # what a pack made with this config was made by (see method_configs)
    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7, 8])
    mom2_update_weight: float = 15000.0
    mom2_update_weight_per_edit: float = 0.0
    v_lr: float = 0.5
    v_lr_relative: bool = False
    v_lr_decay_to: float = 1.0
    v_num_grad_steps: int = 25
    v_loss_threshold: float = 0.05
    v_max_grad_steps: int | None = None
    v_stop_when_top: bool = False
    v_target_nll_threshold: float = 0.0
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    preserve_factor: float = 0.0
    preserve_max_relations: int | None = None
    preserve_every: int = 1
    share_subject_delta: bool = True
    subject_keys: bool = False
    edit_token: str = "last"
    repair_rounds: int = 0
    v_batch_size: int | None = 32
    context_templates: list[str] | None = None
    context_template_length: int = 10
    context_template_starts: list[str] = field(default_factory=lambda: list(CONTEXT_TEMPLATE_STARTS))
    context_template_top_k: int = 5
    mom2_n_samples: int = 100_000
    mom2_dtype: str = "float32"
    mom2_max_length: int | None = None
    mom2_max_tokens: int | None = None
    stats_batch_size: int = 8
    seed: int = 0
    nullspace_threshold: float = 0.0
    nullspace_threshold_of: str = "absolute"
    nullspace_l2: float = 10.0
    keep_weight: float = 1.0

    def __post_init__(self) -> None:
        _typed(self)
        self.layers = list(self.layers)
        if not self.layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
            raise ConfigError(f"layers must be a non-empty list of ints, got {self.layers!r}")
        if any(x < 0 for x in self.layers) or self.layers != sorted(set(self.layers)):
            raise ConfigError(f"layers must be distinct non-negative ints in ascending order, got {self.layers!r}")
        _positive(self, "mom2_update_weight", "v_lr", "clamp_norm_factor", "mom2_n_samples", "stats_batch_size",
                  "context_template_length", "context_template_top_k", "nullspace_l2", "preserve_every",
                  "keep_weight")
        _non_negative(self, "v_loss_threshold", "v_target_nll_threshold", "kl_factor", "v_weight_decay",
                      "preserve_factor", "mom2_update_weight_per_edit", "nullspace_threshold", "repair_rounds")
        if self.edit_token not in EDIT_TOKENS:
            raise ConfigError(f"edit_token must be one of {EDIT_TOKENS}, got {self.edit_token!r}")
        if self.nullspace_threshold_of not in _NULLSPACE_REFERENCES:
            raise ConfigError(f"nullspace_threshold_of must be one of {_NULLSPACE_REFERENCES}, "
                              f"got {self.nullspace_threshold_of!r}")
        if not 0 < self.v_lr_decay_to <= 1:
            raise ConfigError(f"v_lr_decay_to must be in (0, 1] (a fraction of v_lr), got {self.v_lr_decay_to}")
        if self.v_num_grad_steps < 1:
            raise ConfigError(f"v_num_grad_steps must be >= 1 (0 steps would leave every δ at zero: an empty pack), "
                              f"got {self.v_num_grad_steps}")
        if self.v_max_grad_steps is not None and self.v_max_grad_steps < self.v_num_grad_steps:
            raise ConfigError(f"v_max_grad_steps must be None or >= v_num_grad_steps ({self.v_num_grad_steps}), "
                              f"got {self.v_max_grad_steps}")
        if self.preserve_max_relations is not None and self.preserve_max_relations < 1:
            raise ConfigError(f"preserve_max_relations must be None or >= 1, got {self.preserve_max_relations}")
        if self.v_batch_size is not None and self.v_batch_size < 1:
            raise ConfigError(f"v_batch_size must be None or >= 1, got {self.v_batch_size}")
        for name in ("mom2_max_length", "mom2_max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be None or an int >= 1, got {value!r}")
        if self.mom2_dtype not in _DTYPES:
            raise ConfigError(f"mom2_dtype must be one of {_DTYPES}, got {self.mom2_dtype!r}")
        if self.context_templates is not None:
            self.context_templates = list(self.context_templates)
            bad = [t for t in self.context_templates if not isinstance(t, str) or t.count("{}") != 1]
            if not self.context_templates or bad:
                raise ConfigError(f"context_templates must be strings with exactly one '{{}}', bad: {bad!r}")
        self.context_template_starts = list(self.context_template_starts)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemitConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MemitConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MemitConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"MemitConfig JSON does not parse: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"MemitConfig JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> MemitConfig:
        return replace(self, **changes)

    def update_weight(self, n_edits: int) -> float:
        """λ of the solve for a batch of ``n_edits`` (see ``mom2_update_weight_per_edit``)."""
        return max(self.mom2_update_weight, self.mom2_update_weight_per_edit * n_edits)

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> MemitConfig:
        """Published presets for GPT-2 XL, GPT-J, GPT-NeoX-20B and LLaMA-7B-class models; scaled defaults else.

        Presets (paper and EasyEdit): GPT-2 XL R=13..17, lambda 20,000, 20 steps; GPT-J R=3..8,
        lambda 15,000, 25 steps; GPT-NeoX-20B R=6..10, lambda 20,000, clamp 0.3, 20 steps;
        LLaMA/Mistral/Qwen2 with 32 layers of width 4096: R=4..8, lambda 15,000, clamp 4, weight decay 1e-3.

        Other models get one scaling rule. Its constants come from three conventionally trained models that
        nobody shaped for MEMIT (``memit_adapter.demo``): world-gpt2-bpe (GPT-2, 6 layers, d_model 256, d_ff
        1,024, byte-level BPE), world-llama-sp (LLaMA, 6 layers, d_model 256, d_ff 688, SentencePiece-style,
        BOS) and an 8-layer GPT-2 of d_model 288, d_ff 1,152 trained the same way (the command is in
        ``memit_adapter/demo/train.py``); each knows 4,200 facts of 600 subjects. Figures: 100 edits, CounterFact
        ES / PS / NS and retention (unedited facts still recalled); the closing note of issue 11 has the tables.
        The lambda and entropy figures come from the worlds' present statistics corpus (sentences and running
        texts); the others were measured earlier, on the one-sentence corpus the worlds shipped then.

        * layers: the contiguous range from ``floor(0.1 * n_layers)`` up to ``ceil(0.35 * n_layers)``
          (exclusive), i.e. the early-middle layers where causal tracing finds the factual MLPs
          (GPT-J's 3..8 of 28 is 11%-32%): layers 0-2 of 6 or 8. On world-gpt2-bpe at λ 100, layers 0-2 gave
          ES / PS / NS / retention 100 / 87 / 98.4 / 96.7, layers 1-3 91 / 85 / 94.1 / 86.8.
        * lambda: ``LAMBDA_PER_D_FF * d_ff`` = 0.1 * d_ff (the key second moment weighs against the edits'
          keys, whose number of directions grows with the MLP width). 100 edits, layers 0-2, 60 steps, statistics
          from each world's corpus (its sentences, then the same packed into running texts), mean of the samples
          of seeds 0, 1, 2; ES / PS / NS / retention and the change in the entropy of greedy generations:

          ===============  ===========================  ==============================  ==============================
          world            Score, lower / higher λ      lower λ                         higher λ
          ===============  ===========================  ==============================  ==============================
          world-gpt2-bpe   95.9 / 95.5                  λ 100 (0.1 d_ff): 97.7 / 92.8   λ 205 (0.2 d_ff): 97.3 / 91.8
                                                        / 97.3 / 92.7, +6.3%            / 97.5 / 94.0, +5.3%
          world-llama-sp   83.8 / 83.3                  λ 100 (0.15 d_ff): 80.7 / 77.2  λ 138 (0.2 d_ff): 80.0 / 76.2
                                                        / 96.0 / 86.9, +4.4%            / 96.4 / 88.2, +4.3%
          8-layer GPT-2    93.7 / 91.1                  λ 115 (0.1 d_ff): 97.7 / 86.2   λ 230 (0.2 d_ff): 95.3 / 81.3
                                                        / 98.1 / 95.6, +0.8%            / 98.6 / 96.9, +0.4%
          ===============  ===========================  ==============================  ==============================

          (Score: the mean of the seeds' Scores.) The lower λ has the better Score on every model; the higher
          (1.4 to 2x) buys 1.3 points of retention. The rule's own λ on world-llama-sp, 69, gives 81.0 / 77.8 /
          95.8 / 85.5, +4.5%, Score 84.1, the best of the three. (The
          published presets' λ, 0.8-3x d_ff, come with other target settings and 100,000 Wikipedia texts; they
          are not comparable.)
          Past 100 edits λ grows with the batch, ``0.1 * d_ff * n / 100`` (``mom2_update_weight_per_edit``):
          ``K Kᵀ`` is a sum over the edits, so a fixed λ lets 1,000 edits outweigh C ten times more than 100.
          world-gpt2-bpe, 1,000 edits (seed 0): λ 1,024 gives 69.3 / 66.6 / 85.1, retention 66.0, entropy +19.2%;
          λ 2,048 gives 53.9 / 50.0 / 91.4, 82.1, +4.9% (on the one-sentence statistics the worlds shipped before,
          a fixed λ 102 kept 16.9% of the unedited facts).
        * statistics: at most ``20 * d_ff`` key vectors (``mom2_max_tokens``), 32 texts a batch, drawn
          uniformly from the corpus (:func:`~memit_adapter.stats.load_corpus`); 4x as many changed nothing
          measurable (world-gpt2-bpe: retention 99.2 vs 99.5, ES 68 both, at λ 1,000). The corpus should hold
          texts as long as the ones the edited model will write: from one sentence per text, C sees keys at the
          first dozen positions only, and 100 edits raised the entropy of greedy generations by 22% on
          world-gpt2-bpe (word salad after three sentences) against 6.3% with the running texts added; on
          world-llama-sp, whose rotary positions do not enter the MLP keys, 5.7% against 4.4%.
        * target vectors: steps relative to the hidden state (``v_lr=0.1, v_lr_relative=True``),
          clamp 4, 60 steps and a loss threshold of 0.001. Small models trained from scratch carry
          hidden norms in the hundreds at the subject, where the published lr 0.5 moves δ by 1% of ``h`` a
          step. The solve realises only part of each ``δ``, so ``z`` must overshoot: 25 steps reached
          ES 89 where 60 reach 100 (world-gpt2-bpe, λ 100).
        * preservation of the subject's other relations (``preserve_factor=0.5``): a batch that edits
          several relations of one subject writes one δ for it, and without this term nothing keeps
          that δ off the subject's facts that are not edited. world-gpt2-bpe, 100 edits: retention 96.7 with it,
          86.8 without; NS over neighbours whose subject has an edit of its own 99.2 vs 83.9 (ES / PS 100 / 87
          vs 98 / 94.8).
        * keys that also read the subject alone (``subject_keys``): PS +3.0 on world-gpt2-bpe and +5.7 on the
          8-layer GPT-2 (100 edits, mean of 3 samples), ES/PS +2 on world-gpt2-bpe at 1,000, level on
          world-llama-sp; retention within 0.5 everywhere (table in the field's docstring).
        * the edit token (``edit_token="reach"``): each subject at its last token, as published, unless a short
          optimisation there cannot reach its target, then at the latest subject token that reaches it. On
          world-llama-sp, which reads ~30% of its subjects from earlier tokens, ES / PS / Score +10.3 / +9.6 / +7.3
          at 100 edits (NS +0.2, retention +2.1) and +6.1 / +5.0 / +3.9 at 1,000 (NS level, retention +3.0); on
          world-gpt2-bpe it moves 0-1 of ~95 subjects and changes nothing but 5-8 s of the edit (table in the
          field's docstring).
        * LLaMA-style models (gated MLP, RMSNorm) keep weight decay 1e-3 from EasyEdit.

        Any keyword in ``overrides`` replaces the chosen value. Use :func:`suggest_layers` to find
        the layer range of a new architecture from causal tracing.
        """
        cfg = model.config
        n_layer = _first_attr(cfg, "n_layer", "num_hidden_layers")
        d_model = _first_attr(cfg, "n_embd", "hidden_size")
        d_ff = _first_attr(cfg, "n_inner", "intermediate_size") or 4 * d_model
        llama_like = getattr(cfg, "model_type", "") in LLAMA_LIKE
        published = published_preset(model)
        preset: dict[str, Any]
        if published is not None:
            preset = {k: list(v) if isinstance(v, range) else v for k, v in published.values.items()}
        else:
            start = math.floor(0.1 * n_layer)
            stop = max(start + 1, math.ceil(0.35 * n_layer))
            preset = dict(layers=list(range(start, min(stop, n_layer))),
                          mom2_update_weight=LAMBDA_PER_D_FF * d_ff,
                          mom2_update_weight_per_edit=LAMBDA_PER_D_FF * d_ff / 100, v_num_grad_steps=60,
                          v_loss_threshold=0.001, v_lr=0.1, v_lr_relative=True, clamp_norm_factor=4.0,
                          mom2_max_tokens=20 * d_ff, stats_batch_size=32, preserve_factor=0.5,
                          subject_keys=True, edit_token="reach")
            if llama_like:
                preset.update(v_weight_decay=1e-3)
        max_pos = _first_attr(cfg, "n_positions", "max_position_embeddings", default=1024)
        preset["mom2_max_length"] = min(int(max_pos), 1024)
        preset.update(overrides)
        return cls(**preset)

    @classmethod
    def published_for(cls, model: nn.Module, **overrides: Any) -> MemitConfig:
        """The published method's settings for ``model``, to set beside :meth:`for_model`'s on the same requests.

        A model with a published preset gets that preset (what :meth:`for_model` gives it). Any other model gets
        the published defaults of the target vectors and the solve (20 steps of lr 0.5, clamp 0.75, KL 0.0625,
        weight decay 0.5, threshold 0.05; no preservation, no subject keys, the last subject token; λ fixed
        whatever the batch size) at :meth:`for_model`'s layers, λ (of 100 edits) and statistics budget: the
        published method has no rule for those on a model it was not run on, and with them equal only the method
        differs. ``overrides`` replace any field.
        """
        if published_preset(model) is not None:
            return cls.for_model(model, **overrides)
        scaled = cls.for_model(model)
        kept = ("layers", "mom2_update_weight", "mom2_max_tokens", "mom2_max_length", "stats_batch_size")
        return cls(**{**{name: getattr(scaled, name) for name in kept}, "v_num_grad_steps": 20, **overrides})


def published_preset(model: nn.Module) -> PublishedPreset | None:
    """The entry of :data:`PUBLISHED_PRESETS` for ``model``'s type, depth and width, or None."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", "")
    shape = (_first_attr(cfg, "n_layer", "num_hidden_layers"), _first_attr(cfg, "n_embd", "hidden_size"))
    return next((p for p in PUBLISHED_PRESETS if model_type in p.model_types and shape == (p.n_layers, p.d_model)),
                None)


def _first_attr(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


_INTS = ("v_num_grad_steps", "context_template_length", "context_template_top_k", "mom2_n_samples",
         "stats_batch_size", "seed", "repair_rounds", "preserve_every")
_OPTIONAL_INTS = ("preserve_max_relations", "v_batch_size", "mom2_max_length", "mom2_max_tokens", "v_max_grad_steps")
_BOOLS = ("v_stop_when_top", "v_lr_relative", "share_subject_delta", "subject_keys")
_FLOATS = ("mom2_update_weight", "mom2_update_weight_per_edit", "v_lr", "v_lr_decay_to", "v_loss_threshold",
           "v_target_nll_threshold", "clamp_norm_factor",
           "kl_factor", "v_weight_decay", "preserve_factor", "nullspace_threshold", "nullspace_l2", "keep_weight")


def _typed(cfg: MemitConfig) -> None:
    """Raise :class:`ConfigError` on a value of the wrong type: a float or bool where a count goes, a string or
    number where a flag goes (``"no"`` is not False), a non-number where a weight goes."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for name in _INTS + _OPTIONAL_INTS:
        value = getattr(cfg, name)
        if not is_int(value) and not (name in _OPTIONAL_INTS and value is None):
            raise ConfigError(f"{name} must be an int{' or None' if name in _OPTIONAL_INTS else ''}, got {value!r}")
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be True or False, got {getattr(cfg, name)!r}")
    for name in _FLOATS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")


def _positive(cfg: MemitConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(cfg: MemitConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
