"""Using a trained run: chat, generate, eval, report and export, on tiny models trained for a few
steps (full fine-tuning, LoRA and QLoRA) in a temporary directory."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import write_alpaca
from strop.config import load_dict
from strop.train.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("use-data") / "alpaca.jsonl", 120, seed=5)


@pytest.fixture(scope="module")
def rows(alpaca) -> Path:
    path = alpaca.with_name("eval.jsonl")
    path.write_text("".join(alpaca.read_text().splitlines(keepends=True)[:3]))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, alpaca, tmp_path_factory) -> dict[str, Path]:
    """full, lora and qlora runs of 2 steps, each with a validation split."""
    root = tmp_path_factory.mktemp("use-runs")
    modes = {"full": {}, "lora": {"adapter": "lora", "lora_target_linear": True},
             "qlora": {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}}
    out = {}
    for mode, extra in modes.items():
        cfg = {"base_model": str(tiny_model_dir("llama")),
               "datasets": [{"path": str(alpaca), "type": "alpaca"}], "learning_rate": 1e-2,
               "micro_batch_size": 4, "max_steps": 2, "sequence_len": 192,
               "output_dir": str(root / mode), "logging_steps": 1, "val_set_size": 0.1,
               "eval_steps": 2, **extra}
        (root / f"{mode}.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        train(load_dict(cfg))
        out[mode] = root / mode
    return out


def final_eval_loss(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["final_eval"]["eval_loss"]


# ------------------------------------------------------------------------------- chat, generate


def test_chat_driven_by_scripted_stdin(runs, cli, monkeypatch):
    script = "hello river\n/reset\nwhat city\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    result = cli("chat", runs["lora"], "--max-new-tokens", "6", "--system", "be brief")
    assert result.code == 0, result.err
    assert "alpaca prompt format" in result.out  # the format the run trained on
    assert result.out.count("model> ") == 2 and "(conversation cleared)" in result.out
    assert result.out.rstrip().endswith("bye") and "never read" not in result.out
    replies = re.findall(r"model> (.*)", result.out)
    assert all(r.strip() for r in replies)

    monkeypatch.setattr(sys, "stdin", io.StringIO("one turn and then end of input\n"))
    result = cli("chat", runs["full"], "--max-new-tokens", "4", "--temperature", "0.8",
                 "--top-p", "0.9", "--top-k", "20", "--seed", "1")
    assert result.code == 0 and result.out.count("model> ") == 1 and "bye" in result.out


def test_generate_writes_jsonl_from_text_and_dataset_rows(runs, rows, cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Alpha beta\nWhere is the river\n")
    out = tmp_path / "gen.jsonl"
    result = cli("generate", runs["full"], "--prompts", prompts, "--out", out,
                 "--max-new-tokens", "5")
    assert result.code == 0, result.err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["Alpha beta", "Where is the river"]
    assert all(0 < x["new_tokens"] <= 5 and isinstance(x["stopped"], bool) for x in lines)

    result = cli("generate", runs["lora"], "--prompts", rows, "--out", out, "--max-new-tokens", "3")
    assert result.code == 0, result.err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and all(x["prompt"].endswith("### Response:\n") for x in lines)
    assert all(x["reference"] for x in lines)


def test_batched_generation_equals_one_at_a_time(runs):
    """Left padding must not change a greedy answer."""
    from strop.infer.generate import Sampling, generate
    from strop.infer.load import load_for_inference
    from strop.infer.prompts import Prompt

    loaded = load_for_inference(runs["full"])
    prompts = [Prompt(t, None, True) for t in ("A", "The river north of the city", "Seven")]
    sampling = Sampling(max_new_tokens=6)
    together = generate(loaded.model, loaded.tokenizer, prompts, sampling, batch_size=3)
    alone = [generate(loaded.model, loaded.tokenizer, [p], sampling)[0] for p in prompts]
    assert [g.text for g in together] == [g.text for g in alone]


def test_qlora_adapter_loads_onto_a_4bit_base(runs):
    import bitsandbytes as bnb

    from strop.infer.evaluate import eval_loss
    from strop.infer.load import load_for_inference

    loaded = load_for_inference(runs["qlora"])
    assert loaded.kind == "adapter" and "4-bit" in loaded.description
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    assert eval_loss(loaded)["eval_loss"] == pytest.approx(final_eval_loss(runs["qlora"]),
                                                           rel=1e-3)


# ------------------------------------------------------------------------------------------ eval


def test_eval_cli_loss_generation_and_base_side_by_side(runs, rows, cli, tmp_path):
    out = tmp_path / "eval.json"
    result = cli("eval", runs["full"], "--data", rows, "--base", "--max-new-tokens", "4",
                 "--json", out)
    assert result.code == 0, result.err
    assert "perplexity" in result.out and "base" in result.out and "token F1" in result.out
    got = json.loads(out.read_text())
    # Same loss as training's own evaluation of the final weights.
    assert got["loss"]["eval_loss"] == pytest.approx(final_eval_loss(runs["full"]), rel=1e-3)
    assert got["loss"]["perplexity"] == pytest.approx(np.exp(got["loss"]["eval_loss"]))
    gen = got["generation"]
    assert gen["n"] == 3 and all(0 <= gen[k] <= 1 for k in
                                 ("exact_match", "contains", "token_f1", "stop_rate"))
    assert got["base"]["loss"]["eval_loss"] != got["loss"]["eval_loss"]
    assert got["base"]["generation"]["n"] == 3 and got["samples"][0]["reference"]


def test_evaluate_run_api_on_an_adapter_and_through_its_yaml(runs, rows):
    from strop.infer.evaluate import evaluate_run

    result = evaluate_run(runs["lora"], data=rows, base=True, max_new_tokens=3, batch_size=2)
    assert set(result) >= {"loss", "generation", "base"}
    assert result["loss"]["eval_loss"] == pytest.approx(final_eval_loss(runs["lora"]), rel=1e-3)
    # The base is the adapter switched off: the untrained model's loss.
    assert result["base"]["loss"]["eval_loss"] > result["loss"]["eval_loss"]
    via_yaml = evaluate_run(runs["lora"].with_name("lora.yml"))
    assert via_yaml["loss"] == pytest.approx(result["loss"]) and via_yaml["generation"] is None


def test_one_line_errors(runs, cli, tmp_path):
    for verb in ("chat", "eval", "report"):
        result = cli(verb, tmp_path / "nope")
        assert result.code == 2 and result.err.count("\n") == 1 and "nope" in result.err, verb
    (tmp_path / "p.txt").write_text("hello\n")
    result = cli("generate", tmp_path, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "o")
    assert result.code == 2 and "no model here" in result.err
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        result = cli("eval", runs["full"], "--tasks", "hellaswag")
        assert result.code == 2 and "pip install lm-eval" in result.err


# ---------------------------------------------------------------------------------------- report


def test_report_draws_real_images_and_one_html_page(runs, cli, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    result = cli("report", runs["full"], runs["lora"], "--out", out)
    assert result.code == 0, result.err
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == {"loss", "learning_rate", "grad_norm", "tokens_per_s"}
    for png in pngs:
        image = Image.open(png)
        assert image.size == (800, 450) and png.stat().st_size > 5000
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)
    assert "full" in page and "lora" in page and "learning_rate" in page  # config shown
    result = cli("report", runs["qlora"])
    assert result.code == 0 and (runs["qlora"] / "report" / "loss.png").is_file()


# ---------------------------------------------------------------------------------------- export


def _diff(text: str) -> float:
    return float(re.search(r"max \|gguf - source\| ([0-9.e+-]+)", text).group(1))


@pytest.mark.parametrize("quant, limit", [("f16", 1e-3), ("q8_0", 2e-2)])
def test_export_gguf_round_trip(quant, limit, runs, cli, tmp_path):
    import gguf

    out = tmp_path / f"lora-{quant}.gguf"
    result = cli("export", runs["lora"], "--format", "gguf", "--quant", quant, "--out", out)
    assert result.code == 0, result.err
    assert out.is_file() and 0 < _diff(result.out) < limit
    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "output_norm.weight"} <= names
    kinds = {t.tensor_type.name for t in reader.tensors}
    assert kinds == ({"F16", "F32"} if quant == "f16" else {"Q8_0", "F32"})
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"


def test_a_corrupted_tensor_fails_verification(runs, cli, tmp_path, monkeypatch):
    import gguf

    import strop.export.gguf_llama as gl
    from strop.infer.load import load_for_inference

    loaded = load_for_inference(runs["full"])
    path = tmp_path / "full.gguf"
    gl.write_gguf(loaded.model, loaded.tokenizer, path, "f16")
    assert gl.verify_gguf(path, loaded.model.state_dict(), loaded.model.config).passed

    def corrupt(file: Path, name: str = "blk.0.attn_k.weight") -> None:
        tensor = next(t for t in gguf.GGUFReader(str(file)).tensors if t.name == name)
        with file.open("r+b") as f:
            f.seek(int(tensor.data_offset) + 10)
            f.write(np.array([0.5, -0.5], dtype=np.float16).tobytes())

    corrupt(path)
    check = gl.verify_gguf(path, loaded.model.state_dict(), loaded.model.config)
    assert not check.passed and check.failures()[0].startswith("blk.0.attn_k.weight")

    real_write = gl.write_gguf

    def write_then_corrupt(*args, **kwargs):
        notes = real_write(*args, **kwargs)
        corrupt(args[2])
        return notes

    monkeypatch.setattr(gl, "write_gguf", write_then_corrupt)
    out = tmp_path / "refused.gguf"
    result = cli("export", runs["full"], "--format", "gguf", "--out", out)
    assert result.code == 2 and "does not match" in result.err and "blk.0.attn_k" in result.err
    assert not out.exists() and not list(tmp_path.glob("refused*"))


def test_gguf_matches_llama_cpp(runs, tmp_path):
    # In the dev extras, so `make test` has it; a bare `pip install -e .` does not.
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e "
                                            "'.[dev]' builds it)")
    from strop.export.gguf_llama import llama_cpp_parity, write_gguf
    from strop.infer.load import load_for_inference

    loaded = load_for_inference(runs["full"])
    path = tmp_path / "parity.gguf"
    write_gguf(loaded.model, loaded.tokenizer, path, "f16")
    parity = llama_cpp_parity(path, loaded.model, loaded.tokenizer)
    assert parity["greedy_agreement"] == 1.0
    assert parity["max_abs_logit_diff"] < 3e-3 * max(1.0, parity["logit_scale"])
    assert parity["same_tokenization"] == "2/2"


def test_export_hf_loads_and_matches_the_adapter(runs, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    from strop.infer.load import load_for_inference

    out = tmp_path / "merged"
    result = cli("export", runs["lora"], "--format", "hf", "--out", out)
    assert result.code == 0, result.err
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapter = load_for_inference(runs["lora"]).model
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_export_refuses_other_families_in_one_line(tiny_model_dir, cli, tmp_path):
    result = cli("export", tiny_model_dir("gpt2"), "--format", "gguf", "--out", tmp_path / "x.gguf")
    assert result.code == 2 and "supports the llama family" in result.err and "gpt2" in result.err
    result = cli("export", tiny_model_dir("gpt2"))
    assert result.code == 2 and "--format is required" in result.err
