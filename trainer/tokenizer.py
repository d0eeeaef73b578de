"""Loading the tokenizer the same way on the driver (data preparation) and on every worker."""
from __future__ import annotations

from transformers import AutoTokenizer

from tunerun.jobs.errors import DataError
from tunerun.jobs.plan import ResolvedJob


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
