"""``llm-modules serve``: the official ``openai`` client against a tiny composed model, and hostile requests.

The server runs in a thread on loopback (fixture ``serving`` in conftest.py), serving the composed model, its
source alone and its target alone, with small limits (max_tokens <= 64, queue of 16 sequences).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from llm_modules import LLMModulesForCausalLM
from llm_modules.cli import main
from llm_modules.serving.models import load_served_models
from llm_modules.tiny import build_tokenizer, save_tiny, save_tiny_composed, tiny_config, tiny_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def client(serving):
    url, _ = serving
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def composed(serving):
    return serving[1][0]


def test_models_lists_the_composed_model_its_source_and_its_target(client):
    models = {m.id: m for m in client.models.list().data}
    assert [m.role for m in models.values()] == ["composed", "source", "target"]
    assert models["composed"].gate_values is True and models["source"].gate_values is False
    assert client.models.retrieve("composed").id == "composed"


def test_chat_uses_the_models_chat_template_and_reports_usage(client, composed):
    reply = client.chat.completions.create(model="composed", messages=CHAT, max_tokens=8, temperature=1.0, seed=3)
    prompt = composed.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(composed.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert reply.choices[0].message.role == "assistant" and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 8
    assert len(reply.gate_values) == 2 and all(0.0 <= g <= 1.0 for g in reply.gate_values)  # sigmoid gates


def test_greedy_completion_is_the_models_own_greedy_continuation(client, composed):
    prompt = "The quick brown fox"
    reply = client.completions.create(model="composed", prompt=prompt, max_tokens=6, temperature=0)
    ids = composed.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = composed.model.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=sorted(composed.stop_ids))
    new = out[0, ids.input_ids.shape[1]:].tolist()
    ended = any(t in composed.stop_ids for t in new)
    expected = composed.tokenizer.decode([t for t in new if t not in composed.stop_ids], skip_special_tokens=True)
    assert reply.choices[0].text == expected.rstrip("\ufffd")
    assert reply.choices[0].finish_reason == ("stop" if ended else "length")


def test_streaming_chat_and_completion_equal_the_answers_without_streaming(client):
    settings = dict(max_tokens=12, temperature=1.0, seed=11)
    whole = client.chat.completions.create(model="composed", messages=CHAT, **settings)
    chunks = list(client.chat.completions.create(model="composed", messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **settings))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    text = client.completions.create(model="composed", prompt="A small model", **settings)
    pieces = list(client.completions.create(model="composed", prompt="A small model", stream=True, **settings))
    assert len(pieces) > 2  # it streamed, not one block
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text


def test_seed_fixes_the_sample_whatever_shares_the_batch(client):
    def ask(seed):
        return client.completions.create(model="composed", prompt="Knowledge moves", max_tokens=10, temperature=1.0,
                                         seed=seed).choices[0].text

    with ThreadPoolExecutor(4) as pool:  # the same seed, alone and in batches with other requests
        texts = list(pool.map(ask, [5, 5, 6, 5]))
    assert texts[0] == texts[1] == texts[3] == ask(5)
    assert texts[2] != texts[0]


def test_stop_strings_cut_the_answer_before_them_streamed_or_not(client):
    settings = dict(model="composed", prompt="The quick brown fox", max_tokens=24, temperature=1.0, seed=2)
    full = client.completions.create(**settings).choices[0].text
    assert len(full) > 8
    stop = full[5:8]
    cut = full[:full.index(stop)]
    reply = client.completions.create(stop=[stop, "\u2603 never"], **settings)
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **settings))
    assert "".join(p.choices[0].text for p in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_share_batches_and_answer_as_if_alone(client, composed):
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(6)]
    alone = [client.completions.create(model="composed", prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts]
    before = composed.engine.stats["batches"]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: client.completions.create(
            model="composed", prompt=p, max_tokens=8, temperature=0).choices[0].text, prompts))
    assert together == alone  # left padding inside a batch changes no answer
    assert composed.engine.stats["batches"] - before < len(prompts)  # at least two requests were decoded together
    several = client.completions.create(model="composed", prompt=prompts[:3], max_tokens=8, temperature=0)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == alone[:3]


def test_source_and_target_alone_answer_with_their_own_models(client, serving):
    _, models = serving
    assert len(models) == 3  # the composed model, then its source and its target alone
    for served in models[1:]:
        reply = client.completions.create(model=served.id, prompt="The quick", max_tokens=4, temperature=0)
        ids = served.tokenizer("The quick", return_tensors="pt")
        out = served.model.generate(**ids, max_new_tokens=4, do_sample=False, eos_token_id=sorted(served.stop_ids))
        expected = served.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        assert reply.choices[0].text == expected.rstrip("\ufffd")
        assert getattr(reply, "gate_values", None) is None


def test_client_errors_are_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert missing.value.code == "model_not_found" and "composed" in missing.value.message
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="composed", messages=[])
    assert empty.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as huge:
        client.completions.create(model="composed", prompt="hi", max_tokens=10**9)
    assert huge.value.code == "max_tokens_too_large"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="composed", messages=CHAT, n=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="composed", prompt="hi", temperature=3)
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="composed", prompt="word " * 600, max_tokens=4)
    assert long.value.code == "context_length_exceeded"


HOSTILE = [  # (what, request kwargs for httpx, expected status)
    ("malformed JSON", dict(content=b'{"model": "composed", "messages": [', headers={"content-type": "application/json"}), 400),
    ("not JSON at all", dict(content=b"\xff\xfe garbage", headers={"content-type": "application/json"}), 400),
    ("JSON that is not an object", dict(json=[1, 2, 3]), 400),
    ("huge max_tokens", dict(json={"model": "composed", "messages": CHAT, "max_tokens": 10**12}), 400),
    ("negative max_tokens", dict(json={"model": "composed", "messages": CHAT, "max_tokens": -1}), 400),
    ("empty message list", dict(json={"model": "composed", "messages": []}), 400),
    ("message without role", dict(json={"model": "composed", "messages": [{"content": "hi"}]}), 400),
    ("tool role", dict(json={"model": "composed", "messages": [{"role": "tool", "content": "x"}]}), 400),
    ("wrong model name", dict(json={"model": "no-such-model", "messages": CHAT}), 404),
    ("top_p of 0", dict(json={"model": "composed", "messages": CHAT, "top_p": 0}), 400),
    ("seventeen stop strings", dict(json={"model": "composed", "messages": CHAT, "stop": ["x"] * 17}), 400),
    ("a 10 MB body", dict(json={"model": "composed", "messages": [{"role": "user", "content": "x" * 10_000_000}]}), 413),
    ("a 10 MB body, chunked", dict(content=iter([b'{"messages": "' + b"x" * 1_000_000] * 10 + [b'"}']),
                                   headers={"content-type": "application/json"}), 413),
    ("tools", dict(json={"model": "composed", "messages": CHAT, "tools": [{"type": "function"}]}), 400),
]


def test_hostile_requests_get_a_4xx_in_openai_shape_and_the_server_keeps_serving(serving):
    url, _ = serving
    with httpx.Client(base_url=url, timeout=60) as http:
        for what, request, status in HOSTILE:
            response = http.post("/v1/chat/completions", **request)
            assert response.status_code == status, (what, response.text[:300])
            error = response.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and "type" in error, what
            assert http.get("/health").status_code == 200, what
        assert http.get("/no/such/route").json()["error"]["message"].startswith("no route")
        assert http.get("/v1/chat/completions").status_code == 405
        answer = http.post("/v1/completions", json={"model": "composed", "prompt": "hi", "max_tokens": 3})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1


def test_a_full_queue_answers_429(serving):
    url, _ = serving
    response = httpx.post(f"{url}/v1/completions", json={"model": "composed", "prompt": ["hi"] * 17, "max_tokens": 2})
    assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"


def test_a_client_that_leaves_mid_stream_stops_its_decoding(serving, composed):
    url, _ = serving
    cancelled = composed.engine.stats["cancelled"]
    body = {"model": "composed", "prompt": "The quick", "max_tokens": 64, "temperature": 1.0, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{url}/v1/completions", json=body) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 30
    while composed.engine.stats["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert composed.engine.stats["cancelled"] == cancelled + 1  # its row ended before its 64 tokens
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_target_given_as_a_config_is_refused_for_compare_with_a_clear_message(model_folder, tokenizer, tmp_path):
    config = tiny_config("gpt_neo", vocab_size=len(tokenizer), tokenizer=tokenizer)
    model = LLMModulesForCausalLM.compose(model_folder("qwen2", hidden=48), config, target_init="random",
                                          heads=4, adapter_dim=16)
    model.save_pretrained(tmp_path)
    from llm_modules import LLMModulesError

    with pytest.raises(LLMModulesError, match="given as a config"):
        load_served_models(tmp_path, ["target"])
    assert [m.role for m in load_served_models(tmp_path, ["source"])] == ["composed", "source"]


def test_serve_command_errors_exit_2_without_a_traceback(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-tokens", "0"]) == 2
    assert "--max-tokens must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--compare", "teacher"]) == 2
    assert "--compare takes" in capsys.readouterr().err


def test_target_without_tokenizer_reads_the_composed_models_tokenizer(tmp_path):
    tokenizer = build_tokenizer()
    source = save_tiny(tiny_model("qwen2", tokenizer, hidden=48), tokenizer, tmp_path / "source")
    target = tmp_path / "target"
    tiny_model("gpt2", tokenizer).save_pretrained(target)  # weights and config only
    LLMModulesForCausalLM.compose(str(source), str(target), heads=4, adapter_dim=16).save_pretrained(tmp_path / "run")
    composed, served = load_served_models(tmp_path / "run", ["target"])
    assert served.tokenizer is composed.tokenizer and "tokenizer" in served.note
    assert json.loads(json.dumps(served.card()))["note"] == served.note


def test_a_fusion_model_is_served_and_with_closed_gates_answers_as_its_target_alone(tmp_path, serve_models):
    models = load_served_models(save_tiny_composed(tmp_path, topology="fusion", fusion_every=1), ["target"])
    client = openai.OpenAI(base_url=f"{serve_models(models)}/v1", api_key="unused", max_retries=0)
    settings = dict(messages=CHAT, max_tokens=8, temperature=0)
    composed = client.chat.completions.create(model=models[0].id, **settings)
    target = client.chat.completions.create(model=models[1].id, **settings)
    assert composed.choices[0].message.content == target.choices[0].message.content  # tanh gates start at 0
    assert composed.gate_values == [0.0] * len(models[0].model.fusion.blocks)
    streamed = client.completions.create(model=models[0].id, prompt="The quick", max_tokens=6, temperature=1.0,
                                         seed=1, stream=True)
    assert sum(1 for _ in streamed) >= 2
