"""One entry of `datasets:` / `test_datasets:`: where rows come from and how they become tokens."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from strop.config.suggest import closest

# The formats strop turns into input_ids + labels (see strop.data.formats). Kept here, not
# imported from the data package, so validating a config never imports tokenizers or torch.
FORMATS = ("completion", "pretrain", "alpaca", "chat_template", "input_output", "untemplated")
# The formats of preference rows (`rl:`): through the chat template, or plain text.
PREFERENCE_FORMATS = ("chat_template", "untemplated")

# Named chat templates strop ships (strop.data.templates); "tokenizer_default" uses the
# tokenizer's own template.
CHAT_TEMPLATES = ("tokenizer_default", "chatml", "llama3", "mistral", "alpaca", "gemma", "phi3",
                  "qwen2", "jinja")


def _check_format_name(value: Any) -> Any:
    """A known format, an axolotl format not supported yet, or a typo."""
    if not isinstance(value, str):
        return value
    if value in FORMATS:
        return value
    if value == "chat_template.default":  # axolotl's name for its preference chat template
        return "chat_template"
    base = value.split(":")[0].split(".")[0]
    axolotl_formats = {"sharegpt", "alpaca_chat", "alpaca_w_system", "oasst", "gpteacher",
                       "reflection", "explainchoice", "concisechoice", "summarizetldr",
                       "alpaca_chat.load_qa", "context_qa", "creative_acr", "metharme",
                       "orcamini", "pygmalion", "completion", "input_output", "stepwise_supervised",
                       "bradley_terry", "chat_template", "user_defined", "jeopardy", "dpo", "kto",
                       "orpo", "alpaca_instruct", "open_orca"}
    if base in axolotl_formats:
        hint = ("use type: chat_template (ShareGPT conversations are read with field_messages: "
                "conversations)" if base == "sharegpt" else
                f"strop's formats are {', '.join(FORMATS)}, or a mapping that defines the prompt")
        raise ValueError(f"format {value!r} is an axolotl format strop does not support yet; {hint}")
    guess = closest(value, list(FORMATS))
    fix = f"did you mean {guess}?" if guess else f"strop's formats are {', '.join(FORMATS)}"
    raise ValueError(f"unknown format {value!r}; {fix}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class UserFormat(_Strict):
    """A prompt format written in the YAML itself (axolotl's user-defined prompt type)."""

    system_prompt: str = Field("", description="System prompt used when a row has none")
    system_format: str = Field("{system}", description="How the system prompt is written; {system} is replaced")
    field_system: str = Field("system", description="Column holding a per-row system prompt")
    field_instruction: str = Field("instruction", description="Column holding the instruction")
    field_input: str = Field("input", description="Column holding the optional input")
    field_output: str = Field("output", description="Column holding the response (the trained part)")
    format: str = Field("{instruction} {input} ",
                        description="Prompt with {instruction}, {input} and {system} placeholders")
    no_input_format: str = Field("{instruction} ",
                                 description="Prompt used when the input column is empty")


class MessageMapping(_Strict):
    role: str = Field("role", description="Property of a message holding its role")
    content: str = Field("content", description="Property of a message holding its text")


class DatasetConfig(_Strict):
    path: str = Field(..., description="Local file, folder or glob, or a Hugging Face hub dataset id")
    type: str | UserFormat = Field(
        ..., description="Row format: completion, pretrain, alpaca, chat_template, input_output, "
                         "or a mapping that defines a prompt format; preference rows: "
                         "chat_template or untemplated")
    ds_type: Literal["json", "csv", "parquet", "text", "arrow"] | None = Field(
        None, description="File type when the extension does not say it")
    data_files: str | list[str] | None = Field(None, description="Files or globs inside path to load")
    split: str = Field("train", description="Split to read")
    name: str | None = Field(None, description="Subset (configuration) name of a hub dataset")
    revision: str | None = Field(None, description="Git revision of a hub dataset")
    shards: int | None = Field(None, gt=0, description="Split the rows into this many shards ...")
    shards_idx: int | None = Field(None, ge=0, description="... and keep only this shard (0-based)")
    streaming: bool = Field(False, description="Stream rows instead of loading them (pretraining corpora)")
    field: str | None = Field(None, description="Text column for completion/pretrain (default: text)")
    # chat_template
    field_messages: str | None = Field(
        None, description="Column holding the conversation (default: messages, or conversations)")
    message_property_mappings: MessageMapping | None = Field(
        None, description="Names of the role and content properties of each message")
    message_field_role: str | None = Field(None, description="Older spelling of message_property_mappings.role")
    message_field_content: str | None = Field(
        None, description="Older spelling of message_property_mappings.content")
    roles: dict[str, list[str]] | None = Field(
        None, description="Map of strop role -> names used in the data, e.g. assistant: [gpt, bot]")
    roles_to_train: list[str] | None = Field(
        None, description="Roles whose turns are trained (default: assistant)")
    train_on_eos: Literal["turn", "last", "all", "none"] | None = Field(
        None, description="Which end-of-turn tokens are trained (default: turn)")
    chat_template: str | None = Field(None, description="Template for this dataset (default: the top-level one)")
    chat_template_jinja: str | None = Field(None, description="Jinja text of a custom chat template")
    drop_system_message: bool = Field(False, description="Drop system messages from conversations")
    # alpaca-style columns (also usable with type: alpaca)
    field_system: str | None = Field(None, description="Column holding a per-row system prompt")
    field_instruction: str | None = Field(None, description="Column holding the instruction")
    field_input: str | None = Field(None, description="Column holding the optional input")
    field_output: str | None = Field(None, description="Column holding the response")
    system_prompt: str | None = Field(None, description="System prompt used when a row has none")
    # preference rows (rl:)
    field_prompt: str | None = Field(
        None, description="Preference rows: column holding the prompt, text or messages "
                          "(default: prompt, else the field_messages conversation)")
    field_chosen: str | None = Field(None, description="Preference rows: column holding the chosen "
                                                       "response (default: chosen)")
    field_rejected: str | None = Field(None, description="Preference rows: column holding the "
                                                         "rejected response (default: rejected)")
    field_completion: str | None = Field(None, description="kto: column holding the completion "
                                                           "(default: completion)")
    field_label: str | None = Field(None, description="kto: column saying whether the completion "
                                                      "is desirable, true or false (default: label)")
    # input_output
    field_segments: str | None = Field(None, description="Column of [{text, label}] segments for input_output")
    train_on_inputs: bool | None = Field(None, description="Per-dataset override of train_on_inputs")

    @property
    def format_name(self) -> str:
        return "user_defined" if isinstance(self.type, UserFormat) else self.type

    @field_validator("type", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        return _check_format_name(value)

    @property
    def role_key(self) -> str:
        if self.message_property_mappings is not None:
            return self.message_property_mappings.role
        return self.message_field_role or "role"

    @property
    def content_key(self) -> str:
        if self.message_property_mappings is not None:
            return self.message_property_mappings.content
        return self.message_field_content or "content"
