"""TRL 1.16 preference losses on pre-tokenized examples: a reference for strop's own losses.

Each function builds TRL's own trainer on the given ids and runs `trainer.evaluate()` over exactly
one batch holding every example (model in eval mode, no grad, float32, one `compute_loss`/
`get_batch_loss_metrics` call), and returns TRL's loss plus the metrics TRL logs for that batch,
keyed by TRL's names without the `eval_` prefix ("loss", "rewards/chosen", ...).

How ids reach TRL. TRL 1.16 trainers only take text: DPO/KTO always re-tokenize (`_prepare_dataset`
has no pass-through for `prompt_ids`), ORPO/CPO tokenize in `tokenize_row`. So we hand TRL a private
"id tokenizer" (WordLevel, one vocab entry "<i>" per id, whitespace split, no BOS/EOS
post-processor) and write every id sequence as "<i> <j> ...". It round-trips exactly, so all of
TRL's own preprocessing (EOS check, ORPO/CPO BOS/EOS check, KTO's KL pairing) runs unchanged on
your ids. Your tokenizer is only read for its eos/pad ids; model and tokenizer are deep-copied,
because TRL patches `model.forward` (fused LM head), its config pad id and dropout.

Conventions an independent implementation must match (TRL 1.16.0):
1. Sequence = prompt_ids + completion_ids, right-padded; log-probs count only completion tokens
   (token t scored from position t-1). From text, DPO/KTO tokenize with the tokenizer's own
   special tokens (e.g. Llama's BOS) and append the eos_token *string* if the completion text
   does not end with it; ORPO/CPO tokenize without special tokens, then prepend bos_token_id if
   the prompt does not start with it and append eos_token_id if the answer does not end with it.
   Here nothing is added: the id tokenizer has no BOS and every completion already ends in EOS.
   Truncation defaults: max_length=1024 everywhere (ORPO/CPO fall back to 512 when None); we set
   None for DPO/KTO and the longest prompt+completion for ORPO/CPO, so nothing is cut.
2. DPO: logp = SUM of completion-token log-probs; delta = (pc - rc) - (pr - rr);
   loss = mean(-logsigmoid(beta * delta)). `label_smoothing` is IGNORED by loss_type "sigmoid"
   (no cDPO in 1.16; it only feeds "robust", "exo_pair", "aot"), so we refuse it for "dpo".
   There is no `rpo_alpha` in 1.16: RPO is loss_type=["sigmoid","sft"], loss_weights=[1,
   rpo_alpha], sft = mean of -logp over ALL chosen completion tokens of the batch (token-mean,
   chosen only, not per-sequence); no nll metric is logged.
   IPO: scores divided by completion length (token-mean log-ratio), loss =
   mean((dc/|yc| - dr/|yr| - 1/(2*beta))^2).
   Metrics: rewards/chosen = mean(beta*(pc-rc)) (summed logps, also for IPO), rewards/rejected
   likewise, margins = mean of the difference, accuracies = mean(chosen > rejected, strict),
   logps/* = mean summed policy logps.
3. ORPO: logp = MEAN completion-token log-prob; log_odds = (lc - lr) - (log(1-e^lc) -
   log(1-e^lr)); loss = nll - beta * mean(logsigmoid(log_odds)) with beta = lambda (the paper's /
   original code's "alpha"). nll = cross-entropy token-mean over ALL non-pad tokens of the chosen
   sequences, PROMPT INCLUDED (labels = input_ids where attention_mask==1). rewards/* =
   beta * mean logps (no reference); metric "log_odds_ratio" = mean(logsigmoid(log_odds)),
   "log_odds_chosen" = mean(log_odds).
4. SimPO = CPOTrainer(loss_type="simpo"): logp = MEAN completion-token log-prob; loss =
   mean(-(1-ls)*logsigmoid(beta*(lc-lr) - simpo_gamma) - ls*logsigmoid(-(beta*(lc-lr) -
   simpo_gamma))) + cpo_alpha * nll (TRL subtracts simpo_gamma/beta inside beta*(...), i.e. the
   margin is simpo_gamma in reward units). cpo_alpha DEFAULTS TO 1.0 (pure SimPO needs 0.0);
   nll = token-mean cross-entropy over chosen COMPLETION tokens of the batch (prompt masked).
   rewards/* = beta * mean logps; nll_loss logged (0 when cpo_alpha == 0).
5. KTO: logp = SUM of completion-token log-probs. KL pairs are built at dataset time by rotating
   completions by one within each chunk of per_device_train_batch_size examples: example i gets
   prompt_i + completion_{i-1} (example 0 takes the last). Policy KL logps are computed under
   no_grad; kl = clamp(mean_batch(policy_KL - ref_KL), min=0), detached. With r = logp - ref_logp:
   desirable loss = 1 - sigmoid(beta*(r - kl)), undesirable = 1 - sigmoid(beta*(kl - r));
   loss = plain mean over ALL examples of [desirable_weight * des_losses, undesirable_weight *
   und_losses] (weights are not renormalised). Metrics: kl, rewards/chosen|rejected =
   beta * mean r per class, logps/* per class, margins = chosen - rejected. Needs >= 2 examples.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import warnings

import datasets
import transformers
from accelerate.utils import is_peft_model
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.trainer_callback import PrinterCallback

# Trainer bookkeeping, not loss metrics.
_TIMING_KEYS = {
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "model_preparation_time",
    "epoch",
}


def _text(ids) -> str:
    # TRL concatenates prompt + completion as text, so prompts get a trailing " "; completions get
    # none, so one ending in EOS ends with the eos string and TRL's "append EOS" check is a no-op.
    # The brackets keep "<11>" from ending with "<1>".
    return " ".join(f"<{int(i)}>" for i in ids)


def _id_tokenizer(tokenizer, id_lists) -> PreTrainedTokenizerFast:
    """A tokenizer whose text "<i> <j>" is exactly the ids [i, j]: no BOS, no EOS added."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    size = (
        max(max((max(ids) for ids in id_lists if ids), default=0), eos, pad, len(tokenizer) - 1) + 1
    )
    word_level = Tokenizer(
        models.WordLevel({f"<{i}>": i for i in range(size)}, unk_token=f"<{eos}>")
    )
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # bos_token stays unset, so ORPO/CPO's "prepend BOS if missing" has nothing to prepend.
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level, eos_token=f"<{eos}>", pad_token=f"<{pad}>"
    )


def _args(config_cls, out_dir: str, n: int, **kw):
    return config_cls(
        output_dir=out_dir,
        report_to="none",
        per_device_train_batch_size=n,  # KTO pairs KL completions within chunks of this size
        per_device_eval_batch_size=n,  # one batch holds every example
        bf16=False,  # TRL defaults bf16 to True: keep float32 so values are comparable
        fp16=False,
        activation_checkpointing=False,  # TRL defaults it on; the new name avoids a deprecation
        dataloader_pin_memory=False,
        disable_tqdm=True,
        save_strategy="no",
        **kw,
    )


@contextlib.contextmanager
def _quiet():
    """Silence progress bars, library log chatter and deprecation notices for the TRL call only."""
    bars = datasets.is_progress_bar_enabled()
    verbosity = transformers.logging.get_verbosity()
    trl_logger = logging.getLogger("trl")
    trl_level = trl_logger.level
    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    trl_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        trl_logger.setLevel(trl_level)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bar()


def _evaluate(trainer) -> dict[str, float]:
    trainer.remove_callback(PrinterCallback)  # it would print the metrics
    metrics = trainer.evaluate()  # the one eval batch: model.eval(), no_grad, one loss call
    out = {}
    for key, value in metrics.items():
        key = key.removeprefix("eval_")
        if key not in _TIMING_KEYS:
            out[key] = float(value)
    return out


def _ref_copy(model, ref_model):
    # TRL builds the reference from the model's hub path when none is given; an in-memory model has
    # none, so mirror TRL's meaning ("the initial policy") with a copy. PEFT models need none: TRL
    # disables the adapter instead.
    if ref_model is None and is_peft_model(model):
        return None
    ref = copy.deepcopy(model if ref_model is None else ref_model)
    # TRL never calls ref_model.eval() (outside DeepSpeed/FSDP) and its disable_dropout only zeroes
    # nn.Dropout modules, so a ref passed in train mode keeps functional dropout (Llama attention).
    return ref.eval()


def trl_pair_loss(objective: str, model, tokenizer, pairs: list[dict], **hp) -> dict[str, float]:
    """TRL's loss and metrics for ONE batch of `pairs` ({"prompt_ids", "chosen_ids",
    "rejected_ids"}).

    objective: "dpo" | "ipo" (DPOTrainer), "orpo" (ORPOTrainer), "simpo" (CPOTrainer,
    loss_type="simpo").
    hp: beta; dpo: rpo_alpha, ref_model; ipo: ref_model; orpo: beta (alias orpo_alpha);
    simpo: simpo_gamma, cpo_alpha (TRL default 1.0), label_smoothing. Any other key is passed to the
    TRL config unchanged (e.g. loss_type="robust" with label_smoothing for DPO).
    """
    hp = dict(hp)
    id_tok = _id_tokenizer(
        tokenizer, [p[k] for p in pairs for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    )
    rows = [
        {
            "prompt": _text(p["prompt_ids"]) + " ",
            "chosen": _text(p["chosen_ids"]),
            "rejected": _text(p["rejected_ids"]),
        }
        for p in pairs
    ]
    data = Dataset.from_list(rows)
    policy = copy.deepcopy(model)
    n = len(pairs)

    with _quiet(), tempfile.TemporaryDirectory() as out_dir:
        if objective in ("dpo", "ipo"):
            from trl import DPOConfig, DPOTrainer

            ref = _ref_copy(model, hp.pop("ref_model", None))
            if objective == "ipo":
                hp.setdefault("loss_type", ["ipo"])
            else:
                rpo_alpha = hp.pop("rpo_alpha", None)
                if rpo_alpha:  # 1.16 has no rpo_alpha: RPO is the weighted sum of these two losses
                    hp.setdefault("loss_type", ["sigmoid", "sft"])
                    hp.setdefault("loss_weights", [1.0, float(rpo_alpha)])
                hp.setdefault("loss_type", ["sigmoid"])
                loss_types = (
                    [hp["loss_type"]] if isinstance(hp["loss_type"], str) else hp["loss_type"]
                )
                if hp.get("label_smoothing") and "sigmoid" in loss_types:
                    raise ValueError(
                        "TRL 1.16's DPO 'sigmoid' loss ignores label_smoothing (no cDPO); pass "
                        "loss_type='robust' or 'exo_pair' explicitly if that is what you compare "
                        "against"
                    )
            args = _args(DPOConfig, out_dir, n, max_length=None, **hp)
            trainer = DPOTrainer(
                model=policy,
                ref_model=ref,
                args=args,
                train_dataset=data,
                eval_dataset=data,
                processing_class=id_tok,
            )
        elif objective in ("orpo", "simpo"):
            # ORPO/CPO default max_length 1024 (512 when None): set it to the longest sequence.
            longest = max(
                len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                for p in pairs
            )
            # remove_unused_columns=False: their collator needs every tokenized column.
            common = dict(max_length=longest, remove_unused_columns=False)
            if objective == "orpo":
                from trl.experimental.orpo import ORPOConfig, ORPOTrainer

                if "orpo_alpha" in hp:  # the paper's lambda / original code's alpha is TRL's beta
                    hp["beta"] = hp.pop("orpo_alpha")
                config_cls, trainer_cls = ORPOConfig, ORPOTrainer
            else:
                from trl.experimental.cpo import CPOConfig, CPOTrainer

                hp.setdefault("loss_type", "simpo")
                config_cls, trainer_cls = CPOConfig, CPOTrainer
            args = _args(config_cls, out_dir, n, **common, **hp)
            trainer = trainer_cls(
                model=policy,
                args=args,
                train_dataset=data,
                eval_dataset=data,
                processing_class=id_tok,
            )
        else:
            raise ValueError(f"unknown objective {objective!r}: expected dpo, ipo, orpo or simpo")
        return _evaluate(trainer)


def trl_kto_loss(model, tokenizer, examples: list[dict], **hp) -> dict[str, float]:
    """TRL's KTO loss and metrics for ONE batch of `examples` ({"prompt_ids", "completion_ids",
    "label"}).

    hp: beta, desirable_weight, undesirable_weight, ref_model (default: a copy of `model`); any
    other key goes to KTOConfig. The KL completions are TRL's: example i is scored as prompt_i +
    completion_{i-1} (cyclic over the whole list, which is one batch).
    """
    from trl import KTOConfig, KTOTrainer

    hp = dict(hp)
    ref = _ref_copy(model, hp.pop("ref_model", None))
    id_tok = _id_tokenizer(
        tokenizer, [e[k] for e in examples for k in ("prompt_ids", "completion_ids")]
    )
    data = Dataset.from_list(
        [
            {
                "prompt": _text(e["prompt_ids"]) + " ",
                "completion": _text(e["completion_ids"]),
                "label": bool(e["label"]),
            }
            for e in examples
        ]
    )
    with _quiet(), tempfile.TemporaryDirectory() as out_dir:
        args = _args(KTOConfig, out_dir, len(examples), max_length=None, **hp)
        trainer = KTOTrainer(
            model=copy.deepcopy(model),
            ref_model=ref,
            args=args,
            train_dataset=data,
            eval_dataset=data,
            processing_class=id_tok,
        )
        return _evaluate(trainer)
