"""`tunerun serve`: an on-prem fine-tuning service that speaks OpenAI's fine-tuning API, for many projects.

A second front door beside the CLI, not a second system: a fine-tuning job *is* a run, launched through the
same targets, and every object the API returns is read from the run folders and the storage.

- `config`: ``server.yaml`` (storage, target, the model catalog, limits), checked like a job spec.
- `keys`: API keys, one project each, stored as hashes.
- `files`: uploads, validated with tunerun's own data reader.
- `fine_tuning`: jobs from a catalog model's spec and the request; the local target's queue.
- `objects`: run folders seen as OpenAI's job, event, checkpoint and file objects.
- `app`: the FastAPI routes under ``/v1``; `errors`: OpenAI's error shape.
- `audit`: the trail of state-changing requests and key changes; `usage`: per-project jobs, tokens, worker-hours.
- `webhooks`: OpenAI's job events, signed per Standard Webhooks, to the endpoints the admin allows (an outbox
  in the storage; OpenAI's ``/v1/webhook_endpoints`` for a project's own).

Nothing here imports torch or Ray.
"""
