"""The weights a run produced, in formats that outlive tunerun.

- `hf`: `export_run` — the LoRA adapter in PEFT format, the merged model, or a full run's consolidated weights,
  as safetensors with tokenizer, generation config and model card (vLLM, TGI, transformers).
- `card`: the model card (README.md) of every export.
- `gguf`: `export_gguf` — the merged model through llama.cpp's converter (and quantiser) as one GGUF file,
  checked against the Hugging Face model before it is renamed into place.
- `modelfile`: the Ollama Modelfile beside a GGUF, its TEMPLATE measured from the training chat format.

Which weights (`tunerun.trainer.weights`) and how they load (the run's `Method`) are not export's own: evaluation
uses them too.
"""
