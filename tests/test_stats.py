import json
import warnings

import pytest
import torch
from engine_setup import corpus, model_and_tokenizer

from memit_adapter import StatisticsError
from memit_adapter.arch import get_arch_spec
from memit_adapter.stats import StatsCache, collect_stats, load_corpus, warn_if_short_texts


def _independent_mom2(model, tok, texts, layer):
    """E[k kᵀ] from the model's own hidden states, text by text, unpadded, in float64."""
    spec = get_arch_spec(model)
    keys = []
    handle = spec.mlp_out_module(model, layer).register_forward_pre_hook(lambda m, a: keys.append(a[0][0].double()))
    try:
        with torch.no_grad():
            for t in texts:
                model(torch.tensor([tok(t)["input_ids"]]))
    finally:
        handle.remove()
    k = torch.cat(keys)
    return k.T @ k / k.shape[0], k.shape[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_pass_equals_independent_per_layer_computation(arch):
    model, tok = model_and_tokenizer(arch)
    texts = [t[: 20 + 7 * i] for i, t in enumerate(corpus(12))]  # different lengths: padding must be masked
    stats = collect_stats(model, tok, texts, [0, 2, 3], batch_size=5, progress=False)
    assert sorted(stats) == [0, 2, 3]
    for layer, stat in stats.items():
        expected, count = _independent_mom2(model, tok, texts, layer)
        assert stat.count == count and stat.mom2.dtype == torch.float32
        torch.testing.assert_close(stat.mom2.double(), expected, rtol=1e-4, atol=1e-6)


def test_cache_hit_runs_no_forward_pass(tmp_path):
    model, tok = model_and_tokenizer("gpt2")
    texts = corpus(30)
    first = collect_stats(model, tok, texts, [1, 2], cache=tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("mom2_layer") and f.endswith(".safetensors") for f in files)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = collect_stats(model, tok, texts, [1, 2], cache=tmp_path, progress=False)
        without_corpus = collect_stats(model, tok, None, [2], cache=tmp_path, progress=False)
        assert not calls
        collect_stats(model, tok, texts, [1, 2, 3], cache=tmp_path, progress=False)  # only layer 3 is new
        assert len(calls) == 4  # ceil(30 texts / 8 per batch)
    finally:
        handle.remove()
    for layer in (1, 2):
        assert torch.equal(first[layer].mom2, again[layer].mom2) and first[layer].count == again[layer].count
    assert torch.equal(without_corpus[2].mom2, first[2].mom2)
    # another corpus or sample count is another key
    collect_stats(model, tok, texts[:10], [1], cache=tmp_path, progress=False)
    assert len(list(tmp_path.glob("mom2_layer1_*"))) == 2
    assert not list(tmp_path.glob(".tmp-*"))


def test_changed_weights_miss_the_cache(tmp_path):
    model, tok = model_and_tokenizer("gpt2")
    collect_stats(model, tok, corpus(10), [1], cache=tmp_path, progress=False)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)
    collect_stats(model, tok, corpus(10), [1], cache=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2


def test_corpus_files_and_dataset(tmp_path):
    texts = corpus(6)
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    a, id_a = load_corpus(tmp_path / "c.txt", 100)
    b, id_b = load_corpus(str(tmp_path / "c.jsonl"), 100)
    c, id_c = load_corpus(texts, 4)
    assert a == b and sorted(a) == sorted(texts) and id_a == id_b
    assert len(set(c)) == 4 and set(c) <= set(texts) and id_c != id_a
    assert load_corpus(texts, 100, seed=1) != (a, id_a) and load_corpus(texts, 100) == (a, id_a)  # seeded order
    datasets = pytest.importorskip("datasets")
    d, id_d = load_corpus(datasets.Dataset.from_dict({"text": texts}), 100)
    assert d == a and id_d == id_a

    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(StatisticsError, match="text"):
        load_corpus(tmp_path / "bad.jsonl", 10)
    with pytest.raises(StatisticsError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt", 10)
    with pytest.raises(StatisticsError):
        load_corpus(42, 10)


def test_a_budget_samples_the_whole_corpus_not_its_head():
    """A corpus written in order (200 texts of one kind, then 200 of another): a budget of 50 texts reads both."""
    texts = [f"alpha {i}" for i in range(200)] + [f"beta {i}" for i in range(200)]
    sample, _ = load_corpus(texts, 50)
    kinds = [t.split()[0] for t in sample]
    assert 15 <= kinds.count("alpha") <= 35 and 15 <= kinds.count("beta") <= 35


def test_no_corpus_and_no_cache_says_how_to_provide_one(tmp_path):
    model, tok = model_and_tokenizer("gpt2")
    with pytest.raises(StatisticsError, match="corpus=.*never downloads"):
        collect_stats(model, tok, None, [1], cache=tmp_path, progress=False)


def test_corrupted_cache_file_is_reported(tmp_path):
    model, tok = model_and_tokenizer("gpt2")
    collect_stats(model, tok, corpus(5), [1], cache=tmp_path, progress=False)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(StatisticsError, match="unreadable"):
        collect_stats(model, tok, corpus(5), [1], cache=StatsCache(tmp_path), progress=False)


def test_half_precision_model_accumulates_in_float32():
    model, tok = model_and_tokenizer("gpt2", dtype=torch.bfloat16)
    stats = collect_stats(model, tok, corpus(8), [1], progress=False)
    assert stats[1].mom2.dtype == torch.float32 and torch.isfinite(stats[1].mom2).all()
    stats64 = collect_stats(model, tok, corpus(8), [1], dtype="float64", progress=False)
    assert stats64[1].mom2.dtype == torch.float64


def test_tensor_bytes_of_odd_strided_and_half_tensors():
    from memit_adapter.fingerprint import tensor_bytes

    col = torch.arange(6.0).reshape(1, 6).T  # (6, 1), strides (1, 6)
    assert tensor_bytes(col) == tensor_bytes(torch.arange(6.0).reshape(6, 1).clone())
    bf = torch.arange(4.0).to(torch.bfloat16)
    assert len(tensor_bytes(bf)) == 8 and tensor_bytes(torch.empty(0)) == b""


def test_token_budget_stops_the_pass_and_keys_the_cache(tmp_path):
    model, tok = model_and_tokenizer("gpt2")
    texts = corpus(40)  # 30 tokens each
    full = collect_stats(model, tok, texts, [1], batch_size=4, cache=tmp_path, progress=False)
    part = collect_stats(model, tok, texts, [1], batch_size=4, max_tokens=200, cache=tmp_path, progress=False)
    assert full[1].count == 1200 and part[1].count == 240  # two batches of 4 x 30 reach 200
    expected, _ = _independent_mom2(model, tok, load_corpus(texts, 40)[0][:8], 1)  # the first 8 in the seeded order
    torch.testing.assert_close(part[1].mom2.double(), expected, rtol=1e-4, atol=1e-6)
    assert len(list(tmp_path.iterdir())) == 2


def test_texts_longer_than_the_context_are_cut_to_it():
    model, tok = model_and_tokenizer("gpt2", n_positions=16)
    texts = corpus(4, length=40)  # 40 tokens each, past the 16 positions
    stats = collect_stats(model, tok, texts, [1], progress=False)
    assert stats[1].count == 4 * 16


def test_a_corpus_of_short_texts_warns_that_c_stops_early():
    model, tok = model_and_tokenizer("gpt2", n_positions=64)
    short = corpus(40, length=10)  # 10 tokens each
    with pytest.warns(UserWarning, match="longest of 40 sampled is 10 tokens against a context of 64"):
        collect_stats(model, tok, short, [1], progress=False)
    long = corpus(1, length=40, seed=1)
    assert warn_if_short_texts(tok, long + short, 64) == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect_stats(model, tok, short + long, [1], progress=False)  # one text past half the context
        collect_stats(model, tok, short, [1], max_length=16, progress=False)  # the texts the model will read


def test_the_log_and_the_bar_count_what_the_budget_used(caplog, capsys):
    """Under a token budget the bar counts key vectors up to the budget (it ends full) and the log names the
    texts actually read, not the corpus size."""
    model, tok = model_and_tokenizer("gpt2")
    texts = corpus(40)  # 30 tokens each
    with caplog.at_level("INFO", logger="memit_adapter.stats"):
        stats = collect_stats(model, tok, texts, [1], batch_size=4, max_tokens=200, progress=True)
    assert stats[1].count == 240 and "from 8 of 40 texts, 240 key vectors" in caplog.text
    bar = capsys.readouterr().err
    assert "200/200" in bar and "keys" in bar


def test_streaming_datasets_splits_and_other_columns():
    datasets = pytest.importorskip("datasets")
    texts = corpus(30)
    stream = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()
    got, _ = load_corpus(stream, 10)
    assert len(set(got)) == 10 and set(got) <= set(texts) and got != texts[:10]  # through the shuffle buffer
    assert load_corpus(stream, 10) == load_corpus(stream, 10)  # seeded
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    with pytest.raises(StatisticsError, match=r"splits \['train'\].*ds\['train'\]"):
        load_corpus(splits, 10)
    with pytest.raises(StatisticsError, match="rename_column"):
        load_corpus(datasets.Dataset.from_dict({"content": texts}), 10)
    with pytest.raises(StatisticsError, match="rename_column"):
        load_corpus(datasets.Dataset.from_dict({"content": texts}).to_iterable_dataset(), 10)


class _Interrupt(Exception):
    pass


def _interrupt_after(model, n_calls: int):
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) > n_calls:
            raise _Interrupt

    return model.register_forward_pre_hook(hook), calls


@pytest.mark.parametrize("max_tokens", [None, 600])
def test_an_interrupted_pass_resumes_from_its_checkpoint_bit_for_bit(tmp_path, max_tokens):
    model, tok = model_and_tokenizer("gpt2")
    texts = corpus(40)  # 30 tokens each: 10 batches of 4, or 5 under the budget of 600 keys
    kw = dict(batch_size=4, max_tokens=max_tokens, progress=False)
    whole = collect_stats(model, tok, texts, [1, 2], cache=tmp_path / "whole", **kw)

    handle, calls = _interrupt_after(model, 3)
    try:
        with pytest.raises(_Interrupt):
            collect_stats(model, tok, texts, [1, 2], cache=tmp_path / "c", checkpoint_seconds=0, **kw)
    finally:
        handle.remove()
    partial = list((tmp_path / "c").glob(".partial-*-rank0of1.safetensors"))
    assert len(partial) == 1 and not list((tmp_path / "c").glob("mom2_*"))  # no entry from a partial pass

    handle, calls = _interrupt_after(model, 100)
    try:
        resumed = collect_stats(model, tok, texts, [1, 2], cache=tmp_path / "c", checkpoint_seconds=0, **kw)
    finally:
        handle.remove()
    assert len(calls) == (10 if max_tokens is None else 5) - 3  # only the batches the first run did not finish
    for layer in (1, 2):
        assert torch.equal(resumed[layer].mom2, whole[layer].mom2) and resumed[layer].count == whole[layer].count
    assert not list((tmp_path / "c").glob(".partial-*"))  # the checkpoint is gone with the entries written


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    model, tok = model_and_tokenizer("gpt2")
    texts = corpus(20)
    handle, _ = _interrupt_after(model, 2)
    try:
        with pytest.raises(_Interrupt):
            collect_stats(model, tok, texts, [1], batch_size=4, cache=tmp_path, checkpoint_seconds=0, progress=False)
    finally:
        handle.remove()
    handle, calls = _interrupt_after(model, 100)
    try:
        other = collect_stats(model, tok, texts, [1], batch_size=5, cache=tmp_path, checkpoint_seconds=0,
                              progress=False)
    finally:
        handle.remove()
    assert len(calls) == 4  # every batch of 5: the batch-of-4 checkpoint is another pass
    expected, count = _independent_mom2(model, tok, texts, 1)
    assert other[1].count == count
    torch.testing.assert_close(other[1].mom2.double(), expected, rtol=1e-4, atol=1e-6)
