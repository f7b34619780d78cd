"""Models: loading (pretrained or from scratch), tokenizers, quantization and inspection."""

from strop.model.quantize import quiet_bitsandbytes_notice

# bitsandbytes logs a notice about an optional hub package when it is first imported, by strop,
# transformers or PEFT alike; it says nothing a strop user can act on (see strop.model.quantize).
# A logging filter costs nothing and does not import bitsandbytes.
quiet_bitsandbytes_notice()
