"""The web page at ``/`` of the server, in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by selenium): real models answer a prompt typed into the page, and the page shows who wrote each token,
where the ensemble overrode the drafter (with the candidates on hover), a branching answer's samples, and works
behind ``--api-key``. The screenshots under results/web/ are this test's own output.

Skipped only where Chromium or its driver is not installed (.ci/run installs both); selenium comes with the
``web-test`` extra (scripts/test installs it), so its absence fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("uvicorn")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.real, pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver; .ci/run installs them)")]

from edge_ensemble.api import Ensemble, EnsembleConfig  # noqa: E402
from edge_ensemble.server import ServerOptions, create_app  # noqa: E402
from test_server import Running  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "web"
MODEL = "tiny"
KEY = "page-key-123"
# every-token on the tiny preset (Qwen2.5-Coder-0.5B drafting, SmolLM2-135M): SmolLM2 overrides several tokens here
PROMPT = "In one sentence: why is the sky blue?"
TOKENS = 24


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[web-test]' (scripts/test does)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900",
                "--disable-gpu", "--no-first-run"):  # --no-sandbox: CI runs as root
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def tiny(real_models, llama_quiet) -> Iterator[Ensemble]:
    paths = [real_models("qwen2.5-coder-0.5b-instruct"), real_models("smollm2-135m-instruct")]
    with Ensemble(paths, config=EnsembleConfig(n_ctx=1024, n_threads=2, check_memory=False)) as ens:
        yield ens


def wait(driver: Any, condition: Any, seconds: float = 120) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(condition)


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), 30)


def ask(driver: Any, prompt: str, *, policy: str | None = None, options: str = "", max_tokens: int = TOKENS,
        temperature: float = 0.0) -> Any:
    """Type ``prompt`` into the page with these settings, send it, and return the finished answer's element."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    if policy is not None:
        Select(driver.find_element(By.ID, "policy")).select_by_value(policy)
    for field, value in (("options", options), ("max-tokens", str(max_tokens)), ("temperature", str(temperature))):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(prompt, Keys.ENTER)
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > before, 10)
    msg = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    wait(driver, lambda d: msg.get_attribute("data-state") != "streaming")
    assert msg.get_attribute("data-state") == "done", msg.text
    return msg


def tokens(msg: Any) -> list[dict[str, Any]]:
    from selenium.webdriver.common.by import By

    return [{"text": s.get_attribute("textContent"), "member": s.get_attribute("data-member"),
             "kind": s.get_attribute("data-kind"), "override": s.get_attribute("data-override") == "1"}
            for s in msg.find_elements(By.CSS_SELECTOR, ".answer .tok")]


def test_the_page_colours_each_token_by_its_member_and_marks_the_overrides(browser, tiny):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    names = [m.name for m in tiny.members]
    running = Running(create_app(tiny, ServerOptions(model_id=MODEL)))
    try:
        open_page(browser, running.url)
        legend = [c.get_attribute("data-member") for c in browser.find_elements(By.CSS_SELECTOR, "#legend .chip")]
        assert legend == names
        policies = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#policy option")]
        assert {"every-token", "safe", "single"} <= set(policies)

        # every-token: every token is the ensemble's; those where it overrode the drafter are outlined
        msg = ask(browser, PROMPT, policy="every-token")
        got = tokens(msg)
        want = tiny.generate(messages=[{"role": "user", "content": PROMPT}], policy="every-token", max_tokens=TOKENS)
        assert "".join(t["text"] for t in got) == want.text  # the page's tokens are the answer, exactly
        assert msg.find_element(By.CSS_SELECTOR, ".answer").get_attribute("textContent") == want.text
        assert {t["member"] for t in got} <= set(names) and all(t["kind"] == "ensemble" for t in got)
        overrides = [t for t in got if t["override"]]
        assert len(overrides) == want.stats.overridden_tokens > 0
        figures = msg.find_element(By.CSS_SELECTOR, ".figures").text
        assert f"{want.stats.tokens} tokens" in figures and f"{want.stats.overridden_tokens} overridden" in figures
        outlined = msg.find_elements(By.CSS_SELECTOR, ".tok.override")[0]
        ActionChains(browser).move_to_element(outlined).perform()
        tip = browser.find_element(By.ID, "tip")
        wait(browser, lambda d: tip.is_displayed(), 5)
        assert "the drafter proposed" in tip.text and outlined.get_attribute("data-member") in tip.text

        # SAFE (a policy that scores its tokens): every token carries its candidates with their probabilities
        browser.find_element(By.ID, "clear").click()  # a new chat: the same question alone, as the API is asked
        msg = ask(browser, PROMPT, policy="safe")
        got = tokens(msg)
        want = tiny.generate(messages=[{"role": "user", "content": PROMPT}], policy="safe", max_tokens=TOKENS)
        assert "".join(t["text"] for t in got) == want.text and {t["member"] for t in got} <= set(names)
        assert any(t["member"] == names[0] and t["kind"] == "draft" for t in got)
        assert sum(t["override"] for t in got) == want.stats.overridden_tokens
        assert "policy safe" in msg.find_element(By.CSS_SELECTOR, ".figures").text
        marked = msg.find_elements(By.CSS_SELECTOR, ".answer .tok.override") or msg.find_elements(
            By.CSS_SELECTOR, ".answer .tok.has-tip")
        ActionChains(browser).move_to_element(marked[0]).perform()
        wait(browser, lambda d: tip.is_displayed() and "candidates as" in tip.text, 5)
        assert "%" in tip.text
        RESULTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(RESULTS / "page.png"))
        assert running.health()["running"] == 0
    finally:
        running.stop()


def branch_table(msg: Any, rows: int, columns: set[str]) -> str:
    """Check a branching answer's table (``rows`` samples, exactly one chosen, at least ``columns``; the chosen
    row's text is the answer shown) and return the chosen text."""
    from selenium.webdriver.common.by import By

    found = msg.find_elements(By.CSS_SELECTOR, "table.branches tr.branch")
    assert len(found) == rows
    assert [r.get_attribute("data-chosen") for r in found].count("1") == 1
    heads = [th.text for th in msg.find_elements(By.CSS_SELECTOR, "table.branches th")]
    assert columns <= set(heads)
    chosen = msg.find_element(By.CSS_SELECTOR, "table.branches tr.chosen td.text").get_attribute("title")
    assert chosen == msg.find_element(By.CSS_SELECTOR, ".answer").get_attribute("textContent")
    return chosen


def test_a_branching_answer_shows_its_samples(browser, real_models, llama_quiet):
    from selenium.webdriver.common.by import By

    config = EnsembleConfig(n_ctx=1024, n_threads=2, check_memory=False, policy="eager", max_branches=3)
    with Ensemble([real_models("smollm2-135m-instruct")], config=config) as ens:
        running = Running(create_app(ens, ServerOptions(model_id=MODEL, seed=7)))
        try:
            open_page(browser, running.url)
            msg = ask(browser, "Pick a number from 1 to 10 and say it.", policy="eager", temperature=0.9,
                      options=json.dumps({"initial_branches": 3, "threshold": "off"}), max_tokens=12)
            branch_table(msg, 3, {"index", "chosen", "answer", "votes", "mean_logprob", "text"})
            assert "3 branches" in msg.find_element(By.CSS_SELECTOR, ".figures").text
            browser.execute_script("arguments[0].scrollIntoView()", msg)
            browser.save_screenshot(str(RESULTS / "branches.png"))
        finally:
            running.stop()


def test_the_page_asks_for_the_api_key_once_and_keeps_it_in_the_tab(browser, tiny):
    from selenium.webdriver.common.by import By

    running = Running(create_app(tiny, ServerOptions(model_id=MODEL, api_key=KEY)))
    try:
        browser.get(running.url + "/")  # the page itself needs no key; its first API call does
        form = browser.find_element(By.ID, "key-form")
        wait(browser, lambda d: form.is_displayed(), 10)
        box = browser.find_element(By.ID, "api-key")
        box.send_keys("wrong-key\n")
        wait(browser, lambda d: "refused" in d.find_element(By.ID, "key-error").text, 10)
        box.send_keys(KEY + "\n")
        wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), 10)
        assert browser.execute_script("return sessionStorage.getItem('edge-ensemble-api-key')") == KEY
        assert browser.execute_script("return localStorage.length") == 0
        msg = ask(browser, "Say hi.", policy="safe", max_tokens=6)
        assert tokens(msg) and not form.is_displayed()
        browser.refresh()  # the same tab: the key is kept, not asked again
        wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), 10)
        assert not browser.find_element(By.ID, "key-form").is_displayed()
    finally:
        browser.execute_script("sessionStorage.clear()")
        running.stop()


def test_a_voting_answer_shows_its_samples_with_member_answer_confidence_and_votes(browser, real_models, llama_quiet):

    config = EnsembleConfig(n_ctx=2048, n_threads=2, check_memory=False, policy="vote", window=2)
    with Ensemble([real_models("smollm2-135m-instruct")], config=config) as ens:
        running = Running(create_app(ens, ServerOptions(model_id=MODEL, seed=3)))
        try:
            open_page(browser, running.url)
            options = {"vote_gate": "never", "max_samples": 5, "answer": "number", "stopping": "none"}
            msg = ask(browser, "What is 12 + 30? Answer with the number.", policy="vote",
                      options=json.dumps(options), max_tokens=24)
            # the first answer and two windows of two samples
            chosen = branch_table(msg, 5, {"member", "answer", "confidence", "votes", "chosen", "origin"})
            want = ens.generate(messages=[{"role": "user", "content": "What is 12 + 30? Answer with the number."}],
                                max_tokens=24, seed=3, **options)
            assert chosen == want.text  # the page shows the answer the API makes with the same seed
            browser.execute_script("arguments[0].scrollIntoView()", msg)
            browser.save_screenshot(str(RESULTS / "vote.png"))
        finally:
            running.stop()
