"""The CLI surface: verbs, `strop validate` output and exit codes, no tracebacks on bad input."""

from __future__ import annotations

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

VERBS = ["train", "preprocess", "validate", "plan", "inspect", "data", "merge", "export", "chat",
         "generate", "eval", "report", "demo", "config-schema"]

GOOD = """\
base_model: ./models/tiny
learning_rate: 2e-4
datasets:
  - path: data/train.jsonl
    type: alpaca
adapter: lora
lora_target_linear: true
wandb_watch:
"""


def test_help_lists_every_verb(cli):
    result = cli("--help")
    assert result.code == 0
    for verb in VERBS:
        assert verb in result.out


def test_validate_prints_every_key_with_its_source(cli, write_yaml):
    result = cli("validate", write_yaml(GOOD), "--lora_r", "32")
    assert result.code == 0, result.err
    assert "lora_r: 32" in result.out and "# command line" in result.out
    assert "sequence_len: 512" in result.out and "# default" in result.out
    assert "config.yml:1" in result.out
    assert "wandb_watch" in result.out  # the empty axolotl key is listed, not dropped silently
    # The printed config is itself valid YAML that loads back to the same values.
    reloaded = yaml.safe_load(result.out)
    assert reloaded["lora_r"] == 32 and reloaded["learning_rate"] == 2e-4


def test_the_printed_config_loads_back_to_the_same_config(cli, write_yaml):
    from strop.config import load_config

    for text in (GOOD, GOOD.replace("adapter: lora\nlora_target_linear: true\n", "")):
        original = load_config(write_yaml(text)).cfg
        printed = cli("validate", write_yaml(text)).out
        assert load_config(write_yaml(printed, "resolved.yml")).cfg == original


def test_validate_lists_every_problem_and_exits_2(cli, write_yaml):
    result = cli("validate", write_yaml(GOOD + "lora_alpah: 3\nmicro_batch_size: 0\n"))
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "Traceback" not in result.err


def test_validate_missing_file_exits_2(cli, tmp_path):
    result = cli("validate", tmp_path / "missing.yml")
    assert result.code == 2 and "no such file" in result.err


def test_config_schema_emits_json_schema(cli):
    import json

    result = cli("config-schema")
    schema = json.loads(result.out)
    assert result.code == 0 and "lora_r" in schema["properties"]
    assert "model_config" in schema["properties"]  # the name users write, not the field name
    assert schema["properties"]["lora_r"]["description"]


def test_every_verb_answers_a_missing_input_with_one_line_and_exit_2(cli, tmp_path):
    # A verb not built yet says so; a built one names the missing file. Never a traceback.
    missing = tmp_path / "missing.yml"
    for verb in [v for v in VERBS if v not in ("config-schema", "demo", "data")] + ["data check"]:
        result = cli(*verb.split(), missing)
        assert result.code == 2, (verb, result.err)
        assert "Traceback" not in result.err and result.err.startswith("error: "), verb
        assert "not built yet" in result.err or "missing.yml" in result.err, verb


# A document that looks like a config: known keys with random values, plus random keys.
KEYS = ["base_model", "learning_rate", "datasets", "lora_r", "adapter", "micro_batch_size",
        "sequence_len", "bf16", "special_tokens", "warmup_steps", "warmup_ratio", "val_set_size",
        "load_in_4bit", "optimizer", "lora_target_modules", "model_config", "num_epochs"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(string.ascii_lowercase, max_size=8),
                                                 inner, max_size=3)), max_leaves=8)
documents = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(string.ascii_lowercase + "_-",
                                                             min_size=1, max_size=14)),
                    values, max_size=8),
    values,
)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents, raw=st.text(max_size=60))
def test_no_traceback_ever_escapes_validate(cli, tmp_path, doc, raw):
    path = tmp_path / "fuzz.yml"
    for text in (yaml.safe_dump(doc), raw):
        path.write_text(text)
        result = cli("validate", path)
        assert result.code in (0, 2), result.err
        assert "Traceback" not in result.err
        if result.code == 2:
            assert all(line.startswith("error: ") for line in result.err.strip().splitlines())


def test_a_rank_of_a_torchrun_job_exits_with_its_code_and_its_output(tmp_path):
    # A rank leaves through os._exit (no interpreter teardown: strop.cli._main_of_a_rank), so
    # what it printed must be flushed and its exit code kept. No process group is needed.
    import os
    import subprocess
    import sys

    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(GOOD)
    bad.write_text(GOOD + "lora_rr: 4\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffers
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")

    def strop(*args):
        return subprocess.run([sys.executable, "-m", "strop", *args], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    ok = strop("validate", good)
    assert ok.returncode == 0 and "learning_rate" in ok.stdout, ok.stderr
    failed = strop("validate", bad)
    assert failed.returncode == 2
    assert failed.stderr.strip() == (f"error: rank 0: {bad}:9: unknown key 'lora_rr'; "
                                      "did you mean lora_r?")
