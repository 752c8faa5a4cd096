"""The web dashboard end to end: headless Chromium drives the page against a live server and a real
worker (upload, launch, watch, inspect the update map, generate). Plus the update-map route it draws
from, checked against the adapter file itself."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from stack import chat_lines, embedded_stack_with_worker, missing_dependency, train_tiny_adapter

from sbora_core.method.adapter_io import load_adapter

TINY = "tiny-llama"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[2]
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    with embedded_stack_with_worker(tmp_path_factory.mktemp("web"), tiny_model_dir) as stack:
        yield stack


@pytest.fixture(scope="module")
def alice(stack):
    return stack.key("alice")


def train(client: httpx.Client, key: str, variant: str) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    dataset = client.post("/datasets", headers=auth, files={"file": ("c.jsonl", chat_lines(24))}).json()
    return train_tiny_adapter(client, auth, dataset["id"], variant)["adapter_id"]


# -- the update-map route --------------------------------------------------------------------------
def test_update_map_matches_the_adapter_file(live, stack, alice, tmp_path):
    auth = {"Authorization": f"Bearer {alice}"}
    with httpx.Client(base_url=live.url, timeout=30) as client:
        adapters = {variant: train(client, alice, variant) for variant in ("sbora_fa", "sbora_fb")}
        for variant, adapter_id in adapters.items():
            got = client.get(f"/adapters/{adapter_id}/update-map", headers=auth)
            assert got.status_code == 200, got.text
            got = got.json()
            archive = client.get(f"/adapters/{adapter_id}", headers=auth)
            zipfile.ZipFile(io.BytesIO(archive.content)).extractall(tmp_path / adapter_id)
            adapter = load_adapter(tmp_path / adapter_id)
            assert (got["variant"], got["r"], got["alpha"], got["scaling"]) == (variant, 4, 8.0, 2.0)
            assert [m["name"] for m in got["modules"]] == sorted(adapter.modules)  # 2 layers: natural = sorted
            for m in got["modules"]:
                delta = adapter.modules[m["name"]]
                d_out, d_in = delta.shape
                dense = delta.dense_delta()  # the full ΔW, computed independently of the route
                changed = dense.norm(dim=0 if variant == "sbora_fa" else 1)
                assert (m["in_features"], m["out_features"]) == (d_in, d_out)
                assert m["axis"] == ("columns" if variant == "sbora_fa" else "rows")
                assert m["dimension"] == (d_in if variant == "sbora_fa" else d_out)
                assert m["indices"] == delta.indices.tolist() and len(set(m["indices"])) == 4
                assert all(0 <= i < m["dimension"] for i in m["indices"])
                torch.testing.assert_close(torch.tensor(m["norms"]), changed[m["indices"]], rtol=1e-5, atol=1e-8)
                untouched = torch.ones(m["dimension"], dtype=torch.bool)
                untouched[m["indices"]] = False
                assert changed[untouched].abs().max() == 0  # the regional update: nothing else moves
            assert got["max_norm"] == pytest.approx(max(max(m["norms"]) for m in got["modules"])) and got["max_norm"] > 0

        adapter_id = adapters["sbora_fa"]
        bob = {"Authorization": f"Bearer {stack.key('bob')}"}
        assert client.get(f"/adapters/{adapter_id}/update-map", headers=bob).status_code == 404
        assert client.get(f"/adapters/{adapter_id}/update-map").status_code == 401
        assert client.get("/adapters/ad_000000000000000000000000/update-map", headers=auth).status_code == 404


def test_the_page_is_public_and_the_data_is_not(live):
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in page.text
    script = httpx.get(f"{live.url}/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(f"{live.url}/static/missing.js").status_code == 404
    assert httpx.get(f"{live.url}/static/%2e%2e/__init__.py").status_code == 404  # no way out of the folder
    assert httpx.get(f"{live.url}/jobs").status_code == 401
    assert "/" not in httpx.get(f"{live.url}/openapi.json").json()["paths"]


# -- the browser -----------------------------------------------------------------------------------
@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        missing_dependency(f"{', '.join(missing)} not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    yield driver
    driver.quit()


class Shots:
    """Full-page screenshots into SBORA_TEST_ARTIFACTS (or tmp_path); copies in docs/img on request."""

    def __init__(self, driver, tmp_path: Path) -> None:
        self.driver = driver
        self.folder = Path(os.environ.get("SBORA_TEST_ARTIFACTS") or tmp_path / "screenshots")
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, readme: str | None = None) -> Path:
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, min(max(900, height + 140), 3000))
        # Canvases redraw at the new size; no scrollbar in the picture.
        self.driver.execute_script("document.documentElement.style.overflow = 'hidden';"
                                   "window.dispatchEvent(new Event('resize'))")
        path = self.folder / f"dashboard-{name}.png"
        self.driver.save_screenshot(str(path))
        self.driver.execute_script("document.documentElement.style.overflow = ''")
        self.driver.set_window_size(1280, 900)
        if readme and os.environ.get("SBORA_UPDATE_SCREENSHOTS") == "1":
            (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, ROOT / "docs" / "img" / readme)
        return path


def painted(driver, canvas, skip: str = "") -> int:
    """How many pixels of `canvas` are drawn in a colour other than transparent or `skip` (r,g,b)."""
    return driver.execute_script("""
        const [c, skip] = arguments, d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4)
            if (d[i + 3] > 0 && `${d[i]},${d[i + 1]},${d[i + 2]}` !== skip) n++;
        return n;""", canvas, skip)


def test_dashboard_end_to_end(browser, live, alice, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver, shot = browser, Shots(browser, tmp_path)
    auth = {"Authorization": f"Bearer {alice}"}

    def wait(condition, timeout: float = 30):
        # Polled pages re-render their rows and headers: a stale element just means "look again".
        return WebDriverWait(driver, timeout, 0.2, ignored_exceptions=[StaleElementReferenceException]).until(condition)

    css = lambda sel: driver.find_element(By.CSS_SELECTOR, sel)  # noqa: E731
    all_css = lambda sel: driver.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
    click = lambda sel: wait(lambda d: css(sel).click() or True)  # noqa: E731

    # The key, once: a wrong one is refused, the right one is kept.
    driver.get(f"{live.url}/")
    wait(lambda d: css("#key-input"))
    css("#key-input").send_keys("sbora-wrong")
    css("#key-save").click()
    wait(lambda d: "rejected" in css("#key-error").text)
    css("#key-input").clear()
    css("#key-input").send_keys(alice)
    css("#key-save").click()
    wait(lambda d: css("#jobs-table"))
    assert driver.execute_script("return localStorage.getItem('sbora.apiKey')") == alice

    # A dataset: a broken one is listed line by line, a good one is kept and selected.
    css("a[href='#/new']").click()
    wait(lambda d: all_css("#dataset-select option"))
    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_bytes(chat_lines(2) + b"{not json\n" + json.dumps({"messages": []}).encode() + b"\n")
    good.write_bytes(chat_lines(24))
    css("#dataset-file").send_keys(str(bad))
    css("#dataset-upload").click()
    errors = wait(lambda d: all_css("#dataset-errors li"))
    assert any(e.get_attribute("data-line") == "3" and "line 3" in e.text for e in errors), [e.text for e in errors]
    shot("upload-errors")
    css("#dataset-file").clear()
    css("#dataset-file").send_keys(str(good))
    css("#dataset-upload").click()
    wait(lambda d: css("#dataset-ok"))
    assert "24 records" in css("#dataset-ok").text and Select(css("#dataset-select")).first_selected_option.get_attribute("value").startswith("ds_")

    # The job form: a rank too large for the model is named next to its field, then the job launches.
    form = css("#job-form")
    Select(form.find_element(By.NAME, "base_model")).select_by_value(TINY)
    values = {"r": "1000", "alpha": "8", "max_steps": "6", "learning_rate": "0.01", "batch_size": "4",
              "max_seq_len": "128", "val_fraction": "0.25", "eval_every": "2", "name": "dashboard-e2e"}
    for name, value in values.items():
        form.find_element(By.NAME, name).clear()
        form.find_element(By.NAME, name).send_keys(value)
    css("#launch").click()
    wait(lambda d: "larger than" in css(".field-error[data-for='method.r']").text)
    form.find_element(By.NAME, "r").clear()
    form.find_element(By.NAME, "r").send_keys("4")
    # More devices than the live worker offers: named next to the devices field.
    form.find_element(By.NAME, "devices").send_keys("8")
    css("#launch").click()
    wait(lambda d: "offer at most 1" in css(".field-error[data-for='resources.devices']").text)
    form.find_element(By.NAME, "devices").clear()
    css("#launch").click()
    wait(lambda d: d.current_url.split("#")[-1].startswith("/jobs/job"))
    job_id = driver.current_url.rsplit("/", 1)[-1]

    # The jobs table follows it to the end.
    css("a[href='#/jobs']").click()
    row = f"tr[data-job-id='{job_id}']"
    wait(lambda d: all_css(f"{row}[data-status='succeeded']"), timeout=120)
    shot("jobs")

    # Its page: the loss curve (train and validation), events, settings, no cancelling a finished job.
    click(f"{row} a")
    chart = wait(lambda d: all_css("#loss-chart[data-train-points='6']"))[0]
    wait(lambda d: int(chart.get_attribute("data-val-points")) >= 1 and css("#job-adapter"))
    assert painted(driver, chart) > 500
    assert all_css("#events-body tr[data-kind='status']") and all_css("#events-body tr[data-kind='eval']")
    wait(lambda d: "dashboard-e2e" in css("h1").text and css("#cancel-job").get_attribute("disabled") is not None)
    wait(lambda d: "6 / 6" in css("#job-summary").text and "null" not in css("#job-summary").text)
    assert "0.01" in css("#hyperparameters").text and "resources.devices" in css("#hyperparameters").text
    shot("job", readme="dashboard-job.png")

    # The adapter: one strip per adapted layer, r coloured bars each, and both downloads.
    click("#job-adapter")
    wait(lambda d: all_css("#update-map .strip"))
    adapter_id = driver.current_url.rsplit("/", 1)[-1]
    updates = httpx.get(f"{live.url}/adapters/{adapter_id}/update-map", headers=auth).json()
    strips = all_css("#update-map .strip")
    assert len(strips) == len(updates["modules"]) == 14  # 2 layers x 7 projections
    for strip, module in zip(strips, updates["modules"], strict=True):
        assert strip.get_attribute("data-module") == module["name"]
        assert [int(i) for i in strip.get_attribute("data-indices").split(",")] == module["indices"]
        assert len(module["indices"]) == 4
    grey = "229,231,235"  # the untouched columns' colour
    assert all(painted(driver, s.find_element(By.TAG_NAME, "canvas"), grey) > 0 for s in strips)
    shot("adapter", readme="dashboard-adapter.png")
    css("#download-sparse").click()
    css("#download-peft").click()
    wait(lambda d: {p.name for p in driver.downloads.iterdir()} >= {f"{adapter_id}.zip", f"{adapter_id}-peft.zip"})
    assert zipfile.ZipFile(driver.downloads / f"{adapter_id}.zip").namelist() == ["adapter_config.json", "adapter_model.safetensors"]

    # The registry lists it with its size and trainable parameters.
    css("a[href='#/adapters']").click()
    listed = wait(lambda d: all_css(f"tr[data-adapter-id='{adapter_id}']"))[0]
    meta = httpx.get(f"{live.url}/adapters/{adapter_id}/metadata", headers=auth).json()
    assert f"{meta['trainable_params']:,}" in listed.text
    shot("adapters")

    # The playground streams an answer with the adapter applied.
    driver.get(f"{live.url}/#/playground?adapter={adapter_id}")
    box = wait(lambda d: all_css(f"#pg-adapters input[value='{adapter_id}']"))[0]
    assert box.is_selected()
    css("#pg-max-tokens").clear()
    css("#pg-max-tokens").send_keys("16")
    css("#pg-prompt").send_keys("Item 2: which colour?")
    css("#pg-generate").click()
    wait(lambda d: css("#pg-status").get_attribute("data-state") in ("done", "error"), timeout=60)
    assert css("#pg-status").get_attribute("data-state") == "done", css("#pg-status").text
    assert adapter_id in css("#pg-status").text and int(css("#pg-output").get_attribute("data-pieces")) > 1
    streamed = css("#pg-output").get_attribute("textContent")  # the tiny model's answer may be all whitespace
    whole = httpx.post(f"{live.url}/generate", headers=auth, timeout=60, json={
        "messages": [{"role": "user", "content": "Item 2: which colour?"}], "adapter_id": [adapter_id],
        "max_new_tokens": 16, "temperature": 0}).json()
    assert streamed and streamed == whole["text"]
    shot("playground")

    # A long job is cancelled from its page.
    dataset_id = httpx.get(f"{live.url}/datasets", headers=auth).json()["data"][0]["id"]
    long = httpx.post(f"{live.url}/jobs", headers=auth, json={
        "base_model": TINY, "training_dataset_id": dataset_id, "method": {"variant": "sbora_fa", "r": 4},
        "hyperparameters": {"max_steps": 100_000, "batch_size": 4, "max_seq_len": 128}}).json()
    driver.get(f"{live.url}/#/jobs/{long['id']}")
    click("#cancel-job:not([disabled])")
    wait(expected_conditions.alert_is_present()).accept()
    wait(lambda d: css("h1 .badge").get_attribute("data-status") == "cancelled", timeout=60)

    # A group: its members' columns drawn in their own colours on every layer, and the room left.
    group = httpx.post(f"{live.url}/groups", headers=auth, json={
        "name": "colours", "base_model": TINY, "variant": "sbora_fa", "r": 4,
        "target_modules": ["q_proj", "v_proj"]}).json()
    members = [httpx.post(f"{live.url}/jobs", headers=auth, json={
        "base_model": TINY, "training_dataset_id": dataset_id, "group": group["id"],
        "hyperparameters": {"max_steps": 2, "batch_size": 4, "max_seq_len": 96}}).json() for _ in range(2)]
    for member in members:
        wait(lambda d, m=member: httpx.get(f"{live.url}/jobs/{m['id']}", headers=auth).json()["status"]
             == "succeeded", timeout=120)
    css("a[href='#/groups']").click()
    click(f"tr[data-group-id='{group['id']}'] a")
    strips = wait(lambda d: all_css("#index-map .strip"))
    assert len(strips) == 4  # 2 layers x q_proj, v_proj
    assert all(s.get_attribute("data-owned") == "8" for s in strips)  # 2 members x r=4 columns each
    assert len(all_css("#members-table tbody tr[data-slot]")) == 2
    assert css("#group-free").text == str(group["capacity"] - 2)
    canvas = strips[0].find_element(By.TAG_NAME, "canvas")
    for colour in ("37,99,235", "220,38,38"):  # the first two members' colours
        assert painted(driver, canvas) - painted(driver, canvas, colour) > 0, colour
    shot("group")


def test_checkpoint_metrics_and_an_evaluation_side_by_side(browser, live, alice, tmp_path):
    """A job's page lists its checkpoints' train and validation token accuracy (and the final full
    validation); the evaluation its eval_after queued shows the candidates side by side with their
    intervals, the paired difference, and its items filtered to the wrong ones."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from stack import wait_for

    driver, shot = browser, Shots(browser, tmp_path)
    auth = {"Authorization": f"Bearer {alice}"}
    css = lambda sel: driver.find_element(By.CSS_SELECTOR, sel)  # noqa: E731
    all_css = lambda sel: driver.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731

    def wait(condition, timeout: float = 30):
        return WebDriverWait(driver, timeout, 0.2, ignored_exceptions=[StaleElementReferenceException]).until(condition)

    with httpx.Client(base_url=live.url, headers=auth, timeout=30) as client:
        train_set = client.post("/datasets", files={"file": ("c.jsonl", chat_lines(24))}).json()["id"]
        items = [{"question": f"Which colour is item {i}?", "choices": ["red", "green", "blue", "gold"], "answer": i % 4}
                 for i in range(10)]
        mc = client.post("/datasets", files={"file": ("mc.jsonl", "".join(json.dumps(r) + "\n" for r in items))}).json()["id"]
        job = client.post("/jobs", json={
            "base_model": TINY, "training_dataset_id": train_set, "method": {"variant": "sbora_fa", "r": 4},
            "hyperparameters": {"max_steps": 4, "batch_size": 4, "max_seq_len": 128, "checkpoint_every": 2,
                                "val_fraction": 0.25, "learning_rate": 0.01},
            "eval_after": {"dataset_id": mc, "grader": "multiple_choice"}}).json()
        done = wait_for(lambda: (j := client.get(f"/jobs/{job['id']}").json())["status"] in ("succeeded", "failed") and j,
                        120, 0.3, "training")
        assert done["status"] == "succeeded", done["error"]
        evaluation_id = wait_for(lambda: next((e["data"]["evaluation_id"] for e in client.get(
            f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"] if "evaluation_id" in e["data"]), None),
            30, 0.3, "eval_after")
        evaluation = wait_for(lambda: (e := client.get(f"/evaluations/{evaluation_id}").json())["status"] == "succeeded"
                              and e, 120, 0.3, "the evaluation")
        checkpoint_events = [e["data"] for e in client.get(f"/jobs/{job['id']}/events", params={"kind": "checkpoint"}).json()["data"]]

    driver.get(f"{live.url}/")
    driver.execute_script("localStorage.setItem('sbora.apiKey', arguments[0])", alice)
    driver.get(f"{live.url}/#/jobs/{job['id']}")
    wait(lambda d: len(all_css("#checkpoints-body tr")) == 3)  # steps 2 and 4, and the final row
    for data in checkpoint_events:
        row = css(f"#checkpoints-body tr[data-step='{data['step']}']")
        accuracy = row.find_element(By.CSS_SELECTOR, "td[data-metric='valid_mean_token_accuracy']").text
        assert accuracy != "–" and float(accuracy) == pytest.approx(data["valid_mean_token_accuracy"], abs=1e-3)
    assert css("#checkpoints-body tr[data-step='final'] td[data-metric='valid_loss']").text != "–"

    css("a[href='#/evaluations']").click()
    wait(lambda d: all_css(f"tr[data-evaluation-id='{evaluation_id}'][data-status='succeeded'] a"))[0].click()
    rows = wait(lambda d: all_css("#results-table tbody tr"))
    assert [r.get_attribute("data-candidate") for r in rows] == ["base", done["adapter_id"]]
    for row, candidate in zip(rows, evaluation["result"]["candidates"], strict=True):
        cell = row.find_element(By.CSS_SELECTOR, "td[data-metric='accuracy']").text
        assert cell.startswith(str(round(candidate["metrics"]["accuracy"]["value"], 4)).rstrip("0").rstrip(".") or "0")
    assert len(all_css("#paired-table tbody tr")) == 1
    Select(css("#items-candidate")).select_by_value("base")
    Select(css("#items-outcome")).select_by_value("false")
    wrong = evaluation["result"]["candidates"][0]["wrong"]
    wait(lambda d: css("#items-total").text == f"{wrong} item(s)")
    assert all(r.get_attribute("data-correct") == "false" for r in all_css("#items-body tr"))
    assert len(all_css("#items-body tr")) == wrong
    shot("evaluation", readme="dashboard-evaluation.png")
