"""strop: train large language models from one YAML file."""

__version__ = "0.1.0"

# bitsandbytes logs a notice about an optional hub package when it is first imported, whether by
# strop, transformers or PEFT; a user cannot act on it (see strop.model.quantize). The filter
# goes in here, before any import of PEFT can come first; it imports neither torch nor
# bitsandbytes.
from strop.model.quantize import quiet_bitsandbytes_notice as _quiet_bitsandbytes_notice  # noqa: E402

_quiet_bitsandbytes_notice()
