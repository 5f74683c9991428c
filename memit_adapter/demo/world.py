"""A seeded fact world: invented people, their facts, a corpus that states them, CounterFact-style records.

Usage::

    world = make_world(seed=0)                    # 300 subjects x 7 relations, deterministic
    world.subjects[0]                             # 'otto zapous'
    world.facts[0]                                # Fact(subject='otto zapous', relation='lives_in', obj='rome')
    world.prompt(world.facts[0], 1)               # 'otto zapous has a home in'
    sentences = world.corpus_sentences()          # every fact in every template, plus a little filler
    records = world.counterfact_records()         # CounterFact-format dicts, targets like ' paris'
    make_world(0, names="composite")              # shared first names and surnames, unique pairs
    tok = train_world_tokenizer(make_world(0, n_subjects=600), kind="bpe", vocab_size=780)  # GPT-2-style BPE
    docs = pack_documents(sentences, tok, 64)     # joined into running texts of <= 64 tokens (statistics corpus)

By default (``names="unique_surname"``) every subject's name ends in a surname that no other subject
has, so the last subject token identifies the subject. ``names="composite"`` draws first names and
surnames from two small pools, each word shared by many subjects, only the (first name, surname)
pair unique. (A 6-layer model trained on a composite world did not compose the subject at its last
token, though: it read both names from the last prompt token, and MEMIT edits there failed too.)
Objects are single words; no template is a prefix of another, so a prompt has exactly one correct
next word.

Two kinds of shipped checkpoints: ``"gpt2"`` and ``"llama"`` were shaped until MEMIT worked on them (a
word-level tokenizer, attention-free first blocks, frozen name embeddings); ``"gpt2-bpe"`` and
``"llama-sp"`` are stock models trained the ordinary way on a 600-subject world with subword tokenizers
of :func:`train_world_tokenizer`, where names and some objects are several tokens, as in large LMs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..evaluation import target_top1

__all__ = ["NAME_STYLES", "RELATIONS", "TOKENIZER_KINDS", "Fact", "FactWorld", "Relation", "build_world_tokenizer",
           "check_templates", "make_world", "pack_documents", "recall_by_template", "train_world_tokenizer"]


@dataclass(frozen=True)
class Relation:
    """A relation: its id, templates with one ``{}`` for the subject, and the single-word objects it takes."""

    relation_id: str
    templates: tuple[str, ...]
    objects: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    obj: str


RELATIONS: tuple[Relation, ...] = (
    Relation("lives_in", (
        "{} lives in", "{} has a home in", "the home of {} is in", "{} resides in", "these days , {} lives in",
    ), ("paris", "london", "rome", "berlin", "tokyo", "madrid", "vienna", "oslo", "cairo", "lima")),
    Relation("profession", (
        "{} works as a", "{} is a", "the profession of {} is", "{} earns a living as a", "by trade , {} is a",
    ), ("doctor", "teacher", "pilot", "farmer", "lawyer", "baker", "painter", "nurse", "chemist", "sailor")),
    Relation("born_in", (
        "{} was born in", "the birthplace of {} is", "{} originally comes from", "{} came into the world in",
        "the country where {} was born is",
    ), ("france", "england", "italy", "germany", "japan", "spain", "austria", "norway", "egypt", "peru")),
    Relation("language", (
        "{} speaks", "the native language of {} is", "the mother tongue of {} is", "{} grew up speaking",
        "{} is fluent in",
    ), ("french", "english", "italian", "german", "japanese", "spanish", "dutch", "swedish", "arabic", "hindi")),
    Relation("sport", (
        "{} plays", "the favorite sport of {} is", "{} is good at", "every weekend , {} plays",
        "{} loves to play",
    ), ("soccer", "tennis", "golf", "hockey", "baseball", "cricket", "rugby", "chess", "volleyball", "basketball")),
    Relation("team", (
        "{} supports the", "the favorite team of {} is the", "{} cheers for the", "{} roots for the",
        "at every game , {} shouts for the",
    ), ("falcons", "tigers", "wolves", "sharks", "eagles", "bears", "lions", "hornets", "comets", "pirates")),
    Relation("employer", (
        "{} works for", "the employer of {} is", "{} is employed by", "{} has a job at",
        "every morning , {} drives to",
    ), ("zentrix", "orvana", "kelbio", "quorra", "maxfeld", "lumora", "tessaly", "brightwave", "novacorp",
        "ferrolux")),
)

FIRST_NAMES = (
    "mira", "oskar", "lena", "tomas", "ada", "felix", "nora", "ivan", "clara", "hugo", "elsa", "marco", "ruth",
    "pavel", "greta", "leo", "sofia", "anton", "vera", "emil", "ines", "otto", "lara", "bruno", "maya", "jonas",
    "petra", "karl", "alma", "victor",
)
MIDDLE_NAMES = ("van", "de", "del", "le", "von")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "k", "s", "m", "nd", "rk", "th")

# Filler: short generic sentences, several starting with the words MEMIT samples context templates from.
_FILLER_STARTS = ("the", "therefore", "because", "i", "you", "we", "they", "it", "then", "so")
_FILLER_SUBJECTS = ("the river", "the old road", "the small town", "the market", "the winter", "the train",
                    "the garden", "the bridge", "the library", "the storm", "the festival", "the harbor")
_FILLER_VERBS = ("was quiet", "was busy", "looked calm", "seemed long", "felt cold", "stayed open",
                 "grew larger", "was closed", "became famous", "was late", "looked bright", "felt warm")
_FILLER_TAILS = ("today", "last night", "in the spring", "after the rain", "for a while", "again", "at noon",
                 "this year", "once more", "all day")
_FILLER_OPENERS = {"the": "", "therefore": "therefore ,", "because": "because of that ,", "i": "i think",
                   "you": "you know", "we": "we saw that", "they": "they said", "it": "it is true that",
                   "then": "then", "so": "so"}


@dataclass
class FactWorld:
    """Subjects, relations and the true fact for every (subject, relation), all drawn from ``seed``."""

    seed: int
    subjects: list[str]
    relations: tuple[Relation, ...]
    facts: list[Fact]
    filler: list[str] = field(default_factory=list)
    names: str = "unique_surname"

    def relation(self, relation_id: str) -> Relation:
        for rel in self.relations:
            if rel.relation_id == relation_id:
                return rel
        raise KeyError(f"no relation {relation_id!r}; known: {[r.relation_id for r in self.relations]}")

    def prompt(self, fact: Fact, template: int) -> str:
        """The prompt of ``fact`` in template number ``template``, without the object."""
        return self.relation(fact.relation).templates[template].format(fact.subject)

    def fact_sentences(self) -> list[str]:
        """Every fact stated in every template of its relation: ``'mira tolvanek lives in paris .'``."""
        return [f"{self.prompt(f, t)} {f.obj} ." for f in self.facts
                for t in range(len(self.relation(f.relation).templates))]

    def corpus_sentences(self) -> list[str]:
        """Fact sentences followed by the filler sentences (shuffle them yourself for training)."""
        return self.fact_sentences() + list(self.filler)

    def vocabulary(self) -> list[str]:
        """Every word that occurs in the corpus, the subjects and the objects, sorted."""
        words = set()
        for text in self.corpus_sentences():
            words.update(text.split())
        for rel in self.relations:
            words.update(rel.objects)
            for t in rel.templates:
                words.update(t.replace("{}", " ").split())
        return sorted(words)

    def counterfact_records(self, *, n_neighbors: int = 10, n_generation: int = 3,
                            leading_space: bool = True) -> list[dict[str, Any]]:
        """One CounterFact-format record per fact, in the order of ``facts``; deterministic in ``seed``.

        The rewrite prompt is a random template of the relation, the paraphrases are the other templates,
        the neighbourhood prompts state the same relation for other subjects with the same true object,
        the attribute prompts for subjects whose true object is the new target. Targets carry a leading
        space (``" paris"``), as MEMIT's GPT-2-style requests do; ``leading_space=False`` stores them as
        CounterFact does (``"paris"``), leaving the space to whoever tokenises prompt and target. The
        choice changes nothing else in the records.
        """
        space = " " if leading_space else ""
        rng = random.Random(f"{self.seed}-records")
        holders: dict[tuple[str, str], list[str]] = {}
        for f in self.facts:
            holders.setdefault((f.relation, f.obj), []).append(f.subject)
        records = []
        for case_id, fact in enumerate(self.facts):
            rel = self.relation(fact.relation)
            templates = list(rel.templates)
            t_rewrite = rng.randrange(len(templates))
            target_new = rng.choice([o for o in rel.objects if o != fact.obj])
            others = [t for i, t in enumerate(templates) if i != t_rewrite]
            neighbors = [s for s in holders[(rel.relation_id, fact.obj)] if s != fact.subject]
            attributes = holders.get((rel.relation_id, target_new), [])
            neighbors = rng.sample(neighbors, min(n_neighbors, len(neighbors)))
            attributes = rng.sample(attributes, min(n_neighbors, len(attributes)))
            records.append({
                "case_id": case_id,
                "requested_rewrite": {
                    "prompt": templates[t_rewrite],
                    "relation_id": rel.relation_id,
                    "subject": fact.subject,
                    "target_new": {"str": space + target_new},
                    "target_true": {"str": space + fact.obj},
                },
                "paraphrase_prompts": [t.format(fact.subject) for t in others],
                "neighborhood_prompts": [templates[(t_rewrite + 1 + i) % len(templates)].format(s)
                                         for i, s in enumerate(neighbors)],
                "attribute_prompts": [templates[(t_rewrite + 1 + i) % len(templates)].format(s)
                                      for i, s in enumerate(attributes)],
                "generation_prompts": [t.format(fact.subject) for t in rng.sample(templates, n_generation)],
            })
        return records

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "subjects": self.subjects,
                "relations": [{"relation_id": r.relation_id, "templates": list(r.templates),
                               "objects": list(r.objects)} for r in self.relations],
                "facts": [[f.subject, f.relation, f.obj] for f in self.facts], "filler": self.filler,
                "names": self.names}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FactWorld:
        relations = tuple(Relation(r["relation_id"], tuple(r["templates"]), tuple(r["objects"]))
                          for r in data["relations"])
        return cls(seed=data["seed"], subjects=list(data["subjects"]), relations=relations,
                   facts=[Fact(*f) for f in data["facts"]], filler=list(data.get("filler", [])),
                   names=data.get("names", "unique_surname"))


NAME_STYLES = ("composite", "unique_surname")


def make_world(seed: int = 0, *, n_subjects: int = 300, n_filler: int = 150,
               relations: Sequence[Relation] = RELATIONS, names: str = "unique_surname",
               n_surnames: int = 30) -> FactWorld:
    """Draw a world: ``n_subjects`` people with unique names, one object per (subject, relation).

    Deterministic in ``seed`` (and ``names``). About one name in five has a middle particle
    ("ada van dorek"), so subjects are two or three words long. ``names="composite"`` draws surnames
    from a pool of ``n_surnames`` words and first names from ``FIRST_NAMES``, each word shared by many
    subjects, with every (first name, surname) pair used once; ``names="unique_surname"`` (the
    default, the worlds of earlier versions) gives every subject a surname of its own.
    """
    if n_subjects < 2:
        raise ConfigError(f"n_subjects must be >= 2, got {n_subjects}")
    if names not in NAME_STYLES:
        raise ConfigError(f"names must be one of {NAME_STYLES}, got {names!r}")
    relations = tuple(relations)
    check_templates(relations)
    rng = random.Random(seed)
    reserved = {w for rel in relations for t in rel.templates for w in t.split()}
    reserved |= {o for rel in relations for o in rel.objects} | set(FIRST_NAMES) | set(MIDDLE_NAMES)
    subjects = []
    if names == "unique_surname":
        for surname in _surnames(rng, n_subjects, reserved):
            parts = [rng.choice(FIRST_NAMES)]
            if rng.random() < 0.2:
                parts.append(rng.choice(MIDDLE_NAMES))
            subjects.append(" ".join(parts + [surname]))
    else:
        if n_surnames < 2 or n_surnames * len(FIRST_NAMES) < n_subjects:
            raise ConfigError(f"{n_surnames} surnames x {len(FIRST_NAMES)} first names cannot name "
                              f"{n_subjects} subjects")
        surnames = _surnames(rng, n_surnames, reserved)
        pairs = [(first, last) for first in FIRST_NAMES for last in surnames]
        for first, last in rng.sample(pairs, n_subjects):
            parts = [first]
            if rng.random() < 0.2:
                parts.append(rng.choice(MIDDLE_NAMES))
            subjects.append(" ".join(parts + [last]))
    facts = [Fact(s, rel.relation_id, rng.choice(rel.objects)) for s in subjects for rel in relations]
    return FactWorld(seed=seed, subjects=subjects, relations=relations, facts=facts,
                     filler=_filler(rng, n_filler), names=names)


def check_templates(relations: Sequence[Relation]) -> None:
    """Raise :class:`ConfigError` if a template is malformed or a prompt is a prefix of another one.

    "{} is a" before "{} is a fan of the" would leave two right answers after "is a", and a model
    trained on both cannot recall either reliably.
    """
    prompts = []
    for rel in relations:
        if len(set(rel.objects)) != len(rel.objects) or any(len(o.split()) != 1 for o in rel.objects):
            raise ConfigError(f"relation {rel.relation_id!r}: objects must be distinct single words")
        for t in rel.templates:
            if t.count("{}") != 1:
                raise ConfigError(f"template {t!r} must hold exactly one '{{}}'")
            prompts.append((t.replace("{}", "SUBJ").split(), t))
    for words_a, a in prompts:
        for words_b, b in prompts:
            if a != b and words_b[: len(words_a)] == words_a:
                raise ConfigError(f"template {a!r} is a prefix of {b!r}: the word after it would be ambiguous")


def _surnames(rng: random.Random, n: int, reserved: set[str]) -> list[str]:
    names: list[str] = []
    seen = set(reserved)
    while len(names) < n:
        syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3)))]
        name = "".join(syllables) + rng.choice(_CODAS)
        if name not in seen and len(name) >= 4:
            seen.add(name)
            names.append(name)
    return names


def _filler(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    seen = set()
    while len(out) < n and len(seen) < 10 * n:
        start = rng.choice(_FILLER_STARTS)
        words = [_FILLER_OPENERS[start], rng.choice(_FILLER_SUBJECTS), rng.choice(_FILLER_VERBS),
                 rng.choice(_FILLER_TAILS), "."]
        text = " ".join(w for w in words if w)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def pack_documents(texts: Sequence[str], tokenizer: Any, max_tokens: int, *, seed: int = 0) -> list[str]:
    """``texts`` shuffled (``random.Random(seed)``) and joined by single spaces into documents of at most
    ``max_tokens`` tokens, special tokens included: running text like the rows the worlds were trained on.

    The statistics of a model that writes past one sentence should see keys at the positions it writes at; a
    corpus of one sentence per line covers only the first dozen. A text longer than ``max_tokens`` makes a
    document of its own (the statistics pass truncates it); blank texts are left out. Counts assume that the
    tokenizer splits words at spaces before merging (byte-level BPE, ``▁`` Metaspace, word level); a joined
    document that comes out longer than ``max_tokens`` raises :class:`ConfigError`.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be at least 1, got {max_tokens}")
    if isinstance(texts, str):
        raise ConfigError("texts must be a sequence of strings, got one string")
    if any("\n" in t for t in texts):
        raise ConfigError("texts must not hold line breaks (a packed document is one line of a corpus file)")
    order = [t for t in texts if t.strip()]
    random.Random(seed).shuffle(order)
    if not order:
        return []
    special = len(tokenizer("x")["input_ids"]) - len(tokenizer("x", add_special_tokens=False)["input_ids"])
    first = [len(ids) for ids in tokenizer(order, add_special_tokens=False)["input_ids"]]
    after = [len(ids) for ids in tokenizer([" " + t for t in order], add_special_tokens=False)["input_ids"]]
    groups, current, used = [], [], special
    for text, n_first, n_after in zip(order, first, after):
        if current and used + n_after > max_tokens:
            groups.append(current)
            current, used = [], special
        used += n_after if current else n_first
        current.append(text)
    groups.append(current)
    docs = [" ".join(g) for g in groups]
    joined = [i for i, g in enumerate(groups) if len(g) > 1]
    lengths = [len(ids) for ids in tokenizer([docs[i] for i in joined])["input_ids"]] if joined else []
    over = [docs[i] for i, n in zip(joined, lengths) if n > max_tokens]
    if over:
        raise ConfigError(f"{len(over)} packed documents exceed {max_tokens} tokens: this tokenizer merges across "
                          f"spaces, so texts cannot be counted one by one (first: {over[0][:80]!r})")
    return docs


def build_world_tokenizer(world: FactWorld, *, add_bos: bool = False) -> Any:
    """A lower-casing word-level ``PreTrainedTokenizerFast`` over the world's vocabulary.

    ``add_bos=True`` puts ``<s>`` in front of every text, as LLaMA's tokenizer does. Ids 0-3 are
    ``<pad> <unk> <s> </s>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", add_bos_token=add_bos, model_max_length=128)


TOKENIZER_KINDS = ("bpe", "sentencepiece")
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def train_world_tokenizer(world: FactWorld, *, kind: str, vocab_size: int) -> Any:
    """A subword ``PreTrainedTokenizerFast`` trained on the world's corpus, built like GPT-2's or LLaMA's.

    Usage::

        world = make_world(0, n_subjects=600)
        tok = train_world_tokenizer(world, kind="bpe", vocab_size=780)
        tok.tokenize("the home of otto zapous is in")   # [..., 'Ġotto', 'Ġz', 'ap', 'ou', 's', 'Ġis', 'Ġin']
        sp = train_world_tokenizer(world, kind="sentencepiece", vocab_size=540)
        sp("otto zapous")["input_ids"][0] == sp.bos_token_id   # True

    ``kind="bpe"``: GPT-2's byte-level BPE: ByteLevel pre-tokenizer without a prefix space, all 256
    bytes in the vocabulary (any text encodes), ByteLevel decoder, no BOS. ``kind="sentencepiece"``:
    LLaMA's SentencePiece BPE: Metaspace pre-tokenizer (``▁``, prepend_scheme ``"first"``), the
    corpus's characters plus ``<unk>``, Metaspace decoder, and a post-processor that puts ``<s>`` in
    front of every text. Neither lower-cases (the world is lower case). Ids 0-3 are ``<pad> <unk> <s>
    </s>`` as in :func:`build_world_tokenizer`; pad, unk, BOS and EOS are set. Deterministic in the
    world, ``kind`` and ``vocab_size``.

    The tokenizer learns from every corpus sentence twice, as a text of its own and after a space, the
    way sentences occur in running text (for byte-level BPE ``otto`` and ``Ġotto`` are different tokens).
    ``vocab_size`` counts every token. BPE first merges the frequent template words, then objects and the
    syllables that surnames are made of; each surname occurs only 35 times (7 relations x 5 templates), so
    a vocabulary small enough leaves surnames split into syllables. On ``make_world(0, n_subjects=600)``,
    780 (bpe) and 540 (sentencepiece) split surnames into 2-8 tokens (4 typically) and leave six of the
    70 objects in several tokens; from about 850 (bpe) and 580 (sentencepiece) every object is one token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise ConfigError(f"kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    if vocab_size < len(_SPECIALS) + len(alphabet) + 1:
        raise ConfigError(f"vocab_size {vocab_size} leaves no room for merges after {len(_SPECIALS)} special "
                          f"tokens and {len(alphabet)} base symbols")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    sentences = world.corpus_sentences()
    tok.train_from_iterator(sentences + [" " + s for s in sentences], trainer)
    add_bos = kind == "sentencepiece"
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                           special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", add_bos_token=add_bos, clean_up_tokenization_spaces=False)


def recall_by_template(model: Any, tokenizer: Any, world: FactWorld, *, facts: Sequence[Fact] | None = None,
                       prefix: str = "", batch_size: int = 256) -> dict[str, dict[int, float]]:
    """Share of facts whose greedy continuation of each template's prompt is the true object, every token of it.

    Returns ``{relation_id: {template_index: recall}}``. The object's tokens are those of
    ``prompt + " " + object`` after the prompt's (:func:`memit_adapter.evaluation.target_top1`, with the
    engine's encoder); a fact counts when, fed the prompt and the object, the
    model's argmax at every object position is the next object token, which is exactly when greedy decoding
    writes the object (in these tokens; another spelling of it in other tokens does not count). With a
    word-level tokenizer that is the next word. ``prefix`` (e.g. a filler sentence) is put in front of every
    prompt to check that recall survives unrelated context.
    """
    facts = list(world.facts if facts is None else facts)
    items = [(f, t) for f in facts for t in range(len(world.relation(f.relation).templates))]
    top1 = target_top1(model, tokenizer, [prefix + world.prompt(f, t) for f, t in items], [f.obj for f, _ in items],
                       batch_size=batch_size).tolist()
    hits: dict[str, dict[int, list[bool]]] = {}
    for (f, t), hit in zip(items, top1):
        hits.setdefault(f.relation, {}).setdefault(t, []).append(hit)
    return {rel: {t: sum(v) / len(v) for t, v in sorted(by_t.items())} for rel, by_t in hits.items()}
