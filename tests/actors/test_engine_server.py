"""The embedded engine as a real process behind a real socket, checked against plain HF transformers:
sampled logprobs equal an independent recomputation, greedy equals `generate`, batching and padding do not
change outputs, stops and weight updates behave like SGLang, bad requests get 400 and SIGTERM exits 0."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engine_client import EngineClient, EngineError
from tests.actors.engine_servers import build_checkpoint, free_port, reference_logprobs

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["1+2=", "17+5=", "3+14=", "20+20=", "7+7= 9", "12+"]


def start_server(model_path: Path, log_path: Path, *extra: str) -> tuple[subprocess.Popen, EngineClient]:
    port = free_port()
    cmd = [sys.executable, "-m", "actors.engine.server", "--model-path", str(model_path), "--host",
           "127.0.0.1", "--port", str(port), "--num-threads", "1", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    client = EngineClient(f"http://127.0.0.1:{port}", timeout=60)
    client.wait_ready(60, proc=proc)
    return proc, client


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return {"a": build_checkpoint(root / "a", seed=0), "b": build_checkpoint(root / "b", seed=1),
            "wide": build_checkpoint(root / "wide", seed=2, hidden_size=32, num_heads=2, num_kv_heads=1),
            "root": root}


@pytest.fixture(scope="module")
def engine(ckpts):
    proc, client = start_server(ckpts["a"], ckpts["root"] / "server.log", "--max-batch-size", "4")
    yield proc, client
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def hf(ckpts):
    tok = AutoTokenizer.from_pretrained(str(ckpts["a"]))
    models = {k: AutoModelForCausalLM.from_pretrained(str(ckpts[k]), dtype=torch.float32).eval() for k in "ab"}
    return tok, models


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.8)])
def test_sampled_logprobs_match_recomputation(engine, hf, temperature, top_k, top_p):
    _, client = engine
    tok, models = hf
    prompts = [encode(tok, p) for p in PROMPTS[:3]]
    params = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": 12,
              "ignore_eos": True, "sampling_seed": 123}
    for prompt, res in zip(prompts, client.generate(prompts, params)):
        assert len(res.output_ids) == 12 and res.finish_reason == "length"
        assert len(res.output_logprobs) == 12 and res.token_versions == [0] * 12
        expected = reference_logprobs(models["a"], prompt, res.output_ids, temperature, top_k, top_p)
        torch.testing.assert_close(torch.tensor(res.output_logprobs), expected, atol=1e-4, rtol=0)


def test_mixed_sampling_params_in_one_batch(engine, hf):
    """Each row of one decode batch uses its own temperature/top-k/top-p (greedy rows: raw logits)."""
    _, client = engine
    tok, models = hf
    prompts = [encode(tok, p) for p in PROMPTS[:4]]
    settings = [(0.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.8), (1.0, 3, 0.9)]
    params = [{"temperature": t, "top_k": k, "top_p": p, "max_new_tokens": 10, "ignore_eos": True}
              for t, k, p in settings]
    for prompt, (t, k, p), res in zip(prompts, settings, client.generate(prompts, params)):
        expected = reference_logprobs(models["a"], prompt, res.output_ids, t or 1.0, k if t else -1, p if t else 1.0)
        torch.testing.assert_close(torch.tensor(res.output_logprobs), expected, atol=1e-4, rtol=0)


def test_sampling_seed_makes_sampling_reproducible(engine, hf):
    _, client = engine
    prompt = encode(hf[0], PROMPTS[0])
    params = {"temperature": 1.0, "max_new_tokens": 10, "ignore_eos": True, "sampling_seed": 7}
    first = client.generate([prompt, encode(hf[0], PROMPTS[3])], params)[0]
    assert client.generate([prompt], params)[0].output_ids == first.output_ids


def test_greedy_matches_hf_generate(engine, hf):
    _, client = engine
    tok, models = hf
    for text in PROMPTS[:3]:
        prompt = encode(tok, text)
        res = client.generate([prompt], {"temperature": 0, "max_new_tokens": 10})[0]
        assert res.output_ids == hf_greedy(models["a"], prompt, 10)
        with torch.no_grad():
            logits = models["a"](torch.tensor([prompt + res.output_ids])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(res.output_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(res.output_logprobs), expected, atol=1e-4, rtol=0)


def test_batch_and_concurrent_requests_match_one_at_a_time(engine, hf):
    """Different prompt lengths (left padding), a batch larger than --max-batch-size, and requests from
    several threads batched together all give the single-request greedy outputs."""
    _, client = engine
    prompts = [encode(hf[0], p) for p in PROMPTS]
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    single = [client.generate([p], params)[0].output_ids for p in prompts]
    assert [r.output_ids for r in client.generate(prompts, params)] == single
    results = [None] * len(prompts)

    def ask(i):
        results[i] = EngineClient(client.url).generate([prompts[i]], params)[0].output_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == single


def test_stop_token_ids_and_max_new_tokens(engine, hf):
    _, client = engine
    prompt = encode(hf[0], PROMPTS[1])
    base = client.generate([prompt], {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})[0]
    assert len(base.output_ids) == 8 and base.finish_reason == "length"
    stop = base.output_ids[2]
    cut = base.output_ids.index(stop) + 1
    body = {"input_ids": prompt, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 8, "stop_token_ids": [stop]}}
    reply = requests.post(client.url + "/generate", json=body, timeout=30).json()
    assert reply["output_ids"] == base.output_ids[:cut]  # the stop token is kept, as SGLang does
    assert reply["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert reply["meta_info"]["completion_tokens"] == cut
    assert [e[1] for e in reply["meta_info"]["output_token_logprobs"]] == reply["output_ids"]
    assert isinstance(reply["text"], str) and reply["meta_info"]["weight_version"] == "0"


def test_update_weights_from_disk(engine, hf, ckpts):
    _, client = engine
    tok, models = hf
    prompts = [encode(tok, p) for p in PROMPTS[:3]]
    greedy = {"temperature": 0, "max_new_tokens": 8}
    before = [r.output_ids for r in client.generate(prompts, greedy)]
    assert client.update_weights_from_disk(str(ckpts["b"]), 7)[0]
    assert client.model_info()["weight_version"] == "7"
    assert client.model_info()["model_path"] == str(ckpts["b"])
    after = client.generate(prompts, greedy)
    assert [r.output_ids for r in after] == [hf_greedy(models["b"], p, 8) for p in prompts] != before
    assert all(r.token_versions == [7] * len(r.output_ids) and r.weight_version == 7 for r in after)
    for bad in (ckpts["root"] / "missing", ckpts["wide"]):
        ok, message = client.update_weights_from_disk(str(bad), 9)
        assert not ok and str(bad) in message
        assert client.model_info()["weight_version"] == "7"
        assert client.model_info()["model_path"] == str(ckpts["b"])
        assert [r.output_ids for r in client.generate(prompts, greedy)] == [r.output_ids for r in after]
    assert client.update_weights_from_disk(str(ckpts["a"]))[0]  # no version given: unchanged, as SGLang
    assert client.model_info()["weight_version"] == "7"
    assert [r.output_ids for r in client.generate(prompts, greedy)] == before


@pytest.mark.parametrize("body,field", [
    (b"{not json", "body"),
    (b"null", "body"),
    ([1, 2, 3], "body"),
    ({"sampling_params": {}}, "input_ids"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [[1, 2], []]}, "input_ids[1]"),
    ({"input_ids": [1, 10_000]}, "input_ids[1]"),
    ({"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "sampling_params.temperature=-1"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
    ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "8"}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"stop_token_ids": 5}}, "sampling_params.stop_token_ids"),
    ({"input_ids": [1, 2], "sampling_params": {"temprature": 1}}, "temprature"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params"),
    ({"input_ids": [1] * 60, "sampling_params": {"max_new_tokens": 10}}, "max_position_embeddings=64"),
])
def test_malformed_requests_get_400_naming_the_field(engine, body, field):
    _, client = engine
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = requests.post(client.url + "/generate", timeout=30, **kwargs)
    assert resp.status_code == 400 and field in resp.json()["error"]
    assert client.health()


def test_client_raises_engine_error_with_server_message(engine):
    _, client = engine
    with pytest.raises(EngineError, match="temperature=-1: must be"):
        client.generate([[1, 2]], {"temperature": -1})
    with pytest.raises(EngineError, match="not found"):
        client._request("GET", "/no_such_endpoint")


def test_wait_ready_reports_a_dead_process():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="code 3"):
        EngineClient(f"http://127.0.0.1:{free_port()}").wait_ready(30, proc=proc)


def test_sigterm_exits_cleanly_under_load(engine):
    proc, client = engine
    outcome = []

    def keep_generating():
        try:
            while True:
                client.generate([[1, 2, 3]] * 8, {"temperature": 1.0, "max_new_tokens": 50, "ignore_eos": True})
                outcome.append("done")
        except EngineError:
            outcome.append("error")

    thread = threading.Thread(target=keep_generating)
    thread.start()
    deadline = time.time() + 60  # one generation finished (a loaded CI core can take over a second), the next running
    while "done" not in outcome and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    thread.join(30)
    assert not thread.is_alive() and outcome[-1] == "error" and "done" in outcome
