"""Prompt data options (slime's): JSONL/Parquet, input/label/metadata/tool keys, chat template (+ kwargs),
rollout_max_prompt_len filtering (counted); errors name the row, the key and the fix."""
from __future__ import annotations

import json

import pytest

from async_rl import config as config_mod
from async_rl import tiny
from async_rl.data import PromptError, load_prompt_data


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    hf = tiny.build_tokenizer(out)
    hf.chat_template = ("{% for m in messages %}{{ m['role'][0] }}{{ m['content'] }} {% endfor %}"
                        "{% if tools %}{{ tools | length }}{% endif %}{% if add_generation_prompt %}={% endif %}")
    hf.save_pretrained(str(out))
    return str(out)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cfg(**kw):
    return config_mod.load(None, [f"{k}={v}" for k, v in kw.items()]).data


def test_keys_metadata_and_length_filter(tmp_path, tok_dir, capsys):
    path = write(tmp_path / "p.jsonl", [{"q": "1+2", "a": "3", "m": {"id": 1}}, {"q": "11+22+33", "a": "66", "m": {}}])
    rows = load_prompt_data(data_cfg(input_key="q", label_key="a", metadata_key="m", rollout_max_prompt_len=5),
                            tok_dir, path)
    assert rows == [{"input": "1+2", "label": "3", "metadata": {"id": 1}}]
    assert "dropped 1 of 2 prompts longer than rollout_max_prompt_len=5" in capsys.readouterr().out


def test_chat_template_with_messages_tools_and_kwargs(tmp_path, tok_dir):
    path = write(tmp_path / "p.jsonl", [{"input": [{"role": "system", "content": "1"}, {"role": "user", "content": "2+3"}],
                                         "label": "5", "tools": [{"name": "calc"}]}, {"input": "4+4", "label": "8"}])
    rows = load_prompt_data(data_cfg(apply_chat_template=True, tool_key="tools"), tok_dir, path)
    assert [r["input"] for r in rows] == ["s1 u2+3 1=", "u4+4 ="]
    assert rows[0]["tools"] == [{"name": "calc"}] and rows[1]["tools"] is None


def test_errors_name_row_key_and_fix(tmp_path, tok_dir):
    with pytest.raises(PromptError, match="row 1: no key 'question'; set data.input_key"):
        load_prompt_data(data_cfg(input_key="question"), tok_dir, write(tmp_path / "a.jsonl", [{"input": "1", "label": "1"}]))
    with pytest.raises(PromptError, match="must be text, or OpenAI-style messages with data.apply_chat_template"):
        load_prompt_data(data_cfg(), tok_dir, write(tmp_path / "b.jsonl", [{"input": [{"role": "user"}], "label": "1"}]))
    with pytest.raises(PromptError, match="no prompts left"):
        load_prompt_data(data_cfg(rollout_max_prompt_len=1), tok_dir, write(tmp_path / "c.jsonl", [{"input": "12", "label": "1"}]))


def test_parquet(tmp_path, tok_dir):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed (Parquet prompt files need it)")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist([{"input": "1+1", "label": "2"}]), tmp_path / "p.parquet")
    assert load_prompt_data(data_cfg(), tok_dir, tmp_path / "p.parquet") == [{"input": "1+1", "label": "2"}]
