"""What an artist sees of the pack in ComfyUI's own frontend, in a real browser (Debian's Chromium, driven by
Playwright, headless) against a real ComfyUI server on loopback with the pack installed: each node's help page in
the node info panel (the selection toolbox's "Node Info"), and the templates under the category "Face-diffuser",
each card with its thumbnail loaded. One browser session serves every test of this file."""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
from dataclasses import dataclass, field

import pytest

import comfy_server
import stage_pictures
from dev.devkit import comfy_harness

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No GPU, no sandbox (CI runs as root), and nothing that reaches beyond loopback.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_FOLDER = "comfyui-facediffuser"  # comfy_server installs the pack under this name, as a git clone names it
WAIT_MS = 60_000  # a shared 2-core machine may take long to draw
PICTURE_WAIT_MS = 20_000  # once the dialog or panel is drawn, a picture or page on loopback comes at once or never


def browser_missing(reason: str):
    """CI installs Chromium and Playwright (.ci/run, requirements-test.txt): there a missing browser is a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class Canvas:
    page: object
    server: comfy_server.Server
    responses: dict = field(default_factory=dict)  # path -> HTTP status of every request the page made


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    if comfy_harness.comfyui_path() is None:
        pytest.skip(comfy_harness.SKIP_REASON)
    if not os.access(CHROMIUM, os.X_OK):
        browser_missing("no Chromium: `apt-get install -y chromium` (Debian's package; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_missing("no Playwright: install requirements-test.txt")
    scratch = tmp_path_factory.mktemp("canvas")
    with comfy_server.running_server(scratch / "comfyui") as server, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(scratch / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 900})
        try:
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            canvas = Canvas(page, server)
            page.on("response", lambda response: canvas.responses.__setitem__(
                response.url.removeprefix(server.url), response.status))
            # A first visit opens the template browser by itself, at a moment of its choosing; the tests open it.
            settings = urllib.request.Request(f"{server.url}/api/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
            urllib.request.urlopen(settings, timeout=30).close()
            page.goto(server.url)
            page.wait_for_function("() => window.app?.graph && window.app?.extensionManager?.command")
            yield canvas
        finally:
            context.close()


def test_the_templates_are_titled_face_diffuser_and_each_card_shows_its_thumbnail(canvas):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = canvas.page
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.get_by_role("dialog")
    try:
        try:  # the pack's category, titled by locales/en/main.json instead of its folder name
            dialog.get_by_text("Face-diffuser", exact=True).click()
        except PlaywrightTimeout:
            pytest.fail(f"the template browser lists no category 'Face-diffuser' "
                        f"('{PACK_FOLDER}' shows {dialog.get_by_text(PACK_FOLDER, exact=True).count()} times)")
        assert dialog.get_by_text(PACK_FOLDER, exact=True).count() == 0
        not_shown = []
        for name in stage_pictures.template_names():
            card = dialog.locator(f"[data-testid='template-workflow-{name}']")
            card.scroll_into_view_if_needed()
            picture = card.locator("img").first
            try:
                page.wait_for_function("picture => picture.complete && picture.naturalWidth > 0",
                                       arg=picture.element_handle(), timeout=PICTURE_WAIT_MS)
            except PlaywrightTimeout:
                not_shown.append(f"{name}: its card's picture did not load")
                continue
            if picture.evaluate("picture => picture.naturalWidth") != stage_pictures.THUMBNAIL_SIZE[0]:
                not_shown.append(f"{name}: its card shows another picture than {name}.jpg")
            if canvas.responses.get(f"/api/workflow_templates/{PACK_FOLDER}/{name}.jpg") != 200:
                not_shown.append(f"{name}: {name}.jpg was not served")
        assert not_shown == [], "\n".join(not_shown)
    finally:
        page.keyboard.press("Escape")
        dialog.wait_for(state="hidden")


def first_words(page_text: str) -> str:
    """The help page's first paragraph's opening words as the panel renders them (markdown emphasis removed)."""
    paragraph = page_text.split("\n\n")[1]
    return " ".join(re.sub(r"[*`]", "", paragraph).split()[:6])


def test_every_nodes_help_page_shows_in_the_node_info_panel(canvas):
    from playwright.sync_api import expect

    page = canvas.page
    expect(page.get_by_role("dialog")).to_have_count(0)  # nothing in front of the canvas
    node_ids = sorted(path.stem for path in (comfy_harness.REPO_ROOT / "web" / "docs").glob("*.md"))
    help_panel = page.locator(".node-help-content")
    not_shown = []
    for shown, node_id in enumerate(node_ids):
        text = (comfy_harness.REPO_ROOT / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
        title = text.splitlines()[0].removeprefix("# ")
        page.evaluate("""node_id => {
            window.app.graph.clear();
            const node = window.LiteGraph.createNode(node_id);
            node.pos = [300, 200];
            window.app.graph.add(node);
            window.app.canvas.selectNode(node);
            window.app.canvas.setDirty(true, true);
        }""", node_id)
        page.get_by_role("button", name="Node Info").click()
        try:
            # the first opens the panel; later ones only change what it shows
            expect(help_panel.locator("h1")).to_have_text(title, timeout=WAIT_MS if shown == 0 else PICTURE_WAIT_MS)
            expect(help_panel).to_contain_text(first_words(text))
            expect(help_panel.locator("h2", has_text="Example")).to_be_visible()
        except AssertionError as error:
            not_shown.append(f"{node_id}: {str(error).splitlines()[0]}")
        if canvas.responses.get(f"/extensions/{PACK_FOLDER}/docs/{node_id}.md") != 200:
            not_shown.append(f"{node_id}: /extensions/{PACK_FOLDER}/docs/{node_id}.md was not served")
    assert not_shown == [], "\n".join(not_shown)
