"""The widget in a real browser, on a page of another site: ask, watch the reply stream, reload, see history.

Also: a reply the model writes with a template slot reaches the widget with the
company's phone from the bot profile, and no slot is ever on screen while it streams.

The host page is served from http://localhost:<port>, the chat from
http://127.0.0.1:<port>: two different sites, as for a customer's shop embedding
the widget, so the chat panel is a cross-site iframe without cookies.
"""

from __future__ import annotations

import contextlib
import http.server
import threading

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conversations.models import BotProfile, Message
from conversations.selectors import system_prompt_for
from finetune.ml.tiny import build_tiny_causal_lm
from finetune.models import ModelVersion
from tests.conversations.conftest import LOW_CONFIDENCE_OFF
from tests.factories import ModelVersionFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.slow]

HOST_PAGE = """<!doctype html>
<html><head><title>Shop</title>
<style>button, p, li { color: red !important; font-size: 40px !important; }</style></head>
<body><h1>A shop that is not SupportBot</h1>
<script src="{base}/static/supportbot/widget.js" defer data-segment="pro"></script>
</body></html>"""


@contextlib.contextmanager
def shop_serving(base: str):
    """A page of another site (http://localhost:<port>/) that embeds the widget from ``base``."""
    body = HOST_PAGE.replace("{base}", base).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()


@pytest.fixture
def host_page(daphne_factory, tiny_model_dir):
    ModelVersionFactory(
        status=ModelVersion.Status.ACTIVE, merged_path=str(tiny_model_dir), adapter_path=str(tiny_model_dir)
    )
    base = daphne_factory(SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD=str(LOW_CONFIDENCE_OFF))
    with shop_serving(base) as shop:
        yield shop, base


def console_problems(driver) -> list[str]:
    """Warnings and errors the page's frames logged to the console since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] in {"WARNING", "SEVERE"}]


def open_panel(driver):
    """Click the bubble (inside the widget's shadow root) and switch into the chat iframe."""
    driver.switch_to.default_content()
    wait = WebDriverWait(driver, 20)
    host = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-supportbot-widget]"))
    shadow = host.shadow_root
    bubble = shadow.find_element(By.CSS_SELECTOR, "button.bubble")
    bubble.click()
    assert bubble.get_attribute("aria-expanded") == "true"
    frame = wait.until(lambda d: shadow.find_element(By.CSS_SELECTOR, "iframe"))
    driver.switch_to.frame(frame)
    # Connected: the connection notice is gone and the conversation frame arrived.
    wait.until(lambda d: d.find_element(By.ID, "sb-conn").get_attribute("hidden") is not None)
    return shadow, bubble


def test_ask_watch_the_stream_reload_and_see_the_history(chromium, host_page):
    driver = chromium
    shop, base = host_page
    driver.get(shop)
    shadow, bubble = open_panel(driver)

    # The host page's !important styles do not reach the widget.
    driver.switch_to.default_content()
    assert bubble.value_of_css_property("color") == "rgba(255, 255, 255, 1)"
    driver.switch_to.frame(shadow.find_element(By.CSS_SELECTOR, "iframe"))

    # Record the bot reply's length at every DOM change, to see it grow token by token.
    driver.execute_script(
        """
        window.__lengths = [];
        new MutationObserver(() => {
          const bot = document.querySelector('.sb-msg--bot .sb-body');
          if (bot) window.__lengths.push(bot.textContent.length);
        }).observe(document.getElementById('sb-log'), {subtree: true, childList: true, characterData: true});
        window.__typingShown = false;
        const typing = document.getElementById('sb-typing');
        new MutationObserver(() => { if (!typing.hidden) window.__typingShown = true; })
          .observe(typing, {attributes: true});
        """
    )
    box = driver.find_element(By.ID, "sb-input")
    assert driver.switch_to.active_element == box  # the panel focuses the input when opened
    box.send_keys("Where is my order?", Keys.ENTER)

    wait = WebDriverWait(driver, 30)
    reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '.sb-msg--bot[data-status="complete"]'))
    text = reply.find_element(By.CSS_SELECTOR, ".sb-body").text
    assert text.strip()
    lengths = driver.execute_script("return window.__lengths")
    assert len(set(lengths)) >= 3, lengths  # it grew in steps, not all at once
    assert driver.execute_script("return window.__typingShown") is True  # "typing…" while waiting
    assert not driver.find_element(By.ID, "sb-typing").is_displayed()
    assert reply.find_element(By.CSS_SELECTOR, ".sb-csat").text.startswith("Was this helpful?")
    assert driver.find_element(By.ID, "sb-log").get_attribute("aria-live") == "polite"
    customer = driver.find_element(By.CSS_SELECTOR, ".sb-msg--customer .sb-body").text
    assert customer == "Where is my order?"
    # Opening the panel posts to the iframe only once it has loaded: no target-origin warnings.
    assert console_problems(driver) == []

    # Was this helpful? No, then Yes. The buttons stay the same elements (the server's
    # echo of each answer updates them in place), so keyboard focus is never lost.
    yes = reply.find_element(By.XPATH, ".//button[text()='Yes']")
    no = reply.find_element(By.XPATH, ".//button[text()='No']")
    no.click()
    wait.until(lambda d: (no.get_attribute("aria-pressed"), yes.get_attribute("aria-pressed")) == ("true", "false"))
    # Every drawing of the buttons sets aria-pressed, even to the value it had: count them.
    driver.execute_script(
        """
        window.__yesDrawn = 0;
        new MutationObserver((records) => { window.__yesDrawn += records.length; })
          .observe(arguments[0], {attributes: true, attributeFilter: ['aria-pressed']});
        """,
        yes,
    )
    yes.click()
    # The server records the answer (a later answer replaces the earlier one)...
    reply_id = int(reply.get_attribute("data-id"))
    wait.until(lambda d: Message.objects.get(pk=reply_id).helpful is True)
    # ...and its echo redraws the buttons: drawn on the click, then again when the echo arrives
    # (a late echo of "No", or a late reply_done redrawing from local state, can come in between;
    # counting draws alone once let this pass before the server had the answer).
    wait.until(
        lambda d: d.execute_script("return window.__yesDrawn") >= 2 and yes.get_attribute("aria-pressed") == "true"
    )
    assert no.get_attribute("aria-pressed") == "false"
    assert driver.switch_to.active_element == yes

    # Reload the shop page: the cross-site iframe has no cookie, its stored token brings the history back.
    driver.switch_to.default_content()
    driver.refresh()
    open_panel(driver)
    history = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.sb-msg--bot[data-status="complete"]'))
    assert history[0].find_element(By.CSS_SELECTOR, ".sb-body").text == text
    assert driver.find_element(By.CSS_SELECTOR, ".sb-msg--customer .sb-body").text == "Where is my order?"
    assert history[0].find_element(By.XPATH, ".//button[text()='Yes']").get_attribute("aria-pressed") == "true"

    # Escape closes the panel and gives focus back to the bubble.
    driver.find_element(By.ID, "sb-input").send_keys(Keys.ESCAPE)
    driver.switch_to.default_content()
    WebDriverWait(driver, 5).until(lambda d: bubble_of(d).get_attribute("aria-expanded") == "false")

    # Phone width: the open panel fits the screen.
    driver.set_window_size(390, 844)
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return window.innerWidth") <= 390)
    bubble_of(driver).click()
    panel = driver.find_element(By.CSS_SELECTOR, "[data-supportbot-widget]").shadow_root.find_element(
        By.CSS_SELECTOR, ".panel"
    )
    width = driver.execute_script("return window.innerWidth")
    assert 0 < panel.rect["width"] <= width

    # The full-page chat on SupportBot's own site works the same way.
    driver.get(f"{base}/chat/")
    wait.until(lambda d: d.find_element(By.ID, "sb-conn").get_attribute("hidden") is not None)
    driver.find_element(By.ID, "sb-input").send_keys("Hello", Keys.ENTER)
    page_reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '.sb-msg--bot[data-status="complete"]'))
    assert page_reply.find_element(By.CSS_SELECTOR, ".sb-body").text.strip()


def bubble_of(driver):
    host = driver.find_element(By.CSS_SELECTOR, "[data-supportbot-widget]")
    return host.shadow_root.find_element(By.CSS_SELECTOR, "button.bubble")


def test_a_server_that_does_not_answer_to_its_host_says_so_in_the_panel(chromium, daphne_factory):
    """The widget is embedded from http://127.0.0.1:<port>, but the server only answers to "localhost"."""
    driver = chromium
    base = daphne_factory(DJANGO_ALLOWED_HOSTS="localhost", DJANGO_DEBUG="1")
    with shop_serving(base) as shop:
        driver.get(shop)
        host = WebDriverWait(driver, 20).until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-supportbot-widget]"))
        shadow = host.shadow_root
        shadow.find_element(By.CSS_SELECTOR, "button.bubble").click()
        driver.switch_to.frame(shadow.find_element(By.CSS_SELECTOR, "iframe"))
        line = WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "sb-unavailable"))
        # One line for the customer, not Django's DisallowedHost debug page.
        assert line.text == "Chat unavailable: this chat server is not set up to answer at 127.0.0.1."
        assert "DisallowedHost" not in driver.page_source
        # The fix, for whoever embeds the widget, in the browser console...
        logged = " ".join(console_problems(driver))
        assert "DJANGO_ALLOWED_HOSTS" in logged
        assert "127.0.0.1" in logged
    # ...and in the server's log.
    log = daphne_factory.processes[base].log_path.read_text()
    assert "not in DJANGO_ALLOWED_HOSTS" in log
    assert "Traceback" not in log


PHONE = "0800 555 0199"
SLOT_REPLY = "Please call our support line at {{Customer Support Phone Number}} and we will find your order right away."


@pytest.fixture(scope="session")
def slot_model_dir(tmp_path_factory):
    """A tiny chat model trained to answer with a template slot, as Bitext-trained models do."""
    system = system_prompt_for(BotProfile())
    corpus = [f"System: {system}\nCustomer: Where is my order?\nAgent: {SLOT_REPLY}"] * 2
    return build_tiny_causal_lm(tmp_path_factory.mktemp("slot-model"), corpus, overfit_steps=150)


def test_a_reply_with_a_template_slot_reaches_the_widget_with_the_company_phone(
    chromium, daphne_factory, slot_model_dir
):
    BotProfile.objects.create(company_name="Acme", support_phone=PHONE)
    ModelVersionFactory(
        status=ModelVersion.Status.ACTIVE, merged_path=str(slot_model_dir), adapter_path=str(slot_model_dir)
    )
    base = daphne_factory(SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD=str(LOW_CONFIDENCE_OFF))
    driver = chromium
    with shop_serving(base) as shop:
        driver.get(shop)
        open_panel(driver)
        # Everything the reply ever showed while it streamed.
        driver.execute_script(
            """
            window.__shown = [];
            new MutationObserver(() => {
              const bot = document.querySelector('.sb-msg--bot .sb-body');
              if (bot) window.__shown.push(bot.textContent);
            }).observe(document.getElementById('sb-log'), {subtree: true, childList: true, characterData: true});
            """
        )
        driver.find_element(By.ID, "sb-input").send_keys("Where is my order?", Keys.ENTER)
        reply = WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.CSS_SELECTOR, '.sb-msg--bot[data-status="complete"]')
        )
        text = reply.find_element(By.CSS_SELECTOR, ".sb-body").text
        shown = driver.execute_script("return window.__shown")
    assert text == SLOT_REPLY.replace("{{Customer Support Phone Number}}", PHONE)
    assert len(set(shown)) >= 3  # streamed in pieces
    assert not [s for s in shown if "{" in s or "}" in s]  # no slot, not even half of one, was ever on screen
    saved = Message.objects.get(pk=int(reply.get_attribute("data-id")))
    assert saved.body == text
