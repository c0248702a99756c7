"""The pack's own socket types, shared by the nodes that produce and consume them."""

from comfy_api.latest import io

# The SDM's image side: its CLIP ViT-L/14 vision tower, projection and fusion MLP (nodes.subject_encoder).
SubjectEncoder = io.Custom("FACEDIFFUSER_SUBJECT_ENCODER")
# One embedding per reference face, in the order of the prompt's <|image|> markers.
FaceEmbeds = io.Custom("FACEDIFFUSER_FACE_EMBEDS")
# The SNF decisions of one sampling run (facediffuser_core.snf.SaliencyRecord).
Saliency = io.Custom("FACEDIFFUSER_SALIENCY")
# Identity scores of a batch of pictures against the reference faces (facediffuser_core.identity.IdentityReport).
Identity = io.Custom("FACEDIFFUSER_IDENTITY")
# The alpha x beta grid a Stage Sweep sampled (facediffuser_core.stage_sweep.StageGrid).
StageSweep = io.Custom("FACEDIFFUSER_STAGE_SWEEP")
# How to find the people's regions during sampling (nodes.auto_regions.AutoRegionsSetup).
AutoRegions = io.Custom("FACEDIFFUSER_AUTO_REGIONS")
