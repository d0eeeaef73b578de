"""Loading the tokenizer the same way on the driver (data preparation) and on every worker."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from tunerun.cluster.run_folder import CHAT_TEMPLATE
from tunerun.jobs.errors import DataError
from tunerun.jobs.plan import ResolvedJob
from tunerun.trainer.data.render import DEFAULT_CHAT_TEMPLATE


def load_tokenizer(job: ResolvedJob):
    spec = job.spec.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DataError(f"model.path {spec.path}: cannot load a tokenizer ({exc}); the model folder needs "
                        "tokenizer files (tokenizer.json or tokenizer.model plus tokenizer_config.json)") from None
    if tokenizer.pad_token_id is None:
        # Llama-style tokenizers ship without a pad token; padded positions are masked out of the loss anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """The tokenizer beside exported weights, with the chat template training rendered with: the tokenizer's own,
    or tunerun's default written out, so that vLLM, transformers or the service render prompts as training did."""
    tokenizer.save_pretrained(folder)
    if not getattr(tokenizer, "chat_template", None):
        (Path(folder) / CHAT_TEMPLATE).write_text(DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8"),
                                                       encoding="utf-8")
