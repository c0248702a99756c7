"""Builds the shipped workflows (workflows/*.json in ComfyUI's UI format, workflows/api/*.json in its API
format) from one description of each graph and the node definitions of a running ComfyUI, so that the
two formats cannot drift apart and widget values follow the nodes' real input order.

Regenerate after a node's inputs change:

    COMFYUI_PATH=~/ComfyUI .venv/bin/python tests/workflow_builder.py

with the oldest ComfyUI the pack supports (0.17): newer versions add outputs to some core nodes, which the
frontend rebuilds from the node definitions on loading, so files made on the oldest load on all of them.

tests/test_workflows.py checks that the files are what this builds, and checks the files themselves.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"
API_DIR = WORKFLOWS_DIR / "api"

SDM_FILE = "facediffuser_sdm.safetensors"
TDM_FILE = "facediffuser_tdm.safetensors"
SUBJECT_PHOTOS = ("facediffuser_subject_1.png", "facediffuser_subject_2.png")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: they exist in the UI format and are dropped from the API format.
FRONTEND_ONLY = {"MarkdownNote", "Note"}


@dataclass
class Slot:
    name: str
    type: str
    options: dict
    widget: bool


def node_inputs(node_class, linked: set[str] = frozenset()) -> list[Slot]:
    """A node's inputs in the order the frontend lays them out (required, then optional), with dynamic
    Autogrow inputs expanded to their minimum count or to the last one the graph links, whichever is more,
    named as ComfyUI names them (`images.image0`). The minimum differs between ComfyUI versions (2 in
    0.17's Batch Images, 1 in 0.33's), so a graph that links two images gives the same file for both."""
    slots = []
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, definition in spec.get(section, {}).items():
            kind = definition[0]
            options = definition[1] if len(definition) > 1 else {}
            if kind == "COMFY_AUTOGROW_V3":
                template = options["template"]
                ((inner_name, inner),) = template["input"]["required"].items()
                linked_count = max((int(key[len(f"{name}.{template['prefix']}"):]) + 1 for key in linked
                                    if key.startswith(f"{name}.{template['prefix']}")), default=0)
                for index in range(max(template["min"], linked_count)):
                    slots.append(Slot(f"{name}.{template['prefix']}{index}", inner[0], inner[1] if len(inner) > 1 else {}, False))
                continue
            is_combo = isinstance(kind, list)
            slots.append(Slot(name, "COMBO" if is_combo else kind, {"options": kind, **options} if is_combo else options,
                              is_combo or kind in WIDGET_TYPES))
    return slots


def node_outputs(node_class) -> list[tuple[str, str]]:
    types = list(node_class.RETURN_TYPES)
    names = list(getattr(node_class, "RETURN_NAMES", None) or types)
    return list(zip(names, types))


def widget_value(node_type: str, slot: Slot, values: dict):
    """The value the graph gives, else the node's default, as a new node in the UI would have it."""
    if slot.name in values:
        return values[slot.name]
    if "default" in slot.options:
        return slot.options["default"]
    raise ValueError(f"{node_type}: the workflow gives no value for '{slot.name}', which has no default")


def ui_widget_values(node_type: str, slots: list[Slot], values: dict) -> list:
    """widgets_values as the frontend saves them: each widget's value, followed by the extra widgets the
    frontend adds (the control_after_generate mode after a seed, the upload button after an image picker)."""
    out = []
    for slot in slots:
        if not slot.widget:
            continue
        out.append(widget_value(node_type, slot, values))
        if slot.options.get("control_after_generate"):
            out.append("fixed")
        if slot.options.get("image_upload"):
            out.append("image")
    return out


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    values: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name -> (source Node, output index)
    title: str | None = None
    size: tuple[int, int] | None = None


class Graph:
    def __init__(self, name: str, description: str):
        self.name = name
        self.description = description
        self.nodes: list[Node] = []

    def add(self, type_: str, pos, title=None, size=None, **inputs) -> Node:
        node = Node(len(self.nodes) + 1, type_, pos, title=title, size=size)
        for key, value in inputs.items():
            key = key.replace("__", ".")  # Autogrow inputs: images__image0 -> images.image0
            if isinstance(value, tuple) and isinstance(value[0], Node):
                node.links[key] = value
            else:
                node.values[key] = value
        self.nodes.append(node)
        return node

    def _order(self) -> list[Node]:
        done: list[Node] = []

        def visit(node: Node):
            if node in done:
                return
            for source, _ in node.links.values():
                visit(source)
            done.append(node)

        for node in self.nodes:
            visit(node)
        return done

    def api(self, mappings: dict) -> dict:
        prompt = {}
        for node in self.nodes:
            if node.type in FRONTEND_ONLY:
                continue
            inputs = {}
            for slot in node_inputs(mappings[node.type], set(node.links)):
                if slot.name in node.links:
                    source, index = node.links[slot.name]
                    inputs[slot.name] = [str(source.id), index]
                elif slot.widget:
                    inputs[slot.name] = widget_value(node.type, slot, node.values)
            prompt[str(node.id)] = {"inputs": inputs, "class_type": node.type,
                                    "_meta": {"title": node.title or display_name(mappings[node.type], node.type)}}
        return prompt

    def ui(self, mappings: dict) -> dict:
        links, link_id = [], 0
        outgoing: dict[tuple[int, int], list[int]] = {}
        incoming: dict[tuple[int, str], int] = {}
        order = {node.id: index for index, node in enumerate(self._order())}
        for node in self.nodes:
            if node.type in FRONTEND_ONLY:
                continue
            slots = node_inputs(mappings[node.type], set(node.links))
            link_slots = [slot for slot in slots if not slot.widget]
            for target_slot, slot in enumerate(link_slots):
                if slot.name not in node.links:
                    continue
                source, index = node.links[slot.name]
                link_id += 1
                links.append([link_id, source.id, index, node.id, target_slot, node_outputs(mappings[source.type])[index][1]])
                outgoing.setdefault((source.id, index), []).append(link_id)
                incoming[(node.id, slot.name)] = link_id
        ui_nodes = []
        for node in self.nodes:
            entry = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size or (320, 120)),
                     "flags": {}, "order": order[node.id], "mode": 0}
            if node.type in FRONTEND_ONLY:
                entry.update(inputs=[], outputs=[], properties={}, widgets_values=[node.values["text"]])
            else:
                slots = node_inputs(mappings[node.type], set(node.links))
                entry["inputs"] = [{"name": slot.name, "type": slot.type, "link": incoming.get((node.id, slot.name))}
                                   for slot in slots if not slot.widget]
                entry["outputs"] = [{"name": name, "type": type_, "links": outgoing.get((node.id, index)), "slot_index": index}
                                    for index, (name, type_) in enumerate(node_outputs(mappings[node.type]))]
                entry["properties"] = {"Node name for S&R": node.type}
                entry["widgets_values"] = ui_widget_values(node.type, slots, node.values)
            if node.title:
                entry["title"] = node.title
            ui_nodes.append(entry)
        return {"last_node_id": len(self.nodes), "last_link_id": link_id, "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def display_name(node_class, node_type: str) -> str:
    schema = getattr(node_class, "GET_SCHEMA", None)
    if schema is not None:
        return schema().display_name or node_type
    import nodes

    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type)


# --- the shipped workflows -----------------------------------------------------------------------------------

SINGLE_PROMPT = "a photo of a woman <|image|> reading a book in a sunlit cafe, detailed, natural light"
TWO_PROMPT = "a photo of a man <|image|> and a woman <|image|> walking on a beach at sunset"
SAMPLER_SETTINGS = dict(seed=42, steps=50, cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", alpha=0.3, beta=0.6)
# The official run: PNDM (PLMS) on its own grid from the official noise; loop entries 0-15 / 16-30 are alpha 0.3, beta 0.6.
OFFICIAL_SETTINGS = dict(seed=42, steps=50, cfg=5.0, sampler_name="pndm_official", scheduler="pndm_official", alpha=0.3, beta=0.6,
                         noise="official")


def _models_and_faces(graph: Graph, photos: int):
    sdm = graph.add("FaceDiffuserSDMLoader", (0, 0), size=(340, 150), ckpt_name=SDM_FILE, weight_dtype="default")
    tdm = graph.add("FaceDiffuserTDMLoader", (0, 200), size=(340, 130), ckpt_name=TDM_FILE, weight_dtype="default")
    faces = graph.add("FaceDiffuserInsightFaceLoader", (0, 380), size=(340, 130), pack="auto", provider="auto", det_size=640)
    loaders = [graph.add("LoadImage", (0, 560 + 360 * index), size=(340, 330), title=f"Reference photo {index + 1}",
                         image=SUBJECT_PHOTOS[index]) for index in range(photos)]
    images = (loaders[0], 0)
    if photos > 1:
        batch = graph.add("BatchImagesNode", (380, 700), size=(240, 80), title="Reference photos, in marker order",
                          **{f"images__image{index}": (loader, 0) for index, loader in enumerate(loaders)})
        images = (batch, 0)
    encode = graph.add("FaceDiffuserEncodeReferenceFaces", (660, 400), size=(360, 200), images=images,
                       subject_encoder=(sdm, 3), face_analysis=(faces, 0))
    graph.add("PreviewImage", (1060, 640), size=(260, 280), title="Face crops", images=(encode, 1))
    return sdm, tdm, encode


def _prompts(graph: Graph, sdm: Node, encode: Node, text: str):
    prompt = graph.add("FaceDiffuserSubjectPrompt", (660, 0), size=(400, 200), clip=(sdm, 1), subject_encoder=(sdm, 3),
                       face_embeds=(encode, 0), text=text)
    null = graph.add("CLIPTextEncode", (660, 250), size=(400, 100), title="Empty prompt (null)", clip=(sdm, 1), text="")
    return prompt, null


def _note(graph: Graph, text: str):
    graph.add("MarkdownNote", (-420, 0), size=(380, 520), title="How to use", text=text)


def _snf_sampling(graph: Graph, sdm, tdm, prompt, null, latent, prefix: str, settings: dict = SAMPLER_SETTINGS,
                  preview: bool = False, **regions) -> Graph:
    """SNF Sampler -> VAE Decode (SDM's VAE) -> Save Image, the tail the KSampler-style workflows share; with `preview`
    a Saliency Preview of the run beside it."""
    sampler = graph.add("FaceDiffuserSNFSampler", (1100, 0), size=(340, 380), tdm=(tdm, 0), sdm=(sdm, 0),
                        augmented=(prompt, 0), text=(prompt, 1), null=(null, 0), latent_image=(latent, 0),
                        **settings, denoise=1.0, **regions)
    decode = graph.add("VAEDecode", (1480, 0), size=(210, 50), samples=(sampler, 0), vae=(sdm, 2))
    graph.add("SaveImage", (1720, 0), size=(420, 460), images=(decode, 0), filename_prefix=prefix)
    if preview:  # the decoded image also makes it run after the sampler
        graph.add("FaceDiffuserSaliencyPreview", (1480, 520), size=(420, 360), saliency=(sampler, 1), image=(decode, 0))
    return graph


def single_subject() -> Graph:
    graph = Graph("facediffuser_single_subject", "One person from one reference photo, with the official weights.")
    _note(graph, (
        "## Face-diffuser: one subject\n\n"
        "1. `python scripts/facediffuser_setup.py` downloads the models and an insightface pack and puts them in place. "
        f"By hand: `{SDM_FILE}` and `{TDM_FILE}` (or the official `.bin` files renamed `facediffuser_sdm.bin` / "
        "`facediffuser_tdm.bin`) in `models/facediffuser`, an insightface pack (buffalo_l or antelopev2; the loader's "
        "`auto` takes either) in `models/insightface/models/<pack>`. `python scripts/facediffuser_check.py` says what is missing.\n"
        "2. Load a photo of the person in **Reference photo 1**.\n"
        "3. In **Face-diffuser Subject Prompt**, write `<|image|>` right after the word naming the person.\n"
        "4. Queue. **Face crops** shows the face that was used.\n\n"
        "alpha ends scene construction (TDM only), beta ends fusion (SNF); lower beta = more identity, "
        "higher alpha = more of the text's scene. Official: cfg 5, 50 steps, alpha 0.32, beta 0.62."))
    return _one_subject_sampling(graph, "facediffuser", SAMPLER_SETTINGS)


def _one_subject_sampling(graph: Graph, prefix: str, settings: dict) -> Graph:
    """One photo, the subject prompt, a 512x512 latent and the SNF Sampler's tail, with these settings."""
    sdm, tdm, encode = _models_and_faces(graph, 1)
    prompt, null = _prompts(graph, sdm, encode, SINGLE_PROMPT)
    latent = graph.add("EmptyLatentImage", (660, 400 + 260), size=(300, 110), width=512, height=512, batch_size=1)
    return _snf_sampling(graph, sdm, tdm, prompt, null, latent, prefix, settings)


def two_subjects() -> Graph:
    graph = Graph("facediffuser_two_subjects", "Two people in one picture, one reference photo each.")
    _note(graph, (
        "## Face-diffuser: two subjects\n\n"
        "One reference photo per `<|image|>` marker, in the order of the markers: **Reference photo 1** is the "
        "first marked person, **Reference photo 2** the second. Batch Images resizes the second photo to the size "
        "of the first (centre crop): use photos of similar shape, or crops around the faces.\n\n"
        "Add a third person with a third Load Image on Batch Images and a third marker."))
    return _two_people(graph, "facediffuser_two", regions=None)


def _two_people(graph: Graph, prefix: str, regions: str | None) -> Graph:
    """Two photos, the two-person prompt, a 512x512 latent, with regions `regions`: None, "layout" (a halves Region
    Layout) or "auto" (Auto Regions, with the SDM's VAE and the reference faces' insightface analysis)."""
    sdm, tdm, encode = _models_and_faces(graph, 2)
    prompt, null = _prompts(graph, sdm, encode, TWO_PROMPT)
    latent = graph.add("EmptyLatentImage", (1100, 420), size=(300, 110), width=512, height=512, batch_size=1)
    inputs = {}
    if regions == "layout":
        inputs["regions"] = (graph.add("FaceDiffuserRegionLayout", (1100, 580), size=(300, 170), layout="halves", subjects=2,
                                       width=512, height=512), 0)
    elif regions == "auto":
        inputs["auto_regions"] = (graph.add("FaceDiffuserAutoRegions", (1100, 580), size=(300, 120), vae=(sdm, 2),
                                            face_analysis=encode.links["face_analysis"], expansion=1.0), 0)
    return _snf_sampling(graph, sdm, tdm, prompt, null, latent, prefix, preview=regions == "auto", **inputs)


def two_subjects_regions() -> Graph:
    graph = Graph("facediffuser_two_subjects_regions", "Two people in one picture, each painted in their own half.")
    _note(graph, (
        "## Face-diffuser: two subjects, each in a region\n\n"
        "As the two-subject workflow, with **Face-diffuser Region Layout** giving each `<|image|>` marker a region, in "
        "marker order: the first person's face is painted only in the left half, the second's only in the right. "
        "This keeps the two faces apart (no blend, no same face twice). Set the layout's width and height to the "
        "picture's; for other placements pick `boxes` and type one `x0 y0 x1 y1` box per person (fractions of the "
        "picture), or connect masks from the mask editor, one per marker.\n\n"
        "`outside_regions` on the SNF Sampler: `snf` lets fusion choose per pixel everywhere (the paper), `tdm` keeps the "
        "TDM alone outside every region."))
    return _two_people(graph, "facediffuser_two_regions", regions="layout")


def two_subjects_auto_regions() -> Graph:
    graph = Graph("facediffuser_two_subjects_auto_regions", "Two people in one picture, each painted where the scene put them.")
    _note(graph, (
        "## Face-diffuser: two subjects, regions found in the picture\n\n"
        "As the two-subject workflow, with **Face-diffuser Auto Regions** on the SNF Sampler's `auto_regions`: at the end "
        "of scene construction (alpha) the TDM's predicted picture is decoded with the SDM's VAE, the faces are found "
        "with the InsightFace Loader's analysis, and each face is widened by `expansion` face sizes (sideways and "
        "upwards, down to the bottom) into a person's region. The regions go to the `<|image|>` markers left to right: "
        "the first marked person is painted at the leftmost face.\n\n"
        "With fewer faces than markers the picture is made without regions, and ComfyUI's log says so (the runner, "
        "`scripts/facediffuser_run.py --regions auto`, shows that line). **Face-diffuser Saliency Preview** outlines "
        "the regions used, over where the SDM painted during fusion."))
    return _two_people(graph, "facediffuser_two_auto_regions", regions="auto")


def custom_sampling() -> Graph:
    graph = Graph("facediffuser_custom_sampling", "The Face-diffuser Guider with SamplerCustomAdvanced, and the saliency preview.")
    _note(graph, (
        "## Face-diffuser: custom sampling\n\n"
        "**Face-diffuser Guider** is the same three-stage collaboration as the SNF Sampler, as a GUIDER: pick any "
        "sampler (KSamplerSelect) and schedule (BasicScheduler, or any SIGMAS node). alpha and beta are fractions "
        "of the sigmas the sampler gets.\n\n"
        "**Face-diffuser Saliency Preview** shows, for every image, the TDM's and the SDM's saliency and where "
        "the SDM painted during fusion. Its image input comes from the decoded result, which also makes it run "
        "after the sampler."))
    sdm, tdm, encode = _models_and_faces(graph, 1)
    prompt, null = _prompts(graph, sdm, encode, SINGLE_PROMPT)
    guider = graph.add("FaceDiffuserGuider", (1100, 0), size=(320, 220), tdm=(tdm, 0), sdm=(sdm, 0), augmented=(prompt, 0),
                       text=(prompt, 1), null=(null, 0), cfg=5.0, alpha=0.3, beta=0.6)
    noise = graph.add("RandomNoise", (1100, 260), size=(320, 90), noise_seed=42)
    sampler = graph.add("KSamplerSelect", (1100, 390), size=(320, 60), sampler_name="ddim")
    sigmas = graph.add("BasicScheduler", (1100, 490), size=(320, 110), model=(sdm, 0), scheduler="ddim_uniform", steps=50, denoise=1.0)
    latent = graph.add("EmptyLatentImage", (1100, 640), size=(320, 110), width=512, height=512, batch_size=1)
    sample = graph.add("SamplerCustomAdvanced", (1460, 0), size=(280, 110), noise=(noise, 0), guider=(guider, 0),
                       sampler=(sampler, 0), sigmas=(sigmas, 0), latent_image=(latent, 0))
    decode = graph.add("VAEDecode", (1780, 0), size=(210, 50), samples=(sample, 0), vae=(sdm, 2))
    graph.add("SaveImage", (2020, 0), size=(420, 460), images=(decode, 0), filename_prefix="facediffuser_custom")
    # The preview node shows its own pictures; the decoded image also makes it run after the sampler.
    graph.add("FaceDiffuserSaliencyPreview", (1780, 520), size=(420, 360), saliency=(guider, 1), image=(decode, 0))
    return graph


def official_pndm() -> Graph:
    graph = Graph("facediffuser_official_pndm", "The official Face-diffuser run: PNDM sampling from the official noise, the 15/30 split.")
    _note(graph, (
        "## Face-diffuser: the official run\n\n"
        "The SNF Sampler is set as the official code ran: 50 steps, cfg 5, the **pndm_official** sampler and "
        "scheduler (diffusers' PNDMScheduler, PLMS), **official** noise, and the demo's 15/30 stage split, which is "
        "alpha 0.3, beta 0.6 with PNDM. With the official weights, the same seed gives the official picture on the "
        "same kind of device (the official noise is drawn on the device ComfyUI samples on).\n\n"
        "Load a photo of the person in **Reference photo 1** and write `<|image|>` after the word naming them."))
    return _one_subject_sampling(graph, "facediffuser_official", OFFICIAL_SETTINGS)


def stage_sweep() -> Graph:
    graph = Graph("facediffuser_stage_sweep", "One seed over a grid of alpha and beta values, each picture with its identity score.")
    _note(graph, (
        "## Face-diffuser: the alpha/beta trade-off as one picture\n\n"
        "**Face-diffuser Stage Sweep** samples the same seed once per combination of its `alphas` (rows) and `betas` "
        "(columns), with the models loaded once. **Face-diffuser Identity Score** measures how closely each picture's "
        "face matches the reference photo (green: the recognition model calls it the same person), and **Stage Sweep "
        "Grid** lays the pictures out with their scores, the best framed.\n\n"
        "Low alpha and beta keep the person; high ones keep the scene. Pick the cell that keeps both, then set those "
        "values on the SNF Sampler of the other workflows. The grid costs one sampling per cell (9 here)."))
    sdm, tdm, encode = _models_and_faces(graph, 1)
    prompt, null = _prompts(graph, sdm, encode, SINGLE_PROMPT)
    latent = graph.add("EmptyLatentImage", (660, 660), size=(300, 110), width=512, height=512, batch_size=1)
    settings = {key: value for key, value in SAMPLER_SETTINGS.items() if key not in ("alpha", "beta")}
    sweep = graph.add("FaceDiffuserStageSweep", (1100, 0), size=(340, 400), tdm=(tdm, 0), sdm=(sdm, 0), augmented=(prompt, 0),
                      text=(prompt, 1), null=(null, 0), latent_image=(latent, 0), **settings,
                      alphas="0.2, 0.3, 0.4", betas="0.5, 0.6, 0.7", denoise=1.0)
    decode = graph.add("VAEDecode", (1480, 0), size=(210, 50), samples=(sweep, 0), vae=(sdm, 2))
    identity = graph.add("FaceDiffuserIdentityScore", (1480, 120), size=(360, 420), references=encode.links["images"],
                         images=(decode, 0), face_analysis=encode.links["face_analysis"], recognition="insightface", keep_best=0)
    grid = graph.add("FaceDiffuserStageSweepGrid", (1880, 0), size=(260, 100), images=(decode, 0), sweep=(sweep, 1),
                     identity=(identity, 4))
    graph.add("SaveImage", (2180, 0), size=(520, 560), images=(grid, 0), filename_prefix="facediffuser_sweep")
    return graph


GRAPHS = (single_subject, two_subjects, custom_sampling, official_pndm, stage_sweep, two_subjects_regions, two_subjects_auto_regions)


def render_all(mappings: dict) -> dict[Path, str]:
    """Every shipped file's path and its exact text."""
    files = {}
    for build in GRAPHS:
        graph = build()
        files[WORKFLOWS_DIR / f"{graph.name}.json"] = json.dumps(graph.ui(mappings), indent=1) + "\n"
        files[API_DIR / f"{graph.name}.json"] = json.dumps(graph.api(mappings), indent=1) + "\n"
    return files


if __name__ == "__main__":
    import standalone  # noqa: F401  (the dev kit's path, as pytest.ini gives the tests)
    from dev.devkit import comfy_harness

    if comfy_harness.comfyui_path() is None:
        sys.exit(comfy_harness.SKIP_REASON)
    comfyui = comfy_harness.start()
    for path, text in render_all(comfyui.nodes.NODE_CLASS_MAPPINGS).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
