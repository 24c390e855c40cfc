"""lm-evaluation-harness: the model type ``llm-modules`` on saved composed models (bridge and fusion), the
shipped task YAMLs over offline JSONL files, our own continuation scorer, and ``llm-modules lm-eval``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from llm_modules import LLMModulesError, LLMModulesForCausalLM
from llm_modules.cli import main
from llm_modules.evaluation.lm_eval_command import evaluate_with_lm_eval
from llm_modules.evaluation.lm_eval_model import LLMModulesLM
from llm_modules.evaluation.lm_eval_tasks import TASKS, write_tasks
from llm_modules.evaluation.loglikelihood import choice_accuracy, encode_pair, score_continuations
from llm_modules.tiny import build_tokenizer, save_tiny, tiny_model

SMALL = dict(adapter_dim=16, attention_dropout=0.0)
PAIRS = [("What is 2 + 3? Answer:", " 5"), ("The quick brown fox", " jumps over the lazy dog."),
         ("The quick brown fox", " sits"), ("A small model learns", " from a large one.")]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Saved tiny models: source (qwen2), target (llama, another tokenizer), fusion (prompt memory, two
    tokenizers, gates closed), bridge (gpt_neo body)."""
    other = build_tokenizer(vocab_size=300)
    root = tmp_path_factory.mktemp("lm-eval-models")
    source = save_tiny(tiny_model("qwen2", tokenizer, hidden=48), tokenizer, root / "source")
    target = save_tiny(tiny_model("llama", other, seed=1), other, root / "target")
    torch.manual_seed(0)
    fusion = LLMModulesForCausalLM.compose(str(source), str(target), topology="fusion", memory="prompt",
                                           fusion_every=1, **SMALL)
    fusion.save_pretrained(root / "fusion")
    body = save_tiny(tiny_model("gpt_neo", tokenizer, seed=2), tokenizer, root / "body")
    bridge = LLMModulesForCausalLM.compose(str(source), str(body), heads=4, **SMALL)
    bridge.save_pretrained(root / "bridge")
    return {name: root / name for name in ("source", "target", "fusion", "bridge")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Offline data in the schemas of offline-datasets.py and GSM8K (a few rows each)."""
    root = tmp_path_factory.mktemp("data")
    arc = [{"id": f"arc{i}", "question": f"What is {i} + {i}?", "choices": [str(2 * i), str(i), "7", "9", "1"][: 3 + i % 3],
            "answer": i % 3} for i in range(6)]
    mmlu = [{"id": f"math/test/{i}", "subject": "math", "question": f"{i} times two is", "choices": ["1", "2", "3", str(2 * i)],
             "answer": 3} for i in range(6)]
    gsm8k = [{"question": f"Natalia sold {i} clips in April and {i} in May. How many in total?",
              "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"} for i in range(4)]
    for name, rows in (("arc_challenge/test", arc), ("mmlu/test", mmlu), ("gsm8k/test", gsm8k), ("gsm8k/train", gsm8k)):
        path = root / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def open_gates(model: LLMModulesForCausalLM) -> LLMModulesForCausalLM:
    with torch.no_grad():
        for block in model.fusion.blocks:
            block.gate_alpha.fill_(1.0)
    return model


def loglikelihood_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def direct_logprob(model, inputs, continuation_length: int) -> float:
    """Sum of log p over the last ``continuation_length`` tokens of one unpadded row (no batching)."""
    with torch.no_grad():
        logits = model(**inputs).logits[0].float().log_softmax(-1)
    ids = inputs["input_ids"][0]
    n = len(ids)
    return float(sum(logits[i - 1, ids[i]] for i in range(n - continuation_length, n)))


def test_importing_llm_modules_does_not_import_lm_eval():
    code = ("import sys, llm_modules, llm_modules.cli, llm_modules.evaluation.lm_eval_tasks, "
            "llm_modules.evaluation.loglikelihood; assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_task_files_name_absolute_local_data_and_missing_data_is_an_error(data, tmp_path, monkeypatch):
    folder = write_tasks(tmp_path / "tasks", data_dir=data, gsm8k_dir=data / "gsm8k", check=["llm_modules"])
    places = {"datasets": data.resolve(), "gsm8k": (data / "gsm8k").resolve()}
    for yaml_name, files in TASKS.values():
        text = (folder / yaml_name).read_text()
        assert "@DATASETS@" not in text and "@GSM8K@" not in text
        for kind, relative in files:
            assert f'"{places[kind] / relative}"' in text
    monkeypatch.setenv("LLM_MODULES_DATASETS", str(data))
    monkeypatch.delenv("LLM_MODULES_GSM8K", raising=False)
    from_env = write_tasks(tmp_path / "env", check=["llm_modules_mmlu", "llm_modules_gsm8k"])  # gsm8k: DATA/gsm8k
    assert str(data.resolve() / "mmlu" / "test.jsonl") in (from_env / "mmlu.yaml").read_text()
    with pytest.raises(LLMModulesError, match=r"llm_modules_arc_challenge reads .*arc_challenge/test.jsonl.*offline-datasets"):
        write_tasks(tmp_path / "missing", data_dir=tmp_path / "nowhere", check=["llm_modules_arc_challenge"])
    write_tasks(tmp_path / "unchecked", data_dir=tmp_path / "nowhere", check=["hellaswag"])  # not ours: not checked


def test_our_scorer_equals_unbatched_log_probabilities_of_a_plain_model(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(models["target"]).eval()
    tok = AutoTokenizer.from_pretrained(models["target"])
    requests = [encode_pair(tok, c, x) for c, x in PAIRS]
    batched = score_continuations(model, requests, tok.pad_token_id, batch_size=3)
    for (context, continuation), (logprob, _) in zip(requests, batched):
        ids = torch.tensor([context + continuation])
        assert logprob == pytest.approx(direct_logprob(model, {"input_ids": ids}, len(continuation)), abs=1e-4)
    # accuracy picks the highest-scoring choice; a question whose answer is the best choice counts
    best = max(range(2), key=lambda k: batched[1 + k][0])
    result = choice_accuracy(model, tok, [(PAIRS[1][0], [PAIRS[1][1], PAIRS[2][1]], best)], batch_size=2)
    assert result["correct"] == 1 and result["predictions"] == [best]
    with pytest.raises(LLMModulesError, match="does not fit in max_length=3"):
        score_continuations(model, requests[1:2], tok.pad_token_id, max_length=3)


def test_fusion_with_closed_gates_scores_and_generates_exactly_as_the_target_alone_in_lm_eval(models, data):
    """simple_evaluate end to end (loglikelihood and generate_until, batched) on the saved fusion model
    (type llm-modules) and on its target alone (lm-eval's own hf): the gates are closed, so every sample agrees."""
    runs = [evaluate_with_lm_eval(models[name], ["llm_modules"], data_dir=data, batch_size=3, max_gen_toks=6,
                                  log_samples=True) for name in ("fusion", "target")]
    for task in TASKS:
        composed, alone = (sorted(run["samples"][task], key=lambda s: (s["doc_id"], s["filter"])) for run in runs)
        assert len(composed) == len(alone) and len({s["doc_id"] for s in composed}) == runs[0]["n-samples"][task]["effective"] > 0
        for a, b in zip(composed, alone):
            if task == "llm_modules_gsm8k":
                assert a["resps"] == b["resps"] and a["resps"][0][0]  # same greedy text, not empty
            else:
                assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)
    assert runs[0]["results"]["llm_modules_arc_challenge"]["acc,none"] == runs[1]["results"]["llm_modules_arc_challenge"]["acc,none"]


def test_prompt_memory_source_reads_the_context_only_and_batching_changes_nothing(models):
    model = open_gates(LLMModulesForCausalLM.from_pretrained(models["fusion"]))
    lm = LLMModulesLM(pretrained=model, batch_size=3, device="cpu")
    scores = [s for s, _ in lm.loglikelihood(loglikelihood_requests(PAIRS))]
    one_by_one = [s for s, _ in LLMModulesLM(pretrained=model, batch_size=1, device="cpu").loglikelihood(
        loglikelihood_requests(PAIRS))]
    assert scores == pytest.approx(one_by_one, abs=1e-4)
    read_along = []
    for (context, continuation), score in zip(PAIRS, scores):
        context_ids, continuation_ids = encode_pair(model.tokenizer, context, continuation)
        text = model.tokenizer.decode(context_ids + continuation_ids)
        reads_context = model.processor([text], source_text=[model.tokenizer.decode(context_ids)])
        assert score == pytest.approx(direct_logprob(model, reads_context, len(continuation_ids)), abs=1e-4)
        read_along.append(direct_logprob(model, model.processor([text]), len(continuation_ids)))
    # the source reading the continuation too would give other numbers for multi-token continuations
    assert any(abs(a - b) > 1e-3 for a, b in zip(scores, read_along))


def test_generate_until_is_greedy_batched_and_cut_at_stop_strings(models):
    model = open_gates(LLMModulesForCausalLM.from_pretrained(models["fusion"]))
    prompts = ["The quick brown fox", "What is 2 + 3?"]
    expected = []
    for prompt in prompts:
        inputs = model.processor([prompt])
        new = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        expected.append(model.tokenizer.decode(new, skip_special_tokens=True))
    assert len(expected[0]) > 4
    stop = expected[0][3:5]  # cut the first answer after three characters
    lm = LLMModulesLM(pretrained=model, batch_size=2, device="cpu")
    got = lm.generate_until([Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 12}), i)
                             for i, p in enumerate(prompts)])
    assert got[0] == expected[0][:expected[0].index(stop)]
    assert got[1] == expected[1].split(stop)[0]


def test_bridge_in_lm_eval_and_the_command_line(models, data, tmp_path, capsys):
    model = LLMModulesForCausalLM.from_pretrained(models["bridge"])
    lm = LLMModulesLM(pretrained=str(models["bridge"]), batch_size=4, device="cpu", dtype="float32")
    scores = lm.loglikelihood(loglikelihood_requests(PAIRS))
    for (context, continuation), (score, _) in zip(PAIRS, scores):
        context_ids, continuation_ids = encode_pair(model.tokenizer, context, continuation)
        ids = torch.tensor([context_ids + continuation_ids])
        assert score == pytest.approx(direct_logprob(model, {"input_ids": ids}, len(continuation_ids)), abs=1e-4)
    output = tmp_path / "results.json"
    assert main(["lm-eval", str(models["bridge"]), "--tasks", "llm_modules_arc_challenge,llm_modules_gsm8k",
                 "--data-dir", str(data), "--limit", "3", "--batch-size", "2", "--max-gen-toks", "4",
                 "--output", str(output), "--log-samples"]) == 0
    assert "llm_modules_arc_challenge" in capsys.readouterr().out
    results = json.loads(output.read_text())
    assert 0 <= results["results"]["llm_modules_arc_challenge"]["acc,none"] <= 1
    assert results["n-samples"]["llm_modules_gsm8k"]["effective"] == 3
    samples = [json.loads(line) for line in output.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 + 3 * 3 and {s["task"] for s in samples} == {"llm_modules_arc_challenge", "llm_modules_gsm8k"}
    assert main(["lm-eval", str(models["bridge"]), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "offline-datasets" in capsys.readouterr().err
    with pytest.raises(LLMModulesError, match="batch_size=auto"):
        LLMModulesLM(pretrained=model, batch_size="auto")


def test_the_lm_eval_letter_prompt_is_the_real_tables_text():
    """lm-eval's tasks and the real table read the same text, so their answers can be compared question by question."""
    from llm_modules.evaluation.lm_eval_tasks import utils
    from llm_modules.evaluation.multiple_choice import letter_text

    doc = {"question": "  Which gas do plants take in?\n", "choices": ["oxygen", "carbon dioxide", "helium"], "answer": 1}
    assert utils.letter_prompt(doc) == letter_text(doc)
    assert letter_text(doc).endswith("\nAnswer:") and "\nC. helium\n" in letter_text(doc)
