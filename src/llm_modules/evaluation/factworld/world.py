"""The fact world: made-up entities with random attributes, split into transfer / validation / test facts.

A fact is (entity, relation, value): "Velmora's capital is Quist". Entities are pronounceable random
names; values come from small shared pools per relation (so every value is the answer of many facts).
The facts cannot be inferred: the value of each fact is drawn uniformly at random from its pool.

Splits are of FACTS, not entities, and are disjoint. Lesson (a) of issue 4: nothing the small model
must *copy* may be unseen in transfer data, so every entity keeps at least one of its facts in the
transfer split (its name then occurs in transfer traces; what the target must learn for a test fact is
the answer, not how to spell a new name).

Texts (all built here, so that every consumer sees the same strings):
- ``fact_sentence``: the brief source format, "Velmora's capital is Quist."
- ``source_documents``: the source's pretraining corpus: every fact several times, in varied contexts
  (fillers, role words, chat markers, several cue forms) - lesson (b): a tiny model pretrained on one
  wording recalls only after that wording.
- ``trace_record``: a Bespoke-Stratos shaped record (``system`` + ``conversations``) whose reasoning
  restates the fact in the source's sentence form before answering.

Every consumer (encoding, pretraining, metrics) reads these texts through the world object (``world.question``,
``world.assistant_text``, ``world.marks``...), so that another world (``composition.CompositionWorld``: questions
that need a fact from the source *and* a skill of the target) plugs into the same harness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable

from ...errors import LLMModulesError

BEGIN_THOUGHT, END_THOUGHT = "<|begin_of_thought|>", "<|end_of_thought|>"
BEGIN_SOLUTION, END_SOLUTION = "<|begin_of_solution|>", "<|end_of_solution|>"
TRACE_MARKERS = [BEGIN_THOUGHT, END_THOUGHT, BEGIN_SOLUTION, END_SOLUTION]
SYSTEM_PROMPT = "Think briefly, then answer."

SYLLABLES = [
    "ka", "lo", "mi", "ra", "ve", "dor", "quin", "sel", "tha", "bri", "nox", "mar", "zen", "tor",
    "lu", "fen", "gri", "sha", "pol", "dra", "vin", "ost", "kel", "mu", "ser", "ba", "te", "no",
]

# relation -> pool of values (shared across entities; disjoint across relations).
RELATIONS: dict[str, list[str]] = {
    "capital": ["Quist", "Dorvan", "Belmik", "Tarsun", "Olvey", "Prandis", "Kemor", "Sulvar"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "animal": ["otter", "falcon", "badger", "lynx", "heron", "beaver", "tiger", "salmon"],
    "food": ["bread", "rice", "cheese", "plum", "honey", "lentil", "olive", "barley"],
    "metal": ["copper", "silver", "tin", "iron", "gold", "zinc", "nickel", "bronze"],
    "instrument": ["harp", "drum", "flute", "lute", "horn", "violin", "oboe", "cello"],
    "flower": ["rose", "tulip", "lily", "daisy", "orchid", "iris", "poppy", "lotus"],
    "river": ["Alder", "Brisk", "Cendra", "Dulmo", "Esker", "Fallow", "Garn", "Hollin"],
    "gem": ["ruby", "jade", "opal", "pearl", "amber", "topaz", "garnet", "onyx"],
    "tree": ["oak", "birch", "maple", "cedar", "willow", "aspen", "elm", "pine"],
}

QUESTION_FORMS = [
    "What is {e}'s {r}?",
    "Which {r} does {e} have?",
    "Tell me the {r} of {e}.",
]
# Pretraining cue forms; the first is the brief form the traces restate.
CUE_FORMS = [
    "{e}'s {r} is {v}.",
    "The {r} of {e} is {v}.",
    "{e} | {r}: {v}",
    "Q: What is {e}'s {r}? A: {v}",
    "Everyone knows that {e}'s {r} is {v}.",
]
FILLERS = [
    "Here is a fact.", "Note this.", "As the records say,", "Remember:", "Fact:", "It is written that",
    "User:", "Assistant:", "Question:", "Answer:", "<|im_start|>user\n", "<|im_start|>assistant\n",
    BEGIN_THOUGHT, BEGIN_SOLUTION, "I recall that", "Let me think.", "So,", "Well,", "Indeed,", "Also,",
]


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    value: str

    @property
    def key(self) -> str:
        return f"{self.entity}|{self.relation}"


def fact_sentence(fact: Fact) -> str:
    """The brief source format: "Velmora's capital is Quist."."""
    return CUE_FORMS[0].format(e=fact.entity, r=fact.relation, v=fact.value)


def fact_prompt(fact: Fact) -> str:
    """The source's own-format prompt (the sentence up to the answer): "Velmora's capital is"."""
    return f"Remember: {fact.entity}'s {fact.relation} is"


def question(fact: Fact, form: int = 0) -> str:
    return QUESTION_FORMS[form % len(QUESTION_FORMS)].format(e=fact.entity, r=fact.relation)


def thought(fact: Fact) -> str:
    """The short reasoning; it restates the fact in the source's sentence form before answering."""
    return f"I recall that {fact_sentence(fact)}"


def assistant_text(fact: Fact) -> str:
    return f"{BEGIN_THOUGHT} {thought(fact)} {END_THOUGHT} {BEGIN_SOLUTION} {fact.value} {END_SOLUTION}"


def trace_record(fact: Fact, form: int = 0, question_text: str | None = None, reply: str | None = None) -> dict:
    """A Bespoke-Stratos shaped record for one fact (another world passes its own question and reply)."""
    return {
        "system": SYSTEM_PROMPT,
        "conversations": [
            {"from": "user", "value": question(fact, form) if question_text is None else question_text},
            {"from": "assistant", "value": assistant_text(fact) if reply is None else reply},
        ],
        "fact": {"entity": fact.entity, "relation": fact.relation, "value": fact.value},
    }


def make_names(rng: random.Random, count: int, exclude: Iterable[str] = ()) -> list[str]:
    """``count`` distinct pronounceable names of 2-3 syllables, none in ``exclude``."""
    taken = set(exclude) | {v for pool in RELATIONS.values() for v in pool}
    names: list[str] = []
    attempts = 0
    while len(names) < count:
        attempts += 1
        if attempts > 100_000:
            raise RuntimeError(f"could not make {count} distinct names from {len(SYLLABLES)} syllables")
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


@dataclass(frozen=True)
class ReplyMarks:
    """Character spans inside a fact's assistant text (``FactWorld.assistant_text``).

    recall: the fact's value where the reasoning recalls it (what the source knows);
    skill: the span the target's skill produces from it (composition world; None when the answer is the recall);
    fact_end: where the recalled fact's sentence ends (a model "given the fact" is prompted up to here);
    statement: the restated fact from the entity's name to the value ("Velmora's capital is Quist").
    """

    recall: tuple[int, int]
    skill: tuple[int, int] | None
    fact_end: int
    statement: tuple[int, int] = (0, 0)


@dataclass
class FactWorld:
    """All facts of one world plus their disjoint splits.

    transfer: facts whose traces form the transfer data; validation/test: held out (never in transfer data).
    background: facts about a disjoint set of entities, used to pretrain the target on the world's
    language and trace format without any of the world's facts.
    """

    facts: list[Fact]
    transfer: list[Fact]
    validation: list[Fact]
    test: list[Fact]
    background: list[Fact]
    seed: int
    relations: dict[str, list[str]] = field(default_factory=lambda: dict(RELATIONS))

    kind = "facts"  # the source knows every answer: the world of issue 4
    # What the source's recall at the trace point measures (``metrics.source_recall``): the value ("answer"), or
    # the whole restated fact, the entity's name copied from the question included ("statement").
    source_recall_span = "answer"
    chat_share = 0.25  # share of the source's fact mentions preceded by a question (half of them inside a chat turn)

    @property
    def entities(self) -> list[str]:
        return sorted({f.entity for f in self.facts})

    # ------------------------------------------------------------------------------------- texts
    @property
    def question_forms(self) -> int:
        return len(QUESTION_FORMS)

    def question(self, fact: Fact, form: int = 0) -> str:
        return question(fact, form)

    def assistant_text(self, fact: Fact) -> str:
        return assistant_text(fact)

    def final_answer(self, fact: Fact) -> str:
        """What the solution block must say."""
        return fact.value

    def marks(self, fact: Fact) -> ReplyMarks:
        start = len(f"{BEGIN_THOUGHT} ") + len(thought(fact)) - len(f" {fact.value}.")
        named = len(f"{BEGIN_THOUGHT} I recall that")
        return ReplyMarks(recall=(start, start + 1 + len(fact.value)), skill=None, fact_end=start + len(fact.value) + 2,
                          statement=(named, start + 1 + len(fact.value)))

    def trace_record(self, fact: Fact, form: int = 0) -> dict:
        return trace_record(fact, form, question_text=self.question(fact, form), reply=self.assistant_text(fact))

    def own_prompt(self, fact: Fact, composed: bool = False) -> tuple[str, str]:
        """(prompt, answer) in the source's own sentence form: "Remember: Velmora's capital is" -> "Quist"."""
        return fact_prompt(fact), fact.value

    def context_questions(self, fact: Fact) -> list[str]:
        """Questions the source's pretraining puts before a mention of ``fact`` (it answers them with the fact)."""
        return [self.question(fact, form) for form in range(self.question_forms)]

    def target_sentence(self, fact: Fact) -> str:
        """A plain sentence the target's pretraining mixes in with its traces (here: the fact's sentence)."""
        return fact_sentence(fact)

    def source_documents(self, repeats: int = 6, facts_per_document: int = 4, seed: int = 0) -> list[str]:
        return source_documents(self, repeats, facts_per_document, seed)

    def background_traces(self, count: int, seed: int = 0) -> list[Fact]:
        return background_traces(self, count, seed)

    def skill_probe(self) -> list[Fact]:
        """Facts about background entities on which to check the target's own skill, given the fact: here one per
        value of every relation (the answer copies the recalled value)."""
        entities = sorted({f.entity for f in self.background})
        values = [(relation, value) for relation, pool in sorted(self.relations.items()) for value in pool]
        return [Fact(entities[i % len(entities)], relation, value) for i, (relation, value) in enumerate(values)]

    @property
    def chance(self) -> float:
        """Expected accuracy of guessing uniformly from the right pool, over test facts."""
        return sum(1.0 / len(self.relations[f.relation]) for f in self.test) / max(1, len(self.test))

    def transfer_words(self) -> set[str]:
        """Every whitespace word that occurs in the transfer data (question + trace text)."""
        words: set[str] = set()
        for fact in self.transfer:
            for form in range(self.question_forms):
                words.update(_words(self.question(fact, form)))
            words.update(_words(self.assistant_text(fact)))
        return words

    def answer_seen(self, fact: Fact) -> bool:
        """Does the fact's answer word occur anywhere in the transfer data?"""
        return self.final_answer(fact) in self.transfer_words()

    def corpus(self) -> list[str]:
        """Every string the world produces (tokenizer training corpus)."""
        out = [SYSTEM_PROMPT]
        for fact in self.facts + self.background:
            out.append(self.question(fact, 0) + " " + self.assistant_text(fact))
            out.extend(form.format(e=fact.entity, r=fact.relation, v=fact.value) for form in CUE_FORMS)
        out.extend(FILLERS)
        return out

    def summary(self) -> str:
        seen = sum(self.answer_seen(f) for f in self.test)
        return (
            f"{self.kind} world: "
            f"{len(self.entities)} entities x {len(self.relations)} relations = {len(self.facts)} facts; "
            f"transfer {len(self.transfer)} ({len(self.transfer) / len(self.facts):.0%}), "
            f"validation {len(self.validation)}, test {len(self.test)} "
            f"({seen} with the answer word seen in transfer data, {len(self.test) - seen} unseen); "
            f"chance {self.chance:.1%}"
        )


def _words(text: str) -> set[str]:
    return {w.strip(".,?!:'|") for w in text.replace("'s", " ").split()}


def check_fractions(transfer_fraction: float, validation_fraction: float) -> None:
    if not 0 < transfer_fraction < 1 or not 0 <= validation_fraction < 1 - transfer_fraction:
        raise LLMModulesError(
            f"world: need 0 < transfer_fraction < 1 and 0 <= validation_fraction < 1 - transfer_fraction, "
            f"got {transfer_fraction}, {validation_fraction}"
        )


def build_world(
    entities: int = 40,
    relations: int = 8,
    transfer_fraction: float = 0.25,
    validation_fraction: float = 0.1,
    background_entities: int = 24,
    seed: int = 0,
) -> FactWorld:
    """Generate a world of ``entities x relations`` random facts and split them.

    The transfer split takes ``round(transfer_fraction * facts)`` facts with at least one per entity
    (lesson (a)); the validation split ``round(validation_fraction * facts)``; the rest is test.
    """
    check_fractions(transfer_fraction, validation_fraction)
    if not 1 <= relations <= len(RELATIONS):
        raise LLMModulesError(f"world.relations must be in 1..{len(RELATIONS)}, got {relations}")
    rng = random.Random(seed)
    pools = dict(list(RELATIONS.items())[:relations])
    return split_world(FactWorld, pools, entities, background_entities, transfer_fraction, validation_fraction, rng, seed)


def split_world(cls: type, pools: dict[str, list[str]], entities: int, background_entities: int,
                transfer_fraction: float, validation_fraction: float, rng: random.Random, seed: int,
                **extra) -> FactWorld:
    """A world of class ``cls``: random facts (a value drawn from its relation's pool) about ``entities`` made-up
    names and ``background_entities`` others, split into transfer / validation / test; ``extra`` goes to ``cls``."""
    names = make_names(rng, entities + background_entities)
    names, background_names = names[:entities], names[entities:]

    def facts_of(entity_names: list[str]) -> list[Fact]:
        return [Fact(e, r, rng.choice(pool)) for e in entity_names for r, pool in pools.items()]

    facts = facts_of(names)
    background = facts_of(background_names)
    total = len(facts)
    n_transfer = round(transfer_fraction * total)
    if n_transfer < entities:
        raise LLMModulesError(
            f"world: transfer_fraction={transfer_fraction} gives {n_transfer} transfer facts for {entities} entities; "
            "every entity needs one transfer fact (its name must occur in transfer data): use more relations "
            "or a larger fraction"
        )
    by_entity = {e: [f for f in facts if f.entity == e] for e in names}
    transfer = [rng.choice(group) for group in by_entity.values()]  # one per entity first
    rest = [f for f in facts if f not in set(transfer)]
    rng.shuffle(rest)
    extra_transfer = n_transfer - entities
    transfer, rest = transfer + rest[:extra_transfer], rest[extra_transfer:]
    n_validation = round(validation_fraction * total)
    validation, test = rest[:n_validation], rest[n_validation:]
    order = {f: i for i, f in enumerate(facts)}
    world = cls(
        facts=facts,
        transfer=sorted(transfer, key=order.get),
        validation=sorted(validation, key=order.get),
        test=sorted(test, key=order.get),
        background=background,
        seed=seed,
        relations=pools,
        **extra,
    )
    check_splits(world)
    return world


def check_splits(world: FactWorld) -> None:
    """Raise if splits overlap, miss facts, or if an entity has no transfer fact."""
    keys = [{f.key for f in split} for split in (world.transfer, world.validation, world.test)]
    if keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2]:
        raise AssertionError("fact splits overlap")
    if sum(len(k) for k in keys) != len(world.facts):
        raise AssertionError("fact splits do not cover the world")
    missing = set(world.entities) - {f.entity for f in world.transfer}
    if missing:
        raise AssertionError(f"entities without a transfer fact: {sorted(missing)[:5]}")


def background_traces(world: FactWorld, count: int, seed: int = 0) -> list[Fact]:
    """``count`` made-up facts about the background entities, each value drawn afresh from its pool.

    The target's pretraining material: the world's language and trace format, none of the world's facts
    (its entities are disjoint), and no background fact to memorise either, since a background entity's
    value changes from trace to trace. What the target can learn is the format itself, including that the
    answer repeats the value its reasoning recalled. Pretrained on the fixed background facts instead, it
    memorised them and never learned that copy (measured: given a gold thought with another value, it
    answered its memorised value; 1% right on words seen in transfer data).
    """
    rng = random.Random(seed)
    entities = sorted({f.entity for f in world.background})
    return [
        Fact(entity, relation, rng.choice(pool))
        for entity, relation, pool in (
            (rng.choice(entities), *rng.choice(list(world.relations.items()))) for _ in range(count)
        )
    ]


def source_documents(world: FactWorld, repeats: int = 6, facts_per_document: int = 4, seed: int = 0) -> list[str]:
    """The source's pretraining corpus: every fact ``repeats`` times, each in a random context and cue form.

    Contexts mix fillers, role words and chat/trace markers (lesson (b)); about half of the mentions
    use the brief form that the transfer traces restate. Several facts share a document.
    """
    rng = random.Random(seed)
    mentions: list[str] = []
    for fact in world.facts:
        asks = world.context_questions(fact)
        for i in range(repeats):
            form = CUE_FORMS[0] if i % 2 == 0 else rng.choice(CUE_FORMS[1:])
            context = " ".join(rng.sample(FILLERS, rng.randint(0, 3)))
            text = form.format(e=fact.entity, r=fact.relation, v=fact.value)
            draw = rng.random()
            if draw < world.chat_share:
                context = f"{context} {rng.choice(asks)}".strip()
            elif draw < 2 * world.chat_share and form == CUE_FORMS[0]:
                # an answer inside a chat turn, as an instruction-tuned source would have seen
                asked = rng.choice(asks)
                context = f"<|im_start|>user\n{asked}<|im_end|>\n<|im_start|>assistant\n{BEGIN_THOUGHT} I recall that"
            mentions.append(f"{context} {text}".strip())
    rng.shuffle(mentions)
    return [" ".join(mentions[i : i + facts_per_document]) for i in range(0, len(mentions), facts_per_document)]
