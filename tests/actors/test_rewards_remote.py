"""rm_type=remote_rm against real HTTP servers on 127.0.0.1 (stdlib http.server in a thread): the request
body, number and map replies, retries with backoff after failures, a clear error after the last retry,
the timeout on a server that never answers, and no retry when the server rejects the request."""
from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from actors.rewards import RewardError, RewardScorer
from actors.rm_hub.remote import RemoteRM
from async_rl import config as config_mod
from async_rl.config import ConfigError
from async_rl.types import Group, Trajectory


class RewardServer:
    """A reward server whose i-th reply is `script(i, body)` -> (status, body text) or "hang"."""

    def __init__(self, script):
        self.requests: list[dict] = []
        self.release = threading.Event()  # lets hanging handlers finish at shutdown
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                answer = script(len(outer.requests) - 1, body)
                if answer == "hang":
                    outer.release.wait(10)
                    return
                status, text = answer
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(RewardServer(script))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def rollout(**fields):
    return replace(config_mod.RolloutConfig(), rm_type="remote_rm", **fields)


def group_of(texts: list[str], prompt: str = "1+1=") -> Group:
    empty = np.zeros(0, np.int32)
    trajs = [Trajectory(empty, empty, empty.astype(np.float32), empty, response_text=t) for t in texts]
    return Group("g0", 0, 0, "2", trajs, prompt_text=prompt)


def test_posts_prompt_response_label_and_reads_a_number(serve):
    server = serve(lambda i, body: (200, json.dumps(float(len(body["response"])))))
    scorer = RewardScorer(rollout(rm_url=server.url))
    group = group_of(["a", "bb", "ccc", "dddd"])
    scorer.apply(group, {"answer": 2, "unit": "apples"})
    assert [t.reward for t in group.trajectories] == [1.0, 2.0, 3.0, 4.0]
    assert sorted(r["response"] for r in server.requests) == ["a", "bb", "ccc", "dddd"]
    assert all(r["prompt"] == "1+1=" and r["label"] == {"answer": 2, "unit": "apples"} for r in server.requests)
    assert "reward_details" not in group.meta


def test_map_reply_uses_reward_then_reward_key(serve):
    server = serve(lambda i, body: (200, json.dumps({"reward": 0.7, "format": 0.1, "note": "ok"})))
    group = group_of(["x", "y"])
    RewardScorer(rollout(rm_url=server.url)).apply(group, "2")
    assert [t.reward for t in group.trajectories] == [0.7, 0.7]
    assert group.meta["reward_details"] == [{"reward": 0.7, "format": 0.1, "note": "ok"}] * 2
    assert RewardScorer(rollout(rm_url=server.url, reward_key="format")).score_one("p", "r", "l") == 0.1
    with pytest.raises(RewardError, match="reward_key='acc'"):
        RewardScorer(rollout(rm_url=server.url, reward_key="acc")).score_one("p", "r", "l")


def test_two_failures_then_success_is_retried_with_backoff(serve):
    server = serve(lambda i, body: (503, "busy") if i < 2 else (200, "1.5"))
    rm = RemoteRM(server.url, timeout=2.0, max_retries=2, backoff=0.1)
    t0 = time.monotonic()
    assert rm("p", "r", "l") == 1.5
    assert len(server.requests) == 3
    assert time.monotonic() - t0 >= 0.1 + 0.2  # backoff doubles: 0.1 s, then 0.2 s


def test_error_after_the_last_retry_names_the_field_and_last_error(serve):
    server = serve(lambda i, body: (500, "model crashed"))
    rm = RemoteRM(server.url, timeout=2.0, max_retries=2, backoff=0.01)
    with pytest.raises(RewardError, match=r"rm_url=.*failed 3 times.*rm_max_retries=2.*HTTP 500.*model crashed"):
        rm("p", "r", "l")
    assert len(server.requests) == 3


def test_a_server_that_never_answers_times_out(serve):
    server = serve(lambda i, body: "hang")
    rm = RemoteRM(server.url, timeout=0.3, max_retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"failed 2 times.*no answer within rm_timeout=0.3s"):
        rm("p", "r", "l")
    assert 0.6 <= time.monotonic() - t0 < 3.0
    assert len(server.requests) == 2


def test_a_rejected_request_is_not_retried(serve):
    server = serve(lambda i, body: (422, "label missing"))
    with pytest.raises(RewardError, match="rejected the request.*HTTP 422.*label missing"):
        RemoteRM(server.url, timeout=2.0, max_retries=5, backoff=0.01)("p", "r", "l")
    assert len(server.requests) == 1


@pytest.mark.parametrize("reply", ['"great"', "[1, 2]", "true", "null"])
def test_a_reply_that_is_not_a_reward_fails_at_once(serve, reply):
    server = serve(lambda i, body: (200, reply))
    with pytest.raises(RewardError, match="neither a number nor a map"):
        RemoteRM(server.url, timeout=2.0, max_retries=3, backoff=0.01)("p", "r", "l")
    assert len(server.requests) == 1


def test_unreadable_json_is_retried(serve):
    server = serve(lambda i, body: (200, "{not json") if i == 0 else (200, "0.25"))
    assert RemoteRM(server.url, timeout=2.0, max_retries=1, backoff=0.01)("p", "r", "l") == 0.25


def test_nobody_listening_fails_after_retries():
    with socket.socket() as sock:  # a port nobody listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rm = RemoteRM(f"http://127.0.0.1:{port}/score", timeout=1.0, max_retries=1, backoff=0.01)
    with pytest.raises(RewardError, match="failed 2 times.*ConnectionError"):
        rm("p", "r", "l")


def test_config_requires_an_http_url_for_remote_rm():
    with pytest.raises(ConfigError, match=r"rollout.rm_url='': rm_type=remote_rm needs"):
        config_mod.load(overrides=["rm_type=remote_rm"])
    with pytest.raises(ConfigError, match="rm_timeout=0.0: must be > 0"):
        config_mod.load(overrides=["rm_type=remote_rm", "rm_url=http://x:1/s", "rm_timeout=0"])
    with pytest.raises(ConfigError, match="rm_max_retries=-1: must be >= 0"):
        config_mod.load(overrides=["rm_max_retries=-1"])
    cfg = config_mod.load(overrides=["rm_type=remote_rm", "rm_url=http://127.0.0.1:8000/score"])
    assert cfg.rollout.rm_url == "http://127.0.0.1:8000/score"
