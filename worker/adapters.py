"""A job's LoRA adapters for its requests: JobSpec.loras ((name, scale), ...) through the worker's
one library of its model (model/lora_library.py: found on each lookup, loaded once, kept in an LRU
cache bounded in bytes), as GenerationRequest.loras takes them. An adapter that cannot be loaded
fails that job (InvalidRequest naming `loras` and the adapter), never the batch."""
from __future__ import annotations

from latentd.model.errors import InvalidRequest
from latentd.worker import metrics


def load_loras(library, loras) -> tuple:
    """((LoraAdapter, scale), ...) of a spec's adapters; InvalidRequest if one cannot be used."""
    if not loras:
        return ()
    try:
        return library.resolve(loras)
    except (ValueError, OSError) as e:      # unknown, unusable, or gone since it was found
        raise InvalidRequest("loras", str(e), "an adapter this worker's model can use") from None
    finally:
        metrics.count_loras(library)
