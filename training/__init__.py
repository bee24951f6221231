"""Training recipe for the bundled `shapes` model: procedural data, a CLIP-style BPE
tokenizer, a small CLIP, a 4x VAE, a cross-attention U-Net and a Stable-Diffusion-format safety
checker. Run it with `latentd train-shapes` (see recipe.py).

It lives beside the engine (model/) and imports it; the engine never imports the recipe, so serving
never loads training code."""
