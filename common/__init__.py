"""Shared pieces every recipe needs and the guards for known fine-tuning traps."""
import logging


class _OptionalKernelMissing(logging.Filter):
    """bitsandbytes' CPU backend tries the optional `kernels` package (a Hub-downloaded fused 4-bit kernel)
    when it is imported, and warns on every command when that package is not installed; it then uses its
    own CPU kernel, which is what runs here (no hub). Only that one message is dropped: the same warning
    with any other cause (kernels installed but failing), and every other bitsandbytes warning, still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                    and isinstance(cause, ModuleNotFoundError) and cause.name == "kernels")


# installed before bitsandbytes is first imported (peft imports it): every recipe imports common first
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelMissing())
