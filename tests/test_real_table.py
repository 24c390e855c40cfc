"""The real transfer table (evaluation/real/) end to end at tiny size: tiny random models with two tokenizers and
one, synthetic questions in the offline-datasets schema. Resume, partial runs, the report's fields, bad configs."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from llm_modules.errors import LLMModulesError
from llm_modules.evaluation.real.letter_training import Distillation, letter_loss
from llm_modules.evaluation.real.questions import question_sets
from llm_modules.evaluation.real.table import load_real_config, real_main
from llm_modules.tiny import DEFAULT_CORPUS, build_tokenizer, save_tiny, tiny_model

WORDS = ["sun", "moon", "rock", "water", "plant", "heat", "light", "cell", "wind", "ice", "salt", "iron"]
LETTER_CORPUS = [" A B C D E F G H", "A. B. C. D.", "Answer: A", "Answer: B", "Answer: C", "Answer: D",
                 "Answer with the letter of the correct choice only."] * 20


def _questions(prefix: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{prefix}-{i}", "question": f"Which is {rng.choice(WORDS)} made of?",
             "choices": rng.sample(WORDS, 4), "answer": rng.randrange(4)} for i in range(count)]


@pytest.fixture(scope="module")
def table_world(tmp_path_factory):
    """{config, folder}: datasets, a source, a target with another tokenizer and one with the source's."""
    root = tmp_path_factory.mktemp("real-table")
    datasets = root / "datasets"
    for task, split, count in (("arc_easy", "train", 8), ("arc_challenge", "train", 8), ("arc_challenge", "test", 6),
                               ("mmlu", "test", 6)):
        folder = datasets / task
        folder.mkdir(parents=True, exist_ok=True)
        rows = _questions(f"{task}-{split}", count, hash((task, split)) % 100)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = DEFAULT_CORPUS + LETTER_CORPUS + [" ".join(WORDS)] * 5
    shared = build_tokenizer(corpus, vocab_size=400)
    other = build_tokenizer(corpus + ["another vocabulary entirely"] * 7, vocab_size=360)
    source = save_tiny(tiny_model("qwen2", shared, seed=0, hidden=48), shared, root / "source")
    two = save_tiny(tiny_model("llama", other, seed=1, hidden=32), other, root / "target-two")
    one = save_tiny(tiny_model("qwen2", shared, seed=2, hidden=32), shared, root / "target-one")
    config = {
        "real": True, "source": str(source), "datasets": str(datasets), "output": str(root / "out"),
        "docs": str(root / "docs"),
        "questions": {"transfer": 8, "arc_challenge": 4, "mmlu": 4, "seed": 0},
        "budget": {"epochs": 1, "batch_size": 4},
        "rates": {"fusion": 1e-2},
        "save_models": ["two/fusion_prompt"],
        "pairs": {
            "two": {"target": str(two), "rows": ["source_alone", "target_alone", "sft", "lora_sft", "kd", "bridge",
                                                  "fusion_prompt"], "seeds": [0, 1]},
            "one": {"target": str(one), "rows": ["target_alone", "lora_sft", "fusion_prompt", "semalign"], "seeds": [0]},
        },
    }
    path = root / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    small = dict(config, output=str(root / "small-out"), docs=None,
                 pairs={"two": {"target": str(two), "rows": ["source_alone", "target_alone", "kd", "fusion_prompt"],
                                "seeds": [0, 1]}})
    (root / "small.yaml").write_text(yaml.safe_dump(small))
    return {"config": path, "small": root / "small.yaml", "root": root}


def _results(world, output: str = "out") -> dict:
    return json.loads((world["root"] / output / "results.json").read_text())


@pytest.mark.slow
def test_the_whole_table_runs_at_tiny_size(table_world):
    """Every row of both pairs (two tokenizers and one, SemAlign included), two seeds, the report and the plot."""
    assert real_main(["--config", str(table_world["config"])]) == 0
    results = _results(table_world)
    rows = results["rows"]
    assert set(rows) == {"two/source_alone", "two/target_alone", "two/sft", "two/lora_sft", "two/kd", "two/bridge",
                         "two/fusion_prompt", "one/target_alone", "one/lora_sft", "one/fusion_prompt", "one/semalign"}
    assert set(rows["two/sft"]) == {"0", "1"} and set(rows["two/target_alone"]) == {"0"}  # untrained: one run
    assert results["questions"]["arc_challenge"] == [f"arc_challenge-test-{i}" for i in range(4)]
    for key, runs in rows.items():
        for run in runs.values():
            for task in ("arc_challenge", "mmlu"):
                assert run[task]["n"] == 4 and len(run[task]["predictions"]) == 4 and run[task]["seconds_per_question"] >= 0
    assert rows["two/fusion_prompt"]["0"]["trainable_params"] > 0 and rows["two/target_alone"]["0"]["trainable_params"] == 0
    assert (table_world["root"] / "out" / "models" / "two-fusion_prompt-0" / "config.json").is_file()
    document = json.loads((table_world["root"] / "docs" / "real-transfer.json").read_text())
    entry = next(e for e in document["rows"] if e["row"] == "sft" and e["pair"] == "two")
    assert {"row", "pair", "seeds", "arc_challenge", "mmlu", "n", "seconds_per_question", "trainable_params",
            "command"} <= set(entry)
    assert set(entry["arc_challenge"]["per_seed"]) == {"0", "1"} and entry["seeds"] == [0, 1]
    assert (table_world["root"] / "docs" / "real-transfer.png").stat().st_size > 0
    assert "| two | `fusion_prompt` |" in (table_world["root"] / "docs" / "real-transfer.md").read_text()


def test_finished_rows_are_kept_and_only_missing_ones_run(table_world, capsys):
    assert real_main(["--config", str(table_world["small"])]) == 0
    results_path = table_world["root"] / "small-out" / "results.json"
    before = json.loads(results_path.read_text())
    assert set(before["rows"]) == {"two/source_alone", "two/target_alone", "two/kd", "two/fusion_prompt"}
    assert (table_world["root"] / "small-out" / "real-transfer.md").is_file()

    # a second invocation finds every row done and changes nothing
    capsys.readouterr()
    real_main(["--config", str(table_world["small"])])
    assert "0 to run" in capsys.readouterr().err
    assert json.loads(results_path.read_text())["rows"] == before["rows"]

    # a row removed from the results (as if killed before it finished) is the only one that runs again
    cut = json.loads(json.dumps(before))
    del cut["rows"]["two/kd"]["1"]
    results_path.write_text(json.dumps(cut))
    real_main(["--config", str(table_world["small"]), "--pair", "two", "--row", "kd"])
    assert "1 to run" in capsys.readouterr().err
    again = json.loads(results_path.read_text())["rows"]
    assert set(again["two/kd"]) == {"0", "1"}
    assert again["two/kd"]["1"]["arc_challenge"]["predictions"] == before["rows"]["two/kd"]["1"]["arc_challenge"]["predictions"]
    assert again["two/fusion_prompt"] == before["rows"]["two/fusion_prompt"]


def test_a_fresh_machine_resumes_from_the_committed_rows(table_world, capsys):
    """The output folder is gone (another machine); the committed copy in docs holds the rows, which are kept."""
    base = yaml.safe_load(table_world["small"].read_text())
    docs = table_world["root"] / "resume-docs"
    config = dict(base, output=str(table_world["root"] / "machine-1"), docs=str(docs),
                  pairs={"two": dict(base["pairs"]["two"], rows=["target_alone", "kd"], seeds=[0])})
    path = table_world["root"] / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    real_main(["--config", str(path)])
    committed = json.loads((docs / "real-transfer-runs.json").read_text())
    assert set(committed["rows"]) == {"two/target_alone", "two/kd"}
    path.write_text(yaml.safe_dump(dict(config, output=str(table_world["root"] / "machine-2"))))
    capsys.readouterr()
    real_main(["--config", str(path)])
    err = capsys.readouterr().err
    assert "resuming from" in err and "0 to run" in err


def test_a_saved_fusion_row_scores_the_same_through_from_pretrained(table_world):
    """The kept model reloads (its source named in its config) and gives the logits it was scored with."""
    from llm_modules import LLMModulesForCausalLM
    from llm_modules.evaluation.real.scorers import FusionScorer, score
    from llm_modules.evaluation.real.source_pass import run_source_pass

    config = load_real_config(table_world["small"])
    folder = table_world["root"] / "small-out" / "models" / "two-fusion_prompt-0"
    if not folder.exists():
        real_main(["--config", str(table_world["small"]), "--pair", "two", "--row", "fusion_prompt"])
    sets = question_sets(config.datasets, 8, 4, 4)
    source = run_source_pass(config.source, sets.all(), table_world["root"] / "small-out" / "source-cache")
    model = LLMModulesForCausalLM.from_pretrained(str(folder))
    reloaded = score(model, FusionScorer(model.processor, source), sets.heldout["arc_challenge"])
    recorded = _results(table_world, "small-out")["rows"]["two/fusion_prompt"]["0"]["arc_challenge"]
    assert reloaded["predictions"] == recorded["predictions"]


def test_kd_on_letters_pulls_toward_the_teacher_and_ignores_missing_letters():
    logits = torch.zeros(1, 10, requires_grad=True)
    gold, count = torch.tensor([3]), torch.tensor([3])
    teacher = torch.tensor([[0.0, 5.0, 0.0, -float("inf")]])
    loss = letter_loss(logits, gold, count, [1, 2, 3, 4], teacher, Distillation({}, 2.0, 0.0))
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[0, 2] < 0 < logits.grad[0, 1]  # the teacher's letter goes up, the others down
    assert logits.grad[0, 4] == 0  # a letter the question does not have (4th) gets no gradient
    assert letter_loss(logits, gold, count, [1, 2, 3, 4]).item() == pytest.approx(torch.log(torch.tensor(10.0)).item())


def test_bad_real_configs_name_what_to_fix(table_world, tmp_path):
    base = yaml.safe_load(table_world["config"].read_text())
    for change, message in (({"pairs": {"two": {"target": base["pairs"]["two"]["target"], "rows": ["sft", "nope"]}}},
                             "nope"),
                            ({"questions": {"transfr": 3}}, "transfr"),
                            ({"source": ""}, "source"),
                            ({"questions": {"transfer": 10_000}}, "transfer: 10000 questions asked")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(LLMModulesError, match=message):
            config = load_real_config(path)
            question_sets(config.datasets, config.questions.transfer, 4, 4)


def test_missing_datasets_say_how_to_make_them(tmp_path):
    with pytest.raises(LLMModulesError, match="offline-datasets.py"):
        question_sets(tmp_path, 4, 4, 4)
