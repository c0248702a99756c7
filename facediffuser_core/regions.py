"""Per-subject regions: where each `<|image|>` subject may appear in a multi-person picture.

With two or more reference faces, the SDM's augmented prompt carries one fused token per subject, and
without help every latent pixel attends to all of them: both people get one face, or a blend. Regions
(one mask per marker, in marker order) scope each subject's token to its region of the picture:

- Cross-attention in the SDM's augmented branch (`RegionAttention`): a query inside subject k's region
  attends to subject k's fused token; a query outside it attends, at the same place in the prompt, to the
  plain text embedding of that token instead (the hidden state the text encoder gave before the face was
  fused in). Masking the token out altogether was the other choice, and the worse one: outside the region
  the augmented branch would then lack the noun ("a man") that the text branch has, so the SDM's guidance
  response (augmented minus text) there would be "remove the man", a salient response that SNF would
  take, painting over the scene. With the plain embedding, outside every region the augmented branch
  computes exactly the text branch's attention, the SDM's guidance response is zero, and the scene the
  TDM laid out stays as it is. The plain rows are appended to the keys (`extend_context`) and a mask picks,
  per query, either the fused row or the plain one, so one UNet evaluation per branch still does it all.
- Fusion (`restrict_fusion`): what SNF does outside every region, either the paper's per-pixel choice
  (`OUTSIDE_SNF`) or the TDM alone (`OUTSIDE_TDM`); inside a region the saliency choice is as always.

Masks of any size are accepted if they have the latent's aspect ratio (within one latent pixel); each is
reduced to a cell grid by area, and a cell belongs to the region when at least half of it is covered (a
region too thin for that at a coarse resolution keeps every cell it touches). Plain PyTorch, no ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Where the Subject Prompt leaves the marked rows in the augmented conditioning's options.
SUBJECTS_KEY = "facediffuser_subjects"

OUTSIDE_SNF = "snf"
OUTSIDE_TDM = "tdm"
OUTSIDE_CHOICES = (OUTSIDE_SNF, OUTSIDE_TDM)

COVERED = 0.5  # the share of a cell a region must cover for the cell to belong to it


@dataclass(frozen=True)
class SubjectTokens:
    """The subjects' rows in the encoded prompt (chunks concatenated, marker order), the prompt's row count,
    and the plain text hidden states at those rows, (K, D), for queries outside a subject's region."""

    rows: tuple[int, ...]
    prompt_rows: int
    plain: torch.Tensor

    def __post_init__(self):
        if self.plain.dim() != 2 or self.plain.shape[0] != len(self.rows):
            raise ValueError(f"expected one plain row per subject ({len(self.rows)}), got shape {tuple(self.plain.shape)}")


def check_masks(masks: torch.Tensor, subjects: int) -> torch.Tensor:
    """A MASK batch (K, H, W) or one mask (H, W) -> (K, H, W) float32; one non-empty mask per subject."""
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if masks.dim() != 3:
        raise ValueError(f"expected a MASK batch (count, height, width), got shape {tuple(masks.shape)}")
    if masks.shape[0] != subjects:
        raise ValueError(
            f"it holds {masks.shape[0]} mask(s) but the prompt has {subjects} <|image|> marker(s): give one mask per marker, "
            "in the order of the markers (the Face-diffuser Region Layout makes them)"
        )
    masks = masks.float()
    for index, mask in enumerate(masks):
        if not bool((mask >= COVERED).any()):
            raise ValueError(
                f"mask {index + 1} is empty (no pixel at {COVERED} or more): give every subject a region it may appear in"
            )
    return masks


def check_aspect(masks: torch.Tensor, height: int, width: int) -> None:
    """Masks must show the latent's picture: the same aspect ratio, within one latent pixel."""
    mask_height, mask_width = masks.shape[-2:]
    if abs(mask_height * width / mask_width - height) > 1:
        raise ValueError(
            f"the masks are {mask_width}x{mask_height} but the latent is {width * 8}x{height * 8} pixels, another aspect "
            "ratio: make the masks at the picture's size (the Face-diffuser Region Layout takes the width and height)"
        )


def cells(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(K, H, W) masks -> (K, height, width) bool: the cells each region covers at that resolution."""
    coverage = F.adaptive_avg_pool2d(masks.float().unsqueeze(0), (height, width))[0]
    covered = coverage >= COVERED
    touched = coverage > 0
    empty = ~covered.flatten(1).any(dim=1)
    return torch.where(empty[:, None, None], touched, covered)


@dataclass
class FusionArea:
    """Where fusion may choose the SDM: inside any region. The area at a latent size is made once and kept on
    its device, since every fusion evaluation of a run asks for the same one."""

    masks: torch.Tensor  # (K, H, W)
    _inside: dict = field(default_factory=dict, repr=False)

    def restrict(self, sdm_chosen: torch.Tensor) -> torch.Tensor:
        """SNF's choice (B, H, W) with the SDM chosen nowhere outside every region."""
        key = (tuple(sdm_chosen.shape[-2:]), sdm_chosen.device)
        inside = self._inside.get(key)
        if inside is None:
            inside = self._inside[key] = cells(self.masks, *key[0]).any(dim=0).to(key[1])
        return sdm_chosen & inside


def restrict_fusion(sdm_chosen: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """SNF's choice (B, H, W) with the SDM chosen nowhere outside every region."""
    return FusionArea(masks).restrict(sdm_chosen)


@dataclass
class RegionAttention:
    """The SDM's token-scoped cross-attention: `extend_context` appends the plain rows to the keys,
    `bias(...)` is the additive mask (0 or -inf) the attention then takes. `node` names the node in errors
    raised during sampling (where the masks meet the latent's size)."""

    masks: torch.Tensor  # (K, H, W) float32, checked
    tokens: SubjectTokens
    node: str
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.masks = check_masks(self.masks, len(self.tokens.rows))

    @property
    def subjects(self) -> int:
        return len(self.tokens.rows)

    def extend_context(self, context: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T + K, D): every batch item gets the K plain rows after its own."""
        plain = self.tokens.plain.to(device=context.device, dtype=context.dtype)
        return torch.cat([context, plain.unsqueeze(0).expand(context.shape[0], -1, -1)], dim=1)

    def bias(self, latent_shape, attention_shape, cond_or_uncond, batch: int, keys: int, dtype, device) -> torch.Tensor:
        """The additive mask (batch, queries, keys) for one attention call.

        latent_shape: the UNet input's (B, C, H, W); attention_shape: the attended activations' (B, C, h, w);
        cond_or_uncond: per chunk of the batch, 0 for the augmented branch (the SDM's positive) and 1 for its
        text branch, which never sees the appended rows; keys: T + K, after `extend_context`.
        """
        return self._cached("bias", self._bias, latent_shape, attention_shape, cond_or_uncond, batch, keys, dtype, device)

    def groups(self, latent_shape, attention_shape, cond_or_uncond, batch: int, keys: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same attention for a cross-attention that takes no mask (another node's replacement of it): the
        queries fall into groups that lie in the same regions, and within a group every query sees the same
        keys. Per group: which of the T + K extended keys stand at the prompt's T places, (batch, T) indices, and
        which queries belong to it, (batch, queries, 1) bool; every query belongs to exactly one group. Same
        arguments as `bias`."""
        return self._cached("groups", self._groups, latent_shape, attention_shape, cond_or_uncond, batch, keys, None, device)

    def _cached(self, kind, make, latent_shape, attention_shape, cond_or_uncond, batch, keys, dtype, device):
        height, width = (int(side) for side in attention_shape[-2:])
        key = (kind, tuple(latent_shape[-2:]), height, width, tuple(cond_or_uncond), batch, keys, dtype, str(device))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = make(self._layout(latent_shape, height, width, keys, device), cond_or_uncond, batch, keys, dtype, device)
        return cached

    def _layout(self, latent_shape, height, width, keys, device) -> tuple[torch.Tensor, int]:
        """Each subject's region at this attention resolution, (K, queries) bool, and the prompt's key count."""
        try:
            check_aspect(self.masks, int(latent_shape[-2]), int(latent_shape[-1]))
        except ValueError as error:
            raise ValueError(f"{self.node}: the 'regions' input: {error}") from error
        prompt_keys = keys - self.subjects
        if prompt_keys <= 0 or prompt_keys % self.tokens.prompt_rows:
            raise ValueError(
                f"{self.node}: the SDM's cross-attention has {keys} keys, which is not the augmented prompt's "
                f"{self.tokens.prompt_rows} rows (or a multiple) plus {self.subjects} subject rows: another patch changed the "
                "conditioning's length, which regions cannot follow"
            )
        return cells(self.masks, height, width).flatten(1).to(device), prompt_keys

    def _subject_rows(self, prompt_keys: int, subject: int) -> list[int]:
        # ComfyUI repeats a shorter prompt to the batch's longest (a multiple of it): each copy has the token.
        row, prompt_rows = self.tokens.rows[subject], self.tokens.prompt_rows
        return [copy * prompt_rows + row for copy in range(prompt_keys // prompt_rows)]

    @staticmethod
    def _augmented(cond_or_uncond, batch, device) -> torch.Tensor:
        """(batch,) bool: the batch entries of the augmented branch."""
        per_chunk = batch // len(cond_or_uncond)
        return torch.tensor([kind == 0 for kind in cond_or_uncond], device=device).repeat_interleave(per_chunk)

    def _bias(self, layout, cond_or_uncond, batch, keys, dtype, device):
        inside, prompt_keys = layout
        allowed = torch.ones(2, inside.shape[1], keys, dtype=torch.bool, device=device)
        for subject in range(self.subjects):
            allowed[0, :, self._subject_rows(prompt_keys, subject)] = inside[subject].unsqueeze(-1)
            allowed[0, :, prompt_keys + subject] = ~inside[subject]
        allowed[1, :, prompt_keys:] = False
        chosen = (~self._augmented(cond_or_uncond, batch, device)).long()
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        return bias[chosen]

    def _groups(self, layout, cond_or_uncond, batch, keys, dtype, device):
        inside, prompt_keys = layout
        membership = sum(inside[subject].long() << subject for subject in range(self.subjects))  # (queries,)
        augmented = self._augmented(cond_or_uncond, batch, device).unsqueeze(-1)
        prompt = torch.arange(prompt_keys, device=device)
        groups = []
        for position, member_of in enumerate(membership.unique().tolist()):  # one host read per shape: cached
            columns = prompt.clone()
            for subject in range(self.subjects):
                if not member_of >> subject & 1:
                    columns[self._subject_rows(prompt_keys, subject)] = prompt_keys + subject
            here = membership == member_of
            # The text branch sees the prompt alone wherever its queries are: its first group computes it.
            queries = torch.where(augmented, here.unsqueeze(0), torch.full_like(here, position == 0).unsqueeze(0))
            groups.append((torch.where(augmented, columns.unsqueeze(0), prompt.unsqueeze(0)), queries.unsqueeze(-1)))
        return groups
