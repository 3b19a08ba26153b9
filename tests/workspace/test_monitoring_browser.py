"""The bias-monitoring dashboard in a real headless Chromium on a real daphne: its charts render.

An agent signs in, opens /agent/monitoring/, and the bar chart of the chosen measure
by segment and version is drawn (SVG bars with interval whiskers, the alerting segment
outlined), redrawn for another measure, and the weekly trend is drawn; the page loads
no code from elsewhere and logs no error.
"""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from supportbot.roles import SUPPORT_AGENTS
from tests.factories import ModelVersionFactory, staff_user
from tests.workspace.test_monitoring import outcomes

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.slow]

WAIT_S = 60  # generous: the browser and daphne share two loaded cores


def wait(driver, condition, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout).until(condition)


def test_the_dashboard_draws_its_charts(daphne_factory, chromium):
    agent = staff_user(SUPPORT_AGENTS, "sam", first_name="Sam")
    agent.set_password("sam-password-1")
    agent.save()
    v1, v2 = ModelVersionFactory(number=1), ModelVersionFactory(number=2)
    outcomes(v1, 100, register="colloquial", bad=40)
    outcomes(v1, 100, register="plain", bad=10)
    outcomes(v2, 60, register="colloquial", bad=6)
    outcomes(v2, 60, register="plain", bad=6)
    outcomes(v2, 8, register="typos", bad=1)
    base = daphne_factory()
    chromium.get(f"{base}/admin/login/?next=/agent/monitoring/")
    chromium.find_element(By.NAME, "username").send_keys("sam")
    chromium.find_element(By.NAME, "password").send_keys("sam-password-1", Keys.ENTER)
    wait(chromium, lambda d: d.find_elements(By.CSS_SELECTOR, "#mon-chart svg rect.mon-bar"))

    bars = chromium.find_elements(By.CSS_SELECTOR, "#mon-chart svg rect.mon-bar")
    drawn = {(b.get_attribute("data-segment"), b.get_attribute("data-version")) for b in bars}
    assert {("colloquial", "v1"), ("plain", "v1"), ("colloquial", "v2"), ("typos", "v2")} <= drawn
    heights = {
        (b.get_attribute("data-segment"), b.get_attribute("data-version")): float(b.get_attribute("height"))
        for b in bars
    }
    assert heights[("colloquial", "v1")] > 3 * heights[("plain", "v1")]  # 40% against 10%
    alerting = chromium.find_elements(By.CSS_SELECTOR, "#mon-chart rect.mon-bar-alert")
    assert [(b.get_attribute("data-segment"), b.get_attribute("data-version")) for b in alerting] == [
        ("colloquial", "v1")
    ]
    small = chromium.find_elements(By.CSS_SELECTOR, "#mon-chart rect.mon-bar-small")
    assert [b.get_attribute("data-segment") for b in small] == ["typos"]  # 8 replies: pale, still drawn
    assert chromium.find_elements(By.CSS_SELECTOR, "#mon-chart line.mon-whisker")
    assert chromium.find_element(By.CSS_SELECTOR, "#mon-chart svg").size["height"] > 100

    Select(chromium.find_element(By.ID, "mon-metric")).select_by_value("score")
    wait(chromium, lambda d: d.find_element(By.CSS_SELECTOR, "#mon-chart svg").get_attribute("data-metric") == "score")
    assert chromium.find_elements(By.CSS_SELECTOR, "#mon-chart rect.mon-bar")

    lines = chromium.find_elements(By.CSS_SELECTOR, "#mon-trend polyline.mon-trend-line")
    assert {line.get_attribute("data-version") for line in lines} == {"v1", "v2"}

    scripts = chromium.execute_script(
        "return Array.from(document.querySelectorAll('script[src],link[href]'))"
        ".map(e => e.src || e.href).filter(u => !u.startsWith(location.origin));"
    )
    assert scripts == []
    errors = [
        entry
        for entry in chromium.get_log("browser")
        if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]  # the site has none
    ]
    assert errors == []
