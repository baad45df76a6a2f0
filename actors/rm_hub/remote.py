"""rm_type=remote_rm: score a response by HTTP POST to a reward-model server (`rollout.rm_url`).

Contract with the server: the body is JSON {"prompt", "response", "label"}; a 200 reply is JSON, either a
number or a map such as {"reward": 0.7, ...} (the scalar is picked by `rollout.reward_key`, else
"reward"/"score").

Guarantees: each try waits at most `rm_timeout` seconds; connection errors, timeouts, 5xx/408/429 replies
and unreadable JSON are retried up to `rm_max_retries` times with exponential backoff (0.5 s, 1 s, 2 s ...,
at most 10 s); other 4xx replies (the server says the request itself is wrong) and replies of the wrong
shape fail at once. A failure raises `RewardError` naming `rollout.rm_url`, the number of tries and the last
error, never a silent 0 reward (which would train the policy on a broken signal). Safe to call from
several threads (one HTTP session per thread).
"""
from __future__ import annotations

import threading
import time

import requests

from actors.rm_hub import RewardError
from async_rl.plugins import PluginError

_RETRY_STATUSES = {408, 429}
_MAX_BACKOFF = 10.0


class RemoteRM:
    def __init__(self, url: str, timeout: float, max_retries: int, backoff: float = 0.5):
        if not url.startswith(("http://", "https://")):
            raise PluginError(f"rollout.rm_url={url!r}: must be an http:// or https:// URL of the reward server "
                              f"(needed by rollout.rm_type=remote_rm)")
        self.url, self.timeout, self.max_retries, self.backoff = url, timeout, max_retries, backoff
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _try_once(self, payload: dict):
        """-> (reply, None) on success, (None, error text) for a retriable failure; raises on a final one."""
        try:
            resp = self._session().post(self.url, json=payload, timeout=self.timeout)
        except requests.Timeout:
            return None, f"no answer within rm_timeout={self.timeout}s"
        except requests.RequestException as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if resp.status_code != 200:
            error = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
            if 400 <= resp.status_code < 500 and resp.status_code not in _RETRY_STATUSES:
                raise RewardError(f"rollout.rm_url={self.url!r}: the reward server rejected the request ({error})")
            return None, error
        try:
            reply = resp.json()
        except ValueError:
            return None, f"reply is not JSON: {resp.text[:200]!r}"
        if isinstance(reply, bool) or not isinstance(reply, (int, float, dict)):
            raise RewardError(f"rollout.rm_url={self.url!r}: reply {reply!r} is neither a number nor a map "
                              f"such as {{\"reward\": 0.5}}")
        return reply, None

    def __call__(self, prompt: str, response: str, label):
        payload = {"prompt": prompt, "response": response, "label": label}
        tries = self.max_retries + 1
        for attempt in range(tries):
            reply, error = self._try_once(payload)
            if error is None:
                return reply
            if attempt + 1 < tries:
                time.sleep(min(self.backoff * 2 ** attempt, _MAX_BACKOFF))
        raise RewardError(f"rollout.rm_url={self.url!r}: remote reward model failed {tries} times "
                          f"(rm_max_retries={self.max_retries}); last error: {error}. Check that the server is "
                          f"up, or raise rollout.rm_timeout / rollout.rm_max_retries")
