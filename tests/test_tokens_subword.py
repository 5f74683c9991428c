"""The one fact encoder on tokenizers of the real kinds, trained here: byte-level BPE (GPT-2) and
SentencePiece-style (LLaMA: ``▁`` words, BOS). Subjects and targets split into several subword tokens."""

import pytest
import torch
from engine_setup import config, corpus
from tiny import make_tokenizer, subword_tokenizer, tiny_model

from memit_adapter import EditRequest, InvalidRequestError
from memit_adapter.engine import compute_edits
from memit_adapter.evaluation import target_nll
from memit_adapter.tokens import encode_continuation, encode_fact, spaced_target
from memit_adapter.tracing import subject_token_range

KINDS = ["bpe", "sentencepiece"]
PROMPT, SUBJECT = "the mother tongue of {} is", "danielle darrieux"


@pytest.mark.parametrize("kind", KINDS)
def test_subject_span_and_lookup_under_subwords(kind):
    tok = subword_tokenizer(kind)
    fact = encode_fact(tok, "he said that " + PROMPT, SUBJECT, "french")
    first, stop = fact.subject
    assert stop - first >= 4  # "danielle darrieux" is several subword tokens
    assert tok.decode(fact.ids[first:stop]).strip() == SUBJECT
    last = tok.convert_ids_to_tokens(fact.ids[fact.lookup])
    assert len(last) >= 2 and "darrieux".endswith(last.lstrip("Ġ▁"))  # the subject's last subword
    assert tok.decode(fact.ids[fact.lookup + 1:fact.n_prompt]).strip() == "is"
    assert (fact.ids[0] == tok.bos_token_id) == (kind == "sentencepiece")
    assert subject_token_range(tok, "he said that " + PROMPT, SUBJECT) == fact.subject


@pytest.mark.parametrize("kind", KINDS)
def test_target_is_read_as_it_follows_the_prompt(kind):
    tok = subword_tokenizer(kind)
    bare, spaced = (encode_fact(tok, PROMPT, SUBJECT, t) for t in ("french", " french"))
    assert bare == spaced
    running_text = tok(PROMPT.replace("{}", SUBJECT) + " french")["input_ids"]
    assert bare.ids == running_text and len(bare.target_ids) >= 2
    assert tok.convert_ids_to_tokens(bare.target_ids)[0][0] in "Ġ▁"  # the target's word carries its space
    assert tok.decode(bare.target_ids).strip() == "french"
    if kind == "bpe":  # on its own, "french" starts without the space token: the old engine's target
        assert tok("french", add_special_tokens=False)["input_ids"] != bare.target_ids


def test_space_rule_and_word_level_tokenizers():
    assert spaced_target("it is", "english") == " english"
    assert spaced_target("it is", " english") == " english"
    assert spaced_target("it is ", "english") == "english"
    word = make_tokenizer()
    assert encode_continuation(word, "danielle darrieux speaks", "french") == \
        encode_continuation(word, "danielle darrieux speaks", " french")


@pytest.mark.parametrize("kind", KINDS)
def test_target_with_or_without_space_gives_the_identical_pack(kind):
    tok = subword_tokenizer(kind)
    model = tiny_model("gpt2" if kind == "bpe" else "llama", vocab_size=len(tok), initializer_range=0.1)

    def pack(targets):
        reqs = [EditRequest("the sport played by {}", "michael jordan", targets[0]),
                EditRequest("the mother tongue of {}", "danielle darrieux", targets[1])]
        return compute_edits(model, tok, reqs, config(v_num_grad_steps=5), corpus=corpus(40), progress=False)

    a, b = pack(["golf", "french"]), pack([" golf", " french"])
    assert a.deltas.keys() == b.deltas.keys()
    for name in a.deltas:
        assert torch.equal(a.deltas[name].weight_delta(), b.deltas[name].weight_delta())


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_scores_the_tokens_the_engine_writes(kind):
    tok = subword_tokenizer(kind)
    model = tiny_model("gpt2" if kind == "bpe" else "llama", vocab_size=len(tok))
    text = PROMPT.replace("{}", SUBJECT)
    nll_bare, nll_spaced = target_nll(model, tok, [text, text], ["french", " french"]).tolist()
    fact = encode_fact(tok, PROMPT, SUBJECT, "french")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([fact.ids])).logits[0].double(), -1)
    nll = -logp[fact.target_positions, fact.target_ids].mean()
    assert nll_bare == nll_spaced == pytest.approx(float(nll), rel=1e-5)


def test_prompts_with_braces_are_filled_literally():
    req = EditRequest("{} said {name} and {0} is", "bob {x}", "fine")  # str.format raises KeyError here
    assert req.text == "bob {x} said {name} and {0} is"
    with pytest.raises(InvalidRequestError):
        encode_fact(make_tokenizer(), "no slot here", "bob")
