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
- Fusion (`FusionArea`): what SNF does outside every region, either the paper's per-pixel choice
  (`OUTSIDE_SNF`) or the TDM alone (`OUTSIDE_TDM`); inside a region the saliency choice is as always.

The SDM's cross-attention sees a batch of chunks, one per conditioning entry it evaluates (ComfyUI batches
the augmented and text branches, and any further entries, together). A chunk that carries the subjects is
described by a `PromptChunk`: how many rows its prompt has (the Subject Prompt's, plus what a
ConditioningConcat appended after them) and which part of the latent it sees (an area conditioning's crop,
else the whole latent). Any other chunk (the text branch, a prompt combined beside the augmented one) sees
its own prompt alone, never the appended rows.

Masks of any size are accepted if they have the latent's aspect ratio (within one latent pixel); each is
reduced to a cell grid by area, and a cell belongs to the region when at least half of it is covered (a
region too thin for that at a coarse resolution keeps every cell it touches). Plain PyTorch, no ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .region_layouts import layout_boxes

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


@dataclass(frozen=True)
class PromptChunk:
    """A chunk of the cross-attention's batch that carries the subjects: its prompt's row count (the subject
    rows lie among the first `SubjectTokens.prompt_rows`, where the Subject Prompt put them) and the latent
    rows and columns it sees (an area conditioning's crop, or the whole latent)."""

    rows: int
    top: int
    left: int
    height: int
    width: int


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


@dataclass
class RegionAttention:
    """The SDM's token-scoped cross-attention: `extend_context` appends the plain rows to the keys,
    `bias(...)` is the additive mask (0 or -inf) the attention then takes, `groups(...)` the same attention
    for one that takes no mask. `node` names the node in errors raised during sampling.

    What a call needs is made at its first call and kept per shape, device and dtype: the plain rows per
    device and dtype (`to` puts them on the device the model is loaded to), the masks and groups per
    attention shape, so that evaluations after the first copy nothing to the device and read nothing back."""

    masks: torch.Tensor  # (K, H, W) float32, checked
    tokens: SubjectTokens
    node: str
    _latent: tuple[int, int] | None = field(default=None, repr=False)  # the run's latent (height, width), see `start`
    _plain: dict = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.masks = check_masks(self.masks, len(self.tokens.rows))

    @property
    def subjects(self) -> int:
        return len(self.tokens.rows)

    def plain_rows(self, device, dtype) -> torch.Tensor:
        """The plain rows (K, D) on a device in a dtype, made once."""
        key = (torch.device(device), dtype)
        plain = self._plain.get(key)
        if plain is None:
            plain = self._plain[key] = self.tokens.plain.to(device=key[0], dtype=dtype)
        return plain

    def extend_context(self, context: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T + K, D): every batch item gets the K plain rows after its own."""
        plain = self.plain_rows(context.device, context.dtype)
        return torch.cat([context, plain.unsqueeze(0).expand(context.shape[0], -1, -1)], dim=1)

    def bias(self, chunks, attention_shape, batch: int, keys: int, dtype, device) -> torch.Tensor:
        """The additive mask (batch, queries, keys) for one attention call.

        chunks: per chunk of the batch, its PromptChunk, or None for a chunk that sees its prompt alone (the
        text branch); attention_shape: the attended activations' (B, C, h, w), the crop's at this block;
        keys: T + K, after `extend_context`.
        """
        return self._cached("bias", self._bias, chunks, attention_shape, batch, keys, dtype, device)

    def groups(self, chunks, attention_shape, batch: int, keys: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same attention for a cross-attention that takes no mask (an attention backend that ignores one,
        another node's replacement): the queries fall into groups that lie in the same regions, and within a
        group every query sees the same keys. Per group: which of the T + K extended keys stand at the prompt's
        T places, (batch, T) indices, and which queries belong to it, (batch, queries, 1) bool; every query
        belongs to exactly one group. Same arguments as `bias`."""
        return self._cached("groups", self._groups, chunks, attention_shape, batch, keys, None, device)

    def start(self, height: int, width: int) -> None:
        """A run's latent (height, width): the masks must show its picture; raises naming the node."""
        try:
            check_aspect(self.masks, height, width)
        except ValueError as error:
            raise ValueError(f"{self.node}: the 'regions' input: {error}") from error
        self._latent = (height, width)

    def _cached(self, kind, make, chunks, attention_shape, batch, keys, dtype, device):
        height, width = (int(side) for side in attention_shape[-2:])
        key = (kind, self._latent, tuple(chunks), height, width, batch, keys, dtype, str(device))
        cached = self._cache.get(key)
        if cached is None:
            prompt_keys = keys - self.subjects
            for chunk in chunks:
                if chunk is not None and (prompt_keys <= 0 or prompt_keys % chunk.rows):
                    raise ValueError(
                        f"{self.node}: the SDM's cross-attention has {keys} keys, which is not the augmented prompt's "
                        f"{chunk.rows} rows (or a multiple) plus {self.subjects} subject rows: another patch changed the "
                        "conditioning's length, which regions cannot follow"
                    )
            inside = {chunk: self._inside(chunk, height, width, device) for chunk in set(chunks) if chunk is not None}
            cached = self._cache[key] = make(chunks, inside, height * width, prompt_keys, batch, keys, dtype, device)
        return cached

    def _inside(self, chunk: PromptChunk, height: int, width: int, device) -> torch.Tensor:
        """Each subject's region within the chunk's crop at this attention resolution, (K, queries) bool."""
        mask_height, mask_width = self.masks.shape[-2:]
        latent_height, latent_width = self._latent
        top, bottom = (round(row * mask_height / latent_height) for row in (chunk.top, chunk.top + chunk.height))
        left, right = (round(column * mask_width / latent_width) for column in (chunk.left, chunk.left + chunk.width))
        return cells(self.masks[:, top:bottom, left:right], height, width).flatten(1).to(device)

    def _subject_rows(self, chunk: PromptChunk, prompt_keys: int, subject: int) -> list[int]:
        # ComfyUI repeats a shorter prompt to the batch's longest (a multiple of it): each copy has the token.
        row = self.tokens.rows[subject]
        return [copy * chunk.rows + row for copy in range(prompt_keys // chunk.rows)]

    @staticmethod
    def _per_entry(per_chunk: list[torch.Tensor], batch: int) -> torch.Tensor:
        """One tensor per chunk -> one per batch entry (a chunk holds batch / chunks entries)."""
        return torch.stack(per_chunk).repeat_interleave(batch // len(per_chunk), dim=0)

    def _bias(self, chunks, inside, queries, prompt_keys, batch, keys, dtype, device):
        allowed = []
        for chunk in chunks:
            seen = torch.ones(queries, keys, dtype=torch.bool, device=device)
            if chunk is None:
                seen[:, prompt_keys:] = False
            else:
                for subject in range(self.subjects):
                    seen[:, self._subject_rows(chunk, prompt_keys, subject)] = inside[chunk][subject].unsqueeze(-1)
                    seen[:, prompt_keys + subject] = ~inside[chunk][subject]
            allowed.append(seen)
        allowed = self._per_entry(allowed, batch)
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

    def _groups(self, chunks, inside, queries, prompt_keys, batch, keys, dtype, device):
        prompt = torch.arange(prompt_keys, device=device)
        membership = {chunk: sum(inside[chunk][subject].long() << subject for subject in range(self.subjects)) for chunk in inside}
        # One host read per shape (cached): which groups there are.
        found = set()
        for member_of in membership.values():
            found.update(member_of.unique().tolist())
        groups = []
        for position, member_of in enumerate(sorted(found) or [0]):
            columns, members = [], []
            for chunk in chunks:
                if chunk is None:
                    # A chunk that sees its prompt alone does so wherever its queries are: the first group computes it.
                    columns.append(prompt)
                    members.append(torch.full((queries,), position == 0, dtype=torch.bool, device=device))
                    continue
                seen = prompt.clone()
                for subject in range(self.subjects):
                    if not member_of >> subject & 1:
                        seen[self._subject_rows(chunk, prompt_keys, subject)] = prompt_keys + subject
                columns.append(seen)
                members.append(membership[chunk] == member_of)
            groups.append((self._per_entry(columns, batch), self._per_entry(members, batch).unsqueeze(-1)))
        return groups


def layout_masks(layout: str, subjects: int, width: int, height: int, boxes: str = "") -> torch.Tensor:
    """Masks (subjects, height, width) for a Region Layout node's layout (facediffuser_core.region_layouts):
    left/right halves, thirds, or normalised boxes "x0 y0 x1 y1; ..." (fractions of the width and height, left to
    right in marker order)."""
    boxes_px = layout_boxes(layout, subjects, width, height, boxes)
    masks = torch.zeros(len(boxes_px), height, width)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes_px):
        mask[y0:y1, x0:x1] = 1.0
    return masks
