"""Bind and advertise rules (async_rl/endpoints.py, config_rules): loopback stays the default and serves no
weights, a wildcard bind needs an address to advertise, advertised endpoints carry the advertised host."""
from __future__ import annotations

import pytest

from async_rl import config as C
from async_rl.endpoints import advertise, advertised_host, is_loopback, serves_weights


def test_loopback_is_recognised():
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.77.0.1") and not is_loopback("0.0.0.0") and not is_loopback("head.example")


def test_advertise_replaces_only_the_host():
    assert advertise("tcp://0.0.0.0:5555", "10.0.0.5") == "tcp://10.0.0.5:5555"
    assert advertise("http://10.0.0.1:30000", "gen1") == "http://gen1:30000"
    assert advertise("tcp://0.0.0.0:7", "fe80::1") == "tcp://[fe80::1]:7"


def test_defaults_stay_on_loopback_and_serve_no_weights():
    cfg = C.load(None)
    assert cfg.cluster.host == "127.0.0.1" and advertised_host(cfg.cluster) == "127.0.0.1"
    assert not serves_weights(cfg.cluster)
    assert serves_weights(C.load(None, ["cluster.host=10.0.0.5"]).cluster)
    assert serves_weights(C.load(None, ["serve_weights=on"]).cluster)
    assert not serves_weights(C.load(None, ["cluster.host=10.0.0.5", "serve_weights=off"]).cluster)
    assert advertised_host(C.load(None, ["cluster.host=0.0.0.0", "advertise_host=10.0.0.5"]).cluster) == "10.0.0.5"


@pytest.mark.parametrize("words,match", [
    (["cluster.host=0.0.0.0"], "cluster.host='0.0.0.0' binds every interface; set cluster.advertise_host"),
    (["serve_weights=maybe"], "cluster.serve_weights='maybe': must be auto, on or off"),
    (["weights_port=70000"], "cluster.weights_port=70000: must be a TCP port"),
])
def test_bad_address_settings_name_the_field_and_the_fix(words, match):
    with pytest.raises(C.ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        C.load(None, words)
