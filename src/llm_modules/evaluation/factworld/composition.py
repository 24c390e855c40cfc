"""The composition world: each parent holds half of what an answer needs.

The source knows facts about made-up entities whose values are two-digit numbers ("Velmora's room is 4 7").
The target knows a cipher the source never saw: a random one-to-one map of the 100 two-digit numbers
("The cipher of 4 7 is 9 2"), learned on traces about *other* entities, so it knows no fact about the
world's entities. A question needs both:

    user:      What is the cipher of Velmora's room?
    assistant: <|begin_of_thought|> I recall that Velmora's room is 4 7. The cipher of 4 7 is 9 2.
               <|end_of_thought|> <|begin_of_solution|> 9 2 <|end_of_solution|>

The source alone cannot say the cipher, the target alone cannot recall the room: each answers about 1 in 100
(chance). The fact-recall skyline is the source answering "Velmora's room is" in its own format; the skill
skyline is the target given the recalled fact.

Why digits, written one token each ("4 7", not "47"), and a cipher over whole numbers. This is CALM's key-value
arithmetic (Bansal et al. 2024) turned around, since here the large model holds the keys.
- A composition passes what the source knows into the target's stream. In the bridge (the target reads
  only the connector's output, never its own token embeddings), a number the transfer data never named
  would be an input token that the connector never learned to deliver. Digits are ten tokens, and every
  transfer trace has several of them, so the bridge can carry any number. The same holds for the output:
  a new head can only say tokens it was trained on.
- A random cipher over whole numbers cannot be learned from the transfer data. The transfer data shows
  the cipher of about half the numbers. A test fact whose final answer never occurs there needs the
  target's own cipher (`answer unseen` in the table). A digit-wise rule such as "add 3 to each digit"
  would be learned from the transfer traces themselves.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ...errors import LLMModulesError

from .world import (
    BEGIN_SOLUTION,
    BEGIN_THOUGHT,
    CUE_FORMS,
    END_SOLUTION,
    END_THOUGHT,
    FILLERS,
    QUESTION_FORMS,
    SYSTEM_PROMPT,
    Fact,
    FactWorld,
    ReplyMarks,
    check_fractions,
    fact_sentence,
    split_world,
)

# Relations whose values are two-digit numbers; the cipher applies to any of them.
NUMBER_RELATIONS = ["room", "locker", "gate", "seat", "track", "cabin", "desk", "berth", "badge", "pier"]
NUMBERS = [f"{n // 10} {n % 10}" for n in range(100)]  # "4 7": one token per digit
COMPOSED_QUESTION_FORMS = [
    "What is the cipher of {e}'s {r}?",
    "Which cipher does {e}'s {r} have?",
    "Tell me the cipher of {e}'s {r}.",
]
_NUMBER = re.compile(r"(?<!\d)(?<!\d )\d \d(?! ?\d)")  # a two-digit number as this world writes it


def cipher_sentence(number: str, cipher: str) -> str:
    """The target's skill as a sentence: "The cipher of 4 7 is 9 2."."""
    return f"The cipher of {number} is {cipher}."


@dataclass
class CompositionWorld(FactWorld):
    """A fact world whose questions ask for the cipher of a fact's value (``cipher``: number -> number)."""

    cipher: dict[str, str] = field(default_factory=dict)
    kind = "composition"
    # The source must restate the fact, the name copied from the question included: neither the bridge's new head
    # nor the target can say a name the source did not (measured: a source trained until it recalled the value
    # given the name wrote one name for every question, and every bridge copied it; 0-3% of test facts).
    source_recall_span = "statement"
    chat_share = 0.4

    @property
    def chance(self) -> float:
        """Guessing one of the 100 numbers uniformly."""
        return 1.0 / len(NUMBERS)

    @property
    def question_forms(self) -> int:
        return len(COMPOSED_QUESTION_FORMS)

    def question(self, fact: Fact, form: int = 0) -> str:
        return COMPOSED_QUESTION_FORMS[form % len(COMPOSED_QUESTION_FORMS)].format(e=fact.entity, r=fact.relation)

    def final_answer(self, fact: Fact) -> str:
        return self.cipher[fact.value]

    def thought(self, fact: Fact) -> str:
        return f"I recall that {fact_sentence(fact)} {cipher_sentence(fact.value, self.final_answer(fact))}"

    def assistant_text(self, fact: Fact) -> str:
        return (f"{BEGIN_THOUGHT} {self.thought(fact)} {END_THOUGHT} {BEGIN_SOLUTION} {self.final_answer(fact)} "
                f"{END_SOLUTION}")

    def marks(self, fact: Fact) -> ReplyMarks:
        reply = self.assistant_text(fact)
        recall = len(f"{BEGIN_THOUGHT} I recall that ") + len(fact_sentence(fact)) - len(f" {fact.value}.")
        skill = reply.index(cipher_sentence(fact.value, self.final_answer(fact))) + len(
            f"The cipher of {fact.value} is")
        return ReplyMarks(recall=(recall, recall + 1 + len(fact.value)),
                          skill=(skill, skill + 1 + len(self.final_answer(fact))),
                          fact_end=recall + len(fact.value) + 2,
                          statement=(len(f"{BEGIN_THOUGHT} I recall that"), recall + 1 + len(fact.value)))

    def own_prompt(self, fact: Fact, composed: bool = False) -> tuple[str, str]:
        """The source's own sentence form: the fact ("Remember: Velmora's room is" -> "4 7"), or with
        ``composed`` the question ("Remember: the cipher of Velmora's room is" -> "9 2")."""
        if composed:
            return f"Remember: the cipher of {fact.entity}'s {fact.relation} is", self.final_answer(fact)
        return super().own_prompt(fact)

    def context_questions(self, fact: Fact) -> list[str]:
        """The source hears the plain and the composed questions, always answered with the fact: it sees the word
        "cipher", never a cipher (so it recalls the fact at the composed trace's recall point, lesson (b))."""
        plain = [q.format(e=fact.entity, r=fact.relation) for q in QUESTION_FORMS]
        return plain + [self.question(fact, form) for form in range(self.question_forms)]

    def skill_probe(self) -> list[Fact]:
        """One background fact per number 00-99 (relations in turn): the target, given the fact, must say every
        number's cipher."""
        entities = sorted({f.entity for f in self.background})
        relations = sorted(self.relations)
        return [Fact(entities[i % len(entities)], relations[i % len(relations)], number)
                for i, number in enumerate(NUMBERS)]

    def target_sentence(self, fact: Fact) -> str:
        return cipher_sentence(fact.value, self.final_answer(fact))

    def transfer_numbers(self) -> set[str]:
        """Every number that occurs anywhere in the transfer data (questions and traces)."""
        found: set[str] = set()
        for fact in self.transfer:
            for form in range(self.question_forms):
                found.update(_NUMBER.findall(self.question(fact, form)))
            found.update(_NUMBER.findall(self.assistant_text(fact)))
        return found

    def answer_seen(self, fact: Fact) -> bool:
        """Does the final answer (the cipher of the value) occur anywhere in the transfer data, as any number?"""
        return self.final_answer(fact) in self.transfer_numbers()

    def corpus(self) -> list[str]:
        out = [SYSTEM_PROMPT, *NUMBERS]
        for fact in self.facts + self.background:
            out.append(self.question(fact, 0) + " " + self.assistant_text(fact))
            out.extend(q.format(e=fact.entity, r=fact.relation) for q in QUESTION_FORMS)
            out.extend(form.format(e=fact.entity, r=fact.relation, v=fact.value) for form in CUE_FORMS)
        out.extend(cipher_sentence(n, c) for n, c in self.cipher.items())
        out.extend(FILLERS)
        return out


def build_composition_world(
    entities: int = 32,
    relations: int = 8,
    transfer_fraction: float = 0.25,
    validation_fraction: float = 0.1,
    background_entities: int = 16,
    seed: int = 0,
) -> CompositionWorld:
    """``entities x relations`` facts with two-digit values, a random cipher of the 100 numbers, and the splits
    of ``build_world`` (every entity keeps one transfer fact)."""
    check_fractions(transfer_fraction, validation_fraction)
    if not 1 <= relations <= len(NUMBER_RELATIONS):
        raise LLMModulesError(f"world.relations must be in 1..{len(NUMBER_RELATIONS)}, got {relations}")
    rng = random.Random(seed)
    shuffled = rng.sample(NUMBERS, len(NUMBERS))
    while any(a == b for a, b in zip(NUMBERS, shuffled)):  # no number is its own cipher: recalling is never answering
        shuffled = rng.sample(NUMBERS, len(NUMBERS))
    cipher = dict(zip(NUMBERS, shuffled))
    pools = {r: list(NUMBERS) for r in NUMBER_RELATIONS[:relations]}
    return split_world(CompositionWorld, pools, entities, background_entities, transfer_fraction, validation_fraction,
                       rng, seed, cipher=cipher)


__all__ = ["COMPOSED_QUESTION_FORMS", "CompositionWorld", "NUMBERS", "build_composition_world", "cipher_sentence"]
