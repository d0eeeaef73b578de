"""Build a tiny Llama model + SentencePiece tokenizer as a normal Hugging Face folder, offline, in seconds.

    python examples/make_tiny_model.py models/tiny-llama        # prints the folder

Tests and the quickstart load it with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`, the same
path a real Llama-3-8B takes; nothing comes from a model hub.

The tokenizer is a SentencePiece model trained here on the support tickets (message text only, not JSON
syntax), kept in the folder as ``tokenizer.model`` because llama.cpp's GGUF converter reads that file (it
refuses a byte-level BPE trained from scratch). Settings follow Llama-2's tokenizer: BPE, byte fallback
(any text encodes, no ``<unk>``), digits split, identity normalisation and whitespace kept as written.
Special ids: ``<unk>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2, and a dedicated ``<pad>`` = 3 rather
than reusing EOS, so a padded position can never be confused with a real end of sequence. The tokenizer
has no chat template on purpose: tunerun falls back to its default template then.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_CORPUS = [EXAMPLES / "data" / "support_tickets.jsonl"]
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def corpus_lines(files: list[Path]) -> list[str]:
    """Text lines from .jsonl/.json chat or plain-text files: message contents only, one line per line."""
    lines: list[str] = []
    for path in files:
        text = Path(path).read_text(encoding="utf-8")
        if path.suffix not in (".jsonl", ".json"):
            lines += text.splitlines()
            continue
        for raw in text.splitlines():
            if raw.strip():
                record = json.loads(raw)
                for message in record.get("messages", []):
                    lines += str(message.get("content", "")).splitlines()
    return [line for line in lines if line.strip()]


def train_sentencepiece(lines: list[str], out_file: Path, vocab_size: int, seed: int) -> Path:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, pad_piece="<pad>", num_threads=1, minloglevel=2,
        # A small corpus cannot always fill vocab_size; take what it supports rather than fail.
        hard_vocab_limit=False, **SPECIAL_IDS,
    )
    out_file.write_bytes(model.getvalue())
    return out_file


def make_tiny_tokenizer(out_dir, corpus_files: list[Path] | None = None, vocab_size: int = 1000, seed: int = 0):
    """Train the SentencePiece model into ``out_dir/tokenizer.model`` and save the HF tokenizer beside it."""
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines([Path(f) for f in (corpus_files or DEFAULT_CORPUS)])
    train_sentencepiece(lines, out_dir / "tokenizer.model", vocab_size, seed)
    # In transformers 5 loading a folder that holds only tokenizer.model converts it to a fast tokenizer;
    # add_bos_token must be explicit (Llama adds BOS, the converted default does not).
    tokenizer = LlamaTokenizer.from_pretrained(out_dir, pad_token="<pad>", add_bos_token=True, add_eos_token=False)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def make_tiny_model(out_dir, corpus_files: list[Path] | None = None, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Tokenizer + a seeded 2-layer LlamaForCausalLM (float32, safetensors) in ``out_dir``; returns the folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out_dir, corpus_files, vocab_size, seed)
    # 2 heads of 32: vLLM's CPU attention serves head sizes from 32 (16 starts, then fails its first request)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=192, max_position_embeddings=512,
        tie_word_embeddings=False, torch_dtype="float32",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # With the default 0.02 init a frozen random head caps logits near ±1.3, so LoRA/QLoRA (which keep the
        # head frozen) could never predict confidently. A pretrained model's head has large norms; so does this.
        model.lm_head.weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=32, do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--corpus", type=Path, nargs="*", default=None, help="text or chat .jsonl files")
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_model(args.out_dir, args.corpus, args.vocab_size, args.seed))


if __name__ == "__main__":
    main()
