"""A job's usage in OpenAI's shape (`usage` of the images API), with what the numbers count for a
latent diffusion model. Torch-free: the worker counts an image's share once, as it stores the
image (worker/finishing.py puts it in the image's record); the API adds the shares up.

  text_tokens    the prompt's and the negative prompt's tokens as the model's CLIP tokenizer
                 reads them (each with its start and end token, at most 77 each), per request
  image_tokens   an edit's init image as latent positions, (width / f) x (height / f) with f the
                 VAE's factor (8 for SD), per request; 0 for text-to-image
  output_tokens  per image: latent positions x the denoising steps it ran (an edit runs the last
                 int(steps x strength)), summed over the images
  input_tokens = text_tokens + image_tokens; total_tokens = input_tokens + output_tokens
  compute_seconds  latentd's: the worker time charged to the job (its shares of batched calls)
"""
from __future__ import annotations


def image_share(spec, width: int, height: int, vae_factor: int, text_tokens: int) -> dict:
    """What one width x height image of `spec` (a JobSpec) counts: {text_tokens, image_tokens,
    output_tokens}."""
    positions = (width // vae_factor) * (height // vae_factor)
    return {"text_tokens": int(text_tokens),
            "image_tokens": positions if spec.kind != "text" else 0,
            "output_tokens": positions * spec.run_steps}


def usage(images: list[dict], compute_s: float) -> dict:
    """OpenAI's usage object (plus compute_seconds) of the images `images` (their records, as
    the job store keeps them: each with its `usage` share). Input is counted once per request."""
    shares = [im.get("usage") or {} for im in images]
    first = shares[0] if shares else {}
    text, image = int(first.get("text_tokens", 0)), int(first.get("image_tokens", 0))
    out = sum(int(s.get("output_tokens", 0)) for s in shares)
    return {"input_tokens": text + image,
            "input_tokens_details": {"text_tokens": text, "image_tokens": image},
            "output_tokens": out, "total_tokens": text + image + out,
            "compute_seconds": round(float(compute_s or 0.0), 6)}
