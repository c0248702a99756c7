"""Face-diffuser's algorithms in plain PyTorch, free of ComfyUI so that they can be tested and reused alone.

One concept per module:
  snf        saliency-adaptive noise fusion (saliency maps, per-pixel choice, the run's record)
  schedule   the three sampling stages and which step a model evaluation belongs to
"""
