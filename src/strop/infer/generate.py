"""Batched generation with transformers' `model.generate`: greedy or sampled, left-padded,
stopping at EOS; and a streamed single prompt for chat."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from strop.errors import StropError
from strop.infer.prompts import Prompt


@dataclass
class Sampling:
    """temperature 0 is greedy decoding; above 0 samples with top_p / top_k."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> Sampling:
        if self.max_new_tokens < 1:
            raise StropError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise StropError("--temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise StropError("--top-p must be in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise StropError("--top-k must be >= 0 and --repetition-penalty > 0")
        return self

    def kwargs(self, tokenizer: Any, stop: list[int]) -> dict[str, Any]:
        sample = self.temperature > 0
        out: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=sample,
                                   repetition_penalty=self.repetition_penalty,
                                   eos_token_id=stop or None,
                                   pad_token_id=_pad_id(tokenizer))
        if sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:  # say so explicitly: a generation_config.json may ask for sampling
            out.update(temperature=None, top_p=None, top_k=None)
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    prompt: str
    text: str
    new_tokens: int
    stopped: bool  # ended with EOS within max_new_tokens


# End-of-turn tokens of common chat templates: a reply rendered through a chat template ends with
# one of these (ChatML, Llama 3, Gemma), which is not always the tokenizer's EOS.
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_ids(tokenizer: Any, chat_template: bool) -> list[int]:
    """EOS, plus the template's end-of-turn token when the prompt came from a chat template."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat_template:
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in TURN_ENDS if t in vocab and vocab[t] not in ids]
    return ids


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def encode(tokenizer: Any, prompts: list[Prompt]) -> dict[str, Any]:
    """Left-padded (B, T) input_ids and attention_mask: every row's last token is the prompt's
    last, so generated tokens line up. BOS is added as training added it; a chat template
    writes its own."""
    import torch

    ids = [tokenizer(p.text, add_special_tokens=p.special_tokens)["input_ids"] for p in prompts]
    width = max(len(i) for i in ids)
    pad = _pad_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def generate(model: Any, tokenizer: Any, prompts: list[Prompt], sampling: Sampling,
             batch_size: int = 16) -> list[Generation]:
    """One Generation per prompt, in order."""
    import torch

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        stop = stop_ids(tokenizer, any(not p.special_tokens for p in chunk))
        batch = {k: v.to(_device(model)) for k, v in encode(tokenizer, chunk).items()}
        with torch.no_grad():
            sequences = model.generate(**batch, **sampling.kwargs(tokenizer, stop))
        new = sequences[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
        out += [_finish(tokenizer, prompt.text, tokens, stop)
                for prompt, tokens in zip(chunk, new.tolist(), strict=True)]
    return out


def _finish(tokenizer: Any, prompt: str, tokens: list[int], stop: list[int]) -> Generation:
    """Cut at the first stop token (what follows is padding)."""
    end = next((i for i, t in enumerate(tokens) if t in stop), None)
    kept = tokens if end is None else tokens[:end]
    return Generation(prompt, tokenizer.decode(kept, skip_special_tokens=True),
                      len(kept) + int(end is not None), end is not None)


def stream(model: Any, tokenizer: Any, prompt: Prompt, sampling: Sampling,
           write: Callable[[str], None]) -> Generation:
    """Generate one reply, handing text to `write` as it is decoded (transformers' streamer)."""
    import torch
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                write(text)

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    stop = stop_ids(tokenizer, not prompt.special_tokens)
    batch = {k: v.to(_device(model)) for k, v in encode(tokenizer, [prompt]).items()}
    streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        sequences = model.generate(**batch, **sampling.kwargs(tokenizer, stop), streamer=streamer)
    return _finish(tokenizer, prompt.text, sequences[0, batch["input_ids"].shape[1]:].tolist(), stop)


def run_file(target: Any, prompts_path: Any, out: Any, sampling: Sampling, batch_size: int = 16,
             device: str = "cpu") -> int:
    """`strop generate`: every prompt of a file through the model, one JSON line each."""
    import json
    from pathlib import Path

    from strop.data.formats import RowProblem
    from strop.infer.load import load_for_inference, run_dir_of
    from strop.infer.prompts import Prompter, read_prompt_file

    run_dir_of(Path(target))  # a missing model is the first thing to say
    if prompts_path is None or out is None:
        raise StropError("--prompts FILE and --out OUT.jsonl are both required")
    prompts_path, out = Path(prompts_path), Path(out)
    rows = read_prompt_file(prompts_path)
    loaded = load_for_inference(target, device)
    prompter = Prompter(loaded.cfg, loaded.tokenizer)
    prompts = []
    for number, row in enumerate(rows, 1):
        try:
            prompts.append(prompter.row(row))
        except RowProblem as problem:
            raise StropError(f"{prompts_path}: row {number}: {problem.field}: "
                             f"{problem.problem}") from None
    generations = generate(loaded.model, loaded.tokenizer, prompts, sampling, batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row, prompt, gen in zip(rows, prompts, generations, strict=True):
            record = {"prompt": prompt.text, "output": gen.text, "stopped": gen.stopped,
                      "new_tokens": gen.new_tokens}
            if prompt.reference is not None:
                record["reference"] = prompt.reference
            if "id" in row:
                record["id"] = row["id"]
            f.write(json.dumps(record) + "\n")
    return len(generations)
