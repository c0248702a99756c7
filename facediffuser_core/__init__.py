"""Face-diffuser's algorithms in plain PyTorch, free of ComfyUI so that they can be tested and reused alone.

One concept per module:
  snf              saliency-adaptive noise fusion: saliency maps, the per-pixel choice, the run's record
  schedule         the three sampling stages and which step a model evaluation belongs to
  pndm             the official run's PNDM (PLMS) sampler and timestep grid, in sigma space
  saliency_view    pictures of a run's SNF decisions
  markers          the prompt's <|image|> subject markers and the token rows they mark
  regions          per-subject regions: each subject's token scoped to its region in the SDM's cross-attention,
                   and where fusion may choose the SDM
  region_layouts   the Region Layout node's layouts (halves, thirds, boxes) as pixel boxes, without torch
  auto_regions     person regions from the face boxes found at the end of scene construction
  postfuse         the fusion MLP that writes a face embedding into a prompt token
  face_crop        where to crop a reference photo, and the official preprocessing for the vision tower
  insightface_packs  the insightface model packs, their files and where to download them
  identity         identity scores: reference x face similarities, one-to-one assignment, missing/mixed flags,
                   per-picture score and ranking, each recognition model's same-person threshold
  recognition      face-recognition backends (insightface ArcFace, dlib) that find and embed faces
  identity_view    pictures of identity results: faces boxed and labelled with subject and similarity
  stage_sweep      one seed over a grid of alpha and beta values, and the labelled grid picture
  checkpoint       what kind an official checkpoint is, its parts, and its networks' sizes from their shapes
  checkpoint_file  reading a checkpoint file safely, with errors a user can act on
  sd15_keys        key names of an SD1.5 single-file checkpoint against the official layout
  convert          the command that converts an official .bin to .safetensors
  model_folders    where a ComfyUI install keeps its models (extra_model_paths.yaml included), read without ComfyUI
"""
