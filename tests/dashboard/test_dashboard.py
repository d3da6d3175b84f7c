"""The dashboard in a real headless Chromium against a real service on loopback.

One module, in order (the jobs started early finish while the other pages are tested): sign-in and every page
without console errors (labels on every control, keyboard focus, no horizontal overflow at 1280x800 and narrow);
a bad form value shows the server's error next to its field; a training job from the form and a protocol run
from the Evaluate page; a query's retrieved adapters and streamed answers, two methods side by side; a merge that
registers an adapter; a read-only key that sees no admin controls; a 200-adapter pool; then the training job
finishes with its curve and its adapter in the pool, and the protocol run shows its table and plot.
Every page's screenshot goes to docs/screenshots/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.dashboard.conftest import DESKTOP, NARROW, SCREENSHOTS

pytestmark = pytest.mark.usefixtures("chromium")

KEY_STORAGE = "lora-retriever-api-key"
PAGES = {
    "pool": "#pool-table",
    "try": "#try-run",
    "train": "text=Start training",
    "jobs": "#jobs-title",
    "merge": "#merge-picker",
    "evaluate": "#protocol-title",
    "signin": "#scope",
}
JOB_TIMEOUT_MS = 600_000
STARTED: dict[str, str] = {}  # job ids started by earlier tests of this module


class Console:
    """The page's console errors and uncaught exceptions."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def unexpected(self, *allowed_status: int) -> list[str]:
        """Errors other than the browser's own note on a refused request with one of ``allowed_status``."""
        allowed = [f"status of {s}" for s in allowed_status]
        return [e for e in self.errors if not any(a in e for a in allowed)]


def open_page(chromium, url: str, key: str | None = None, viewport=DESKTOP):
    context = chromium.new_context(viewport=viewport)
    if key:
        context.add_init_script(f"sessionStorage.setItem({json.dumps(KEY_STORAGE)}, {json.dumps(key)})")
    page = context.new_page()
    page.set_default_timeout(120_000)
    console = Console(page)
    page.goto(url)
    page.wait_for_selector("body[data-ready]")  # the session is known and the first page rendered
    return page, console


def goto(page, route: str, ready: str) -> None:
    page.evaluate(f"location.hash = {json.dumps(route)}")
    try:
        page.wait_for_selector(ready)
    except Exception as err:
        raise AssertionError(
            f"{route}: {ready!r} did not appear; the page shows:\n{page.inner_text('main')}"
        ) from err


def shoot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def unlabelled_controls(page) -> list[str]:
    return page.evaluate(
        """() => [...document.querySelectorAll('main input, main select, main textarea')]
            .filter(el => el.type !== 'hidden' && !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
            .map(el => el.outerHTML.slice(0, 120))"""
    )


def overflows(page) -> bool:
    return page.evaluate("() => document.documentElement.scrollWidth > window.innerWidth + 1")


@pytest.fixture(scope="module")
def admin(chromium, dash_server, keys):
    page, console = open_page(chromium, f"{dash_server.url}/ui/", keys["admin"])
    yield page, console
    page.context.close()


def test_sign_in_and_every_page_loads_without_console_errors(chromium, dash_server, keys):
    page, console = open_page(chromium, f"{dash_server.url}/")  # / redirects to the dashboard
    assert page.url.endswith("/ui/")
    page.wait_for_selector("input[name=authorization]")  # keys configured: the sign-in page comes first
    assert page.locator("#nav a:visible").count() == 0
    shoot(page, "signin")
    page.fill("input[name=authorization]", "lrk_not-a-key")
    page.click("button[type=submit]")
    expect_error = page.locator("[data-error-for=authorization]")
    expect_error.wait_for()
    assert "not one of" in expect_error.inner_text()
    page.fill("input[name=authorization]", keys["admin"])
    page.click("button[type=submit]")
    page.wait_for_selector("#pool-table")
    assert "(admin)" in page.inner_text("#who")
    console.errors.clear()  # the refused key above logged its 401

    for name, ready in PAGES.items():
        for viewport in (DESKTOP, NARROW):
            page.set_viewport_size(viewport)
            goto(page, f"#/{name}", ready)
            assert not overflows(page), f"{name} overflows horizontally at {viewport}"
        assert unlabelled_controls(page) == [], name
        if name in ("train", "merge", "jobs"):
            page.set_viewport_size(DESKTOP)
            shoot(page, name if name != "jobs" else "jobs-empty")
    page.set_viewport_size(DESKTOP)
    assert console.errors == []

    # Keyboard: Tab from the top reaches the Try page's controls in order, ending at its Run button.
    goto(page, "#/try", "#try-run")
    page.focus("#skip")
    reached = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("() => document.activeElement.name || document.activeElement.id"))
        if reached[-1] == "try-run":
            break
    assert reached[-1] == "try-run", reached
    assert {"input", "method", "top_k", "max_tokens", "compare"} <= set(reached)
    page.context.close()


def test_a_bad_form_value_shows_the_servers_error_next_to_the_field(admin, dash_engine, tmp_path):
    page, console = admin
    goto(page, "#/train", "text=Start training")
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"input": f"{i} + 1", "output": str(i + 1)}) + "\n" for i in range(8)))
    page.fill("input[name=server_path]", str(data))
    page.fill("input[name=adapter_name]", "ok_name")
    page.fill("input[name=max_steps]", "0")
    page.click("text=Start training")
    slot = page.locator("[data-error-for=max_steps]")
    slot.wait_for()
    assert "greater than or equal to 1" in slot.inner_text()  # pydantic's message, from the server
    assert page.get_attribute("input[name=max_steps]", "aria-invalid") == "true"
    # A name the pool already holds: the service's 409 lands next to the name field.
    page.fill("input[name=max_steps]", "2")
    page.fill("input[name=adapter_name]", "capitals")
    page.click("text=Start training")
    page.wait_for_selector("[data-error-for=adapter_name]:has-text('taken')")
    assert page.locator("[data-error-for=max_steps]").inner_text() == ""
    shoot(page, "train-error")
    assert console.unexpected(400, 409) == []
    console.errors.clear()  # the refusals above were expected; later tests share this page
    assert dash_engine.config.data_dir and not list(
        Path(dash_engine.config.data_dir).glob("adapters/ok_name")
    )


def test_training_starts_from_the_form_with_an_uploaded_dataset(admin, tmp_path):
    page, console = admin
    goto(page, "#/train", "text=Start training")
    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(json.dumps({"input": f"{i} + 2", "output": str(i + 2)}) + "\n" for i in range(10))
    )
    page.set_input_files("input[name=upload]", str(data))
    page.fill("input[name=adapter_name]", "sums")
    page.fill("input[name=target_modules]", "q_proj, v_proj")
    for name, value in (("max_steps", "3"), ("batch_size", "2"), ("max_length", "96"), ("save_steps", "0")):
        page.fill(f"input[name={name}]", value)
    page.click("text=Start training")
    page.wait_for_url(re.compile(r"#/jobs\?id="))
    STARTED["train"] = page.url.split("id=")[1]
    page.wait_for_selector("#job-state")
    assert console.unexpected() == []


def test_the_protocol_runs_as_a_job_from_the_evaluate_page(admin, service_pool, tmp_path_factory):
    page, console = admin
    test = tmp_path_factory.mktemp("protocol") / "mixed.jsonl"
    items = [
        ("capitals", "What is the capital of Italy?", "Rome"),
        ("arithmetic", "What is 3 + 4?", "7"),
        ("sentiment", "Is the word 'happy' positive or negative?", "positive"),
    ]
    test.write_text(
        "".join(
            json.dumps({"id": str(i), "query": q, "response": r, "task": t}) + "\n"
            for i, (t, q, r) in enumerate(items)
        )
    )
    goto(page, "#/evaluate", "#protocol-title")
    page.fill("input[name=test_data]", str(test))
    page.fill("input[name=num_samples]", "3")
    page.fill("input[name=max_new_tokens]", "3")
    page.fill("input[name=top_k]", "2")
    page.click("text=Run as a job")
    page.wait_for_url(re.compile(r"#/evaluate\?id="))
    STARTED["protocol"] = page.url.split("id=")[1]
    assert console.unexpected() == []


def test_a_query_shows_its_retrieved_adapters_and_streamed_answers_side_by_side(admin, dash_engine):
    page, console = admin
    goto(page, "#/try", "#try-run")
    page.fill("textarea[name=input]", "What is the capital of Japan?")
    page.select_option("select[name=method]", "mixture")
    page.fill("input[name=top_k]", "2")
    page.fill("input[name=max_tokens]", "6")
    page.check("input[name=compare]")
    page.select_option("select[name=method_b]", "fusion")
    pool_before = len(dash_engine.pool)
    page.click("#try-run")
    page.wait_for_selector("#retrieved table tbody tr")
    retrieved = page.locator("#retrieved tbody td.name").all_inner_texts()
    assert retrieved[0] == "capitals" and len(retrieved) == 2
    # a bar for every adapter: 3, or 4 once the training job started above registers its adapter, which can
    # happen between the query and this line (a fresh-clone CI run saw the page draw 3 and the pool hold 4)
    assert pool_before <= page.locator("#similarities svg rect").count() <= len(dash_engine.pool)
    for method in ("mixture", "fusion"):
        answer = page.locator(f".answer[data-method={method}]")
        page.wait_for_selector(f".answer[data-method={method}]:not(.streaming)")
        assert answer.inner_text().strip(), method
        assert "adapters used: capitals" in page.locator(f".answer-panel[data-method={method}]").inner_text()
    shoot(page, "try")
    assert console.unexpected() == []


def test_a_merge_registers_a_new_adapter(admin, dash_engine):
    page, console = admin
    goto(page, "#/merge", "#merge-picker")
    page.fill("input[name=name]", "capitals_and_sums")
    page.select_option("select[name=method]", "cat")
    for name, weight in (("capitals", "0.6"), ("arithmetic", "0.4")):
        row = page.locator(f".pick[data-name={name}]")
        row.locator("input[type=checkbox]").check()
        row.locator("input[type=number]").fill(weight)
    page.click("text=Merge and register")
    page.wait_for_selector("#merge-result")
    shoot(page, "merge")
    page.click("#merge-result")
    page.wait_for_selector("tr[data-name=capitals_and_sums].selected")
    assert "cat merge of capitals, arithmetic" in page.inner_text("tr[data-name=capitals_and_sums]")
    assert "capitals_and_sums" in dash_engine.pool
    assert page.locator("svg circle").count() == len(dash_engine.pool)
    assert console.unexpected() == []


def test_a_read_only_key_sees_no_admin_controls(chromium, dash_server, keys):
    page, console = open_page(chromium, f"{dash_server.url}/ui/#/pool", keys["read"])
    page.wait_for_selector("#pool-table")
    assert "(read)" in page.inner_text("#who")
    assert page.locator("#nav a:visible").all_inner_texts() == ["Pool", "Try", "Jobs", "Evaluate"]
    assert page.locator("button:has-text('Delete')").count() == 0
    assert page.locator("text=Register an adapter").count() == 0
    goto(page, "#/jobs", "#jobs-title")
    if STARTED.get("train"):
        goto(page, f"#/jobs?id={STARTED['train']}", "#job-state")
    assert page.locator("#job-cancel").count() == 0
    goto(page, "#/evaluate", "#runs-title")
    assert page.locator("#protocol-title").count() == 0
    goto(page, "#/train", "text=needs an admin key")
    goto(page, "#/merge", "text=needs an admin key")
    assert console.unexpected() == []
    page.context.close()


def test_a_pool_of_200_adapters_renders_at_both_widths(chromium, big_server):
    page, console = open_page(chromium, f"{big_server.url}/ui/#/pool")  # an open server: no sign-in
    page.wait_for_selector("#pool-table")
    assert page.locator("#pool-table tbody tr").count() == 200
    assert page.locator("svg circle").count() == 200
    assert len(page.locator(".legend span").all_inner_texts()) == 8  # coloured by category
    assert not overflows(page)
    shoot(page, "pool-200")
    page.fill("#pool-filter", "category-3")
    assert page.locator("#pool-table tbody tr:visible").count() == 25
    page.fill("#pool-filter", "")
    page.set_viewport_size(NARROW)
    assert not overflows(page)
    shoot(page, "pool-200-narrow")
    goto(page, "#/try", "#try-run")
    page.fill("textarea[name=input]", "Is 'awful' a negative word?")
    page.click("#try-run")
    page.wait_for_selector(".answer[data-method=mixture]:not(.streaming)")
    assert page.locator("#similarities svg rect").count() == 200
    assert not overflows(page)
    assert console.unexpected() == []
    page.context.close()


def test_the_training_job_finishes_with_its_curve_and_its_adapter_in_the_pool(admin):
    page, console = admin
    assert "train" in STARTED, "the training test above did not start a job"
    goto(page, f"#/jobs?id={STARTED['train']}", "#job-state")
    page.wait_for_selector("#job-state:text-matches('succeeded|failed|cancelled')", timeout=JOB_TIMEOUT_MS)
    assert page.inner_text("#job-state") == "succeeded", page.inner_text("#job-detail")
    page.wait_for_selector("#job-curves svg polyline")  # train loss over 3 steps, from the event files
    assert page.locator("#job-curves svg circle").count() >= 2  # eval loss before and after
    shoot(page, "jobs")
    page.click("#job-adapter")
    page.wait_for_selector("tr[data-name=sums].selected")
    assert "q_proj" in page.inner_text("tr[data-name=sums]")
    shoot(page, "pool")
    assert console.unexpected() == []


def test_the_protocol_run_shows_its_table_and_plot(admin):
    page, console = admin
    assert "protocol" in STARTED, "the Evaluate test above did not start a job"
    goto(page, f"#/evaluate?id={STARTED['protocol']}", "#protocol-result")
    page.wait_for_selector("#protocol-table, #protocol-result .notice.error", timeout=JOB_TIMEOUT_MS)
    assert page.locator("#protocol-table").count() == 1, page.inner_text("#protocol-result")
    header = page.locator("#protocol-table thead th").all_inner_texts()
    assert header[1:] == ["base/iid", "selection/iid", "selection/ood", "mixture/iid", "mixture/ood"]
    assert page.locator("#protocol-table tbody tr").count() == 4  # 3 tasks + average
    assert page.locator("#protocol-result svg rect").count() >= 3
    shoot(page, "evaluate")
    assert console.unexpected() == []
