"""`strop export`: a trained model as a merged Hugging Face directory or a GGUF file, each
verified before it is reported as written.

An adapter run is merged first through `strop.adapters.merge` (which checks the merged logits
against the adapter model's), so both formats start from the same verified full model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from strop.errors import StropError

FORMATS = ("gguf", "hf")
# llama.cpp against PyTorch, measured on tiny llamas: f16 ~4e-4, q8_0 ~9e-3 (x max(1, largest logit));
# a missing rotary permutation gave 4.5e-3 there. Larger models are not measured yet. Beyond the
# limits the export (or llama.cpp's reading of it) is wrong.
# llama.cpp against PyTorch on the weights the file holds: the mean KL divergence of the next-token
# distributions, in nats. What remains is llama.cpp's own arithmetic (f16 matmuls; q8_0 rounds
# the activations to 8 bits too), which grows with depth: on SmolLM2-135M (30 layers) f16 gave
# KL 8e-6 and q8_0 7e-3, and raw logits differed by 0.07 and 1.7, so a logit limit that holds
# for 2 layers fails a real model while its greedy tokens agree.
PARITY_KL = {"f16": 1e-4, "q8_0": 3e-2}


def export_model(run: Path, format_: str, quant: str = "f16", out: Path | None = None,
                 force: bool = False, overwrite: bool = False) -> list[str]:
    if not run.exists():
        raise StropError(f"{run}: no such run or model directory")
    if format_ not in FORMATS:
        raise StropError(f"--format {format_}: choose gguf or hf" if format_ else
                         "--format is required: gguf (llama.cpp) or hf (merged safetensors)")
    is_adapter = (run / "adapter_config.json").is_file()
    if format_ == "hf":
        out = out or run.parent / f"{run.name}-hf"
        return _export_hf(run, out, is_adapter, force, overwrite)
    from strop.export.gguf_llama import QUANTS

    if quant not in QUANTS:
        raise StropError(f"--quant {quant}: choose {' or '.join(QUANTS)}")
    out = out or run.parent / f"{run.name}-{quant}.gguf"
    if out.exists() and not overwrite:
        raise StropError(f"--out {out} already exists; pass --overwrite to replace it")
    messages: list[str] = []
    with tempfile.TemporaryDirectory(prefix="strop-export-") as tmp:
        source = run
        if is_adapter:
            from strop.adapters.merge import merge_adapter

            merged = merge_adapter(run, Path(tmp) / "merged", force=force, dtype="float32")
            messages += [m for m in merged.messages if not m.startswith("wrote ")]
            source = Path(tmp) / "merged"
        model, tokenizer = _load_full(source)
        messages += export_gguf(model, tokenizer, out, quant, force=force, name=run.resolve().name)
    return messages


def export_gguf(model: Any, tokenizer: Any, out: Path, quant: str, force: bool = False,
                name: str = "strop-export") -> list[str]:
    """Write, read back and compare; a file that fails is removed unless forced."""
    from strop.export.gguf_llama import llama_cpp_parity, verify_gguf, write_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    notes = write_gguf(model, tokenizer, partial, quant, name=name)
    check = verify_gguf(partial, model.state_dict(), model.config)
    messages = [f"note: {n}" for n in notes]
    kinds = sorted({c.kind for c in check.checks})
    messages.append(f"verified {len(check.checks)} tensors read back from the GGUF "
                    f"({', '.join(kinds)}): max |gguf - source| {check.max_abs_diff:.3g}")
    if not check.passed:
        failures = check.failures()
        if not force:
            partial.unlink(missing_ok=True)
            raise StropError(f"the GGUF does not match the model ({failures[0]}; "
                             f"{len(failures)} tensor(s) off); nothing was written. Pass --force "
                             "to write it anyway")
        messages.append(f"the check failed ({failures[0]}); writing anyway because of --force")
    parity = llama_cpp_parity(partial, model, tokenizer, check.written)
    if parity is None:
        messages.append("llama.cpp parity not checked: llama-cpp-python is not installed "
                        "(pip install llama-cpp-python)")
    else:
        limit = PARITY_KL[quant]
        messages.append(f"llama.cpp parity on {parity['positions']} positions: mean KL "
                        f"{parity['mean_kl']:.2g} nats (limit {limit:.2g}), max |logit diff| "
                        f"{parity['max_abs_logit_diff']:.3g}, greedy tokens "
                        f"agree {parity['greedy_agreement']:.1%}, same tokenization "
                        f"{parity['same_tokenization']}")
        if parity["mean_kl"] > limit and not force:
            partial.unlink(missing_ok=True)
            raise StropError(f"llama.cpp's next-token distributions differ from PyTorch's by a "
                             f"mean KL of {parity['mean_kl']:.2g} nats (limit {limit:.2g}); "
                             "nothing was written. Pass --force to write it anyway")
    partial.replace(out)
    messages.append(f"wrote {out} ({quant}, {out.stat().st_size / 2**20:.1f} MiB)")
    return messages


def _load_full(source: Path) -> tuple[Any, Any]:
    import torch

    from strop.infer.load import load_for_inference

    loaded = load_for_inference(source, "cpu", torch.float32)
    return loaded.model, loaded.tokenizer


def _export_hf(run: Path, out: Path, is_adapter: bool, force: bool, overwrite: bool) -> list[str]:
    from strop.adapters.merge import _write, check_output_dir, merge_adapter

    if is_adapter:
        return merge_adapter(run, out, force=force, overwrite=overwrite).messages
    check_output_dir(out, run, overwrite)
    model, tokenizer = _load_full(run)
    _write(model, tokenizer, out)
    return [f"{run} is already a full model; wrote a clean copy (weights and tokenizer only) "
            f"to {out}"]
