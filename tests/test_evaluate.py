"""Evaluation: answer extraction and normalisation, answer-only loss, exact match, `llm-modules eval` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import llm_modules.evaluation.evaluate as evaluate_module
from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import main
from llm_modules.training.data import DataOptions, build_examples
from llm_modules.evaluation.evaluate import (
    EvalOptions,
    answers_match,
    evaluate,
    extract_answer,
    last_number,
    normalize_answer,
)

STRATOS = (
    "<|begin_of_thought|>\nMaybe it is \\boxed{3}? No, let me redo it.\n<|end_of_thought|>\n\n"
    "<|begin_of_solution|>\nThe probability is \\boxed{\\frac{1}{2}}.\n<|end_of_solution|>"
)


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72", "72"),
    ("She earned $1,234 in all.\n#### 1,234", "1,234"),
    ("#### 72\n\nUser: and now?", "72"),  # a generation that runs on after its answer
    (STRATOS, "\\frac{1}{2}"),  # the last solution block, its boxed answer (nested braces), not the thought's
    ("<|begin_of_solution|>\nAdd them.\nFinal answer: 10\n<|end_of_solution|>", "10"),
    ("<|begin_of_solution|> 42 <|end_of_solution|>", "42"),
    ("<|begin_of_solution|>\nSo the remainder is 3.\nThe answer is 3", "3"),  # generation cut before the end marker
    ("so we get $\\boxed{12}$.", "12"),
    ("#### Step 1: add\n2 + 3 = 5\nThe answer is 5.", "5."),  # a Markdown heading is no GSM8K answer
    ("Answer: 42", "42"),
    ("**Final Answer:** $1,000$", "$1,000$"),
    ("Answer: 1\nsome more thought\nAnswer: 2", "2"),
    ("The answer to this depends on x.", None),
    ("I do not know.", None),
    ("#### ", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("9 \\times 2 = 18\n\nSo, the amount she makes is \\", "18"),  # cut off after the result, before the answer
    ("She earned $1,200.", "$1,200"),  # a sentence's comma or full stop is not part of the number
    ("the speed is -3.5 km/h, then", "-3.5"),
    ("8 pairs, 64,", "64"),
    ("no numbers here", None),
])
def test_last_number_reads_a_cut_off_reply_leniently(text, expected):
    assert last_number(text) == expected
    assert expected is None or answers_match(last_number(text), expected.replace("$", "").replace(",", ""))


@pytest.mark.parametrize("predicted, reference, same", [
    ("72", "72.0", True),
    ("$1,000", "1000", True),
    ("1,234", "1234", True),
    ("5.", "5", True),
    ("-3", "-3.00", True),
    ("\\text{Paris}", "paris", True),
    ("  The   Blue  Whale ", "the blue whale", True),
    ("\\frac{1}{2}", "\\frac{1}{2}", True),
    ("1,2", "12", False),  # not a thousands separator
    ("5 apples", "5", False),
    ("72", "27", False),
    ("nan", "nan", False),
    (None, "5", False),
    ("5", None, False),
])
def test_answers_match_after_normalisation(predicted, reference, same):
    assert answers_match(predicted, reference) is same


def test_normalize_answer():
    assert normalize_answer(" $1,234.50. ") == "1234.50"
    assert normalize_answer("**B**") == "b"


# ------------------------------------------------------------------------------------- end to end
QUESTIONS = [(3, 4), (10, 25), (7, 8), (120, 5), (2, 2), (31, 11)]


@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-data") / "test.jsonl"
    with path.open("w") as handle:
        for a, b in QUESTIONS:
            handle.write(json.dumps({"question": f"What is {a} + {b}?",
                                     "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def saved_model(model_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-model")
    torch.manual_seed(0)
    model = LLMModulesForCausalLM.compose(model_folder("qwen2", hidden=48), model_folder("gpt_neo"), heads=4,
                                          adapter_dim=16)
    model.save_pretrained(folder)
    return folder


def reference_loss(folder, data, template="chat") -> tuple[float, int]:
    """Answer-token NLL computed row by row, unbatched, with the model's own labels= loss."""
    model = LLMModulesForCausalLM.from_pretrained(folder).eval()
    examples, _ = build_examples(data, model.tokenizer, DataOptions(template=template, loss_on="assistant"))
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count, count


def run_eval(argv, capsys) -> tuple[int, dict | None, str]:
    code = main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def test_cli_eval_prints_and_writes_loss_perplexity_and_exact_match(saved_model, gsm_file, tmp_path, capsys):
    output = tmp_path / "out" / "eval.json"
    code, printed, err = run_eval([saved_model, "--data", gsm_file, "--max-new-tokens", 6, "--batch-size", 4,
                                   "--output", output], capsys)
    assert code == 0
    assert json.loads(output.read_text()) == printed
    loss, count = reference_loss(saved_model, gsm_file)
    # Batched with right padding (batch 4 over 6 rows of different lengths) = unbatched.
    assert printed["answer_loss"] == pytest.approx(loss, rel=1e-5)
    assert printed["answer_tokens"] == count
    assert printed["answer_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert printed["rows"] == 6 and printed["data_report"]["rows"] == 6 and printed["data_report"]["format"] == "gsm8k"
    assert printed["settings"]["template"] == "chat"
    assert printed["rows_with_reference_answer"] == printed["exact_match_rows"] == 6
    assert printed["exact_match"] == printed["correct"] / 6
    first = printed["samples"][0]
    assert first["row"].endswith("test.jsonl:1") and first["reference"] == "7"
    assert first["predicted"] == extract_answer(first["generation"])
    assert "exact match" in err and "Traceback" not in err


def test_exact_match_counts_extracted_answers_on_the_rows_of_the_loss(saved_model, gsm_file, monkeypatch):
    model = LLMModulesForCausalLM.from_pretrained(saved_model)
    seen = {}

    def fake_generations(model, tokenizer, prompts, max_new_tokens, batch_size, end_of_turn=""):
        seen["prompts"] = prompts
        return ["3 + 4 = 7\n#### 7", "The answer is 35.", "I am not sure."]

    monkeypatch.setattr(evaluate_module, "greedy_answers", fake_generations)
    result = evaluate(model, model.tokenizer, EvalOptions(data=str(gsm_file), limit=3))
    assert result["rows"] == 3 and result["exact_match_rows"] == 3
    assert result["correct"] == 2 and result["exact_match"] == pytest.approx(2 / 3)
    assert result["no_answer_extracted"] == 1
    assert [s["correct"] for s in result["samples"]] == [True, True, False]
    prompt = seen["prompts"][1]  # the question, up to the assistant header, without the answer
    assert "What is 10 + 25?" in prompt and prompt.endswith("<|im_start|>assistant\n") and "35" not in prompt


def test_eval_uses_the_template_the_model_was_trained_with(saved_model, gsm_file, tmp_path, capsys):
    folder = tmp_path / "plain-model"
    folder.mkdir()
    for path in saved_model.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "train_config.yaml").write_text("template: plain\nmax_length: 512\n")
    code, printed, _ = run_eval([folder, "--data", gsm_file, "--no-generate"], capsys)
    assert code == 0 and "exact_match" not in printed
    assert printed["settings"]["template"] == "plain" and printed["settings"]["max_length"] == 512
    assert printed["answer_loss"] == pytest.approx(reference_loss(folder, gsm_file, "plain")[0], rel=1e-5)


@pytest.mark.parametrize("line, expected", [
    (b'{"question": "What is 1 + 1?"}\n', [":2, field 'answer': is missing"]),
    (b'{"question": "What is 1 + 1?", "answer": 2}\n', [":2, field 'answer': expected a string"]),
    (b'{"question": "caf\xe9", "answer": "#### 1"}\n', [":2: is not valid UTF-8"]),
    (b'{"question": "What is 1 + 1?", "answer": "#### 2"\n', [":2: is not valid JSON"]),
])
def test_bad_data_exits_2_naming_file_row_and_field_before_loading_the_model(
        saved_model, tmp_path, capsys, monkeypatch, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "What is 2 + 2?", "answer": "#### 4"}\n' + line)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(LLMModulesForCausalLM, "from_pretrained", must_not_load)
    code, _, err = run_eval([saved_model, "--data", path], capsys)
    assert code == 2 and "Traceback" not in err and err.startswith("llm-modules eval: error: ")
    for fragment in expected:
        assert f"{path}{fragment}" in err


def test_eval_user_mistakes_exit_2(saved_model, gsm_file, tmp_path, capsys):
    code, _, err = run_eval([saved_model, "--data", tmp_path / "missing.jsonl"], capsys)
    assert code == 2 and "missing.jsonl: no such file" in err
    code, _, err = run_eval([tmp_path / "no-model", "--data", gsm_file], capsys)
    assert code == 2 and "is not a folder" in err and "Traceback" not in err


def test_a_reply_ends_at_its_turn_and_keeps_answer_markers_a_tokenizer_holds_as_special_tokens():
    from llm_modules.evaluation.evaluate import ANSWER_MARKERS, decode_reply, stop_token_ids
    from llm_modules.tiny import build_tokenizer
    from llm_modules.training.data import Renderer

    tokenizer = build_tokenizer(extra_special_tokens=list(ANSWER_MARKERS))  # as the fact world's tokenizer does
    stops = stop_token_ids(tokenizer, Renderer(tokenizer, "chat").end_of_turn())
    assert stops == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    text = ("<|im_start|>9 2 <|begin_of_solution|> 9 2 <|end_of_solution|><|im_end|>\n<|im_start|>assistant\n"
            "<|begin_of_solution|> 1 1 <|end_of_solution|>")
    generated = tokenizer(text, add_special_tokens=False).input_ids
    assert extract_answer(tokenizer.decode(generated, skip_special_tokens=True)) is None  # the markers were erased
    reply = decode_reply(tokenizer, generated, stops)
    assert reply == "9 2 <|begin_of_solution|> 9 2 <|end_of_solution|>"  # other special tokens dropped, the turn ended
    assert extract_answer(reply) == "9 2"
