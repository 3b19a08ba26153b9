"""Two real browsers on a real daphne: a customer in the widget, an agent in the workspace.

The customer asks; the agent sees the reply appear in the queue without reloading,
rates it with the keyboard, corrects it, takes the conversation over; the customer's
widget shows the agent's name and message without reloading, with typing shown both
ways; the agent hands back and the bot answers the customer's next question.
"""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conversations.models import Conversation, Message, Review, TrainingCandidate
from finetune.models import ModelVersion
from supportbot.roles import SUPPORT_AGENTS
from tests.factories import ModelVersionFactory, staff_user

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser, pytest.mark.slow]

WAIT_S = 60  # generous: two browsers, daphne and a model share two cores with other work
HOST_PAGE = """<!doctype html><html><head><title>Shop</title></head>
<body><h1>A shop</h1><script src="{base}/static/supportbot/widget.js" defer></script></body></html>"""
CORRECTION = "Your order left our warehouse today; the tracking link is in your account."


@pytest.fixture
def site(daphne_factory, tiny_model_dir):
    """The SupportBot server (every reply sampled for review) and a shop page on another origin with the widget."""
    ModelVersionFactory(
        status=ModelVersion.Status.ACTIVE, merged_path=str(tiny_model_dir), adapter_path=str(tiny_model_dir)
    )
    agent = staff_user(SUPPORT_AGENTS, "sam", first_name="Sam")
    agent.set_password("sam-password-1")
    agent.save()
    base = daphne_factory(
        SUPPORTBOT_REVIEW_SAMPLE_SHARE="1",
        SUPPORTBOT_DOUBLE_REVIEW_SHARE="0",
        SUPPORTBOT_REVIEW_LOGPROB_THRESHOLD="-1000",
        SUPPORTBOT_HANDOFF_LOGPROB_THRESHOLD="-1000",
        SUPPORTBOT_RATE_LIMIT="50",
    )
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
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield base, f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()


def wait(driver, condition, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout).until(condition)


def open_widget(driver, shop: str):
    driver.get(shop)
    host = wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "[data-supportbot-widget]"))
    shadow = host.shadow_root
    shadow.find_element(By.CSS_SELECTOR, "button.bubble").click()
    driver.switch_to.frame(wait(driver, lambda d: shadow.find_element(By.CSS_SELECTOR, "iframe")))
    wait(driver, lambda d: d.find_element(By.ID, "sb-conn").get_attribute("hidden") is not None)
    driver.execute_script("window.__sameDocument = true;")  # gone if the panel ever reloads


def press(driver, *keys):
    ActionChains(driver).send_keys(*keys).perform()


def ctrl(driver, key):
    ActionChains(driver).key_down(Keys.CONTROL).send_keys(key).key_up(Keys.CONTROL).perform()


def live(driver):
    wait(driver, lambda d: d.execute_script("return document.documentElement.dataset.wsLive") == "open")


def test_a_customer_and_an_agent_in_two_browsers(chromium_factory, site):
    base, shop = site
    customer, agent = chromium_factory(), chromium_factory()

    # The agent signs in and watches the random-sample queue.
    agent.get(f"{base}/admin/login/?next=/agent/%3Fsource%3Dsample")
    agent.find_element(By.NAME, "username").send_keys("sam")
    agent.find_element(By.NAME, "password").send_keys("sam-password-1", Keys.ENTER)
    wait(agent, lambda d: d.find_elements(By.ID, "ws-queue"))
    live(agent)
    agent.execute_script("window.__sameDocument = true;")

    # The customer asks in the widget; the bot answers.
    open_widget(customer, shop)
    customer.find_element(By.ID, "sb-input").send_keys("Where is my order?", Keys.ENTER)
    asked_at = time.monotonic()
    reply = wait(customer, lambda d: d.find_element(By.CSS_SELECTOR, '.sb-msg--bot[data-status="complete"]'))
    bot_text = reply.find_element(By.CSS_SELECTOR, ".sb-body").text.strip()
    assert bot_text

    # The reply appears in the agent's queue live, without a reload.
    row = wait(agent, lambda d: d.find_element(By.CSS_SELECTOR, 'tr.ws-row[data-source="sample"]'))
    assert "Where is my order?" in row.text
    assert agent.execute_script("return window.__sameDocument") is True

    # Keyboard only: select it, open it, rate it bad with a 2, write a correction, submit and go on.
    press(agent, "j")
    press(agent, Keys.ENTER)
    wait(agent, lambda d: d.find_elements(By.ID, "ws-review-form"))
    wait(agent, lambda d: d.find_element(By.ID, "ws-claim").get_attribute("data-held") == "me")
    press(agent, "b", "2", "c")
    correction = agent.find_element(By.ID, "ws-correction")
    assert agent.switch_to.active_element == correction
    assert correction.get_attribute("value") == agent.find_element(By.ID, "ws-reply").text  # starts from the bot's
    ctrl(agent, "a")
    press(agent, CORRECTION)
    diff = agent.find_element(By.ID, "ws-diff")
    assert diff.is_displayed()
    assert diff.find_elements(By.TAG_NAME, "ins")
    press(agent, Keys.ESCAPE)
    assert agent.switch_to.active_element != correction
    # Shortcuts are off while typing: "g" in the note is text, not "good".
    agent.find_element(By.ID, "ws-note").send_keys("g")
    assert agent.find_element(By.ID, "ws-bad").is_selected()
    assert agent.find_element(By.ID, "ws-score-2").is_selected()
    ctrl(agent, Keys.ENTER)
    wait(agent, lambda d: "Review submitted." in d.find_element(By.TAG_NAME, "body").text)

    saved = Review.objects.get()
    assert (saved.good, saved.rating, saved.corrected_body, saved.comment) == (False, 2, CORRECTION, "g")
    assert saved.reviewer.username == "sam"
    assert TrainingCandidate.objects.get().text == CORRECTION

    # The agent opens the conversation and takes it over with "t".
    conversation = Conversation.objects.get()
    agent.get(f"{base}/agent/conversations/{conversation.pk}/")
    live(agent)
    press(agent, "t")
    wait(agent, lambda d: d.find_element(By.ID, "ws-status").get_attribute("data-status") == "with_agent")
    banner = customer.find_element(By.ID, "sb-banner")
    wait(customer, lambda d: banner.is_displayed() and "Sam from the support team" in banner.text)

    # Typing shows both ways.
    # The widget sends "typing" at most every 3 s (chat.js TYPING_EVERY_MS) and the server
    # relays it at most every 2 s: on a fast run the question above was typed less than 3 s
    # ago, and "Hello" would (rightly) send no new "typing".
    time.sleep(max(0.0, 3.2 - (time.monotonic() - asked_at)))
    customer.find_element(By.ID, "sb-input").send_keys("Hello")
    wait(agent, lambda d: d.find_element(By.ID, "ws-typing").is_displayed())
    assert "customer is typing" in agent.find_element(By.ID, "ws-typing").text
    compose = agent.find_element(By.ID, "ws-compose")
    compose.send_keys("Hi, Sam here.")
    wait(customer, lambda d: d.find_element(By.ID, "sb-typing").is_displayed())
    assert customer.find_element(By.ID, "sb-typing-text").text == "Sam is typing…"

    # The agent's message reaches the customer's widget live, with the agent's name.
    compose.send_keys(" Your parcel is on its way.", Keys.ENTER)
    message = wait(customer, lambda d: d.find_element(By.CSS_SELECTOR, ".sb-msg--agent"))
    assert message.find_element(By.CSS_SELECTOR, ".sb-body").text == "Hi, Sam here. Your parcel is on its way."
    assert message.find_element(By.CSS_SELECTOR, ".sb-author").text == "Sam · Support team"
    assert customer.execute_script("return window.__sameDocument") is True
    assert Message.objects.filter(role="bot").count() == 1  # the bot stayed quiet

    # Handed back, the bot answers the customer's next question.
    agent.find_element(By.ID, "ws-handback").click()
    wait(agent, lambda d: d.find_element(By.ID, "ws-status").get_attribute("data-status") == "bot")
    wait(customer, lambda d: not d.find_element(By.ID, "sb-banner").is_displayed())
    box = customer.find_element(By.ID, "sb-input")
    box.clear()
    box.send_keys("How do I reset my password?", Keys.ENTER)
    wait(customer, lambda d: len(d.find_elements(By.CSS_SELECTOR, '.sb-msg--bot[data-status="complete"]')) == 2)
    # ...and the agent watching sees that answer arrive too.
    wait(agent, lambda d: len(d.find_elements(By.CSS_SELECTOR, '.ws-m--bot[data-status="complete"]')) == 2)
    assert customer.execute_script("return window.__sameDocument") is True
