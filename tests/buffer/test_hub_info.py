"""INFO, what a host without the run dir joins by: a real hub process with CURVE keys answers a client that
holds the run's attach.key (one file) with the run's config and the endpoints it was told to advertise; a
client holding another run's key gets no answer at all; a malformed --advertise is refused at start."""
from __future__ import annotations

import subprocess
import sys

import pytest

from async_rl import config as C
from async_rl.hub_client import HubClient, HubTimeout
from async_rl.keys import create_keys
from tests.buffer.conftest import free_port


def _config(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(f'{{"input": "{i}+1=", "label": "{i + 1}"}}\n' for i in range(5)))
    path = tmp_path / "c.yaml"
    C.save(C.load(None, [f"prompt_data={data}", "rollout_batch_size=1", "n_samples_per_prompt=3"]), path)
    return path


def test_info_gives_the_config_and_advertised_endpoints_to_key_holders_only(tmp_path):
    cfg_path, keys = _config(tmp_path), create_keys(tmp_path / "keys")
    other = create_keys(tmp_path / "other")
    endpoint, ep_file = f"tcp://127.0.0.1:{free_port()}", tmp_path / "ep"
    proc = subprocess.Popen([sys.executable, "-m", "buffer.service", "--config", str(cfg_path), "--bind", endpoint,
                             "--endpoint-file", str(ep_file), "--keys", str(keys),
                             "--advertise", "weights=tcp://10.1.2.3:5601"])
    try:
        client = HubClient(endpoint, identity="t", keys_dir=str(keys / "attach.key"), resend_after=1)
        reply = client.request({"type": "INFO"}, timeout=30)
        client.close()
        assert reply["endpoints"] == {"weights": "tcp://10.1.2.3:5601"} and reply["version"] == 0
        assert reply["config"]["rollout"]["n_samples_per_prompt"] == 3
        assert C.from_dict(reply["config"]).to_dict() == C.load(cfg_path).to_dict()
        stranger = HubClient(endpoint, identity="s", keys_dir=str(other / "attach.key"), resend_after=1)
        with pytest.raises(HubTimeout):
            stranger.request({"type": "INFO"}, timeout=3)
        stranger.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_a_malformed_advertise_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "buffer.service", "--config", str(_config(tmp_path)),
                          "--advertise", "tcp://10.1.2.3:5601"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "expected NAME=URL" in out.stderr
