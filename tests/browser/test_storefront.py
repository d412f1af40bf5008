"""The demo storefront and playground as a shopper and a merchandiser use them: headless chromium
on the page a real gunicorn server (`recsys serve`, demo mode) answers from the demo snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from browser_helpers import serve_demo

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
K = 8  # the page's k


def _wait(browser, condition, timeout: float = 30.0, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(
        condition, message=f"timed out waiting for {what}"
    )


def _cards(browser):
    return browser.execute_script(
        "return [...document.querySelectorAll('#home .card')].map(c => ({"
        "id: c.dataset.itemId, rank: Number(c.dataset.rank),"
        "title: c.querySelector('.title').textContent,"
        "reasons: [...c.querySelectorAll('.reasons li')].map(li => li.textContent)}))"
    )


def _status(browser, box: str) -> str:
    return browser.execute_script(f"return document.getElementById('{box}').textContent")


def _open(browser, demo_server, query: str = "") -> None:
    browser.get(f"{demo_server.url}/demo{query}")
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    _wait(browser, lambda d: len(_cards(d)) > 0, what="the home surface")


def _submit(browser, form: str, **fields) -> None:
    for name, value in fields.items():
        browser.execute_script(
            "const e = document.getElementById(arguments[0]); e.value = arguments[1];",
            name,
            str(value),
        )
    browser.execute_script(f"document.getElementById('{form}').requestSubmit()")


def _tags_of(demo_server, ids: list[str]) -> dict[str, list[str]]:
    status, _, body = demo_server.call(
        "GET", "/demo/items?ids=" + ",".join(ids), token=demo_server.token()
    )
    assert status == 200
    return {i["item_id"]: i["tags"] for i in body["items"]}


@pytest.fixture
def clean_rules(demo_server):
    """The tenant's rules are empty before and after the test."""

    def reset():
        admin = demo_server.token("recommend", "admin")
        path = "/v1/admin/tenants/default/rules"
        status, headers, _ = demo_server.call("GET", path, token=admin)
        assert status == 200
        status, _, body = demo_server.call(
            "PUT", path, {"rules": []}, admin, {"If-Match": headers["ETag"]}
        )
        assert status == 200, body

    reset()
    yield
    reset()


def test_home_renders_k_items_with_titles_and_reasons(
    browser, demo_server, screenshot, clean_rules
):
    _open(browser, demo_server)
    cards = _cards(browser)
    assert len(cards) == K
    assert [c["rank"] for c in cards] == list(range(1, K + 1))
    # titles come from the catalogue (the demo data's "<Style> <category> #<n>"), not ids
    assert all(c["title"] and c["title"] != c["id"] and "#" in c["title"] for c in cards)
    assert all(c["reasons"] for c in cards)
    user = browser.execute_script("return window.recsysDemo.state.user")
    assert user, "a known user is picked first"
    # the same list the API gives that user
    status, _, answer = demo_server.call(
        "POST", "/v1/recommend", {"user": {"user_id": user}, "k": K}, demo_server.token()
    )
    assert status == 200
    assert [c["id"] for c in cards] == [i["item_id"] for i in answer["items"]]
    screenshot("storefront")

    # first render, from the browser's performance timeline: navigation start -> the home
    # surface rendered (server answers + rendering)
    timing = browser.execute_script(
        "const m = performance.getEntriesByName('recsys:home-rendered')[0];"
        "const nav = performance.getEntriesByType('navigation')[0];"
        "return {first_render_ms: m.startTime, dom_content_loaded_ms: nav.domContentLoadedEventEnd,"
        " last: window.recsysDemo.lastRender()}"
    )
    assert timing["first_render_ms"] > 0
    (ARTIFACTS / "first_render.json").write_text(json.dumps(timing, indent=2))
    print(f"\nfirst render: {json.dumps(timing)}")


def test_clicking_an_item_sends_an_event_the_api_returns(browser, demo_server, clean_rules):
    _open(browser, demo_server)
    first = _cards(browser)[0]["id"]
    browser.execute_script("document.querySelector('#home .card button.view').click()")
    event_id = _wait(
        browser,
        lambda d: d.execute_script(
            "const e = document.querySelector('#events li.event[data-event-type=click]');"
            "return e && e.dataset.eventId"
        ),
        what="the click event",
    )
    status, _, event = demo_server.call(
        "GET", f"/v1/recs/events/{event_id}", token=demo_server.token()
    )
    assert status == 200, event
    found = event.get("event", event)
    assert found["item_id"] == first and found["event_type"] == "click"
    # the item's similar items open beside it
    _wait(browser, lambda d: len(d.find_elements("css selector", "#similar .similar")) == 3)


def test_a_pin_appears_at_its_slot_and_a_block_removes_the_item(
    browser, demo_server, screenshot, clean_rules
):
    _open(browser, demo_server)
    shown = [c["id"] for c in _cards(browser)]
    status, _, catalogue = demo_server.call(
        "GET", "/demo/items?limit=200", token=demo_server.token()
    )
    assert status == 200
    outsider = next(
        i["item_id"]
        for i in catalogue["items"]
        if i["item_id"] not in shown and i.get("available", True)
    )
    _submit(browser, "pin-form", **{"pin-item": outsider, "pin-slot": 3})
    _wait(browser, lambda d: [c["id"] for c in _cards(d)][2:3] == [outsider], what="the pin")
    assert "saved" in _status(browser, "rules-status")

    victim = shown[0]
    _submit(browser, "block-form", **{"block-item": victim})
    _wait(browser, lambda d: victim not in [c["id"] for c in _cards(d)], what="the block")
    cards = [c["id"] for c in _cards(browser)]
    assert cards[2] == outsider and len(cards) == K
    screenshot("playground")

    # a diversity cap of 1 on the most frequent tag of the list that the pin does not carry
    # (so that the cap acts on ranked items; a pin counts toward the caps but is never removed
    # by them: tests/serving/test_serving_recommend.py)
    tags = _tags_of(demo_server, cards)
    pinned_tags = set(tags[outsider])
    top_tag = max(
        sorted({t for ts in tags.values() for t in ts} - pinned_tags),
        key=lambda t: sum(t in ts for ts in tags.values()),
    )
    assert sum(top_tag in ts for ts in tags.values()) > 1
    _submit(browser, "cap-form", **{"cap-tag": top_tag, "cap-n": 1})

    def capped(d):
        shown = [c["id"] for c in _cards(d)]
        return (
            len(shown) == K
            and sum(top_tag in t for t in _tags_of(demo_server, shown).values()) <= 1
        )

    _wait(browser, capped, what="the cap")

    # the why toggle: the trace lists the blocked candidate with its rule, and the pin
    browser.execute_script("document.getElementById('why').click()")
    _wait(browser, lambda d: d.find_elements("css selector", "#trace-table tr[data-item-id]"))
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#trace-table tr[data-item-id]')].map(r => ({"
        "id: r.dataset.itemId, outcome: r.dataset.outcome,"
        "rule: r.querySelector('.rule').textContent}))"
    )
    blocked = [r for r in rows if r["id"] == victim]
    assert blocked and blocked[0]["outcome"] == "excluded"
    assert blocked[0]["rule"].startswith("block:demo-block-")
    assert any(r["id"] == outsider and r["outcome"] == "pinned" for r in rows)
    excluded = [r for r in rows if r["outcome"] == "excluded"]
    assert all(r["rule"] for r in excluded)
    assert {r["rule"] for r in rows if r["outcome"] == "capped"} == {f"max_per_tag:{top_tag}"}
    # the explanation signals show on the cards
    assert browser.find_elements("css selector", "#home .card .signals")
    browser.execute_script("document.getElementById('trace').scrollIntoView()")
    screenshot("trace")
    browser.execute_script("document.getElementById('why').click()")
    _submit(browser, "cap-form", **{"cap-tag": top_tag, "cap-n": 0})


def test_burying_and_boosting_a_tag_reorders_the_list(browser, demo_server, clean_rules):
    _open(browser, demo_server)
    shown = [c["id"] for c in _cards(browser)]
    tags = _tags_of(demo_server, shown)
    # a tag of the first item that the second does not carry
    tag = next(t for t in tags[shown[0]] if t not in tags[shown[1]])
    browser.execute_script("document.getElementById('tag-kind').value = 'bury'")
    _submit(browser, "tag-form", **{"tag-name": tag, "tag-factor": 0.1})
    _wait(browser, lambda d: _cards(d)[0]["id"] != shown[0], what="the bury")
    # a boost of a tag no shown item carries, but a candidate below k does, brings it to the top
    user = browser.execute_script("return window.recsysDemo.state.user")
    body = {"user": {"user_id": user}, "k": K, "options": {"include_trace": True}}
    _, _, answer = demo_server.call("POST", "/v1/recommend", body, demo_server.token())
    below = [t["item_id"] for t in answer["trace"] if t["outcome"] == "below_k"]
    now = [c["id"] for c in _cards(browser)]
    carried = {t for ts in _tags_of(demo_server, now).values() for t in ts}
    boosted = next(
        t for ts in _tags_of(demo_server, below[:50]).values() for t in ts if t not in carried
    )
    browser.execute_script("document.getElementById('tag-kind').value = 'boost'")
    _submit(browser, "tag-form", **{"tag-name": boosted, "tag-factor": 50})

    def boosted_first(d):
        first = _cards(d)[0]["id"]
        return boosted in _tags_of(demo_server, [first])[first]

    _wait(browser, boosted_first, what="the boost")
    types = browser.execute_script(
        "return [...document.querySelectorAll('#rules li[data-rule-id]')]"
        ".map(li => li.dataset.ruleType)"
    )
    assert types == ["bury", "boost"]


def test_a_stale_edit_shows_the_409(browser, demo_server, clean_rules):
    _open(browser, demo_server)
    # another merchandiser saves first, behind the page's back
    admin = demo_server.token("recommend", "admin")
    path = "/v1/admin/tenants/default/rules"
    _, headers, _ = demo_server.call("GET", path, token=admin)
    rule = {"id": "other-merchandiser", "type": "bury", "tag": "style:basic", "factor": 0.5}
    status, _, _ = demo_server.call(
        "PUT", path, {"rules": [rule]}, admin, {"If-Match": headers["ETag"]}
    )
    assert status == 200
    first = _cards(browser)[0]["id"]
    _submit(browser, "block-form", **{"block-item": first})
    _wait(browser, lambda d: "409" in _status(d, "rules-status"), what="the 409 message")
    assert "Conflict" in _status(browser, "rules-status")
    # reloading the rules and trying again works
    browser.execute_script("document.getElementById('rules-reload').click()")
    _wait(browser, lambda d: d.find_elements("css selector", "#rules li[data-rule-id]"))
    _submit(browser, "block-form", **{"block-item": first})
    _wait(browser, lambda d: first not in [c["id"] for c in _cards(d)], what="the block")


def test_unknown_user_is_cold_start_with_the_warning(browser, demo_server, clean_rules):
    _open(browser, demo_server)
    browser.execute_script(
        "const s = document.getElementById('user'); s.value = 'u-not-a-customer';"
        "s.dispatchEvent(new Event('change'))"
    )
    _wait(browser, lambda d: "COLD_START" in _status(d, "home-status"), what="the warning")
    assert "unknown user" in _status(browser, "home-status")
    assert "warn" in browser.find_element("id", "home-status").get_attribute("class")
    assert len(_cards(browser)) == K  # served from the fallbacks


def test_anonymous_anchors_change_the_list(browser, demo_server, clean_rules):
    _open(browser, demo_server)
    browser.execute_script(
        "const s = document.getElementById('user'); s.value = '';"
        "s.dispatchEvent(new Event('change'))"
    )
    _wait(browser, lambda d: "anonymous user" in _status(d, "home-status"), what="cold start")
    before = [c["id"] for c in _cards(browser)]
    anchor = before[-1]
    browser.execute_script(
        "document.querySelector(`#home .card[data-item-id='${arguments[0]}'] button.cart`).click()",
        anchor,
    )
    _wait(
        browser,
        lambda d: d.execute_script("return window.recsysDemo.state.anchors").count(anchor) == 1,
    )
    _wait(browser, lambda d: [c["id"] for c in _cards(d)] != before, what="a new list")


def test_problems_and_network_errors_show_as_messages(browser, demo_server, clean_rules):
    _open(browser, demo_server)
    # 422: a diversity cap above the server's k limit
    _submit(browser, "cap-form", **{"cap-tag": "style:basic", "cap-n": 500})
    _wait(browser, lambda d: "422" in _status(d, "home-status"), what="the 422 message")
    assert "max_per_tag" in _status(browser, "home-status")
    _submit(browser, "cap-form", **{"cap-tag": "style:basic", "cap-n": 0})
    _wait(browser, lambda d: "items from snapshot" in _status(d, "home-status"))
    # the network goes away: the page says so and keeps working when it comes back
    browser.set_network_conditions(offline=True, latency=0, throughput=0)
    try:
        browser.execute_script("document.querySelector('#home .card button.buy').click()")
        _wait(browser, lambda d: "Network error" in _status(d, "events-status"))
    finally:
        browser.delete_network_conditions()
    browser.execute_script("document.querySelector('#home .card button.buy').click()")
    _wait(
        browser,
        lambda d: d.find_elements("css selector", "#events li.event[data-event-type=purchase]"),
        what="the purchase after the network came back",
    )


def test_a_rate_limited_page_says_when_to_retry(browser, demo_instance):
    """A server allowing a burst of 6 requests per token, then one every 10 s (one worker: one
    limiter). The page's load and its clicks use the burst; the click after it gets the 429."""
    with serve_demo(demo_instance, workers=1, RECSYS_RATE_LIMIT="6/60") as server:
        _open(browser, server)
        for _ in range(8):  # each toggle asks for the list again
            browser.execute_script("document.getElementById('why').click()")
            if "429" in _status(browser, "home-status"):
                break
            _wait(browser, lambda d: "loading" not in _status(d, "home-status"))
        _wait(browser, lambda d: "429" in _status(d, "home-status"), what="the 429 message")
        text = _status(browser, "home-status")
        assert "Too many requests" in text and "retry in" in text
        assert len(_cards(browser)) == K  # the last list stays
