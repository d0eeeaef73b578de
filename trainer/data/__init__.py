"""Data preparation: the files a user brings → the tokenized examples every worker trains on.

One module per step, in pipeline order; `pipeline` runs them and counts what each removed:

- `read`: JSONL, JSON arrays, Parquet and CSV, one record at a time with its file and line; ``data.columns``.
- `formats`: chat / sharegpt / alpaca / text records → one `Conversation` shape.
- `clean`: Unicode and whitespace normalisation, PII masking, duplicate keys and MinHash signatures.
- `render`: a conversation → the text the model sees and token ids with labels (``IGNORE_INDEX`` off the loss).
- `pack`: several examples per row (``data.packing``), the prepared-file format, padding into batches.
- `report`: ``data_report.html`` / ``.png`` beside ``data_report.json``.
- `pipeline`: read → clean → dedup → render → length → split → pack, streamed to ``train.jsonl`` / ``eval.jsonl``.
- `cache`: prepared folders keyed by the hash of everything they depend on, so unchanged inputs are not
  tokenized twice (``tunerun data prepare`` and every run's driver).
"""
