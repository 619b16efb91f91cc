"""The web page in a real browser (Debian's chromium, headless, through selenium): type a prompt and
generate with the demo model, see progress and the image, draw a mask and inpaint, reuse the parameters
of a dropped PNG. Skipped when chromium or its driver is not installed (see .ci/run).

LATENTFORGE_SCREENSHOT=path saves a screenshot of the page after the run (docs/server-page.png)."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image, PngImagePlugin

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from latentforge.demo import bundled_model_path  # noqa: E402
from serverproc import Server  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.skipif(bundled_model_path() is None, reason="no bundled demo model"),
    pytest.mark.skipif(
        not (os.path.exists(CHROMEDRIVER) and (shutil.which("chromium") or shutil.which("chromium-browser"))),
        reason="chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp=tmp_path_factory.mktemp("srv"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _set(driver, element_id: str, value) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(str(value))


def _cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#gallery .card")


def test_generate_inpaint_and_reuse_parameters(server, browser, tmp_path):
    d = browser
    wait = WebDriverWait(d, 120)
    d.get(server.url + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    assert d.find_element(By.ID, "model").get_attribute("value") == "demo.safetensors"

    # txt2img, typed and submitted from the keyboard
    _set(d, "steps", 12)
    _set(d, "width", 64)
    _set(d, "height", 64)
    _set(d, "seed", 5)
    prompt = d.find_element(By.ID, "prompt")
    prompt.send_keys("a red circle on a blue background")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard shortcut, no mouse
    wait.until(lambda d: len(_cards(d)) == 1)
    assert d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png;base64,")
    assert "1 image" in d.find_element(By.ID, "status").text
    text = _cards(d)[0].find_element(By.CSS_SELECTOR, "pre").text
    assert text.startswith("a red circle on a blue background") and "Seed: 5" in text and "Steps: 12" in text

    # send to img2img, draw a mask, inpaint
    _cards(d)[0].find_element(By.XPATH, ".//button[text()='Send to img2img']").click()
    wait.until(lambda d: d.find_element(By.ID, "img2img-panel").is_displayed())
    canvas = d.find_element(By.ID, "mask-canvas")
    size = canvas.size
    ActionChains(d).move_to_element_with_offset(canvas, -size["width"] // 4, 0).click_and_hold().move_by_offset(
        size["width"] // 2, 5
    ).release().perform()
    white = d.execute_script(
        "const c = document.getElementById('mask-canvas');"
        "const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < a.length; i += 4) if (a[i] > 0) n++; return n;"
    )
    assert white > 0  # the stroke landed on the mask
    _set(d, "steps", 4)
    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(_cards(d)) == 2)
    text = _cards(d)[0].find_element(By.CSS_SELECTOR, "pre").text
    assert "Denoising strength: 0.75" in text and "Mask blur: 4" in text

    # reuse the parameters of a PNG written by hand with A1111's infotext
    png = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a lighthouse at night\nNegative prompt: fog\nSteps: 7, Sampler: DPM++ 2M, Schedule type: Karras, "
        "CFG scale: 4.5, Seed: 123456, Size: 64x128",
    )
    Image.new("RGB", (64, 128)).save(png, pnginfo=info)
    d.find_element(By.ID, "png-file").send_keys(str(png))
    wait.until(lambda d: "lighthouse" in d.find_element(By.ID, "pnginfo").text)
    wait.until(lambda d: d.find_element(By.ID, "pnginfo-reuse").is_enabled())
    d.find_element(By.ID, "pnginfo-reuse").click()
    values = {
        k: d.find_element(By.ID, k).get_attribute("value") for k in ("prompt", "negative_prompt", "steps", "seed")
    }
    assert values == {"prompt": "a lighthouse at night", "negative_prompt": "fog", "steps": "7", "seed": "123456"}
    assert d.find_element(By.ID, "sampler_name").get_attribute("value") == "DPM++ 2M"
    assert d.find_element(By.ID, "scheduler").get_attribute("value") == "karras"
    assert (
        d.find_element(By.ID, "width").get_attribute("value"),
        d.find_element(By.ID, "height").get_attribute("value"),
    ) == ("64", "128")
    # interrupt a long generation from the page
    _set(d, "steps", 1000)
    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("step "))
    d.find_element(By.ID, "interrupt").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("cancelled"))
    assert len(_cards(d)) == 2 and d.find_element(By.ID, "generate").is_enabled()
    if os.environ.get("LATENTFORGE_SCREENSHOT"):
        d.save_screenshot(os.environ["LATENTFORGE_SCREENSHOT"])

    # readable on a phone: one column, nothing wider than the screen
    d.set_window_size(390, 844)
    overflow = d.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0
    gallery, form = d.find_element(By.ID, "gallery"), d.find_element(By.ID, "form")
    assert gallery.location["y"] > form.location["y"] + form.size["height"] - 1


def test_hires_fix_from_the_page_and_reused_from_an_image(server, browser, tmp_path):
    """The txt2img form's Hires. fix panel (A1111's): its fields reach the request (the infotext says so)
    and a PNG's Hires fields fill them again; img2img hides the panel."""
    d = browser
    wait = WebDriverWait(d, 120)
    d.get(server.url + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#hr_upscaler option[value='Lanczos']"))
    for name, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 3), ("hr_scale", 1.5)):
        _set(d, name, value)
    _set(d, "hr_second_pass_steps", 2)
    _set(d, "hr_denoising_strength", 0.45)
    _set(d, "hr_prompt", "a blue square")
    d.find_element(By.ID, "enable_hr").click()
    d.find_element(By.ID, "hr_upscaler").send_keys("Lanczos")
    d.find_element(By.ID, "prompt").send_keys("a red circle")
    before = len(_cards(d))
    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(_cards(d)) == before + 1)
    text = _cards(d)[0].find_element(By.CSS_SELECTOR, "pre").text
    for field in ("Hires upscale: 1.5", "Hires steps: 2", "Hires upscaler: Lanczos", "Denoising strength: 0.45",
                  "Hires prompt: a blue square"):  # fmt: skip
        assert field in text, text
    assert _cards(d)[0].find_element(By.CSS_SELECTOR, "img").get_attribute("naturalWidth") == "96"

    png = tmp_path / "hires.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a tower\nSteps: 5, Seed: 9, Size: 64x64, Denoising strength: 0.3, Hires upscale: 2, "
                  "Hires steps: 3, Hires upscaler: Latent, Hires prompt: a tall tower")  # fmt: skip
    Image.new("RGB", (128, 128)).save(png, pnginfo=info)
    d.find_element(By.ID, "enable_hr").click()  # off: the image turns it on again
    d.find_element(By.ID, "png-file").send_keys(str(png))
    wait.until(
        lambda d: (
            d.find_element(By.ID, "pnginfo-reuse").is_enabled() and "tower" in d.find_element(By.ID, "pnginfo").text
        )
    )
    d.find_element(By.ID, "pnginfo-reuse").click()
    fields = ("hr_scale", "hr_second_pass_steps", "hr_denoising_strength", "hr_prompt", "hr_upscaler")
    values = {k: d.find_element(By.ID, k).get_attribute("value") for k in fields}
    assert values == {"hr_scale": "2", "hr_second_pass_steps": "3", "hr_denoising_strength": "0.3",
                      "hr_prompt": "a tall tower", "hr_upscaler": "Latent"}  # fmt: skip
    assert d.find_element(By.ID, "enable_hr").is_selected()
    d.find_element(By.ID, "tab-img2img").click()
    assert not d.find_element(By.ID, "hires-panel").is_displayed()
    d.find_element(By.ID, "tab-txt2img").click()


STYLES_CSV = 'name,prompt,negative_prompt\nframed,"{prompt}, in a golden frame",\nink,ink drawing,colour\n'


@pytest.fixture(scope="module")
def styled_server(tmp_path_factory):
    """A server with a VAE folder (the demo model's VAE, its weights scaled) and a styles.csv."""
    from safetensors.torch import save_file

    import latentforge

    root = tmp_path_factory.mktemp("srv-styles")
    (root / "VAE").mkdir()
    vae = latentforge.load(bundled_model_path(), dtype="fp32").vae
    save_file({k: (v * 0.9).contiguous() for k, v in vae.state_dict().items()}, root / "VAE" / "soft.safetensors")
    del vae
    styles = root / "styles.csv"
    styles.write_text(STYLES_CSV)
    s = Server("--vae-dir", str(root / "VAE"), "--styles-file", str(styles), tmp=root)
    s.styles_csv = styles
    yield s
    s.close()


def _options(driver, element_id: str) -> list[str]:
    return [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, f"#{element_id} option")]


def _error(driver) -> str:
    """The status line's text once it shows an error."""
    WebDriverWait(driver, 60).until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
    return driver.find_element(By.ID, "status").text


def test_vae_and_styles_from_the_page(styled_server, browser):
    """A1111's SD VAE choice and saved styles: chosen on the page, they reach the request (the infotext
    names the VAE, the prompts carry the styles' text in the order picked); Reuse parameters sets the VAE
    again; a refused VAE or style is shown in the status line and marks its control."""
    d = browser
    d.set_window_size(1200, 1100)
    wait = WebDriverWait(d, 120)
    d.get(styled_server.url + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#styles input") and _options(d, "sd_vae"))
    assert _options(d, "sd_vae") == ["Automatic", "None", "soft.safetensors"]
    assert d.find_element(By.ID, "sd_vae").get_attribute("value") == "Automatic"  # the server's sd_vae
    assert d.find_element(By.ID, "styles-panel").is_displayed()
    boxes = {b.get_attribute("value"): b for b in d.find_elements(By.CSS_SELECTOR, "#styles input[type=checkbox]")}
    assert list(boxes) == ["framed", "ink"]
    framed_label = boxes["framed"].find_element(By.XPATH, "..")
    assert "in a golden frame" in framed_label.get_attribute("title")

    # picked from the keyboard: framed, ink, framed off and on again -> applied as ink, then framed
    for name in ("framed", "ink", "framed", "framed"):
        boxes[name].send_keys(Keys.SPACE)
    assert d.find_element(By.ID, "styles-order").text == "applied in this order: ink, framed"
    Select(d.find_element(By.ID, "sd_vae")).select_by_value("soft.safetensors")
    for name, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 5)):
        _set(d, name, value)
    d.find_element(By.ID, "prompt").send_keys("a cat")
    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(_cards(d)) == 1)
    text = _cards(d)[0].find_element(By.CSS_SELECTOR, "pre").text
    assert text.startswith("a cat, ink drawing, in a golden frame\nNegative prompt: colour\n"), text
    assert "VAE: soft.safetensors" in text, text

    # Reuse parameters of that image: the VAE select again
    Select(d.find_element(By.ID, "sd_vae")).select_by_value("None")
    _cards(d)[0].find_element(By.XPATH, ".//button[text()='Reuse parameters']").click()
    wait.until(lambda d: d.find_element(By.ID, "sd_vae").get_attribute("value") == "soft.safetensors")
    assert not d.find_element(By.ID, "tiling").is_selected()

    # a VAE the server does not have (its file gone since the page loaded): the 400 in the status line
    d.execute_script(
        "const s = document.getElementById('sd_vae'); s.add(new Option('gone.safetensors', 'gone.safetensors'));"
        "s.value = 'gone.safetensors';"
    )
    _set(d, "prompt", "a cat")
    d.find_element(By.ID, "generate").click()
    message = _error(d)
    assert "sd_vae" in message and "gone.safetensors" in message, message
    assert d.find_element(By.ID, "sd_vae").get_attribute("aria-invalid") == "true"
    assert len(_cards(d)) == 1

    # a style taken out of styles.csv since the page loaded: the same
    Select(d.find_element(By.ID, "sd_vae")).select_by_value("soft.safetensors")
    styled_server.styles_csv.write_text("name,prompt,negative_prompt\nink,ink drawing,colour\n")
    try:
        d.find_element(By.ID, "generate").click()
        wait.until(lambda d: "framed" in d.find_element(By.ID, "status").text)
        message = _error(d)
        assert message.startswith("styles:") and "framed" in message, message
        assert d.find_element(By.ID, "styles-panel").get_attribute("aria-invalid") == "true"
        assert d.find_element(By.ID, "sd_vae").get_attribute("aria-invalid") is None
    finally:
        styled_server.styles_csv.write_text(STYLES_CSV)
    assert len(_cards(d)) == 1


def test_tiling_checkbox_and_no_styles(server, browser, tmp_path):
    """Without VAEs or styles the VAE select has A1111's two choices and the styles are hidden; Tiling sends
    ``tiling: true`` only when checked, and Reuse parameters checks it for an infotext's "Tiling: True"."""
    d = browser
    d.set_window_size(1200, 1100)
    wait = WebDriverWait(d, 120)
    d.get(server.url + "/")
    wait.until(lambda d: _options(d, "sd_vae") and _options(d, "model"))
    assert _options(d, "sd_vae") == ["Automatic", "None"]
    assert not d.find_element(By.ID, "styles-panel").is_displayed()

    body = d.execute_script("return payload()")  # the request the page would send
    assert "tiling" not in body and "styles" not in body
    assert body["override_settings"] == {"sd_model_checkpoint": "demo.safetensors", "sd_vae": "Automatic"}
    d.find_element(By.ID, "tiling").click()
    assert d.execute_script("return payload()")["tiling"] is True

    # Reuse parameters: "Tiling: True" checks the box, an image without it clears it; a VAE this server
    # does not have leaves the select as it is
    for tiling in (False, True):
        png = tmp_path / f"tiling-{tiling}.png"
        info = PngImagePlugin.PngInfo()
        extra = ", Tiling: True" if tiling else ""
        info.add_text(
            "parameters", f"a brick wall {tiling}\nSteps: 3, Seed: 4, Size: 64x64, VAE: gone.safetensors{extra}"
        )
        Image.new("RGB", (64, 64)).save(png, pnginfo=info)
        d.find_element(By.ID, "png-file").send_keys(str(png))
        wait.until(lambda d, t=tiling: f"a brick wall {t}" in d.find_element(By.ID, "pnginfo").text)
        wait.until(lambda d: d.find_element(By.ID, "pnginfo-reuse").is_enabled())
        d.find_element(By.ID, "pnginfo-reuse").click()
        assert d.find_element(By.ID, "tiling").is_selected() == tiling
        assert d.find_element(By.ID, "sd_vae").get_attribute("value") == "Automatic"
        assert "gone.safetensors is not on this server" in d.find_element(By.ID, "status").text

    # a tiled image from the server
    for name, value in (("steps", 2), ("width", 64), ("height", 64)):
        _set(d, name, value)
    before = len(_cards(d))
    d.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(_cards(d)) > before or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert len(_cards(d)) > before, d.find_element(By.ID, "status").text
    assert "Tiling: True" in _cards(d)[0].find_element(By.CSS_SELECTOR, "pre").text
